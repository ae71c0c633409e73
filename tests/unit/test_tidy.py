"""What a killed run leaves, and what takes it away (issue 21's crash consistency): temp
files of write_atomic, unlinked metadata generations, received files, old sessions; and the
record a generation keeps of itself, so a kill between its publication and the state file
never leaves dom0 with a file its record does not describe. The sandbox's kill -9 tests
(tests/integration/test_crash_consistency.py) drive the same code through real processes."""

from __future__ import annotations

import errno
import gc
import gzip
import json
import lzma
import os
import resource
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zstandard

from broker.config import Limits, Paths, Remote
from broker.metadata import ACCEPTED_NAME, MetadataStore, open_catalog
from broker.session import ExpectedFile, Sessions
from broker.signatures import Signature, Verified
from broker.transfer import (
    UntrustedFiles,
    sweep_temps,
    sweep_untrusted,
    temp_name,
    write_atomic,
)

REMOTE = Remote("lvfs", "https://cdn.fwupd.org/downloads/firmware.xml.zst")
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def _verified(signed_at: datetime, sha: str) -> Verified:
    return Verified(sha, 3, (Signature("pkcs7", "LVFS", signed_at),), ())


def _store(paths: Paths, nonce: str, data: bytes, verified: Verified) -> None:
    store = MetadataStore(paths)
    with UntrustedFiles(paths.untrusted_dir, nonce) as u, store.locked():
        fd = u.create(REMOTE.metadata_name)
        os.write(fd, data)
        store.store(REMOTE, (fd, u.paths[REMOTE.metadata_name]), verified)


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


# --------------------------------------------------------------------------- temp files
def test_sweep_temps_takes_only_our_temp_names_and_only_old_ones(tmp_path: Path) -> None:
    final = tmp_path / "history.json"
    old_tmp, young_tmp = temp_name(final), temp_name(final)
    for p in (final, old_tmp, young_tmp):
        p.write_bytes(b"{")
    link_tmp = temp_name(tmp_path / "lvfs")
    link_tmp.symlink_to("lvfs.0123456789ab")
    # names that look close but are not ours: never touched
    others = [tmp_path / ".history.json.tmp", tmp_path / ".x.0123456.tmp",
              tmp_path / "x.01234567.tmp", tmp_path / ".x.0123456g.tmp"]  # fmt: skip
    for p in others:
        p.write_bytes(b"")
    a_dir = temp_name(tmp_path / "d")
    a_dir.mkdir()
    for p in (old_tmp, link_tmp, a_dir, *others):
        _age(p, 3600)

    assert sweep_temps(tmp_path, older_than=60) == sorted([old_tmp.name, link_tmp.name])
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {final.name, young_tmp.name, a_dir.name, *(p.name for p in others)}
    # with no age (the caller holds the lock every writer takes), the young one goes too
    assert sweep_temps(tmp_path) == [young_tmp.name]
    assert sweep_temps(tmp_path / "missing") == []


def test_write_atomic_leaves_no_temp_when_the_disk_is_full(tmp_path: Path) -> None:
    """ENOSPC and EFBIG fail the same write(2): a file-size limit stands in for a full
    disk without a filesystem of its own."""
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    try:
        with pytest.raises(OSError) as raised:
            write_atomic(target, b"x" * 4096)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert raised.value.errno == errno.EFBIG
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert target.read_bytes() == b"old"


def test_sweep_untrusted_takes_old_received_files_only(tmp_path: Path) -> None:
    with UntrustedFiles(tmp_path, "n1") as u:
        u.create("a")
        kept = dict(u.paths)
        u.paths.clear()  # as a kill -9 would: never removed on exit
        u.fds.clear()
    old = kept["a"]
    young = tmp_path / "n2.0.UNTRUSTED"
    young.write_bytes(b"")
    not_ours = tmp_path / "notes.txt"
    not_ours.write_bytes(b"")
    link = tmp_path / "n3.0.UNTRUSTED"
    link.symlink_to(not_ours)
    for p in (old, not_ours, link):
        _age(p, 7200)
    assert sweep_untrusted(tmp_path, older_than=960) == [old.name]
    assert {p.name for p in tmp_path.iterdir()} == {young.name, not_ours.name, link.name}


def test_session_sweep_takes_temps_a_minute_old(tmp_path: Path) -> None:
    sessions = Sessions(tmp_path)
    s = sessions.open("cab", "lvfs", (ExpectedFile("a.cab", 10),), 1800)
    killed = temp_name(tmp_path / f"{s.nonce}.outcome")
    killed.write_bytes(b"{")
    live = temp_name(tmp_path / "f.outcome")
    live.write_bytes(b"{")
    _age(killed, 120)
    assert sessions.sweep(1800) == [killed.name]
    assert {p.name for p in tmp_path.iterdir()} == {f"{s.nonce}.pending", live.name}


