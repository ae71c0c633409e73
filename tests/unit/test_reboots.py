"""broker.reboots: installs that wait for a reboot, recorded in dom0 and settled by what the
daemons report; how each ended."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from broker.config import Paths
from broker.fwupd import FLAG_NEEDS_REBOOT, FLAG_SUPPORTED, FLAG_UPDATABLE, Device
from broker.metadata import Release
from broker.reboots import Pending, PendingReboots, outcome
from broker.routing import QubeDevice
from tests.unit.test_unattended import RELEASE


def qd(qube: str, version: str, needs_reboot: bool, device_id: str = "1" * 40) -> QubeDevice:
    flags = FLAG_UPDATABLE | FLAG_SUPPORTED | (FLAG_NEEDS_REBOOT if needs_reboot else 0)
    return QubeDevice(qube, Device(device_id, "Cam", version, (), "", (), "test", (), flags))


def _release(version: str) -> Release:
    return replace(RELEASE, version=version)


def test_a_record_stays_while_the_daemon_still_waits_and_goes_after(tmp_path: Path) -> None:
    reboots = PendingReboots(Paths(tmp_path))
    pending = reboots.record(qd("sys-usb", "1.2.3", True), _release("1.2.4"), "1.2.3")
    assert pending.what == "restart sys-usb"
    assert (pending.version_old, pending.sha256, pending.remote_id) == ("1.2.3", "a" * 64, "lvfs")
    dom0 = reboots.record(qd("dom0", "1.0", True, "2" * 40), _release("2.0"), "1.0")
    assert dom0.what == "reboot the machine"
    still, ended = reboots.settle([qd("sys-usb", "1.2.3", True)])
    assert (len(still), ended) == (2, [])  # dom0's: not listed now
    # sys-usb restarted: the device reports the version it was given
    still, ended = reboots.settle([qd("sys-usb", "1.2.4", False)])
    assert [p.qube for p in still] == ["dom0"]
    assert ended == [(pending, qd("sys-usb", "1.2.4", False).device)]
    # dom0's device no longer waits (reinstalled without a reboot)
    assert reboots.settle([qd("dom0", "1.0", False, "2" * 40)])[0] == []
    assert reboots.all() == []


def test_recording_a_device_again_replaces_its_record(tmp_path: Path) -> None:
    reboots = PendingReboots(Paths(tmp_path))
    reboots.record(qd("sys-usb", "1.2.2", True), _release("1.2.3"), "1.2.2")
    reboots.record(qd("sys-usb", "1.2.2", True), _release("1.2.4"), "1.2.2")
    assert [p.version for p in reboots.all()] == ["1.2.4"]


def test_a_record_written_before_the_history_fields_still_reads(tmp_path: Path) -> None:
    reboots = PendingReboots(Paths(tmp_path))
    reboots.file.parent.mkdir(parents=True)
    old = {"qube": "dom0", "device_id": "2" * 40, "name": "UEFI", "version": "2.0",
           "since": "2026-01-01T00:00:00+00:00"}  # fmt: skip
    reboots.file.write_text(json.dumps([old]))
    (p,) = reboots.all()
    assert (p.version, p.version_old, p.sha256) == ("2.0", "", "")


def test_how_a_pending_install_ended() -> None:
    usb = Pending("sys-usb", "1" * 40, "Cam", "1.2.4", "t", "1.2.3", "c", "lvfs", "a" * 64)
    cap = Pending("dom0", "2" * 40, "UEFI", "2.0", "t", "1.0", "c", "lvfs", "b" * 64)
    assert outcome(usb, qd("sys-usb", "1.2.4", False).device, None) == ""
    assert outcome(usb, qd("sys-usb", "1.2.2", False).device, {"UpdateState": 2}) == (
        "after sys-usb restarted the device runs 1.2.2, not 1.2.4: the update did not apply"
    )
    assert outcome(cap, qd("dom0", "1.0", False).device, None).startswith(
        "after the reboot the device runs 1.0, not 2.0"
    )
    # the daemon's own words, when it says the update failed (made printable)
    failed = {"UpdateState": 3, "UpdateError": "capsule \x1b[2Jnot applied"}
    assert outcome(cap, qd("dom0", "1.0", False).device, failed) == "capsule ?[2Jnot applied"
    # its version decides: a daemon that says failed for a device that runs the version
    assert outcome(cap, qd("dom0", "2.0", False).device, failed) == ""
