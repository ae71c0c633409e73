from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.sandbox.desktop import Desktop, missing_tools
from broker.sandbox.launcher import Launcher, Sandbox
from tests.sandbox_helpers import manager


@pytest.fixture(scope="module")
def refreshed(sandbox: Sandbox) -> Sandbox:
    """dom0 and both daemons hold the mirror's current metadata."""
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    return sandbox


@pytest.fixture
def desktop(sandbox: Sandbox) -> Iterator[Desktop]:
    """dom0's desktop session (Xvfb, the login user's session bus, dunst), fresh for the
    test: ``desktop.notifications()`` is what it was sent."""
    user = Launcher(sandbox).service_user()
    if not user.dropped:
        pytest.skip(f"dom0's services run as {user}: no desktop user to be")
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    session = Desktop(sandbox)
    session.start()
    try:
        yield session
    finally:
        session.stop()
