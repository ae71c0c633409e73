"""fwupd gone, crashing mid-install, or refusing, in dom0 or sys-usb (issue 21's faults).

Each case: one line naming whose fwupd and what happened, a non-zero exit, dom0's trusted
state consistent, nothing of the run left running; and once the daemon is back, the next
run does the update. The crash is real: the daemon is killed with SIGKILL while the test
plugin writes (WriteDelay), at a moment tests/faults_site.py marks in the process that
handed it the cab.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from broker.sandbox import daemons
from broker.sandbox.launcher import Launcher, Sandbox
from broker.sandbox.processes import ProcessTable
from tests.adversarial.hostile import publish_real, sandbox_processes
from tests.adversarial.test_hostile_updatevm import one_line
from tests.faults import Faults, dom0_problems, handover_point, ran, settle
from tests.sandbox_helpers import (
    fwupd_call,
    halted,
    manager,
    plugin_knobs,
    start_manager,
    webcam_version,
)

pytestmark = pytest.mark.sandbox


def restart(sandbox: Sandbox, qube: str) -> None:
    """The qube's fwupd started again (its webcam back at 1.2.2)."""
    daemons.restart_fwupd(sandbox, Launcher(sandbox), ProcessTable(sandbox.pids_file), qube)
    assert webcam_version(sandbox, qube) == "1.2.2"


@pytest.fixture
def ready(faultbox: tuple[Sandbox, Faults]) -> tuple[Sandbox, Faults]:
    sandbox, faults = faultbox
    publish_real(sandbox)
    assert ran(manager(sandbox, "refresh")) is None
    return sandbox, faults


@pytest.mark.parametrize("qube", ["sys-usb", "dom0"])
def test_fwupd_killed_while_it_writes(ready: tuple[Sandbox, Faults], qube: str) -> None:
    sandbox, faults = ready
    role = "usbvm" if qube == "sys-usb" else "manager"
    with halted(sandbox, "sys-usb") if qube == "dom0" else _nothing():
        restart(sandbox, qube)
        with faults.recording() as rec:
            manager(sandbox, "update", "-y")
        assert webcam_version(sandbox, qube) == "1.2.4"
        # the process that hands the cab over is the role's longest one
        at = handover_point(role, max(rec[role], key=len))
        restart(sandbox, qube)
        before = frozenset(sandbox_processes(sandbox))
        fwupd_call(sandbox, qube, "ModifyConfig", "sss", "test", "WriteDelay", "8000")
        try:
            with faults.armed(role, at, mark=True):
                run = start_manager(sandbox, "update", "-y")
                deadline = time.monotonic() + 60
                while faults.struck(role) is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert faults.struck(role) is not None, "the install never started"
                time.sleep(1.5)  # fwupd has the cab now, and writes for 8 s
                os.kill(daemons.fwupd_pid(sandbox, qube), signal.SIGKILL)
                out, err = run.communicate(timeout=60)
        finally:
            # the knob is in its fwupd.conf: the next daemon must not write slowly too
            restart(sandbox, qube)
            fwupd_call(sandbox, qube, "ResetConfig", "s", "test")
        assert run.returncode == 1, out + err
        # one line for the crash (with sys-usb halted, dom0's run also says so, its own)
        (line,) = [ln for ln in err.splitlines() if "fwupd" in ln and "unreachable" not in ln]
        assert line.startswith(f"qubes-fwupdmgr: {qube}: "), err
        assert "fwupd stopped before it answered" in line, line
        if qube == "sys-usb":
            one_line(err)
        assert settle(sandbox, before, timeout=10) == {}
        assert dom0_problems(sandbox, strict=True) == []
        # fwupd back (as after a reboot of the qube): the next run does the update
        again = manager(sandbox, "update", "-y")
        assert f"[{qube}] 1.2.2 -> 1.2.4" in again.stdout, again.stdout + again.stderr
        assert webcam_version(sandbox, qube) == "1.2.4"


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def test_a_missing_fwupd_is_one_line_and_the_other_qube_still_counts(
    ready: tuple[Sandbox, Faults],
) -> None:
    sandbox, _ = ready
    table = ProcessTable(sandbox.pids_file)
    restart(sandbox, "sys-usb")
    try:
        table.stop_all("dom0", roles=("fwupd",))
        r = manager(sandbox, "get-devices")
        assert r.returncode == 1, r.stdout + r.stderr
        line = one_line(r.stderr)
        assert line.startswith("qubes-fwupdmgr: dom0: unreachable: fwupd is not running"), line
        assert "Integrated Webcam™" in r.stdout and "sys-usb" in r.stdout, r.stdout
        # a refresh still stores what it verified, and says whose daemon missed it
        r = manager(sandbox, "refresh", "--force")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "dom0" in one_line(r.stderr) and "fwupd is not running" in r.stderr
        assert dom0_problems(sandbox, strict=True) == []
    finally:
        restart(sandbox, "dom0")
    assert ran(manager(sandbox, "get-devices")) is None


def test_dom0_fwupd_refusing_is_one_line(ready: tuple[Sandbox, Faults]) -> None:
    sandbox, _ = ready
    with halted(sandbox, "sys-usb"):
        restart(sandbox, "dom0")
        with plugin_knobs(sandbox, "dom0", WriteSupported="false"):
            r = manager(sandbox, "update", "-y")
        assert r.returncode == 1, r.stdout + r.stderr
        lines = [ln for ln in r.stderr.splitlines() if "dom0: fwupd refused" in ln]
        assert len(lines) == 1, r.stderr
        assert webcam_version(sandbox, "dom0") == "1.2.2"
        assert dom0_problems(sandbox, strict=True) == []
