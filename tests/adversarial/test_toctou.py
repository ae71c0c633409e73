"""A cached cab changed between dom0's check and fwupd's read (issue 21, TOCTOU).

dom0's cab cache holds files the receive service wrote: its login user can write them,
through their path or another one. Here the manager itself, by tests/faults_site.py, at
the moment after its last check and before the daemon gets the cab, rewrites the cached
file's inode with another release's cab (fakedevice123.cab: LVFS-signed, valid, and newer
than the device's 1.2.2, so fwupd would take it) and renames a copy over its name. dom0's
own fwupd reads an fd dom0 hands it (sys-usb streams and checks its copy again), so that is
the path that must hold: what fwupd installs is the 1.2.4 that was checked, never 1.2.3.
"""

from __future__ import annotations

import hashlib
import shutil

import pytest

from broker.sandbox import daemons
from broker.sandbox.launcher import Launcher, Sandbox
from broker.sandbox.processes import ProcessTable
from tests.adversarial.hostile import publish_real
from tests.faults import Faults, dom0_problems, handover_point, ran
from tests.sandbox_helpers import halted, manager, qube_paths, webcam_version

pytestmark = pytest.mark.sandbox


def test_a_cab_rewritten_after_its_check_is_never_what_fwupd_installs(
    faultbox: tuple[Sandbox, Faults],
) -> None:
    sandbox, faults = faultbox
    paths = qube_paths(sandbox, "dom0")
    publish_real(sandbox)
    assert ran(manager(sandbox, "refresh")) is None
    good = (sandbox.lvfs_dir / "fakedevice124.cab").read_bytes()
    cached = paths.cabs_dir / f"{hashlib.sha256(good).hexdigest()}.cab"
    other = sandbox.root("dom0") / "home/other.cab"
    shutil.copyfile(sandbox.lvfs_dir / "fakedevice123.cab", other)

    def reset() -> None:
        manager(sandbox, "clean")
        daemons.restart_fwupd(sandbox, Launcher(sandbox), ProcessTable(sandbox.pids_file),
                              "dom0")  # fmt: skip
        assert webcam_version(sandbox, "dom0") == "1.2.2"

    with halted(sandbox, "sys-usb"):  # the webcam goes to dom0's own fwupd
        reset()
        with faults.recording() as rec:
            first = manager(sandbox, "update", "-y")
        # exit 1 all the same: sys-usb's devices could not be handled
        assert "[dom0] 1.2.2 -> 1.2.4" in first.stdout, first.stdout + first.stderr
        assert webcam_version(sandbox, "dom0") == "1.2.4"
        (events,) = rec["manager"]
        at = handover_point("manager", events)

        reset()
        with faults.armed("manager", at, swap=(cached, other)):
            r = manager(sandbox, "update", "-y")
            struck = faults.struck("manager")
    assert struck is not None and struck.endswith("socket.connect"), struck
    version = webcam_version(sandbox, "dom0")
    assert version != "1.2.3", "fwupd installed the cab put in place after dom0's check"
    assert version == "1.2.4" and "[dom0] 1.2.2 -> 1.2.4" in r.stdout, r.stdout + r.stderr
    assert dom0_problems(sandbox, strict=True) == []
