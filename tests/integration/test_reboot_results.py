"""An install that waits for a reboot, and the run after the reboot: dom0 collects how it
ended (the device's version now and its daemon's GetResults) into the history that
get-history reads. A restart of sys-usb's fwupd stands in for the reboot: the test
plugin's device comes back at 1.2.2, as a capsule that did not apply leaves the old
firmware."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from broker.sandbox import daemons
from broker.sandbox.cli import DEFAULT_CABS
from broker.sandbox.launcher import Launcher, Sandbox
from broker.sandbox.processes import ProcessTable
from tests.sandbox_helpers import WEBCAM_ID, manager, plugin_knobs, webcam_version

pytestmark = pytest.mark.sandbox
WEBCAM = f"sys-usb:{WEBCAM_ID}"


def _pending_install(sandbox: Sandbox, version: str) -> None:
    with plugin_knobs(sandbox, "sys-usb", NeedsReboot="true"):
        r = manager(sandbox, "install", "-y", WEBCAM, version)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "pending reboot (restart sys-usb)" in r.stdout
    r = manager(sandbox, "check-reboot-needed")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"[sys-usb] {version} waits: restart sys-usb" in r.stdout


def _restart_sys_usb(sandbox: Sandbox) -> None:
    daemons.restart_fwupd(sandbox, Launcher(sandbox), ProcessTable(sandbox.pids_file), "sys-usb")
    assert webcam_version(sandbox, "sys-usb") == "1.2.2"


def _last_event(sandbox: Sandbox) -> tuple[str, str, int, str]:
    r = manager(sandbox, "get-history", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    last = json.loads(r.stdout)["Devices"][-1]
    return last["Version"], last["Releases"][0]["Version"], last["UpdateState"], \
        last.get("UpdateError", "")  # fmt: skip


def test_a_pending_install_that_did_not_apply_is_collected_as_failed(refreshed: Sandbox) -> None:
    sandbox = refreshed
    r = manager(sandbox, "install", "-y", WEBCAM, "1.2.3")
    assert r.returncode == 0, r.stdout + r.stderr
    _pending_install(sandbox, "1.2.4")
    assert _last_event(sandbox)[:3] == ("1.2.3", "1.2.4", 4)  # needs-reboot, so far

    _restart_sys_usb(sandbox)  # the "reboot": the device still runs the old firmware
    r = manager(sandbox, "check-reboot-needed")
    assert (r.returncode, r.stdout) == (2, "No reboot is needed\n"), r.stdout + r.stderr
    assert r.stderr == (
        "qubes-fwupdmgr: warning: Integrated Webcam™ [sys-usb]: the pending install of 1.2.4 "
        "failed: after sys-usb restarted the device runs 1.2.2, not 1.2.4: the update did "
        "not apply (see get-history)\n"
    )
    assert _last_event(sandbox) == (
        "1.2.3", "1.2.4", 3,
        "after sys-usb restarted the device runs 1.2.2, not 1.2.4: the update did not apply",
    )  # fmt: skip
    # collected once: the next run says nothing more of it
    r = manager(sandbox, "check-reboot-needed")
    assert (r.returncode, r.stderr) == (2, ""), r.stdout + r.stderr


def test_a_pending_install_that_applied_is_collected_as_success(refreshed: Sandbox) -> None:
    sandbox = refreshed
    r = manager(sandbox, "install", "-y", WEBCAM, "1.2.3")
    assert r.returncode == 0, r.stdout + r.stderr
    _pending_install(sandbox, "1.2.4")
    _restart_sys_usb(sandbox)
    # the firmware "applied at boot": the device reports 1.2.4 before any run of ours
    # (sys-usb's fwupd given the LVFS-signed cab by plain fwupdmgr, as in the sandbox)
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": sandbox.bus_address("sys-usb")}
    done = subprocess.run(
        ["fwupdmgr", "install", "-y", "--no-reboot-check", str(DEFAULT_CABS[1]), WEBCAM_ID],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert webcam_version(sandbox, "sys-usb") == "1.2.4"
    r = manager(sandbox, "check-reboot-needed")  # any run that asks the daemons collects
    assert (r.returncode, r.stderr) == (2, ""), r.stdout + r.stderr
    assert _last_event(sandbox) == ("1.2.3", "1.2.4", 2, "")
