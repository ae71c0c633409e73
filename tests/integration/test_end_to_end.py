"""The whole path on real parts: UpdateVM download, dom0 verification, install by the
fwupd that owns the device."""

from __future__ import annotations

import json

import pytest

from broker.sandbox.launcher import Sandbox
from tests.sandbox_helpers import WEBCAM_GUID, manager, webcam_version

pytestmark = pytest.mark.sandbox


def test_refresh_then_update_goes_through_sys_usb(sandbox: Sandbox) -> None:
    assert webcam_version(sandbox, "sys-usb") == "1.2.2"
    assert webcam_version(sandbox, "dom0") == "1.2.2"

    # 2 when an earlier test already refreshed the shared sandbox: nothing new, as fwupdmgr
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stderr
    assert ("metadata for lvfs accepted" in r.stdout) == (r.returncode == 0)
    assert "sys-usb fwupd" in r.stdout

    r = manager(sandbox, "get-updates", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    webcams = [d for d in doc["Devices"] if WEBCAM_GUID in d["Guid"]]
    # both daemons report the webcam; it is USB, so it is sys-usb's alone
    assert [d["Qube"] for d in webcams] == ["sys-usb"]
    assert [rel["Version"] for rel in webcams[0]["Releases"]] == ["1.2.4", "1.2.3"]

    r = manager(sandbox, "update", "-y")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Installing on sys-usb" in r.stdout

    assert webcam_version(sandbox, "sys-usb") == "1.2.4"
    assert webcam_version(sandbox, "dom0") == "1.2.2"  # dom0's daemon never saw the cab
    log = (sandbox.log_dir / "qrexec.log").read_text()
    assert "allow dom0 -> sys-usb qubes.FwupdUsbvm+Install" in log
    assert "allow sys-firewall -> dom0 qubes.FwupdReceiveUpdates" in log

    # a second update finds nothing newer: exit 2, like fwupdmgr
    r = manager(sandbox, "update", "-y")
    assert r.returncode == 2, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("argv", "code", "line"),
    [
        (["update", "-y", "deadbeef"], 3,
         "qubes-fwupdmgr: no device matches 'deadbeef' (see get-devices)"),
        (["-y", "frobnicate"], 1, None),
        (["get-updates", "--no-such-flag"], 1, None),
    ],
)  # fmt: skip
def test_exit_codes_an_admin_can_script_against(
    sandbox: Sandbox, argv: list[str], code: int, line: str | None
) -> None:
    r = manager(sandbox, *argv)
    assert r.returncode == code, r.stdout + r.stderr
    (err,) = r.stderr.strip().splitlines()
    if line is not None:
        assert err == line
    assert r.stdout == ""
