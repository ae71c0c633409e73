"""When a run may act.

One qubes-fwupdmgr at a time for what changes state (refresh, installs, remotes, clean):
the timer's run and an admin's never act at once. The second waits, up to the config's
``lock_wait_seconds``, then says who holds the lock. Read-only verbs never wait. And no
run refreshes or installs while an inhibit file of the config's exists
(:func:`check_inhibit`); one that is under way is never interrupted by it.

The lock is flock(2) on a file in a root-only dir, so it goes with its holder's process,
however that ends; the holder writes who it is into the file for the next one to read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from broker.errors import Busy, Inhibited
from broker.sanitize import printable

_POLL_SECONDS = 0.2
_HOLDER_MAX_BYTES = 4096


@dataclass(frozen=True)
class Holder:
    pid: int
    verb: str
    since: float  # seconds since the epoch

    def __str__(self) -> str:
        when = datetime.fromtimestamp(self.since, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"pid {self.pid}, {self.verb}, since {when}"

    @classmethod
    def read(cls, fd: int) -> Holder | None:
        """What the holder wrote, or None if it has not yet or it makes no sense."""
        try:
            doc = json.loads(os.pread(fd, _HOLDER_MAX_BYTES, 0))
            verb = str(doc["verb"])
            if not verb.replace("-", "").isalpha() or len(verb) > 32:
                return None
            return cls(int(doc["pid"]), verb, float(doc["since"]))
        except (OSError, ValueError, KeyError, TypeError, OverflowError):
            return None


@contextlib.contextmanager
def run_lock(
    path: Path,
    verb: str,
    wait_seconds: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[None]:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = clock() + wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if clock() >= deadline:
                    holder = Holder.read(fd)
                    who = f" ({holder})" if holder else ""
                    raise Busy(
                        f"another qubes-fwupdmgr is at work{who}; waited {wait_seconds:g} s "
                        "(lock_wait_seconds): try again when it has finished"
                    ) from None
                sleep(_POLL_SECONDS)
        me = {"pid": os.getpid(), "verb": verb, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)  # and with it the lock


def holder(path: Path) -> Holder | None:
    """Who holds the run lock now (status), without waiting or creating anything: None
    when nobody does. A holder that has not written itself yet reads as pid 0."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return Holder.read(fd) or Holder(0, "unknown", 0.0)
        return None  # free: our shared lock goes with the fd
    finally:
        os.close(fd)


def check_inhibit(root: Path, files: tuple[str, ...]) -> None:
    """Raise Inhibited, naming the file and its first line (the admin's reason), while
    one of ``files`` (absolute, under dom0's ``root``) exists."""
    for name in files:
        path = root / name.lstrip("/")
        try:
            with path.open("rb") as f:
                first = f.read(_HOLDER_MAX_BYTES).decode("utf-8", "replace").split("\n", 1)[0]
        except FileNotFoundError:
            continue
        except OSError as e:
            first = e.strerror or ""
        why = f" ({printable(first.strip(), 200)})" if first.strip() else ""
        raise Inhibited(f"inhibited by {name}{why}: nothing refreshed or installed; "
                        "remove it to go on")  # fmt: skip
