"""A composite device (a dock: a hub and its ports) whose parts one cab matches.

fwupd installs a cab on every device of the composite it matches, so the first install of
the run updates them all; asked again for the next part, it refuses ("already installed")
and `update -y` used to stop there with exit 1, leaving later devices not updated. Here
two more parts carry the webcam's GUID (fwupd's own Children and Guid quirks, on the test
plugin's composite) in sys-usb's fwupd.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.fwupd import FwupdClient
from broker.sandbox import daemons
from broker.sandbox.launcher import Launcher, Sandbox
from broker.sandbox.processes import ProcessTable
from tests.adversarial.hostile import publish_real
from tests.faults import Faults, ran
from tests.sandbox_helpers import WEBCAM_GUID, manager

pytestmark = pytest.mark.sandbox

MODULE1_GUID = "7fddead7-12b5-4fb9-9fa0-6d30305df755"  # the test plugin's composite child
QUIRK = "var/lib/fwupd/quirks.d/qubes-fwupd-composite.quirk"
PARTS = ("QUBESFWUPDTEST\\PORT_1", "QUBESFWUPDTEST\\PORT_2")


def _quirk() -> str:
    text = f"[{MODULE1_GUID}]\nChildren = {','.join(f'FuDevice|{p}' for p in PARTS)}\n"
    for i, part in enumerate(PARTS, 1):
        text += (f"\n[{part}]\nName = Dock port {i}\nFlags = updatable,unsigned-payload\n"
                 "VersionFormat = triplet\nVersion = 1.2.2\nProtocol = com.acme.test\n"
                 f"Guid = {WEBCAM_GUID}\n")  # fmt: skip
    return text


@pytest.fixture
def dock(faultbox: tuple[Sandbox, Faults]) -> Iterator[Sandbox]:
    sandbox, _ = faultbox
    launcher, table = Launcher(sandbox), ProcessTable(sandbox.pids_file)
    quirk = sandbox.root("sys-usb") / QUIRK
    quirk.parent.mkdir(parents=True, exist_ok=True)
    quirk.write_text(_quirk())
    daemons.write_fwupd_tree(sandbox, "sys-usb", {"CompositeChild": "true"})
    daemons.restart_fwupd(sandbox, launcher, table, "sys-usb")
    try:
        yield sandbox
    finally:
        quirk.unlink()
        daemons.write_fwupd_tree(sandbox, "sys-usb")
        daemons.restart_fwupd(sandbox, launcher, table, "sys-usb")


def _versions(sandbox: Sandbox) -> dict[str, str]:
    devices = FwupdClient(sandbox.bus_address("sys-usb")).get_devices()
    return {d.name: d.version for d in devices if WEBCAM_GUID in d.guids}


def test_parts_a_cab_already_updated_count_as_updated(dock: Sandbox) -> None:
    publish_real(dock)
    assert ran(manager(dock, "refresh")) is None
    before = _versions(dock)
    assert sorted(before.values()) == ["1.2.2"] * 3, before
    r = manager(dock, "update", "-y")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(_versions(dock).values()) == ["1.2.4"] * 3
    along = [ln for ln in r.stdout.splitlines() if "with an earlier device of this run" in ln]
    assert len(along) == 2, r.stdout
    history = manager(dock, "get-history")
    assert history.stdout.count("Dock port") >= 2, history.stdout
