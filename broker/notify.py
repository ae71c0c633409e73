"""Detect-and-notify: what waits for a person, kept in a state file and told to whoever
sits at dom0's desktop. Nothing is installed in this mode.

A half-finished flash looks like a frozen machine and tempts a forced power-off, so some
admins want notice, not auto-apply: `get-updates --notify` (the timer's last step) writes
``updates-waiting.json`` (what waits, since when, urgency, the metadata's age) and sends
one desktop notification through org.freedesktop.Notifications to each desktop session
running in dom0.

A session bus only lets its own user in, so the notification goes from a forked child
that has dropped to that user (root's own uid never talks to a user's bus); the child
gets its text from us, never from the bus, and is killed if it hangs.
"""

from __future__ import annotations

import html
import json
import os
import pwd
import select
import signal
import stat
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from broker.errors import BrokerError
from broker.sanitize import printable
from broker.transfer import read_small, write_atomic

APP_NAME = "qubes-fwupd"
# the first uid of a person's account on Fedora and Debian: below it are system users,
# a display manager's greeter among them, which is nobody to tell
MIN_DESKTOP_UID = 1000
SEND_SECONDS = 10.0
_MAX_STATE_BYTES = 256 * 1024
_URGENCY_HINT = {"low": 0, "medium": 1, "high": 2, "critical": 2}  # the spec's byte


@dataclass(frozen=True)
class WaitingUpdate:
    qube: str
    device_id: str
    name: str
    version_old: str
    version: str
    urgency: str  # the LVFS's, "" when unset
    remote_id: str

    @property
    def key(self) -> tuple[str, str, str]:
        return self.qube, self.device_id, self.version


@dataclass(frozen=True)
class Waiting:
    """What updates-waiting.json holds: the updates that wait for a person, since when
    the oldest of them has waited, when that was last checked, and when each remote's
    metadata was signed."""

    since: str  # ISO 8601, UTC
    checked: str
    updates: tuple[WaitingUpdate, ...]
    metadata_signed: tuple[tuple[str, str], ...]  # (remote id, ISO 8601)

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["metadata_signed"] = dict(self.metadata_signed)
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def load(cls, path: Path) -> Waiting | None:
        """The recorded state, or None when there is none or it does not read (the next
        run writes a sound one)."""
        try:
            raw = read_small(path, _MAX_STATE_BYTES)
        except (OSError, BrokerError):
            return None
        try:
            doc = json.loads(raw)
            updates = tuple(WaitingUpdate(**{k: str(v) for k, v in u.items()})
                            for u in doc["updates"])  # fmt: skip
            signed = tuple((str(k), str(v)) for k, v in doc["metadata_signed"].items())
            return cls(str(doc["since"]), str(doc["checked"]), updates, signed)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None


def record(path: Path, updates: Sequence[WaitingUpdate], signed: dict[str, str],
           now: datetime) -> Waiting | None:  # fmt: skip
    """Write what waits now (None, and no file, when nothing does). An update that waited
    before keeps the time it was first seen: the state says how long it has waited."""
    if not updates:
        path.unlink(missing_ok=True)
        return None
    before = Waiting.load(path)
    stamp = now.isoformat(timespec="seconds")
    known = before is not None and {u.key for u in before.updates} & {u.key for u in updates}
    since = before.since if before is not None and known else stamp
    waiting = Waiting(since, stamp, tuple(updates), tuple(sorted(signed.items())))
    write_atomic(path, waiting.to_json())
    return waiting


def ago(signed_at: str, now: datetime) -> str | None:
    """How long ago an ISO 8601 time was, in whole days ("1 day ago", "3 days ago"); None
    when it does not parse. get-updates, status and the notification all say it so."""
    try:
        days = max(0, (now - datetime.fromisoformat(signed_at)).days)
    except (ValueError, TypeError):
        return None
    return f"{days} day{'s' if days != 1 else ''} ago"


