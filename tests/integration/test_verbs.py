"""The manager's verbs beyond update, on the sandbox's real daemons: get-releases, install
a chosen version, downgrade (allow-older), reinstall (allow-reinstall), device selectors.
Each goes through the owning fwupd's offers and dom0's catalog, as update does."""

from __future__ import annotations

import json

import pytest

from broker.sandbox.launcher import Sandbox
from tests.sandbox_helpers import WEBCAM_GUID, WEBCAM_ID, manager, plugin_knobs, webcam_version

pytestmark = pytest.mark.sandbox



def test_get_releases_lists_what_the_owner_offers_and_dom0_holds(refreshed: Sandbox) -> None:
    r = manager(refreshed, "get-releases", WEBCAM_GUID.upper(), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    releases = json.loads(r.stdout)["Releases"]
    versions = [rel["Version"] for rel in releases]
    # the keys a fwupdmgr script reads (AppstreamId, not a name of our own)
    assert {rel["AppstreamId"] for rel in releases} == {"org.fwupd.fakedevice.firmware"}
    assert versions == ["1.2.4", "1.2.3"]  # newest first, by fwupd's version rules


def test_install_downgrade_reinstall_on_sys_usb(refreshed: Sandbox) -> None:
    sandbox = refreshed
    dom0_before = webcam_version(sandbox, "dom0")
    # a chosen version, whatever the webcam runs now (older: allow-older, same: reinstall)
    r = manager(sandbox, "install", "-y", f"sys-usb:{WEBCAM_ID[:8]}", "1.2.4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Installed Integrated Webcam" in r.stdout and "now 1.2.4" in r.stdout
    assert webcam_version(sandbox, "sys-usb") == "1.2.4"

    r = manager(sandbox, "downgrade", "-y", WEBCAM_ID)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "-> 1.2.3: now 1.2.3" in r.stdout
    assert webcam_version(sandbox, "sys-usb") == "1.2.3"

    r = manager(sandbox, "reinstall", "-y", WEBCAM_ID[:6])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1.2.3 -> 1.2.3: now 1.2.3" in r.stdout

    # back to the newest for whatever runs next, through plain update
    r = manager(sandbox, "update", "-y")
    assert r.returncode == 0, r.stdout + r.stderr
    assert webcam_version(sandbox, "sys-usb") == "1.2.4"
    assert webcam_version(sandbox, "dom0") == dom0_before  # dom0's copy never touched


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["install", "-y", WEBCAM_ID, "9.9.9"], 3, "no release 9.9.9"),
        (["reinstall", "-y", "dom0:" + WEBCAM_ID], 3, "no device matches"),
        (["get-releases", "ffff"], 3, "no device matches 'ffff'"),
        (["install", "-y", ""], 3, "no device matches ''"),
    ],
)
def test_what_cannot_be_found_says_so(
    refreshed: Sandbox, argv: list[str], code: int, needle: str | None
) -> None:
    r = manager(refreshed, *argv)
    assert r.returncode == code, r.stdout + r.stderr
    (line,) = r.stderr.strip().splitlines()
    if needle:
        assert needle in line, line


def test_an_install_that_waits_for_a_reboot_is_pending_and_not_offered_again(
    refreshed: Sandbox,
) -> None:
    sandbox = refreshed
    r = manager(sandbox, "install", "-y", f"sys-usb:{WEBCAM_ID}", "1.2.3")
    assert r.returncode == 0, r.stdout + r.stderr
    with plugin_knobs(sandbox, "sys-usb", NeedsReboot="true"):
        r = manager(sandbox, "update", "-y", WEBCAM_ID, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        (device,) = json.loads(r.stdout)["Devices"]  # and the steps went to stderr
        assert "1.2.3 -> 1.2.4: pending reboot (restart sys-usb); now 1.2.3" in r.stderr
        assert "To finish, restart sys-usb" in r.stderr
        # fwupd's own words for it: UpdateState 4 is needs-reboot, the release is 1.2.4
        assert (device["Qube"], device["Version"], device["UpdateState"]) == (
            "sys-usb", "1.2.3", 4,
        )  # fmt: skip
        assert [rel["Version"] for rel in device["Releases"]] == ["1.2.4"]
        # not offered again while it waits (fwupd's test plugin would offer it)
        r = manager(sandbox, "get-updates", "--json")
        assert r.returncode == 2, r.stdout + r.stderr
        r = manager(sandbox, "update", "-y")
        assert r.returncode == 2, r.stdout + r.stderr
        r = manager(sandbox, "check-reboot-needed")
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.strip() == "Integrated Webcam™ [sys-usb] 1.2.4 waits: restart sys-usb"
    # an explicit install is the admin's choice; done without a reboot, nothing waits
    r = manager(sandbox, "install", "-y", WEBCAM_ID, "1.2.4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "now 1.2.4" in r.stdout
    r = manager(sandbox, "check-reboot-needed")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout.strip() == "No reboot is needed"
