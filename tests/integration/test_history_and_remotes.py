"""get-history, get-results/clear-results, an install the daemon refuses, and
get-remotes/enable-remote/disable-remote, on the sandbox's real daemons."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from broker.sandbox.launcher import Sandbox
from tests.sandbox_helpers import (
    WEBCAM_GUID,
    WEBCAM_ID,
    manager,
    plugin_knobs,
    qube_paths,
    tree_snapshot,
    webcam_version,
)

pytestmark = pytest.mark.sandbox

CAB_124 = "fakedevice124.cab"


def _history(sandbox: Sandbox) -> list[dict[str, Any]]:
    r = manager(sandbox, "get-history", "--json")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    devices: list[dict[str, Any]] = json.loads(r.stdout)["Devices"]
    return devices


def _install(sandbox: Sandbox, *args: str) -> subprocess.CompletedProcess[str]:
    r = manager(sandbox, *args, "-y")
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_every_install_dom0_makes_is_in_its_history(refreshed: Sandbox) -> None:
    sandbox = refreshed
    start = len(_history(sandbox))
    steps = [
        (("install", f"sys-usb:{WEBCAM_ID}", "1.2.3"), "1.2.3"),
        (("update", WEBCAM_GUID), "1.2.4"),
        (("downgrade", WEBCAM_ID), "1.2.3"),
        (("reinstall", WEBCAM_ID[:8]), "1.2.3"),
    ]
    for n, (args, version) in enumerate(steps, 1):
        before = webcam_version(sandbox, "sys-usb")
        _install(sandbox, *args)
        entries = _history(sandbox)
        assert len(entries) == start + n, args
        last = entries[-1]
        assert (last["Qube"], last["DeviceId"], last["Version"], last["UpdateState"]) == (
            "sys-usb", WEBCAM_ID, before, 2,
        ), args  # fmt: skip
        (release,) = last["Releases"]
        assert release["Version"] == version == webcam_version(sandbox, "sys-usb")
        assert release["RemoteId"] == "lvfs" and len(release["Checksum"][0]) == 64
    text = manager(sandbox, "get-history").stdout.strip().splitlines()
    assert text[-1].endswith("sys-usb  Integrated Webcam™ (08d460be0f1f)  1.2.3 -> 1.2.3  success")

    # the daemon's own record of the last update, then forgotten
    r = manager(sandbox, "get-results", WEBCAM_ID, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert (result["DeviceId"], result["Qube"], result["UpdateState"]) == (WEBCAM_ID, "sys-usb", 2)
    assert manager(sandbox, "get-results", WEBCAM_ID).stdout.strip() == (
        "Integrated Webcam™ [sys-usb] 1.2.3: success"
    )
    r = manager(sandbox, "clear-results", WEBCAM_ID)
    assert r.returncode == 0, r.stdout + r.stderr
    r = manager(sandbox, "get-results", WEBCAM_ID)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout.strip() == "Integrated Webcam™ [sys-usb] has no update results"


def test_an_install_the_daemon_refuses_is_a_failure_and_changes_nothing_else(
    refreshed: Sandbox,
) -> None:
    sandbox = refreshed
    if webcam_version(sandbox, "sys-usb") != "1.2.3":
        _install(sandbox, "install", WEBCAM_ID, "1.2.3")
    dom0 = qube_paths(sandbox, "dom0")
    start = len(_history(sandbox))
    pending = tree_snapshot(dom0.manager_dir / "pending-reboot.json")
    with plugin_knobs(sandbox, "sys-usb", WriteSupported="false"):
        r = manager(sandbox, "update", "-y", WEBCAM_ID)
    assert r.returncode == 1, r.stdout + r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("qubes-fwupdmgr: sys-usb: qubes.FwupdUsbvm+Install failed: "), line
    assert "fwupd refused" in line, line
    assert webcam_version(sandbox, "sys-usb") == "1.2.3"
    entries = _history(sandbox)
    assert len(entries) == start + 1
    assert (entries[-1]["UpdateState"], entries[-1]["Releases"][0]["Version"]) == (3, "1.2.4")
    assert "fwupd refused" in entries[-1]["UpdateError"]
    assert tree_snapshot(dom0.manager_dir / "pending-reboot.json") == pending
    # the cab dom0 verified stays cached for the next try; no session, nothing untrusted
    assert not list(dom0.sessions_dir.iterdir())
    assert not [p for p in dom0.untrusted_dir.iterdir()] if dom0.untrusted_dir.exists() else True
    r = manager(sandbox, "get-updates")  # still offered: nothing was installed
    assert r.returncode == 0 and "-> 1.2.4" in r.stdout, r.stdout + r.stderr


def _fwupdmgr_remote(sandbox: Sandbox) -> dict[str, Any]:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": sandbox.bus_address("dom0")}
    r = subprocess.run(["fwupdmgr", "--json", "get-remotes"], env=env, capture_output=True,
                       text=True, timeout=60, check=True)  # fmt: skip
    (lvfs,) = [x for x in json.loads(r.stdout)["Remotes"] if x["Id"] == "lvfs"]
    return lvfs


def test_remotes_are_listed_as_fwupdmgr_lists_them_and_can_be_switched(
    refreshed: Sandbox,
) -> None:
    sandbox = refreshed
    r = manager(sandbox, "get-remotes", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    (ours,) = json.loads(r.stdout)["Remotes"]
    theirs = _fwupdmgr_remote(sandbox)
    for key in set(ours) - {"FirmwareBaseUri"}:  # fwupd keeps that one in its own config
        assert type(ours[key]) is type(theirs[key]), key
    assert (ours["Id"], ours["Enabled"], ours["Flags"]) == ("lvfs", True, 1)
    assert ours["Mtime"] > 0  # the signing time of what dom0 accepted
    assert manager(sandbox, "get-remotes").stdout.startswith("lvfs: enabled, metadata signed ")

    r = manager(sandbox, "disable-remote", "lvfs")
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        assert manager(sandbox, "disable-remote", "lvfs").returncode == 2
        assert json.loads(manager(sandbox, "get-remotes", "--json").stdout)["Remotes"][0][
            "Enabled"] is False  # fmt: skip
        for verb in ("refresh", "get-updates", "update"):
            r = manager(sandbox, verb, "-y")
            assert r.returncode == 2, (verb, r.stdout + r.stderr)
            assert "very remote is disabled" in r.stdout + r.stderr, verb
            assert "Downloading" not in r.stdout
    finally:
        r = manager(sandbox, "enable-remote", "lvfs")
        assert r.returncode == 0, r.stdout + r.stderr
    assert manager(sandbox, "enable-remote", "lvfs").returncode == 2
    r = manager(sandbox, "enable-remote", "nope")
    assert r.returncode == 3 and "no remote 'nope' (configured: lvfs)" in r.stderr, r.stderr
