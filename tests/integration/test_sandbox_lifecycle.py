"""up / status / down on a sandbox of its own: down must leave no process behind."""

from __future__ import annotations

import shutil

import pytest

from broker.sandbox.cli import TOR_MIRROR_ROLE, tor_port_file
from broker.sandbox.launcher import Launcher, Sandbox
from tests.sandbox_helpers import (
    processes_mentioning,
    sandbox_cli,
    sandbox_prerequisites,
    short_tmpdir,
    up,
)

pytestmark = pytest.mark.sandbox


def test_up_status_down_leaves_nothing_running() -> None:
    reason = sandbox_prerequisites()
    if reason:
        pytest.skip(reason)
    directory = short_tmpdir("qfwl")
    try:
        up(directory)
        r = sandbox_cli("status", "--dir", str(directory))
        assert r.returncode == 0, r.stdout
        roles = {line.split()[0] for line in r.stdout.splitlines() if "pid" in line}
        assert {"mirror", "dbus", "fwupd", "qrexecd"} <= roles, r.stdout
        # a second mirror on sys-whonix's network, where it has one of its own
        isolated = Launcher(Sandbox(directory)).isolation().on
        assert (TOR_MIRROR_ROLE in roles) == isolated, r.stdout
        assert tor_port_file(Sandbox(directory)).exists() == isolated
        assert "DEAD" not in r.stdout
        assert processes_mentioning(str(directory)), "up started nothing we can see"

        # a second up on a running sandbox is refused and changes nothing
        again = sandbox_cli("up", "--dir", str(directory))
        assert again.returncode == 1
        assert "already running" in again.stderr
        still = sandbox_cli("status", "--dir", str(directory))
        assert still.returncode == 0 and "DEAD" not in still.stdout, still.stdout

        r = sandbox_cli("down", "--dir", str(directory))
        assert r.returncode == 0, r.stderr
        assert processes_mentioning(str(directory)) == []
        assert not list(directory.glob("vm/*/run/qubes-fwupd/qrexec.sock"))
        assert not list(directory.glob("lvfs*.port"))  # each mirror's, removed as it ends
        assert sandbox_cli("status", "--dir", str(directory)).returncode == 1
    finally:
        sandbox_cli("down", "--dir", str(directory))
        shutil.rmtree(directory, ignore_errors=True)
