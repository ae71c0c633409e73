"""How a call leaves this qube: dom0 calls a VM service with ``qvm-run --pass-io
--service``, a VM calls with ``qrexec-client-vm``. The sandbox puts both commands on its
qubes' PATH (its qrexec emulation's clients, which reach its daemon through the socket the
launcher names in QUBES_FWUPD_QREXEC_SOCKET). Everything above this module only sees
:func:`call`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from broker.errors import (
    EXIT_QREXEC_NO_SERVICE,
    EXIT_QREXEC_REFUSED,
    LimitExceeded,
    QrexecError,
)
from broker.sanitize import printable

_log = logging.getLogger("qubes-fwupd")
# progress lines one call may send: an honest one sends a few a second for the
# transfer deadline; a peer past this fails its call, as one past the output cap does
_MAX_LINES = 100_000


@dataclass(frozen=True)
class Transport:
    """Builds the argv of the qrexec client for one call."""

    kind: str  # "dom0" | "vm": who calls (the manager in dom0, a service in a VM)

    def argv(self, target: str, service: str) -> list[str]:
        if self.kind == "dom0":
            # dom0 -> VM calls are not subject to policy in Qubes; --no-autostart would
            # fail for a halted UpdateVM, which an admin expects to be started
            return ["qvm-run", "--pass-io", "--no-gui", "--service", "--", target, service]
        return ["qrexec-client-vm", "--", target, service]


FROM_DOM0 = Transport("dom0")
FROM_VM = Transport("vm")


@dataclass(frozen=True)
class CallResult:
    code: int
    stdout: bytes
    stderr: bytes

    def error_line(self) -> str:
        """The last non-empty stderr line of the other side, safe to print."""
        lines = [ln for ln in self.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
        return printable(lines[-1], 300) if lines else ""


def _drain(stream: IO[bytes], cap: int, out: list[bytes], over: list[bool]) -> None:
    total = 0
    while chunk := stream.read(65536):
        total += len(chunk)
        if total > cap:
            over.append(True)
            continue  # keep draining so the other side cannot block, but keep nothing more
        out.append(chunk)


def _lines(
    stream: IO[bytes], cap: int, on_line: Callable[[bytes], None], over: list[bool]
) -> None:
    """stdout as lines for ``on_line`` (progress), none kept: a line longer than ``cap``
    is an error, as too much output is in :func:`_drain`."""
    pending = b""
    budget = _MAX_LINES
    while chunk := stream.read1(65536):  # type: ignore[attr-defined]
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if len(pending) > cap:
            over.append(True)
            pending = b""
        for line in lines:
            budget -= 1
            if len(line) > cap or budget < 0:
                over.append(True)  # drained on, never handed over
                continue
            with contextlib.suppress(Exception):  # showing progress must never end a call
                on_line(line)


def call(
    transport: Transport,
    target: str,
    service: str,
    feed: Callable[[int], None] | None = None,
    max_stdout: int = 4 * 1024 * 1024,
    max_stderr: int = 64 * 1024,
    timeout: float = 1800.0,
    on_line: Callable[[bytes], None] | None = None,
) -> CallResult:
    """Run one qrexec call; ``feed`` writes our side of the data to the given fd. With
    ``on_line``, stdout is handed over line by line as it comes (each at most
    ``max_stdout`` bytes) and not kept."""
    _log.debug("qrexec call: %s in %s", service, target)
    proc = subprocess.Popen(
        transport.argv(target, service),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # its own process group: on timeout the client and anything it started go together
        start_new_session=True,
    )
    assert proc.stdin and proc.stdout and proc.stderr  # noqa: S101  all three are PIPE
    out: list[bytes] = []
    err: list[bytes] = []
    over_out: list[bool] = []
    over_err: list[bool] = []
    stdin = proc.stdin

    def feed_then_close() -> None:
        # the other side may stop reading early; its exit code then says why
        with contextlib.suppress(BrokenPipeError, OSError):
            if feed is not None:
                feed(stdin.fileno())
            stdin.close()

    # feeding runs in a thread too: a peer that stops reading must not block us past the
    # deadline (a pipe write blocks, and nothing else would time it out)
    threads = [
        threading.Thread(target=_drain, args=(proc.stdout, max_stdout, out, over_out))
        if on_line is None
        else threading.Thread(target=_lines, args=(proc.stdout, max_stdout, on_line, over_out)),
        threading.Thread(target=_drain, args=(proc.stderr, max_stderr, err, over_err)),
        threading.Thread(target=feed_then_close),
    ]
    deadline = time.monotonic() + timeout
    try:
        for t in threads:  # inside: a Ctrl-C while they start still ends the call
            t.daemon = True
            t.start()
        code = proc.wait(timeout=timeout)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise subprocess.TimeoutExpired(proc.args, timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise QrexecError(f"{service} in {target} did not finish in {timeout:.0f} s") from None
    except BaseException:
        # Ctrl-C (or any other way out): the call ends with us. Its own session does not
        # get the terminal's SIGINT, so without this the other qube's work (a download)
        # would run on; closing our end of the call is what stops the service there.
        _stop(proc)
        raise
    if over_out:
        raise LimitExceeded(f"{service} in {target} sent more than {max_stdout} bytes")
    return CallResult(code, b"".join(out), b"".join(err))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def check(result: CallResult, target: str, service: str) -> CallResult:
    """Turn a failed call into one clear line naming the qube and the cause."""
    if result.code == 0:
        return result
    if result.code == EXIT_QREXEC_REFUSED:
        raise QrexecError(f"{target}: call to {service} refused by qrexec policy", result.code)
    if result.code == EXIT_QREXEC_NO_SERVICE:
        raise QrexecError(f"{target}: service {service} is not installed", result.code)
    cause = result.error_line() or f"exit status {result.code}"
    raise QrexecError(f"{target}: {service} failed: {cause}", result.code)
