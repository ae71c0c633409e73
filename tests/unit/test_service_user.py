"""Whom dom0's qrexec services run as in the sandbox, as recorded at `up`, and what must
hold whichever user makes dom0's shared files first."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from broker.config import Paths
from broker.sandbox import launcher
from broker.sandbox.launcher import DOM0_QUBES_GID, DOM0_USER_UID, ServiceUser
from broker.service import log
from broker.transfer import write_atomic


def test_the_record_reads_back_as_written() -> None:
    for user in (ServiceUser(True), ServiceUser(False, "not root: only root can change uid")):
        assert ServiceUser.parse(user.line()) == user
    assert ServiceUser.parse("") == ServiceUser(False, "not recorded")


def test_dropped_means_setpriv_to_the_login_user_with_nothing_to_climb_back_by() -> None:
    argv = ServiceUser(True).setpriv()
    assert argv[0] == "setpriv" and argv[-3:] == ["--", "env", "--"]
    for flag in (f"--reuid={DOM0_USER_UID}", f"--regid={DOM0_USER_UID}",
                 f"--groups={DOM0_QUBES_GID}", "--inh-caps=-all", "--bounding-set=-all",
                 "--no-new-privs"):  # fmt: skip
        assert flag in argv
    assert ServiceUser(False, "why").setpriv() == []


def test_not_root_services_run_as_everything_else_and_say_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(launcher.os, "geteuid", lambda: 1000)
    user = launcher.service_user_available()
    assert not user.dropped
    assert str(user) == "the sandbox's own user (not root: only root can change uid)"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_log_is_group_writable_whoever_makes_it(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    old = os.umask(0o022)
    try:
        log(paths, "first line")
        assert _mode(paths.log_file) == 0o660
        paths.log_file.chmod(0o644)  # as an older version left it
        log(paths, "second line")
    finally:
        os.umask(old)
    assert _mode(paths.log_file) == 0o660
    assert len(paths.log_file.read_text().splitlines()) == 2


def test_atomic_writes_get_their_mode_whatever_the_umask(tmp_path: Path) -> None:
    """A session file the root manager writes must stay readable by the service's group."""
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "s.pending", b"{}")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "s.pending") == 0o640
