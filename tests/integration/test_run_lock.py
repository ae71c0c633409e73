"""One qubes-fwupdmgr at a time on the sandbox: a run that would change state waits for
another, or gives up naming it; read-only verbs never wait."""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from broker.sandbox.launcher import Sandbox
from tests.sandbox_helpers import manager, qube_paths, start_manager

pytestmark = pytest.mark.sandbox


@contextmanager
def _lock_wait(sandbox: Sandbox, seconds: int) -> Iterator[None]:
    conf = qube_paths(sandbox, "dom0").config_file
    before = conf.read_text()
    wait = f"[qubes-fwupd]\nlock_wait_seconds = {seconds}\n"
    conf.write_text(before.replace("[qubes-fwupd]\n", wait, 1))
    try:
        yield
    finally:
        conf.write_text(before)


@contextmanager
def _held(sandbox: Sandbox) -> Iterator[None]:
    """The lock as another manager in dom0 holds it (pid, verb and time written)."""
    lock = qube_paths(sandbox, "dom0").run_lock
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        holder = {"pid": 31337, "verb": "update", "since": time.time()}
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)


def test_a_run_gives_up_naming_the_holder_while_reading_verbs_go_on(refreshed: Sandbox) -> None:
    sandbox = refreshed
    with _lock_wait(sandbox, 1), _held(sandbox):
        r = manager(sandbox, "refresh")
        assert r.returncode == 1, r.stdout + r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert re.fullmatch(
            r"qubes-fwupdmgr: another qubes-fwupdmgr is at work \(pid 31337, update, since "
            r"\S+ \S+ UTC\); waited 1 s \(lock_wait_seconds\): try again when it has finished",
            line,
        ), line
        r = manager(sandbox, "refresh", "--json")
        assert r.returncode == 1
        assert json.loads(r.stdout)["Error"]["Code"] == 20  # FwupdError Busy
        r = manager(sandbox, "get-devices")
        assert r.returncode == 0, r.stdout + r.stderr
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr


def test_two_runs_at_once_take_turns(refreshed: Sandbox) -> None:
    sandbox = refreshed
    log = sandbox.log_dir / "qrexec.log"
    seen = len(log.read_text())
    runs = [start_manager(sandbox, "refresh", "--force") for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode in (0, 2), out + err
    # the UpdateVM's downloads did not overlap: each ended before the next began
    events = re.findall(r" (allow|done) dom0 -> sys-firewall qubes\.FwupdDownload\+",
                        log.read_text()[seen:])  # fmt: skip
    assert events == ["allow", "done", "allow", "done"], events


def test_an_inhibit_file_holds_back_refresh_and_installs_but_not_reading(
    refreshed: Sandbox,
) -> None:
    sandbox = refreshed
    hold = qube_paths(sandbox, "dom0").config_dir / "inhibit"
    hold.write_text("firmware audit\n")
    try:
        for verb in (("refresh",), ("update", "-y"), ("update", "--unattended")):
            r = manager(sandbox, *verb)
            assert r.returncode == 2, r.stdout + r.stderr
            # as "nothing to do" is said: one line on stdout, exit 2
            assert (r.stdout, r.stderr) == (
                "Inhibited by /etc/qubes-fwupd/inhibit (firmware audit): nothing refreshed or "
                "installed; remove it to go on\n", "",
            ), verb  # fmt: skip
        r = manager(sandbox, "get-updates")
        assert r.returncode in (0, 2), r.stdout + r.stderr
        assert "inhibited" not in r.stderr
    finally:
        hold.unlink()
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr


def test_failed_refreshes_make_the_unattended_one_back_off_until_one_works(
    refreshed: Sandbox,
) -> None:
    sandbox = refreshed
    backoff = qube_paths(sandbox, "dom0").refresh_backoff
    assert not backoff.exists()
    halted = sandbox.halted_file("sys-firewall")
    halted.parent.mkdir(exist_ok=True)
    halted.touch()
    try:
        r = manager(sandbox, "refresh", "--unattended")
        assert r.returncode == 1, r.stdout + r.stderr
        assert json.loads(backoff.read_text())["failures"] == 1
        # within the hour: the timer's run does not try, and says until when
        r = manager(sandbox, "refresh", "--unattended")
        assert r.returncode == 2, r.stdout + r.stderr
        assert re.fullmatch(
            r"Backing off: 1 refreshes failed in a row \(last: .*sys-firewall.*\); the next "
            r"unattended one after \S+ \S+ UTC\n", r.stdout,
        ), r.stdout  # fmt: skip
        assert _backoff_wait(sandbox) == 3600
        # an admin's refresh never waits: it tries, and fails again; each failure in a row
        # lengthens the unattended one's wait: 1 h, 4 h, then a day (status shows it)
        for failures, wait in ((2, 4 * 3600), (3, 24 * 3600), (4, 24 * 3600)):
            r = manager(sandbox, "refresh")
            assert r.returncode == 1, r.stdout + r.stderr
            assert json.loads(backoff.read_text())["failures"] == failures
            assert _backoff_wait(sandbox) == wait, failures
    finally:
        halted.unlink()
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    assert not backoff.exists()  # it worked: reset
    assert _backoff_wait(sandbox) is None
    r = manager(sandbox, "refresh", "--unattended")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    assert "Backing off" not in r.stdout


def _backoff_wait(sandbox: Sandbox) -> int | None:
    """Seconds from the last failure to the next unattended refresh, as status says."""
    r = manager(sandbox, "status", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    backoff = json.loads(r.stdout)["Status"]["Backoff"]
    if not backoff["NextUnattendedRefresh"]:
        return None
    last = json.loads(qube_paths(sandbox, "dom0").refresh_backoff.read_text())["last_failure"]
    return int(backoff["NextUnattendedRefresh"] - int(last))
