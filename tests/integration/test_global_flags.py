"""fwupdmgr's global flags on the sandbox's real daemons and UpdateVM, progress on a
terminal through a slow LVFS, and Ctrl-C during a download: the UpdateVM's download
stops too, and nothing reaches dom0."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from broker.sandbox.launcher import Sandbox
from broker.sandbox.mirror import rate_file
from tests.sandbox_helpers import (
    WEBCAM_GUID,
    _manager_command,
    manager,
    processes_mentioning,
    qube_paths,
    webcam_version,
)

pytestmark = pytest.mark.sandbox

CAB = "fakedevice124.cab"  # 4,955 bytes: the webcam's 1.2.4


@pytest.fixture
def behind(sandbox: Sandbox) -> Iterator[Sandbox]:
    """Metadata loaded and sys-usb's webcam at 1.2.3, so 1.2.4 must be fetched; the LVFS
    fast again afterwards."""
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    if webcam_version(sandbox, "sys-usb") != "1.2.3":
        r = manager(sandbox, "install", "-y", f"sys-usb:{WEBCAM_GUID}", "1.2.3")
        assert r.returncode == 0, r.stdout + r.stderr
    manager(sandbox, "clean")  # the 1.2.4 cab must come through the UpdateVM
    try:
        yield sandbox
    finally:
        rate_file(sandbox.lvfs_dir).unlink(missing_ok=True)


def _slow_lvfs(sandbox: Sandbox, bytes_per_second: int) -> None:
    rate_file(sandbox.lvfs_dir).write_text(str(bytes_per_second))


def _on_a_terminal(sandbox: Sandbox, *args: str) -> tuple[int, str, str]:
    """qubes-fwupdmgr with stderr on a pty (as an admin sees it), stdout piped."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(**{**_manager_command(sandbox, args), "stdout": subprocess.PIPE,
                               "stderr": slave})  # fmt: skip
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            pytest.fail("qubes-fwupdmgr hung")
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the last writer closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    out = proc.stdout.read() if proc.stdout else ""
    return proc.wait(30), out, seen.decode("utf-8", "replace")


def test_a_slow_download_shows_bytes_rate_and_time_left_on_a_terminal(behind: Sandbox) -> None:
    _slow_lvfs(behind, 1500)  # about 3 s for the cab
    code, out, terminal = _on_a_terminal(behind, "update", "-y", f"sys-usb:{WEBCAM_GUID}")
    assert code == 0, out + terminal
    assert f"Downloading {CAB} through sys-firewall" in out
    steps = [s for s in terminal.replace("\r", "\n").split("\n") if CAB in s]
    assert len(steps) >= 3, terminal  # it moved while it ran
    assert any("s left" in s and "/4.8 KiB at " in s for s in steps), steps
    assert f"sys-firewall: {CAB} 4.8 KiB/4.8 KiB at " in steps[-1], steps  # and it ended
    assert webcam_version(behind, "sys-usb") == "1.2.4"


