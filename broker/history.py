"""dom0's own record of every install it made (get-history): when, in which qube, which
device, from which version to which, the cab's sha256 and remote, and how it ended.

dom0 keeps it rather than asking the daemons: it is what dom0 decided and sent, it
survives a sys-usb that is rebuilt from its template at every boot, and no qube can
write to it. One JSON line per install, appended under a lock; the oldest lines go
once the file passes its cap, so a machine updated for years keeps a bounded file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any

from broker.config import Paths
from broker.transfer import flocked, write_atomic

SUCCESS, NEEDS_REBOOT, FAILED = "success", "needs-reboot", "failed"
# FwupdUpdateState, as fwupdmgr --json prints a history entry's "UpdateState"
UPDATE_STATES = {SUCCESS: 2, FAILED: 3, NEEDS_REBOOT: 4}
_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Event:
    time: str  # ISO 8601, UTC
    qube: str
    device_id: str
    device_name: str
    version_old: str
    version_new: str
    appstream_id: str
    remote_id: str
    sha256: str
    result: str  # SUCCESS, NEEDS_REBOOT or FAILED
    error: str = ""

    @property
    def epoch(self) -> int:
        return int(datetime.fromisoformat(self.time).timestamp())

    def dbus_form(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The device and release a{sv} of fwupd's own history entry for this install."""
        device: dict[str, Any] = {
            "DeviceId": self.device_id, "Name": self.device_name, "Version": self.version_old,
            "Created": self.epoch, "Modified": self.epoch,
            "UpdateState": UPDATE_STATES[self.result],
        }  # fmt: skip
        if self.error:
            device["UpdateError"] = self.error
        release = {"AppstreamId": self.appstream_id, "Version": self.version_new,
                   "RemoteId": self.remote_id, "Checksum": self.sha256}  # fmt: skip
        return device, release


class History:
    def __init__(self, paths: Paths) -> None:
        self.file = paths.manager_dir / "history.jsonl"
        # a line that cannot be read (a write cut by power loss): skipped, and counted
        self.skipped = 0

    def append(self, event: Event) -> None:
        # trimming replaces the history file: the lock is a file of its own
        with flocked(self.file.with_suffix(".lock")):
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(self.file, flags, 0o640)
            with os.fdopen(fd, "ab") as f:
                f.write(json.dumps(asdict(event)).encode() + b"\n")
            if self.file.stat().st_size > _MAX_BYTES:
                kept = self.file.read_bytes().splitlines(keepends=True)
                write_atomic(self.file, b"".join(kept[len(kept) // 2 :]))

    def events(self) -> list[Event]:
        """Oldest first."""
        try:
            lines = self.file.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        names = {f.name for f in fields(Event)}
        out = []
        for line in lines:
            try:
                doc = json.loads(line)
                event = Event(**{k: str(v) for k, v in doc.items() if k in names})
                event.epoch  # noqa: B018  a time that does not parse is a bad line too
            except (ValueError, TypeError, AttributeError):
                self.skipped += 1
                continue
            if event.result in UPDATE_STATES:
                out.append(event)
            else:
                self.skipped += 1
        return out


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