# --------------------------------------------------------------------------- metadata
@pytest.fixture
def stored(tmp_path: Path) -> Iterator[Paths]:
    paths = Paths(tmp_path)
    _store(paths, "n1", b"one", _verified(T0, "1" * 64))
    yield paths


def test_a_generation_carries_its_own_record(stored: Paths) -> None:
    gen = stored.metadata_dir / "lvfs"
    record = json.loads((gen / ACCEPTED_NAME).read_bytes())
    assert record["sha256"] == "1" * 64 and record["signed_at"] == T0.isoformat()
    assert json.loads(stored.metadata_state_file.read_bytes())["lvfs"] == record


def test_killed_before_the_state_file_the_generation_record_wins(stored: Paths) -> None:
    """A kill after the link swap, before the state file: the record published with the
    file describes it, and the rollback floor is the newer signing time."""
    before = stored.metadata_state_file.read_bytes()
    t1 = T0 + timedelta(days=1)
    _store(stored, "n2", b"two", _verified(t1, "2" * 64))
    stored.metadata_state_file.write_bytes(before)  # as if the last write never happened
    accepted = MetadataStore(stored).accepted("lvfs")
    assert accepted is not None
    assert accepted["sha256"] == "2" * 64 and accepted["signed_at"] == t1.isoformat()


def test_a_wiped_cache_keeps_the_state_file_as_floor(stored: Paths) -> None:
    for gen in stored.metadata_dir.iterdir():
        if gen.is_symlink():
            gen.unlink()
    accepted = MetadataStore(stored).accepted("lvfs")
    assert accepted is not None and accepted["signed_at"] == T0.isoformat()
    stored.metadata_state_file.unlink()
    assert MetadataStore(stored).accepted("lvfs") is None


def test_tidy_removes_unlinked_generations_and_temps(stored: Paths) -> None:
    base = stored.metadata_dir
    current = os.readlink(base / "lvfs")
    orphan = base / "lvfs.0123456789ab"  # a store killed before its swap
    orphan.mkdir()
    (orphan / REMOTE.metadata_name).write_bytes(b"half")
    tmp_link = temp_name(base / "lvfs")
    tmp_link.symlink_to(orphan.name)
    state_tmp = temp_name(stored.metadata_state_file)
    state_tmp.write_bytes(b"{")
    stranger = base / "README"
    stranger.write_bytes(b"")

    removed = MetadataStore(stored).tidy()
    assert sorted(removed) == sorted([orphan.name, tmp_link.name, state_tmp.name])
    assert {p.name for p in base.iterdir()} == {"lvfs", current, "README"}
    # the receive service tidies under the lock it holds already
    orphan.mkdir()
    store = MetadataStore(stored)
    with store.locked():
        assert store.tidy_locked() == [orphan.name]


def test_a_record_that_is_no_file_is_ignored(stored: Paths) -> None:
    """The generation's record is the service's file: a FIFO or a link in its place
    neither hangs the root manager nor is followed; the state file answers."""
    record = stored.metadata_dir / "lvfs" / ACCEPTED_NAME
    record.unlink()
    os.mkfifo(record)
    accepted = MetadataStore(stored).accepted("lvfs")
    assert accepted is not None and accepted["signed_at"] == T0.isoformat()
    record.unlink()
    record.symlink_to("/dev/zero")
    assert MetadataStore(stored).accepted("lvfs") == accepted


@pytest.mark.parametrize("name", ["firmware.xml.zst", "firmware.xml.gz", "firmware.xml.xz",
                                  "firmware.xml"])  # fmt: skip
def test_a_closed_catalog_reader_leaves_no_fd(tmp_path: Path, name: str) -> None:
    """The reader's dup of the verified fd goes when the reader is closed, not when the
    garbage collector gets to it (a long-lived process would gather them)."""
    xml = b"<components/>"
    packed = {"firmware.xml.zst": zstandard.ZstdCompressor().compress(xml),
              "firmware.xml.gz": gzip.compress(xml), "firmware.xml.xz": lzma.compress(xml),
              "firmware.xml": xml}[name]  # fmt: skip
    (tmp_path / name).write_bytes(packed)
    fd = os.open(tmp_path / name, os.O_RDONLY)
    gc.disable()  # what is closed must be closed by close(), not collected
    try:
        before = len(os.listdir("/proc/self/fd"))
        with open_catalog(fd, name, Limits()) as stream:
            assert stream.read() == xml
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        gc.enable()
        os.close(fd)