def message(waiting: Waiting, now: datetime) -> tuple[str, str, int]:
    """The notification's summary, body and urgency hint (0 low, 1 normal, 2 critical)."""
    n = len(waiting.updates)
    summary = f"{n} firmware update{'s' if n != 1 else ''} waiting"
    lines = []
    for u in waiting.updates[:5]:
        urgency = f", {u.urgency}" if u.urgency else ""
        lines.append(f"{printable(u.name, 60)} [{u.qube}]: {printable(u.version_old, 32)} → "
                     f"{printable(u.version, 32)}{urgency}")  # fmt: skip
    if n > 5:
        lines.append(f"… and {n - 5} more")
    for remote, signed in waiting.metadata_signed:
        if (age := ago(signed, now)) is not None:
            lines.append(f"{remote} metadata signed {age}")
    lines.append("Install with: qubes-fwupdmgr update")
    hint = max(_URGENCY_HINT.get(u.urgency.lower(), 1) for u in waiting.updates)
    # every line made printable (the state file is in a dir the receive service may write
    # to), then escaped: the body is markup to most notification daemons (dunst, Plasma,
    # xfce4-notifyd), and a device name comes from sys-usb's fwupd, or the USB device
    body = "\n".join(printable(line, 300) for line in lines)
    return summary, html.escape(body, quote=False), hint


@dataclass(frozen=True)
class DesktopSession:
    uid: int
    gid: int
    bus: Path

    @property
    def address(self) -> str:
        return f"unix:path={self.bus}"


def desktop_sessions(root: Path) -> list[DesktopSession]:
    """Session buses of people logged in to dom0: ``/run/user/UID/bus``, where the dir is
    owned by UID (as logind makes it) and the bus is a socket of that user's."""
    out = []
    try:
        entries = sorted(os.scandir(root / "run/user"), key=lambda e: e.name)
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) < MIN_DESKTOP_UID:
            continue
        try:
            st_dir = entry.stat(follow_symlinks=False)
            bus = Path(entry.path) / "bus"
            st_bus = bus.lstat()
        except OSError:
            continue
        uid = int(entry.name)
        if (stat.S_ISDIR(st_dir.st_mode) and st_dir.st_uid == uid
                and stat.S_ISSOCK(st_bus.st_mode) and st_bus.st_uid == uid):  # fmt: skip
            out.append(DesktopSession(uid, _primary_gid(uid, st_dir.st_gid), bus))
    return out


def _primary_gid(uid: int, fallback: int) -> int:
    """The user's own group from the passwd database; where the user has no entry (the
    sandbox's dom0 user), the group of its runtime dir."""
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return fallback


async def _notify(address: str, summary: str, body: str, urgency: int) -> int:
    # imported here, in the child that sends: get-updates without --notify never needs it
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.constants import MessageType
    from dbus_next.message import Message
    from dbus_next.signature import Variant

    bus = await MessageBus(bus_address=address).connect()
    try:
        reply = await bus.call(Message(
            destination="org.freedesktop.Notifications",
            path="/org/freedesktop/Notifications",
            interface="org.freedesktop.Notifications",
            member="Notify",
            signature="susssasa{sv}i",
            body=[APP_NAME, 0, "software-update-available", summary, body, [],
                  {"urgency": Variant("y", urgency)}, -1],
        ))  # fmt: skip
    finally:
        bus.disconnect()  # type: ignore[no-untyped-call]
    if reply is None or reply.message_type != MessageType.METHOD_RETURN:
        return 1
    return 0


def send(session: DesktopSession, summary: str, body: str, urgency: int,
         timeout: float = SEND_SECONDS) -> str | None:  # fmt: skip
    """One notification to one session, from a child that runs as the session's user;
    None when it was delivered, else why not."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root for good, then talk to the user's bus
        code = 1
        try:
            # nothing of root's (the system bus connection to fwupd, the run lock, the
            # terminal) goes along: only the pipe to the parent
            os.closerange(0, write_end)
            os.closerange(write_end + 1, os.sysconf("SC_OPEN_MAX"))
            os.setgroups([])
            os.setgid(session.gid)
            os.setuid(session.uid)
            import asyncio

            code = asyncio.run(asyncio.wait_for(
                _notify(session.address, summary, body, urgency), timeout))  # fmt: skip
        except BaseException:  # noqa: S110  the parent says what failed
            pass
        finally:
            try:
                os.write(write_end, bytes([code]))
            finally:
                os._exit(code)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout + 1)
        answer = os.read(read_end, 1) if ready else b""
    finally:
        os.close(read_end)
    if not answer:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    if answer == b"\0":
        return None
    return "timed out" if not answer else "the notification daemon did not take it"


def now() -> datetime:
    return datetime.now(UTC)
