"""Installs that wait for a reboot: which, and of what (the machine, or sys-usb).

fwupd stops offering a release whose install waits for a reboot (update state
needs-reboot), except for devices it does not track that way (its test plugin among
them); dom0 keeps its own record so that a pending release is never fetched and installed
again, whichever daemon owns the device. A record goes when the device reports the
version it was given or no longer waits for a reboot.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from broker.config import Paths
from broker.routing import DOM0, QubeDevice
from broker.transfer import write_atomic


@dataclass(frozen=True)
class Pending:
    qube: str
    device_id: str
    name: str
    version: str  # what was installed and waits
    since: str

    @property
    def what(self) -> str:
        return what_restarts(self.qube)


def what_restarts(qube: str) -> str:
    """What has to restart: dom0's devices need the machine, sys-usb's only sys-usb."""
    return "reboot the machine" if qube == DOM0 else f"restart {qube}"


class PendingReboots:
    def __init__(self, paths: Paths) -> None:
        self.file = paths.state_dir / "pending-reboot.json"

    def all(self) -> list[Pending]:
        try:
            doc = json.loads(self.file.read_text())
        except FileNotFoundError:
            return []
        return [Pending(**entry) for entry in doc]

    def _write(self, entries: list[Pending]) -> None:
        write_atomic(self.file, json.dumps([asdict(p) for p in entries], indent=1).encode())

    def record(self, qd: QubeDevice, version: str) -> Pending:
        pending = Pending(
            qd.qube,
            qd.device.device_id,
            qd.device.name,
            version,
            datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self._write([p for p in self.all() if (p.qube, p.device_id) != qd.key] + [pending])
        return pending

    def settle(self, devices: list[QubeDevice]) -> list[Pending]:
        """The records still pending, given what the daemons report now; the others go."""
        by_key = {qd.key: qd.device for qd in devices}
        recorded = self.all()
        still = []
        for p in recorded:
            device = by_key.get((p.qube, p.device_id))
            # a device not listed now (a qube unreachable) keeps its record
            if device is None or (device.needs_reboot and device.version != p.version):
                still.append(p)
        if len(still) != len(recorded):
            self._write(still)
        return still
