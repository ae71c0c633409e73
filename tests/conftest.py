from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from broker.sandbox.launcher import Sandbox
from tests.sandbox_helpers import (
    mounts_under,
    processes_mentioning,
    sandbox_cli,
    sandbox_prerequisites,
    short_tmpdir,
    up,
)


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """One sandbox for the integration tests: up once, down at the end, nothing left."""
    reason = sandbox_prerequisites()
    if reason:
        pytest.skip(reason)
    directory = short_tmpdir("qfwi")
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
