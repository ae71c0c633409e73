"""How a call leaves this qube: the transport seam, chosen once at start-up.

In Qubes, dom0 calls a VM service with ``qvm-run --pass-io --service`` and a VM calls with
``qrexec-client-vm``; in the sandbox, the launcher sets QUBES_FWUPD_QREXEC_SOCKET and a
small client hands our stdio to the emulated qrexec daemon. Everything above this module
only sees :func:`call`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from broker.errors import (
    EXIT_QREXEC_NO_SERVICE,
    EXIT_QREXEC_REFUSED,
    LimitExceeded,
    QrexecError,
)
from broker.sanitize import printable

SANDBOX_SOCKET_ENV = "QUBES_FWUPD_QREXEC_SOCKET"


@dataclass(frozen=True)
class Transport:
    """Builds the argv of the qrexec client for one call."""

    kind: str  # "dom0" | "vm" | "sandbox"

    def argv(self, target: str, service: str) -> list[str]:
        if self.kind == "dom0":
            # dom0 -> VM calls are not subject to policy in Qubes; --no-autostart would
            # fail for a halted UpdateVM, which an admin expects to be started
            return ["qvm-run", "--pass-io", "--no-gui", "--service", "--", target, service]
        if self.kind == "vm":
            return ["qrexec-client-vm", "--", target, service]
        return [sys.executable, "-m", "broker.sandbox.qrexec_client", target, service]


def transport_from_env() -> Transport:
    if os.environ.get(SANDBOX_SOCKET_ENV):
        return Transport("sandbox")
    if Path("/usr/share/qubes/marker-vm").exists():
        return Transport("vm")
    return Transport("dom0")


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


def call(
    transport: Transport,
    target: str,
    service: str,
    feed: Callable[[int], None] | None = None,
    max_stdout: int = 4 * 1024 * 1024,
    max_stderr: int = 64 * 1024,
    timeout: float = 1800.0,
) -> CallResult:
    """Run one qrexec call; ``feed`` writes our side of the data to the given fd."""
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
        threading.Thread(target=_drain, args=(proc.stdout, max_stdout, out, over_out)),
        threading.Thread(target=_drain, args=(proc.stderr, max_stderr, err, over_err)),
        threading.Thread(target=feed_then_close),
    ]
    for t in threads:
        t.daemon = True
        t.start()
    deadline = time.monotonic() + timeout
    try:
        code = proc.wait(timeout=timeout)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise subprocess.TimeoutExpired(proc.args, timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise QrexecError(f"{service} in {target} did not finish in {timeout:.0f} s") from None
    if over_out:
        raise LimitExceeded(f"{service} in {target} sent more than {max_stdout} bytes")
    return CallResult(code, b"".join(out), b"".join(err))


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
