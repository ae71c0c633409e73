"""`qubes-fwupdmgr status`: what the automated runs would meet, from dom0's own state
alone (no daemon and no qube is asked, and it never waits for the run lock): who holds
the lock, an inhibit file, the refresh backoff, what unattended.conf allows, what waits
for a person (the last get-updates --notify), installs pending a reboot, and each
remote's metadata age."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from broker import notify, runlock
from broker.backoff import Backoff
from broker.config import Config, Paths
from broker.errors import ConfigError, Inhibited
from broker.metadata import MetadataStore
from broker.notify import Waiting
from broker.reboots import Pending, PendingReboots
from broker.remotes import RemoteSwitches
from broker.runlock import Holder
from broker.sanitize import printable
from broker.unattended import UnattendedPolicy


@dataclass(frozen=True)
class RemoteAge:
    remote_id: str
    enabled: bool
    signed_at: str  # "" when never refreshed


@dataclass(frozen=True)
class Status:
    lock: Holder | None
    inhibited: str | None  # why, or None
    backoff: Backoff
    unattended: str  # what the policy allows, or why it does not load
    waiting: Waiting | None
    pending: tuple[Pending, ...]
    remotes: tuple[RemoteAge, ...]

    def lines(self, now: datetime) -> list[str]:
        """What status prints, each line printable: the state files it reads are in dirs
        the receive service (dom0's login user) may write to."""
        return [printable(line, 400) for line in self._lines(now)]

    def _lines(self, now: datetime) -> list[str]:
        lock = f"held by {self.lock}" if self.lock else "free"
        inhibit = printable(self.inhibited, 300) if self.inhibited else "none"
        out = [f"Run lock:    {lock}", f"Inhibit:     {inhibit}"]
        until = self.backoff.wait_until()
        if until is None:
            out.append("Refresh:     no failures in a row")
        else:
            when = datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%d %H:%M UTC")
            out.append(f"Refresh:     {self.backoff.failures} failed in a row (last: "
                       f"{printable(self.backoff.last_error, 200)}); the next unattended "
                       f"one after {when}")  # fmt: skip
        out.append(f"Unattended:  {printable(self.unattended, 300)}")
        if self.waiting is None:
            out.append("Waiting:     nothing (as of the last get-updates --notify)")
        else:
            w = self.waiting
            out.append(f"Waiting:     {len(w.updates)} updates since {w.since} (checked "
                       f"{w.checked})")  # fmt: skip
            out += [f"  {printable(u.name, 80)} [{u.qube}] {printable(u.version_old, 64)} -> "
                    f"{printable(u.version, 64)}" for u in w.updates]  # fmt: skip
        out.append(f"Pending:     {len(self.pending) or 'no'} installs waiting for a reboot")
        out += [f"  {printable(p.name, 80)} [{p.qube}] {printable(p.version, 64)}: {p.what}"
                for p in self.pending]  # fmt: skip
        for r in self.remotes:
            ago = notify.ago(r.signed_at, now)
            age = f"signed {r.signed_at} ({ago})" if ago is not None else "never"
            state = "" if r.enabled else " (disabled)"
            out.append(f"Metadata:    {r.remote_id}{state}: {age}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "Lock": None if self.lock is None else
            {"Pid": self.lock.pid, "Verb": self.lock.verb, "Since": int(self.lock.since)},
            "Inhibited": self.inhibited,
            "Backoff": {"Failures": self.backoff.failures,
                        "LastError": self.backoff.last_error,
                        "NextUnattendedRefresh": int(self.backoff.wait_until() or 0)},
            "Unattended": self.unattended,
            "Waiting": None if self.waiting is None else {
                "Since": self.waiting.since, "Checked": self.waiting.checked,
                "Updates": [{"Qube": u.qube, "DeviceId": u.device_id, "Name": u.name,
                             "VersionOld": u.version_old, "Version": u.version,
                             "Urgency": u.urgency, "RemoteId": u.remote_id}
                            for u in self.waiting.updates]},
            "Pending": [{"Qube": p.qube, "DeviceId": p.device_id, "Name": p.name,
                         "Version": p.version, "Since": p.since} for p in self.pending],
            "Remotes": [{"Id": r.remote_id, "Enabled": r.enabled, "Signed": r.signed_at}
                        for r in self.remotes],
        }  # fmt: skip


def gather(paths: Paths, config: Config) -> Status:
    try:
        runlock.check_inhibit(paths.root, config.inhibit_files)
        inhibited = None
    except Inhibited as e:
        inhibited = str(e)
    try:
        unattended = UnattendedPolicy.load(paths.unattended_file).summary()
    except ConfigError as e:
        unattended = f"unattended.conf does not load: {e}"
    store, off = MetadataStore(paths), RemoteSwitches(paths).disabled()
    remotes = tuple(
        RemoteAge(r.id, r.id not in off, (store.accepted(r.id) or {}).get("signed_at", ""))
        for r in config.remotes
    )
    return Status(
        runlock.holder(paths.run_lock), inhibited, Backoff.load(paths.refresh_backoff),
        unattended, Waiting.load(paths.updates_waiting), tuple(PendingReboots(paths).all()),
        remotes,
    )  # fmt: skip
