"""The sandbox's qrexec daemon: the stand-in for Xen's vchan and dom0's qrexec-daemon.

It listens on one socket per qube (``vm/<qube>/run/qubes-fwupd/qrexec.sock``); the socket a
request arrives on *is* the caller's identity, as the vchan is in Qubes, so a qube cannot
claim to be another. Per request it follows real qrexec (shared/QUBES.md): service names
cleaned to ``A-Za-z0-9_.-+``, a missing argument becomes ``+``, calls from dom0 skip
policy, other calls are evaluated against ``policy.d`` (a syntax error denies all), a
refusal is "Request refused" on the caller's stderr and exit 126, a missing service 127,
a target marked halted (:meth:`Sandbox.halted_file`: it cannot start) one line and exit 1,
as qvm-run. A target that is only shut down (:meth:`Sandbox.stopped_file`) is started
first, as qrexec starts a halted target unless the policy says autostart=no (then the
call is refused) and as qvm-run does for dom0's calls. The service runs in the target
qube through the launcher, as the user qrexec runs it as there, with QREXEC_* set by us,
and the caller's own stdin/stdout/stderr (received over SCM_RIGHTS) as its channel.

dom0's admin tools (qvm-check, qvm-start, qvm-shutdown; broker/sandbox/qrexec_client.py)
send {"admin": "check"|"start"|"shutdown", "qube": NAME} with no fds, and get back
{"exit": N} with "error" (the line for the tool's stderr) or "running". Only a request on
dom0's socket acts: from any other qube it is refused, as qrexec's default policy refuses
a VM's admin.* calls. The emulation cannot stop a qube's processes: its power state is the
two marker files, and running means neither exists.
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
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from broker.errors import EXIT_QREXEC_NO_SERVICE, EXIT_QREXEC_PROBLEM, EXIT_QREXEC_REFUSED
from broker.sandbox.launcher import QUBES, Launcher, Sandbox
from broker.sandbox.policy import Policy, PolicyError, QubeInfo, Request

_SERVICE_CHARS = re.compile(r"[^A-Za-z0-9_.+-]")
_TARGET_CHARS = re.compile(r"[^A-Za-z0-9_.@:-]")
MAX_REQUEST = 65536
ADMIN_ACTIONS = ("check", "start", "shutdown")


class Daemon:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.launcher = Launcher(sandbox)
        self.log_lock = threading.Lock()
        # one power change at a time: a check-then-act on the marker files is not atomic
        self.power_lock = threading.Lock()

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

    # ------------------------------------------------------------------ power state
    def is_running(self, qube: str) -> bool:
        if qube == "dom0":
            return True
        return not (
            self.sandbox.halted_file(qube).exists() or self.sandbox.stopped_file(qube).exists()
        )

    def system(self) -> dict[str, QubeInfo]:
        """The qubes as the policy sees them, each running or not as its markers say."""
        return {
            name: replace(info, running=self.is_running(name), tags=info.tags | self.tags(name))
            for name, info in QUBES.items()
        }

    def tags(self, qube: str) -> frozenset[str]:
        """Tags added since `up`, as `qvm-tags QUBE add TAG` adds them (a test's)."""
        try:
            return frozenset(self.sandbox.tags_file(qube).read_text().split())
        except FileNotFoundError:
            return frozenset()

    def autostart(self, source: str, target: str, call: str) -> None:
        """Start a shut-down target for a call the caller may make (qrexec's autostart)."""
        with self.power_lock:
            try:
                self.sandbox.stopped_file(target).unlink()
            except FileNotFoundError:
                return
        self.log(f"started {target} for {source} -> {target} {call}")

    def admin(self, source: str, untrusted: dict[str, object]) -> dict[str, object]:
        """One admin request: the reply for the tool (broker/sandbox/qrexec_client.py)."""
        action = _TARGET_CHARS.sub("_", str(untrusted.get("admin")))[:63]
        qube = _TARGET_CHARS.sub("_", str(untrusted.get("qube")))[:63]
        what = f"admin {source} {action} {qube}"
        if source != "dom0":
            # real qrexec: admin.* calls from a VM are denied by the default policy
            self.log(f"deny {what}: only dom0 may use the admin API")
            return {"exit": EXIT_QREXEC_REFUSED, "error": "Request refused"}
        if action not in ADMIN_ACTIONS:
            self.log(f"bad request from {source}: unknown admin action {action!r}")
            return {"exit": EXIT_QREXEC_PROBLEM, "error": f"unknown admin action {action!r}"}
        if qube == "@adminvm":
            qube = "dom0"
        if qube not in QUBES:
            self.log(f"{what}: no such domain")
            return {"exit": 1, "error": f"{qube}: no such domain"}
        with self.power_lock:
            code, outcome, error = self._power(action, qube, untrusted.get("skip_if_running"))
        self.log(f"{what}: {outcome}")
        if action == "check":
            return {"exit": code, "running": code == 0}
        return {"exit": code, **({"error": error} if error else {})}

    def _power(self, action: str, qube: str, skip_if_running: object) -> tuple[int, str, str]:
        """(exit, what the log says, the line for stderr) of one admin action, under the
        power lock."""
        halted = self.sandbox.halted_file(qube).exists()
        stopped = self.sandbox.stopped_file(qube)
        running = self.is_running(qube)
        if action == "check":
            return (0, "running", "") if running else (1, "not running", "")
        if action == "start":
            if running:
                if skip_if_running is True:
                    return 0, "ok (already running)", ""
                return 1, "failed (already running)", f"{qube}: domain is already running"
            if halted:
                return 1, "failed (halted)", f"{qube}: could not be started (sandbox: halted)"
            stopped.unlink(missing_ok=True)
            return 0, "ok", ""
        if qube == "dom0":
            return 1, "failed (dom0)", "dom0: cannot be shut down"
        if not running:
            return 0, "ok (already halted)", ""
        stopped.parent.mkdir(parents=True, exist_ok=True)
        stopped.touch()
        return 0, "ok", ""

    # ------------------------------------------------------------------ calls
    def decide(self, source: str, target: str, service: str, arg: str) -> tuple[str | None, str]:
        if source == "dom0":
            # dom0's calls are not subject to policy in Qubes
            resolved = "dom0" if target in ("dom0", "@adminvm") else target
            return (resolved if resolved in QUBES and resolved != "dom0" else None), "dom0 call"
        try:
            policy = Policy.from_dir(self.sandbox.policy_dir)
        except PolicyError as e:
            return None, f"policy error, every call denied: {e}"
        # a target that is not running is refused here when its rule says autostart=no
        decision = policy.evaluate(Request(service, arg, source, target), self.system())
        return (decision.target if decision.allowed else None), decision.reason

    def handle(self, conn: socket.socket, source: str) -> None:
        fds: list[int] = []
        try:
            msg, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 3)
            untrusted = json.loads(msg)
            if isinstance(untrusted, dict) and "admin" in untrusted:
                conn.sendall(json.dumps(self.admin(source, untrusted)).encode())
                return
            if len(fds) != 3:
                conn.sendall(json.dumps({"exit": EXIT_QREXEC_PROBLEM}).encode())
                return
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
            # shut down, not halted: started for the call, as qrexec does when the policy
            # allowed it with autostart (its default) and as qvm-run does for dom0
            self.autostart(source, resolved, f"{service}+{arg}")
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