def test_no_progress_with_json_or_quiet_or_off_a_terminal(behind: Sandbox) -> None:
    code, out, terminal = _on_a_terminal(behind, "get-updates", "--json")
    assert code == 0 and json.loads(out)["Devices"], out + terminal
    assert terminal == ""
    r = manager(behind, "update", "-y", "-q", f"sys-usb:{WEBCAM_GUID}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == r.stderr == ""  # done, and nothing to say about it
    assert webcam_version(behind, "sys-usb") == "1.2.4"


def _ctrl_c_allowed() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_a_download_stops_the_updatevm_and_stores_nothing(
    behind: Sandbox,
) -> None:
    _slow_lvfs(behind, 400)  # more than 12 s for the cab
    dom0 = qube_paths(behind, "dom0")
    updatevm = qube_paths(behind, "sys-firewall")
    # a shell's background job starts with SIGINT ignored, and children inherit that:
    # as at a terminal, Ctrl-C must reach the run
    proc = subprocess.Popen(**{**_manager_command(behind, ("update", "-y", WEBCAM_GUID)),
                               "stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
                               "start_new_session": True,
                               "preexec_fn": _ctrl_c_allowed})  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    assert line.startswith(f"Downloading {CAB}"), line
    deadline = time.monotonic() + 15
    while not processes_mentioning("qubes.FwupdDownload") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning("qubes.FwupdDownload"), "the download never started"
    time.sleep(1.5)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    code = proc.wait(30)
    err = proc.stderr.read()
    assert code == 130, err
    assert err.strip().splitlines() == ["qubes-fwupdmgr: interrupted"], err
    deadline = time.monotonic() + 10
    while processes_mentioning("qubes.FwupdDownload") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_mentioning("qubes.FwupdDownload"), "the UpdateVM's download ran on"
    assert not any(dom0.cabs_dir.glob("*.cab")), "a cab reached dom0's cache"
    assert not list(dom0.sessions_dir.iterdir()), "a session was left open"
    assert not any(updatevm.download_dir.rglob("*")), "the UpdateVM kept a partial download"
    assert webcam_version(behind, "sys-usb") == "1.2.3"


def _ids(sandbox: Sandbox, *flags: str) -> list[str]:
    r = manager(sandbox, *flags, "get-devices", "--json")
    assert r.returncode == 0, r.stderr
    return [d["DeviceId"] for d in json.loads(r.stdout)["Devices"]]


def test_filter_and_the_get_upgrades_alias(behind: Sandbox) -> None:
    everything = _ids(behind)
    (webcam,) = [d for d in everything if d.startswith("08d460be")]
    # the webcam is updatable and not internal (and the sandbox has no internal device)
    assert webcam in _ids(behind, "--filter", "updatable")
    assert webcam in _ids(behind, "--filter=~internal,updatable")
    assert webcam not in _ids(behind, "--filter", "~updatable")
    assert webcam not in _ids(behind, "--filter", "internal")
    assert sorted(_ids(behind, "--filter", "~internal") + _ids(behind, "--filter", "internal")) \
        == sorted(everything)
    r = manager(behind, "get-devices", "--filter", "updateable")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == "qubes-fwupdmgr: --filter: unknown device flag 'updateable'"

    updates = manager(behind, "get-updates", "--json", WEBCAM_GUID)
    upgrades = manager(behind, "get-upgrades", "--json", WEBCAM_GUID)
    assert updates.returncode == upgrades.returncode == 0
    assert json.loads(updates.stdout) == json.loads(upgrades.stdout)
    r = manager(behind, "get-updates", "--filter", "~updatable")
    assert r.returncode == 2, r.stdout + r.stderr


def test_updatevm_for_one_run_and_verbose(behind: Sandbox) -> None:
    # work has the download service (for offline imports) but no network: the mirror is
    # on the UpdateVM's 127.0.0.1, not work's, and dom0 says so naming it
    r = manager(behind, "update", "-y", "--updatevm", "work", WEBCAM_GUID)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "qubes-fwupdmgr: work: qubes.FwupdDownload failed: qubes.FwupdDownload: 127.0.0.1: "
        "connection refused"
    )
    assert "Downloading fakedevice124.cab through work" in r.stdout
    assert not list(qube_paths(behind, "dom0").sessions_dir.iterdir())
    # sys-usb has no download service at all: exit 127 from qrexec, said in one line
    r = manager(behind, "refresh", "--updatevm", "sys-usb")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "qubes-fwupdmgr: sys-usb: service qubes.FwupdDownload is not installed"
    )
    r = manager(behind, "refresh", "--updatevm", "../dom0")
    assert r.returncode == 1 and "--updatevm" in r.stderr, r.stderr

    r = manager(behind, "get-devices", "-v")
    assert r.returncode == 0
    assert "qubes-fwupdmgr: qrexec call: qubes.FwupdUsbvm+GetDevices in sys-usb" in r.stderr
    assert "qrexec call" not in manager(behind, "get-devices").stderr
