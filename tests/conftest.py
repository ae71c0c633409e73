from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from broker.sandbox.launcher import Sandbox
from tests.adversarial.hostile import restore_mirror
from tests.faults import Faults
from tests.sandbox_helpers import (
    manager,
    mounts_under,
    processes_mentioning,
    sandbox_cli,
    sandbox_prerequisites,
    short_tmpdir,
    up,
)


@contextmanager
def own_sandbox(prefix: str) -> Iterator[Sandbox]:
    """A sandbox up for the block, down after it, nothing left (or the test fails)."""
    reason = sandbox_prerequisites()
    if reason:
        pytest.skip(reason)
    directory = short_tmpdir(prefix)
    try:
        yield up(directory)
    finally:
        sandbox_cli("down", "--dir", str(directory))
        left = processes_mentioning(str(directory))
        mounts = mounts_under(directory)
        if not mounts:  # never delete through a mount
            shutil.rmtree(directory, ignore_errors=True)
        assert not left, f"sandbox processes left after down: {left}"
        assert not mounts, f"mounts left after down: {mounts}"


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """One sandbox for the integration tests: up once, down at the end, nothing left."""
    with own_sandbox("qfwi") as box:
        yield box


@pytest.fixture(scope="module")
def mirror(sandbox: Sandbox) -> Iterator[Sandbox]:
    """For a module whose tests publish their own catalogs: the real one comes back (and
    dom0 and both daemons hold it) at the end."""
    try:
        yield sandbox
    finally:
        restore_mirror(sandbox)


@pytest.fixture(scope="session")
def faultbox() -> Iterator[tuple[Sandbox, Faults]]:
    """A second sandbox for the crash, fault and TOCTOU tests: kills and failing parts
    leave its dom0 and sys-usb anywhere, so the other tests never share it. Every Python
    process in its dom0, sys-firewall and sys-usb carries tests/faults_site.py."""
    with own_sandbox("qfk") as box:
        faults = Faults(box)
        faults.install()
        r = manager(box, "refresh")
        assert r.returncode == 0, r.stdout + r.stderr
        yield box, faults
