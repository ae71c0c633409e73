"""Installs that wait for a reboot: which, and of what (the machine, or sys-usb).

fwupd stops offering a release whose install waits for a reboot (update state
needs-reboot), except for devices it does not track that way (its test plugin among
them); dom0 keeps its own record so that a pending release is never fetched and installed
again, whichever daemon owns the device. A record goes when the device reports the
version it was given or no longer waits for a reboot: then it has ended, and how
(:func:`outcome`) goes into dom0's history, so a capsule that did not apply after the
reboot is reported as failed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from broker.config import Paths
from broker.errors import BrokerError
from broker.fwupd import Device
from broker.metadata import Release
from broker.routing import DOM0, QubeDevice
from broker.sanitize import printable
from broker.transfer import flocked, read_small, write_atomic

_UPDATE_STATE_FAILED = 3  # FwupdUpdateState
_MAX_BYTES = 256 * 1024


@dataclass(frozen=True)
class Pending:
    qube: str
    device_id: str
    name: str
    version: str  # what was installed and waits
    since: str
    # what the history event of its end names (empty in records older than these fields)
    version_old: str = ""
    appstream_id: str = ""
    remote_id: str = ""
    sha256: str = ""

    @property
    def what(self) -> str:
        return what_restarts(self.qube)


def what_restarts(qube: str) -> str:
    """What has to restart: dom0's devices need the machine, sys-usb's only sys-usb."""
    return "reboot the machine" if qube == DOM0 else f"restart {qube}"


class PendingReboots:
    def __init__(self, paths: Paths) -> None:
        self.file = paths.manager_dir / "pending-reboot.json"
        self._lock = paths.manager_dir / "pending-reboot.lock"

    def all(self) -> list[Pending]:
        """The records; none when there is no file, or it does not read (a damaged record
        only stops dom0 offering that install again: fwupd's own state still does)."""
        try:
            doc = json.loads(read_small(self.file, _MAX_BYTES))
            return [Pending(**{k: str(v) for k, v in entry.items()}) for entry in doc]
        except (OSError, BrokerError, ValueError, TypeError, AttributeError, RecursionError):
            return []

    def _write(self, entries: list[Pending]) -> None:
        write_atomic(self.file, json.dumps([asdict(p) for p in entries], indent=1).encode())

    def record(self, qd: QubeDevice, release: Release, version_old: str) -> Pending:
        pending = Pending(
            qd.qube, qd.device.device_id, qd.device.name, release.version,
            datetime.now(UTC).isoformat(timespec="seconds"),
            version_old, release.component_id, release.remote_id, release.sha256,
        )  # fmt: skip
        with flocked(self._lock):
            self._write([p for p in self.all() if (p.qube, p.device_id) != qd.key] + [pending])
        return pending

    def settle(
        self, devices: list[QubeDevice]
    ) -> tuple[list[Pending], list[tuple[Pending, Device]]]:
        """The records still pending, given what the daemons report now, and those that
        ended, each with its device as reported now; the ended ones go."""
        by_key = {qd.key: qd.device for qd in devices}
        # under the lock: a run that settles while another records must not drop that
        # record, and each ended one goes to exactly one run (which writes its history)
        with flocked(self._lock):
            still, ended = [], []
            for p in self.all():
                device = by_key.get((p.qube, p.device_id))
                # a device not listed now (a qube unreachable) keeps its record
                if device is None or (device.needs_reboot and device.version != p.version):
                    still.append(p)
                else:
                    ended.append((p, device))
            if ended:
                self._write(still)
        return still, ended


def outcome(p: Pending, device: Device, results: dict[str, Any] | None) -> str:
    """Why the pending install did not apply ("" when it did), from the device's version
    now (fwupd's own rule after a reboot) and its daemon's result of the update, whose
    error text, when it failed, says more than a version can."""
    if device.version == p.version:
        return ""
    if results and results.get("UpdateState") == _UPDATE_STATE_FAILED:
        error = results.get("UpdateError")
        if isinstance(error, str) and error.strip():
            return printable(error, 300)
    after = "the reboot" if p.qube == DOM0 else f"{p.qube} restarted"
    return (f"after {after} the device runs {printable(device.version, 64)}, not "
            f"{printable(p.version, 64)}: the update did not apply")  # fmt: skip
