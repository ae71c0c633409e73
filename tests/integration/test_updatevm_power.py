"""The UpdateVM's power on the sandbox: a halted one is started for the run and shut down
again at its end, however the run ends; a running one is left running."""

from __future__ import annotations

import signal
import time

import pytest

from broker.sandbox.launcher import Sandbox
from broker.sandbox.mirror import rate_file
from tests.adversarial.hostile import publish_variant
from tests.sandbox_helpers import manager, start_manager

pytestmark = pytest.mark.sandbox


def _stop(sandbox: Sandbox, qube: str) -> None:
    marker = sandbox.stopped_file(qube)
    marker.parent.mkdir(exist_ok=True)
    marker.touch()


def test_a_halted_updatevm_is_started_for_the_run_and_shut_down_after(
    refreshed: Sandbox,
) -> None:
    sandbox = refreshed
    stopped = sandbox.stopped_file("sys-firewall")
    publish_variant(sandbox, "power")  # something new to fetch
    jcats = {jcat: jcat.read_bytes() for jcat in sandbox.lvfs_dir.glob("*.jcat")}
    _stop(sandbox, "sys-firewall")
    try:
        r = manager(sandbox, "refresh")
        assert r.returncode == 0, r.stdout + r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == "Starting sys-firewall: it was halted and is shut down again " \
            "after this run"
        assert lines[-1] == "Shut sys-firewall down again"
        assert stopped.exists()  # halted, as the admin left it
        log = (sandbox.log_dir / "qrexec.log").read_text()
        assert "admin dom0 start sys-firewall: ok" in log
        assert "admin dom0 shutdown sys-firewall: ok" in log

        # a run that fails after starting it (the mirror's signature is junk) shuts it
        # down too
        for jcat in jcats:
            jcat.write_bytes(b"junk")
        r = manager(sandbox, "refresh")
        assert r.returncode == 1, r.stdout + r.stderr
        assert r.stdout.splitlines()[0].startswith("Starting sys-firewall"), r.stdout
        assert r.stdout.splitlines()[-1] == "Shut sys-firewall down again", r.stdout
        assert stopped.exists()
    finally:
        stopped.unlink(missing_ok=True)
        for jcat, signed in jcats.items():
            jcat.write_bytes(signed)

    # running before: left running, and not a word about it
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    assert "Starting" not in r.stdout and "Shut" not in r.stdout
    assert not stopped.exists()


def test_an_updatevm_that_cannot_start_is_one_line(refreshed: Sandbox) -> None:
    halted = refreshed.halted_file("sys-firewall")
    halted.parent.mkdir(exist_ok=True)
    halted.touch()
    try:
        r = manager(refreshed, "refresh")
    finally:
        halted.unlink()
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr == "qubes-fwupdmgr: sys-firewall is not running and could not be " \
        "started: sys-firewall: could not be started (sandbox: halted)\n"


def test_a_run_stopped_with_sigterm_still_shuts_down_what_it_started(
    refreshed: Sandbox,
) -> None:
    """As `systemctl stop` ends a timer's run: SIGTERM mid-download unwinds it."""
    sandbox = refreshed
    stopped = sandbox.stopped_file("sys-firewall")
    publish_variant(sandbox, "sigterm")
    rate_file(sandbox.lvfs_dir).write_text("2000")  # a slow CDN: the download takes a while
    _stop(sandbox, "sys-firewall")
    try:
        proc = start_manager(sandbox, "refresh")
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        assert first.startswith("Starting sys-firewall"), first
        time.sleep(1.0)  # into the download
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, first + out + err
        assert err.splitlines()[-1] == "qubes-fwupdmgr: terminated", err
        assert out.splitlines()[-1] == "Shut sys-firewall down again", out
        assert stopped.exists()
        r = manager(sandbox, "status")
        assert r.stdout.startswith("Run lock:    free\n"), r.stdout
    finally:
        rate_file(sandbox.lvfs_dir).unlink(missing_ok=True)
        stopped.unlink(missing_ok=True)
