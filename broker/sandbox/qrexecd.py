"""The sandbox's qrexec daemon: the stand-in for Xen's vchan and dom0's qrexec-daemon.

It listens on one socket per qube (``vm/<qube>/run/qubes-fwupd/qrexec.sock``); the socket a
request arrives on *is* the caller's identity, as the vchan is in Qubes, so a qube cannot
claim to be another. Per request it follows real qrexec (shared/QUBES.md): service names
cleaned to ``A-Za-z0-9_.-+``, a missing argument becomes ``+``, calls from dom0 skip
policy, other calls are evaluated against ``policy.d`` (a syntax error denies all), a
refusal is "Request refused" on the caller's stderr and exit 126, a missing service 127,
a target marked halted (:meth:`Sandbox.halted_file`) one line and exit 1, as qvm-run.
The service runs in the target qube through the launcher, as the user qrexec runs it as
there, with QREXEC_* set by us, and the caller's own stdin/stdout/stderr (received over
SCM_RIGHTS) as its channel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

from broker.errors import EXIT_QREXEC_NO_SERVICE, EXIT_QREXEC_PROBLEM, EXIT_QREXEC_REFUSED
from broker.sandbox.launcher import QUBES, Launcher, Sandbox
from broker.sandbox.policy import Policy, PolicyError, Request

_SERVICE_CHARS = re.compile(r"[^A-Za-z0-9_.+-]")
_TARGET_CHARS = re.compile(r"[^A-Za-z0-9_.@:-]")
MAX_REQUEST = 65536


class Daemon:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.launcher = Launcher(sandbox)
        self.log_lock = threading.Lock()

    def log(self, text: str) -> None:
        with self.log_lock, (self.sandbox.log_dir / "qrexec.log").open("a") as f:
            f.write(f"{datetime.now(UTC).isoformat(timespec='milliseconds')} {text}\n")

    def find_service(self, qube: str, service: str, arg: str) -> Path | None:
        """`SERVICE+ARG` first, then `SERVICE`; executables only (real qrexec: 125/127)."""
        rpc = self.sandbox.rpc_dir(qube)
        for name in (f"{service}+{arg}", service):
            path = rpc / name
            if path.exists() and os.access(path, os.X_OK):
                return path
        return None

    def decide(self, source: str, target: str, service: str, arg: str) -> tuple[str | None, str]:
        if source == "dom0":
            # dom0's calls are not subject to policy in Qubes
            resolved = "dom0" if target in ("dom0", "@adminvm") else target
            return (resolved if resolved in QUBES and resolved != "dom0" else None), "dom0 call"
        try:
            policy = Policy.from_dir(self.sandbox.policy_dir)
        except PolicyError as e:
            return None, f"policy error, every call denied: {e}"
        decision = policy.evaluate(Request(service, arg, source, target), QUBES)
        return (decision.target if decision.allowed else None), decision.reason

    def handle(self, conn: socket.socket, source: str) -> None:
        fds: list[int] = []
        try:
            msg, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 3)
            if len(fds) != 3:
                conn.sendall(json.dumps({"exit": EXIT_QREXEC_PROBLEM}).encode())
                return
            untrusted = json.loads(msg)
            target = _TARGET_CHARS.sub("_", str(untrusted["target"]))[:63]
            full = _SERVICE_CHARS.sub("_", str(untrusted["service"]))
            if not full or full.startswith("+"):
                raise ValueError("empty service name")
            service, _, arg = full.partition("+")
            resolved, reason = self.decide(source, target, service, arg)
            if resolved is None:
                self.log(f"deny {source} -> {target} {service}+{arg}: {reason}")
                os.write(fds[2], b"Request refused\n")
                conn.sendall(json.dumps({"exit": EXIT_QREXEC_REFUSED}).encode())
                return
            if self.sandbox.halted_file(resolved).exists():
                # as qvm-run fails for a qube that cannot start: one line, exit 1
                self.log(f"halted {source} -> {resolved} {service}+{arg}: {reason}")
                down = f"qrexec: {resolved} is not running and could not be started"
                os.write(fds[2], f"{down} (sandbox: halted)\n".encode())
                conn.sendall(json.dumps({"exit": 1}).encode())
                return
            path = self.find_service(resolved, service, arg)
            if path is None:
                self.log(f"no service {service}+{arg} in {resolved}")
                conn.sendall(json.dumps({"exit": EXIT_QREXEC_NO_SERVICE}).encode())
                return
            self.log(f"allow {source} -> {resolved} {service}+{arg}: {reason}")
            env = {
                "QREXEC_REMOTE_DOMAIN": source,
                "QREXEC_SERVICE_FULL_NAME": f"{service}+{arg}",
                "QREXEC_SERVICE_ARGUMENT": arg,
                "QREXEC_REQUESTED_TARGET_TYPE": "name" if resolved == "dom0" else "",
            }
            argv = [str(path), *([arg] if arg else [])]
            proc = self.launcher.popen_service(
                resolved, argv, env=env, stdin=fds[0], stdout=fds[1], stderr=fds[2]
            )
            # our copies must go, or the caller would never see EOF from the service
            for fd in fds:
                os.close(fd)
            fds = []
            code = proc.wait()
            self.log(f"done {source} -> {resolved} {service}+{arg}: exit {code}")
            conn.sendall(json.dumps({"exit": code}).encode())
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log(f"bad request from {source}: {type(e).__name__}: {e}")
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"exit": EXIT_QREXEC_PROBLEM}).encode())
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    def listen(self, qube: str) -> socket.socket:
        path = self.sandbox.qrexec_socket(qube)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(16)
        return sock

    def serve(self) -> None:
        sockets = {qube: self.listen(qube) for qube in QUBES}
        for qube, sock in sockets.items():
            threading.Thread(target=self._accept_loop, args=(sock, qube), daemon=True).start()
        (self.sandbox.dir / "qrexecd.ready").write_text(str(os.getpid()))
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait()
        for qube, sock in sockets.items():
            sock.close()
            self.sandbox.qrexec_socket(qube).unlink(missing_ok=True)
        (self.sandbox.dir / "qrexecd.ready").unlink(missing_ok=True)

    def _accept_loop(self, sock: socket.socket, qube: str) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn, qube), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sandbox qrexec daemon")
    parser.add_argument("--dir", required=True, type=Path)
    args = parser.parse_args(argv)
    Daemon(Sandbox(args.dir.resolve())).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
