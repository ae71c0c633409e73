"""Detect-and-notify on the sandbox: `get-updates --notify` records what waits and sends a
notification that a real notification daemon (dunst, on the dom0 login user's session bus)
shows, and installs nothing."""

from __future__ import annotations

import json

import pytest

from broker.sandbox.desktop import Desktop, Notification
from broker.sandbox.launcher import Sandbox
from tests.sandbox_helpers import WEBCAM_ID, manager, qube_paths, webcam_version

pytestmark = pytest.mark.sandbox


def test_notify_tells_the_desktop_what_waits_and_installs_nothing(
    refreshed: Sandbox, desktop: Desktop
) -> None:
    sandbox = refreshed
    paths = qube_paths(sandbox, "dom0")
    r = manager(sandbox, "install", "-y", f"sys-usb:{WEBCAM_ID}", "1.2.3")
    assert r.returncode == 0, r.stdout + r.stderr
    history_before = paths.manager_dir.joinpath("history.jsonl").read_text()
    dom0_before = webcam_version(sandbox, "dom0")

    r = manager(sandbox, "get-updates", "--notify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Notified the desktop of uid {desktop.uid}: 1 firmware update waiting" in r.stdout
    assert "lvfs metadata signed " in r.stdout and "(0 days ago)" in r.stdout
    # nothing installed, nothing recorded as installed
    assert (webcam_version(sandbox, "sys-usb"), webcam_version(sandbox, "dom0")) == (
        "1.2.3", dom0_before,
    )  # fmt: skip
    assert paths.manager_dir.joinpath("history.jsonl").read_text() == history_before

    (shown,) = desktop.notifications()
    assert shown == Notification(
        "qubes-fwupd",
        "1 firmware update waiting",
        "Integrated Webcam™ [sys-usb]: 1.2.3 → 1.2.4, medium\n"
        "lvfs metadata signed 0 days ago\n"
        "Install with: qubes-fwupdmgr update",
        "NORMAL",
    )
    state = json.loads(paths.updates_waiting.read_text())
    assert [(u["qube"], u["version_old"], u["version"]) for u in state["updates"]] == [
        ("sys-usb", "1.2.3", "1.2.4")
    ]
    assert set(state["metadata_signed"]) == {"lvfs"}

    # status shows what waits, from that state
    r = manager(sandbox, "status")
    assert f"Waiting:     1 updates since {state['since']}" in r.stdout, r.stdout

    # once installed, nothing waits: no notification, no state
    r = manager(sandbox, "update", "-y")
    assert r.returncode == 0, r.stdout + r.stderr
    r = manager(sandbox, "get-updates", "--notify")
    assert (r.returncode, r.stdout) == (2, "No updates available\n"), r.stdout + r.stderr
    assert not paths.updates_waiting.exists()
    assert desktop.notifications() == [shown]  # still only the first


def test_without_a_desktop_session_notify_says_so_and_keeps_the_state(
    refreshed: Sandbox,
) -> None:
    sandbox = refreshed
    paths = qube_paths(sandbox, "dom0")
    r = manager(sandbox, "install", "-y", f"sys-usb:{WEBCAM_ID}", "1.2.3")
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        r = manager(sandbox, "get-updates", "--notify")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "No desktop session in dom0 to notify: 1 firmware update waiting" in r.stdout
        assert paths.updates_waiting.exists()
    finally:
        r = manager(sandbox, "update", "-y")
        assert r.returncode == 0, r.stdout + r.stderr
