"""One manager at a time: the lock, its wait, and the line that names the holder."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

import pytest

from broker.config import Config, Paths
from broker.errors import Busy, ConfigError, Inhibited
from broker.runlock import Holder, check_inhibit, run_lock


def _held_by_other(path: Path, holder: dict[str, object] | None) -> int:
    """Another open file description holding the lock, as another process's would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    if holder is not None:
        os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd


def test_the_holder_writes_who_it_is_and_lets_go_after(tmp_path: Path) -> None:
    lock = tmp_path / "run/qubes-fwupd/manager.lock"
    with run_lock(lock, "update", 0):
        doc = json.loads(lock.read_text())
        assert (doc["pid"], doc["verb"]) == (os.getpid(), "update")
        # its dir is root's alone, so nothing else can leave a FIFO or a link there
        assert lock.parent.stat().st_mode & 0o777 == 0o700
        with pytest.raises(Busy), run_lock(lock, "refresh", 0, sleep=lambda _: None):
            pass
    with run_lock(lock, "refresh", 0):  # free again
        pass


def test_a_second_run_gives_up_naming_the_holder(tmp_path: Path) -> None:
    lock = tmp_path / "manager.lock"
    fd = _held_by_other(lock, {"pid": 4242, "verb": "update", "since": 1796300000.0})
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    try:
        with pytest.raises(Busy) as e, run_lock(lock, "refresh", 5, lambda: now[0], sleep):
            pass
    finally:
        os.close(fd)
    assert str(e.value) == (
        "another qubes-fwupdmgr is at work (pid 4242, update, since 2026-12-03 12:13:20 UTC); "
        "waited 5 s (lock_wait_seconds): try again when it has finished"
    )
    assert 5 <= now[0] < 5.5  # it waited, in small steps, no longer


@pytest.mark.parametrize("holder", [None, {"pid": "x"}, {"pid": 1, "verb": "\x1b[2J", "since": 0}])
def test_what_the_holder_wrote_is_only_shown_when_it_makes_sense(
    tmp_path: Path, holder: dict[str, object] | None
) -> None:
    lock = tmp_path / "manager.lock"
    fd = _held_by_other(lock, holder)
    try:
        busy = r"^another qubes-fwupdmgr is at work; waited 0 s"
        with pytest.raises(Busy, match=busy), run_lock(lock, "refresh", 0):
            pass
    finally:
        os.close(fd)


def test_a_run_that_waits_goes_on_once_the_holder_is_done(tmp_path: Path) -> None:
    lock = tmp_path / "manager.lock"
    fd = _held_by_other(lock, None)
    threading.Timer(0.3, os.close, (fd,)).start()
    with run_lock(lock, "refresh", 30):
        mine = os.open(lock, os.O_RDONLY)
        try:
            assert Holder.read(mine) == Holder(os.getpid(), "refresh", Holder.read(mine).since)
        finally:
            os.close(mine)


def test_the_lock_file_is_never_followed_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("root's file")
    lock = tmp_path / "manager.lock"
    lock.symlink_to(target)
    with pytest.raises(OSError), run_lock(lock, "refresh", 0):
        pass
    assert target.read_text() == "root's file"


def test_an_inhibit_file_holds_back_naming_itself_and_its_first_line(tmp_path: Path) -> None:
    files = Config().inhibit_files
    check_inhibit(tmp_path, files)  # none there: go on
    hold = tmp_path / "run/qubes-fwupd/inhibit"
    hold.parent.mkdir(parents=True)
    hold.write_text("firmware audit \x1b[31muntil Friday\nmore\n")
    with pytest.raises(Inhibited) as e:
        check_inhibit(tmp_path, files)
    assert str(e.value) == (
        "inhibited by /run/qubes-fwupd/inhibit (firmware audit ?[31muntil Friday): nothing "
        "refreshed or installed; remove it to go on"
    )
    assert e.value.exit_code == 2  # a timer's hold is the admin's choice, not a failure
    hold.write_text("")
    with pytest.raises(Inhibited, match=r"^inhibited by /run/qubes-fwupd/inhibit: nothing"):
        check_inhibit(tmp_path, files)


def test_inhibit_files_in_the_config_must_be_absolute(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    paths.config_file.write_text("[qubes-fwupd]\ninhibit_files = /srv/hold\n")
    assert Config.load(paths).inhibit_files == ("/srv/hold",)
    paths.config_file.write_text("[qubes-fwupd]\ninhibit_files = hold\n")
    with pytest.raises(ConfigError, match="is not an absolute path"):
        Config.load(paths)
