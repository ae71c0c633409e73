"""broker.reboots: installs that wait for a reboot, recorded in dom0 and settled by what the
daemons report."""

from __future__ import annotations

from pathlib import Path

from broker.config import Paths
from broker.fwupd import FLAG_NEEDS_REBOOT, FLAG_SUPPORTED, FLAG_UPDATABLE, Device
from broker.reboots import PendingReboots
from broker.routing import QubeDevice


def qd(qube: str, version: str, needs_reboot: bool, device_id: str = "1" * 40) -> QubeDevice:
    flags = FLAG_UPDATABLE | FLAG_SUPPORTED | (FLAG_NEEDS_REBOOT if needs_reboot else 0)
    return QubeDevice(qube, Device(device_id, "Cam", version, (), "", (), "test", (), flags))


def test_a_record_stays_while_the_daemon_still_waits_and_goes_after(tmp_path: Path) -> None:
    reboots = PendingReboots(Paths(tmp_path))
    pending = reboots.record(qd("sys-usb", "1.2.3", True), "1.2.4")
    assert pending.what == "restart sys-usb"
    assert reboots.record(qd("dom0", "1.0", True, "2" * 40), "2.0").what == "reboot the machine"
    assert len(reboots.settle([qd("sys-usb", "1.2.3", True)])) == 2  # dom0's: not listed now
    # sys-usb restarted: the device reports the version it was given
    assert [p.qube for p in reboots.settle([qd("sys-usb", "1.2.4", False)])] == ["dom0"]
    # dom0's device no longer waits (reinstalled without a reboot)
    assert reboots.settle([qd("dom0", "1.0", False, "2" * 40)]) == []
    assert reboots.all() == []


def test_recording_a_device_again_replaces_its_record(tmp_path: Path) -> None:
    reboots = PendingReboots(Paths(tmp_path))
    reboots.record(qd("sys-usb", "1.2.2", True), "1.2.3")
    reboots.record(qd("sys-usb", "1.2.2", True), "1.2.4")
    assert [p.version for p in reboots.all()] == ["1.2.4"]
