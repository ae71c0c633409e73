"""A refresh that lands while dom0 hands metadata to the daemons (issue 15, item 8).

dom0 gives each fwupd the current catalog and its jcat. If a push replaced that generation
between the two opens, a daemon got one generation's catalog with another's jcat, and
the second refresh deleted what the first was still handing over. An UpdateVM can time its
push to do that; so can the timer racing an admin. Here the kernel holds the handing-over
manager inside its open of the catalog (fanotify, tests/open_gate.py) while a second,
newer refresh arrives through the real services: the push must wait for the handover, and
each daemon must end up holding exactly one generation: dom0's current one.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from broker.config import Config
from broker.metadata import MetadataStore
from broker.sandbox.launcher import Sandbox
from tests.adversarial.hostile import publish_variant
from tests.open_gate import OpenGate
from tests.sandbox_helpers import manager, qube_paths, start_manager, tree_snapshot

pytestmark = pytest.mark.sandbox

_LOCKS_INODE = re.compile(r"[0-9a-f]+:[0-9a-f]+:(\d+)")


def _waiting_on(lock: Path) -> int:
    """How many processes wait for this flock (the kernel's own /proc/locks, "->" lines)."""
    inode = str(os.stat(lock).st_ino)
    waiting = 0
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and any(
            (m := _LOCKS_INODE.fullmatch(f)) and m[1] == inode for f in fields
        ):
            waiting += 1
    return waiting


def test_a_push_landing_mid_handover_waits_and_each_daemon_holds_one_generation(
    sandbox: Sandbox,
) -> None:
    paths = qube_paths(sandbox, "dom0")
    remote = Config.load(paths).remotes[0]
    link = paths.metadata_dir / remote.id
    publish_variant(sandbox, "race-old")
    r = manager(sandbox, "refresh")
    assert r.returncode == 0, r.stdout + r.stderr
    old_generation = os.readlink(link)

    with OpenGate(link / remote.metadata_name) as gate:
        # the mirror still serves the same catalog: this refresh fetches nothing new and
        # then hands the current generation to both daemons, and is held in that open
        first = start_manager(sandbox, "refresh")
        assert gate.opened.wait(90), "the refresh never opened dom0's current catalog"
        held = Path(f"/proc/{gate.pid}/cmdline").read_bytes()
        assert b"broker.cli" in held, f"held the wrong process: {held!r}"

        publish_variant(sandbox, "race-new")
        second = start_manager(sandbox, "refresh")
        lock = paths.state_dir / "metadata.lock"
        try:
            # held back, as it must be: by the run lock (one manager at a time) or, past
            # it, by the metadata lock; 5 s of neither finishing nor swapping shows it
            deadline = time.monotonic() + 5
            while (
                time.monotonic() < deadline
                and second.poll() is None
                and os.readlink(link) == old_generation
                and not _waiting_on(lock)
            ):
                time.sleep(0.02)
            swapped = os.readlink(link) != old_generation
            waited = second.poll() is None
        finally:
            gate.release()
            out1, err1 = first.communicate(timeout=120)
            out2, err2 = second.communicate(timeout=120)

    assert not swapped, "a push replaced the metadata dom0 was handing to the daemons"
    assert waited, "the second refresh was not held back while the first handed over"
    assert not swapped, "a push replaced the metadata dom0 was handing to the daemons"
    # the first handed over what it opened, whole: both daemons already had it
    assert first.returncode == 2, out1 + err1
    assert "dom0 fwupd already had the metadata" in out1, out1
    assert "sys-usb fwupd already had the metadata" in out1, out1
    assert err1 == "", err1
    # the second, which waited, then stored and handed over the newer generation
    assert second.returncode == 0, out2 + err2
    assert "accepted" in out2 and "dom0 fwupd loaded the metadata" in out2, out2
    assert "sys-usb fwupd loaded the metadata" in out2, out2
    assert os.readlink(link) != old_generation
    current = MetadataStore(paths).current(remote)
    assert current is not None
    data, jcat = current
    for qube in ("dom0", "sys-usb"):
        held_dir = sandbox.root(qube) / "var/lib/fwupd/metadata" / remote.id
        assert (held_dir / data.name).read_bytes() == data.read_bytes(), qube
        assert (held_dir / jcat.name).read_bytes() == jcat.read_bytes(), qube
    # nothing left behind: the old generation is gone, nothing untrusted remains
    assert not (paths.metadata_dir / old_generation).exists()
    assert tree_snapshot(paths.untrusted_dir) == {}
