"""qubes-fwupdmgr --json reads like fwupdmgr --json (issue 16): real ``fwupdmgr --json``
and ``qubes-fwupdmgr --json`` against the same daemon, sys-usb's real fwupd, which owns
the fake webcam. Every key fwupdmgr prints for a device or a release is in ours, with the
same JSON type and, where dom0 does not deliberately say otherwise, the same value; ours
adds "Qube". Every output validates against docs/qubes-fwupdmgr.schema.json.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from broker.config import Config
from broker.sandbox.launcher import Sandbox
from tests.sandbox_helpers import manager, qube_paths, webcam_version

pytestmark = pytest.mark.sandbox

WEBCAM_GUID = "b585990a-003e-5270-89d5-3705a17f9a43"
# what dom0 says in place of the daemon, on purpose (see the schema's "release")
DOM0S_WORD = {"Locations"}


def fwupdmgr(sandbox: Sandbox, qube: str, *args: str) -> tuple[int, Any]:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": sandbox.bus_address(qube)}
    r = subprocess.run(
        ["fwupdmgr", "--json", "--no-metadata-check", "--no-remote-check", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return r.returncode, json.loads(r.stdout)


def ours(sandbox: Sandbox, *args: str) -> tuple[int, Any]:
    r = manager(sandbox, "--json", *args)  # validates against the schema
    return r.returncode, json.loads(r.stdout)  # nothing but JSON on stdout


def json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", str: "string", list: "array", dict: "object",
            type(None): "null"}[type(value)]  # fmt: skip


def assert_like(theirs: dict[str, Any], mine: dict[str, Any], what: str) -> None:
    for key, value in theirs.items():
        assert key in mine, f"{what}: fwupdmgr prints {key!r}, we do not"
        assert json_type(mine[key]) == json_type(value), f"{what}: {key!r} has another type"
        if isinstance(value, list) and value and not isinstance(value[0], dict):
            assert {json_type(v) for v in mine[key]} == {json_type(v) for v in value}, key


@pytest.fixture(scope="module")
def refreshed(sandbox: Sandbox) -> Sandbox:
    """Metadata loaded, and the webcam with an update to show (earlier tests in the shared
    sandbox may have left it at a newer release: then it goes back to 1.2.3)."""
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    if webcam_version(sandbox, "sys-usb") not in ("1.2.2", "1.2.3"):
        r = manager(sandbox, "install", f"sys-usb:{WEBCAM_GUID}", "1.2.3", "-y")
        assert r.returncode == 0, r.stdout + r.stderr
    assert webcam_version(sandbox, "sys-usb") in ("1.2.2", "1.2.3")
    return sandbox


def _webcam(devices: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [d for d in devices if WEBCAM_GUID in d.get("Guid", [])]
    return found


def test_get_devices_has_every_key_and_type_fwupdmgr_prints(refreshed: Sandbox) -> None:
    code, theirs = fwupdmgr(refreshed, "sys-usb", "get-devices")
    assert code == 0
    mine_code, mine = ours(refreshed, "get-devices")
    assert mine_code == 0
    t, m = _webcam(theirs["Devices"]), _webcam(mine["Devices"])
    assert m["Qube"] == "sys-usb"
    assert_like(t, m, "device")
    for key in set(t) - {"Releases"}:
        assert m[key] == t[key], key  # the same daemon: the same values
    # the releases: ours are those dom0's catalog binds, each as fwupdmgr prints it
    assert t["Releases"] and m["Releases"]
    theirs_by_version = {r["Version"]: r for r in t["Releases"]}
    for release in m["Releases"]:
        their = theirs_by_version[release["Version"]]
        assert_like(their, release, f"release {release['Version']}")
        for key in set(their) - DOM0S_WORD:
            assert release[key] == their[key], (release["Version"], key)
        (url,) = release["Locations"]  # where dom0 has the UpdateVM fetch it from
        remote = Config.load(qube_paths(refreshed, "dom0")).remotes[0]
        base = remote.firmware_base_uri or remote.metadata_url.rsplit("/", 1)[0]
        assert url == f"{base.rstrip('/')}/{their['Filename']}", url


def test_get_updates_and_get_releases_are_shaped_as_fwupdmgrs(refreshed: Sandbox) -> None:
    code, theirs = fwupdmgr(refreshed, "sys-usb", "get-updates")
    assert code == 0, theirs
    mine_code, mine = ours(refreshed, "get-updates")
    assert mine_code == 0
    t, m = _webcam(theirs["Devices"]), _webcam(mine["Devices"])
    assert_like(t, m, "device")
    assert [r["Version"] for r in m["Releases"]] == [r["Version"] for r in t["Releases"]]
    for their, release in zip(t["Releases"], m["Releases"], strict=True):
        assert_like(their, release, "release")

    device_id = t["DeviceId"]
    code, theirs = fwupdmgr(refreshed, "sys-usb", "get-releases", device_id)
    assert code == 0
    mine_code, mine = ours(refreshed, "get-releases", device_id)
    assert mine_code == 0
    assert set(theirs) == set(mine) == {"Releases"}
    theirs_by_version = {r["Version"]: r for r in theirs["Releases"]}
    assert mine["Releases"]
    for release in mine["Releases"]:
        assert_like(theirs_by_version[release["Version"]], release, "release")


def test_failures_are_one_error_object_and_nothing_else(refreshed: Sandbox) -> None:
    code, theirs = fwupdmgr(refreshed, "sys-usb", "get-releases", "0" * 40)
    mine_code, mine = ours(refreshed, "get-releases", "0" * 40)
    assert mine_code == 3 and code != 0
    assert set(mine) == set(theirs) == {"Error"}
    assert_like(theirs["Error"], mine["Error"], "error")
    assert mine["Error"]["Domain"] == theirs["Error"]["Domain"] == "FwupdError"
    assert mine["Error"]["Code"] == theirs["Error"]["Code"]  # NotFound
