"""The sandbox's PID table: ``down`` stops exactly the processes that ``up`` started.

Each line is ``role qube pid starttime``. The start time (``/proc/PID/stat`` field 22) is
what makes a PID safe to signal later: a PID alone may have been recycled by then, and
the sandbox must never kill a stranger.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Recorded:
    role: str
    qube: str
    pid: int
    starttime: int  # /proc/PID/stat field 22, in clock ticks since boot

    def line(self) -> str:
        return f"{self.role} {self.qube} {self.pid} {self.starttime}\n"

    def __str__(self) -> str:
        return f"{self.qube}: {self.role} {self.pid}"


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, starttime) of a PID, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may itself contain spaces and parentheses
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


class ProcessTable:
    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, role: str, qube: str, pid: int) -> None:
        for word in (role, qube):
            if not word or any(c.isspace() for c in word):
                raise ValueError(f"role and qube must be single words, got {word!r}")
        stat = proc_stat(pid)
        if stat is None:
            raise ProcessLookupError(f"no process {pid} to record as {qube} {role}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one short write in append mode: lines of concurrent writers do not interleave
        with self.path.open("a") as f:
            f.write(Recorded(role, qube, pid, stat[1]).line())
            f.flush()

    def entries(self) -> list[Recorded]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            parts = line.split()
            # a torn last line (writer killed mid-write) is skipped, not fatal for `down`
            if len(parts) == 4 and parts[2].isdigit() and parts[3].isdigit():
                out.append(Recorded(parts[0], parts[1], int(parts[2]), int(parts[3])))
        return out

    def alive(self, entry: Recorded) -> bool:
        stat = proc_stat(entry.pid)
        return stat is not None and stat[0] != "Z" and stat[1] == entry.starttime

    def stop(self, entry: Recorded, timeout: float = 5.0) -> str:
        """SIGTERM, then SIGKILL after ``timeout``: "stopped", "killed", "gone" (not
        running, or a zombie) or "recycled" (the PID belongs to another process now)."""
        try:
            # a pidfd pins the process: once its start time matches, nothing signalled
            # through it can hit a process that reused the PID in between
            pidfd = os.pidfd_open(entry.pid)
        except ProcessLookupError:
            return "gone"
        try:
            stat = proc_stat(entry.pid)
            if stat is None:
                return "gone"
            if stat[1] != entry.starttime:
                return "recycled"
            if stat[0] == "Z":
                _reap(entry.pid)
                return "gone"
            result = "stopped"
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            if not _wait_exit(pidfd, timeout):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                _wait_exit(pidfd, 5.0)
                result = "killed"
            _reap(entry.pid)
            return result
        except ProcessLookupError:
            return "gone"
        finally:
            os.close(pidfd)

    def stop_all(
        self,
        qube: str | None = None,
        timeout: float = 5.0,
        roles: Collection[str] | None = None,
    ) -> list[str]:
        """Stop the recorded processes (of one qube, or all; of some roles, or all) newest
        first, so fwupd goes before the bus it is on; their lines leave the table."""
        entries = self.entries()
        report, keep = [], set()
        for i in reversed(range(len(entries))):
            entry = entries[i]
            if (qube is not None and entry.qube != qube) or (
                roles is not None and entry.role not in roles
            ):
                keep.add(i)
                continue
            try:
                report.append(f"{entry}: {self.stop(entry, timeout)}")
            except PermissionError as e:
                keep.add(i)
                report.append(f"{entry}: cannot stop: {e}")
        self._rewrite([e for i, e in enumerate(entries) if i in keep])
        return report

    def _rewrite(self, entries: list[Recorded]) -> None:
        if not entries:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(e.line() for e in entries))
        os.replace(tmp, self.path)


def _wait_exit(pidfd: int, timeout: float) -> bool:
    """True once the process has exited (a pidfd turns readable then, zombie or not)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if poller.poll(max(0, int(left * 1000))):
            return True
        if left <= 0:
            return False


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our own child, so it leaves no zombie;
    daemons started by an earlier `up` belong to PID 1, which reaps them itself."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
