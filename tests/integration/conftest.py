from __future__ import annotations

import pytest

from broker.sandbox.launcher import Sandbox
from tests.sandbox_helpers import manager


@pytest.fixture(scope="module")
def refreshed(sandbox: Sandbox) -> Sandbox:
    """dom0 and both daemons hold the mirror's current metadata."""
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    return sandbox
