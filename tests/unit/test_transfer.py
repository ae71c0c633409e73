"""broker.transfer: framing between qubes, bounded reads, header checks, untrusted files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import BrokerError, FormatError, LimitExceeded, TransferError
from broker.signatures import sha256_fd
from broker.transfer import (
    CHUNK,
    FRAME_VERSION,
    FrameFile,
    ProgressLines,
    StreamReader,
    UntrustedFiles,
    fsync_dir,
    install_file,
    is_file_name,
    parse_header,
    prune_cabs,
    read_small,
    write_atomic,
    write_frame,
)
from tests.properties import assert_user_message, expect_only_our_errors

HEADER_MAX = 64 * 1024


# --------------------------------------------------------------------------- helpers
class Pipe:
    """A pipe whose ends are each closed exactly once, by whoever is done first: a writer
    thread must never close an fd number that a later test has been given."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self._open = {self.r, self.w}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def close(self, fd: int) -> None:
        with self._lock:
            if fd in self._open:
                self._open.discard(fd)
                os.close(fd)

    def writer(self, write: Callable[[int], object], close: bool = True) -> threading.Thread:
        """Run write(w) in a thread (a pipe buffer is smaller than our files)."""

        def run() -> None:
            try:
                write(self.w)
            except (BrokenPipeError, TransferError):
                pass  # the reader gave up, as it should
            finally:
                if close:
                    self.close(self.w)

        t = threading.Thread(target=run, daemon=True)
        self._threads.append(t)
        t.start()
        return t

    def feed(self, data: bytes, close: bool = True) -> threading.Thread:
        return self.writer(lambda w: _write_all(w, data), close)

    def teardown(self) -> None:
        self.close(self.r)  # a writer still blocked gets EPIPE
        for t in self._threads:
            t.join(5)
        self.close(self.w)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    p.teardown()


def _file_fd(tmp_path: Path, name: str, content: bytes) -> int:
    path = tmp_path / name
    path.write_bytes(content)
    return os.open(path, os.O_RDONLY)


def _reader(fd: int, seconds: float = 5.0) -> StreamReader:
    return StreamReader(fd, time.monotonic() + seconds)


def _header(files: list[Any], **extra: Any) -> bytes:
    return json.dumps({"version": FRAME_VERSION, "files": files, **extra}).encode()


# --------------------------------------------------------------------------- round trip
def test_write_frame_reads_back_byte_exact(tmp_path: Path, pipe: Pipe) -> None:
    r = pipe.r
    big = os.urandom(CHUNK * 2 + 12345)  # several chunks, not a multiple of the chunk size
    small = b"jcat\x00\xff\n\x1b binary"
    empty = b""
    fds = [
        ("firmware.xml.zst", _file_fd(tmp_path, "a", big)),
        ("firmware.xml.zst.jcat", _file_fd(tmp_path, "b", small)),
        ("empty.bin", _file_fd(tmp_path, "c", empty)),
    ]
    nonce = "0123456789abcdef0123456789abcdef"

    t = pipe.writer(lambda w: write_frame(w, {"nonce": nonce}, fds))
    reader = _reader(r)
    header, files = parse_header(reader.readline(HEADER_MAX))
    assert header["nonce"] == nonce
    assert header["version"] == FRAME_VERSION
    assert files == (
        FrameFile("firmware.xml.zst", len(big)),
        FrameFile("firmware.xml.zst.jcat", len(small)),
        FrameFile("empty.bin", 0),
    )
    out = tmp_path / "out"
    out_fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        reader.copy_exact(out_fd, files[0].size)
        assert reader.read_exact(files[1].size) == small
        assert reader.read_exact(files[2].size) == b""
        reader.expect_eof()
        assert sha256_fd(out_fd) == (hashlib.sha256(big).hexdigest(), len(big))
    finally:
        os.close(out_fd)
        for _, fd in fds:
            os.close(fd)
    t.join(5)
    assert out.read_bytes() == big


def test_copy_exact_hashes_what_it_copies(tmp_path: Path) -> None:
    data = os.urandom(CHUNK + 7)
    src = _file_fd(tmp_path, "src", b"ignored line\n" + data)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        reader = _reader(src)
        assert reader.readline(100) == b"ignored line"
        h = hashlib.sha256()
        reader.copy_exact(dst, len(data), h)
        reader.expect_eof()
    finally:
        os.close(src)
        os.close(dst)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "dst").read_bytes() == data


def test_write_frame_refuses_a_file_that_shrinks(
    tmp_path: Path, pipe: Pipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, w = pipe.r, pipe.w
    fd = _file_fd(tmp_path, "f", b"x" * 100)
    real_fstat = os.fstat
    # the file shrinks between fstat (size in the header) and sending
    monkeypatch.setattr(
        os, "fstat", lambda f: SimpleNamespace(st_size=200) if f == fd else real_fstat(f)
    )
    try:
        with pytest.raises(TransferError, match=r"f\.bin shrank while being sent"):
            write_frame(w, {}, [("f.bin", fd)])
    finally:
        monkeypatch.undo()
        os.close(fd)
    pipe.close(w)
    sent = os.read(r, 10_000)
    _, files = parse_header(sent.split(b"\n", 1)[0])
    assert files == (FrameFile("f.bin", 200),)
    assert sent.split(b"\n", 1)[1] == b"x" * 100


# --------------------------------------------------------------------------- readline
def test_header_line_at_the_cap_is_accepted(pipe: Pipe) -> None:
    r = pipe.r
    pipe.feed(b"a" * 64 + b"\nrest")
    reader = _reader(r)
    assert reader.readline(64) == b"a" * 64
    assert reader.read_exact(4) == b"rest"
    reader.expect_eof()


def test_header_line_over_the_cap_is_refused(pipe: Pipe) -> None:
    r = pipe.r
    pipe.feed(b"a" * 65 + b"\n")
    with pytest.raises(LimitExceeded, match="longer than 64 bytes"):
        _reader(r).readline(64)


def test_endless_header_line_is_refused_without_reading_it_all(pipe: Pipe) -> None:
    r = pipe.r
    # the writer never ends the line nor closes: the cap must trigger, not EOF or deadline
    t = pipe.feed(b"{" * (HEADER_MAX * 4), close=False)
    start = time.monotonic()
    with pytest.raises(LimitExceeded, match=f"longer than {HEADER_MAX} bytes"):
        _reader(r, 5.0).readline(HEADER_MAX)
    assert time.monotonic() - start < 2.0
    pipe.close(r)  # unblocks the writer (EPIPE)
    t.join(5)


def test_header_line_dribbled_over_the_cap_is_refused(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    os.write(w, b"ab")
    reader = _reader(r)
    os.write(w, b"cd")
    os.write(w, b"ef\n")
    with pytest.raises(LimitExceeded):
        reader.readline(5)


def test_stream_ending_mid_header_is_refused(pipe: Pipe) -> None:
    r = pipe.r
    pipe.feed(b'{"version": 1, "fil')
    with pytest.raises(TransferError, match="header line was complete"):
        _reader(r).readline(HEADER_MAX)


def test_empty_stream_is_refused(pipe: Pipe) -> None:
    pipe.close(pipe.w)
    r = pipe.r
    with pytest.raises(TransferError, match="header"):
        _reader(r).readline(HEADER_MAX)


def test_stream_ending_mid_file_is_refused_naming_the_bytes(tmp_path: Path, pipe: Pipe) -> None:
    r = pipe.r
    pipe.feed(_header([{"name": "a.cab", "size": 10}]) + b"\n" + b"123")
    reader = _reader(r)
    _, files = parse_header(reader.readline(HEADER_MAX))
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(TransferError, match="after 3 of 10 bytes"):
            reader.copy_exact(out, files[0].size)
    finally:
        os.close(out)


def test_read_exact_short_stream_is_refused_naming_the_bytes(pipe: Pipe) -> None:
    r = pipe.r
    pipe.feed(b"12345")
    with pytest.raises(TransferError, match="after 5 of 8 bytes"):
        _reader(r).read_exact(8)


def test_extra_bytes_after_the_last_file_are_refused(pipe: Pipe) -> None:
    r = pipe.r
    pipe.feed(_header([{"name": "a.cab", "size": 3}]) + b"\nabcX")
    reader = _reader(r)
    _, files = parse_header(reader.readline(HEADER_MAX))
    assert reader.read_exact(files[0].size) == b"abc"
    with pytest.raises(TransferError, match="unexpected bytes after the last file"):
        reader.expect_eof()


def test_extra_bytes_already_buffered_are_refused(pipe: Pipe) -> None:
    r = pipe.r
    # everything arrives in one read: the surplus sits in the reader's buffer
    pipe.feed(b"h\nX")
    reader = _reader(r)
    assert reader.readline(10) == b"h"
    with pytest.raises(TransferError, match="unexpected bytes"):
        reader.expect_eof()


# --------------------------------------------------------------------------- deadline
def test_silent_writer_hits_the_deadline(pipe: Pipe) -> None:
    r = pipe.r  # the write end stays open and never writes
    reader = StreamReader(r, time.monotonic() + 0.2)
    start = time.monotonic()
    with pytest.raises(TransferError, match="deadline"):
        reader.readline(HEADER_MAX)
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 0.3


def test_silent_writer_mid_file_hits_the_deadline(tmp_path: Path, pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    os.write(w, b"header\n12")
    reader = StreamReader(r, time.monotonic() + 0.2)
    assert reader.readline(100) == b"header"
    start = time.monotonic()
    with pytest.raises(TransferError, match="deadline"):
        reader.read_exact(10)
    assert time.monotonic() - start < 0.3


def test_dribbling_writer_hits_the_whole_stream_deadline(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    stop = threading.Event()

    def dribble() -> None:
        while not stop.is_set():
            try:
                os.write(w, b"x")
            except OSError:
                return
            time.sleep(0.02)

    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    try:
        reader = StreamReader(r, time.monotonic() + 0.2)
        start = time.monotonic()
        with pytest.raises(TransferError, match="deadline"):
            reader.read_exact(10_000)  # every read is quick, the whole is not
        assert time.monotonic() - start < 0.35
    finally:
        stop.set()
        t.join(2)


def test_expired_deadline_refuses_before_reading(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    os.write(w, b"data that is ready\n")
    reader = StreamReader(r, time.monotonic() - 1)
    with pytest.raises(TransferError, match="deadline"):
        reader.readline(100)


# --------------------------------------------------------------------------- parse_header
def test_parse_header_accepts_a_valid_header() -> None:
    line = _header(
        [{"name": "firmware.xml.zst", "size": 0}, {"name": "A-b_c+1.cab", "size": 2**40}],
        nonce="n",
    )
    header, files = parse_header(line)
    assert header["nonce"] == "n"
    assert files == (FrameFile("firmware.xml.zst", 0), FrameFile("A-b_c+1.cab", 2**40))


def test_parse_header_accepts_the_longest_name() -> None:
    # an LVFS-style name (<sha1>-<Vendor>-<Model>-<version>.cab) at NAME_MAX
    name = ("0123456789abcdef" * 3)[:40] + "-" + "V" * 204 + "-1.2.3.cab"
    assert len(name) == 255
    _, files = parse_header(_header([{"name": name, "size": 1}]))
    assert files[0].name == name


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"\xff\xfe{}",  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser recurses
        b"",
    ],
)
def test_parse_header_refuses_non_json(line: bytes) -> None:
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_header(line)


@pytest.mark.parametrize(
    "doc",
    [
        [],
        "string",
        {"files": []},
        {"version": 2, "files": []},
        {"version": "1", "files": []},
        {"version": None, "files": []},
    ],
)
def test_parse_header_refuses_wrong_version_or_shape(doc: object) -> None:
    with pytest.raises(FormatError, match=f"version {FRAME_VERSION} object"):
        parse_header(json.dumps(doc).encode())


@pytest.mark.parametrize("version", [True, 1.0])
def test_parse_header_refuses_version_of_the_wrong_type(version: object) -> None:
    with pytest.raises(FormatError, match="version"):
        parse_header(json.dumps({"version": version, "files": []}).encode())


@pytest.mark.parametrize("files", [None, {}, "a.cab", 3, {"name": "a.cab", "size": 1}])
def test_parse_header_refuses_files_that_are_not_a_list(files: object) -> None:
    with pytest.raises(FormatError, match="list of at most"):
        parse_header(json.dumps({"version": 1, "files": files}).encode())


def test_parse_header_refuses_missing_files() -> None:
    with pytest.raises(FormatError, match="list of at most 8 files"):
        parse_header(b'{"version": 1}')


def test_parse_header_refuses_too_many_files() -> None:
    files = [{"name": f"f{i}", "size": 1} for i in range(3)]
    assert len(parse_header(_header(files[:2]), max_files=2)[1]) == 2
    with pytest.raises(FormatError, match="at most 2 files"):
        parse_header(_header(files), max_files=2)
    with pytest.raises(FormatError, match="at most 8 files"):
        parse_header(_header([{"name": f"f{i}", "size": 1} for i in range(9)]))


@pytest.mark.parametrize("entry", [None, "a.cab", ["a.cab", 1], 5])
def test_parse_header_refuses_entries_that_are_not_objects(entry: object) -> None:
    with pytest.raises(FormatError, match="not an object"):
        parse_header(_header([entry]))


@pytest.mark.parametrize(
    "name",
    [
        "a/b",
        "/etc/passwd",
        "..",
        "../x",
        "x/../y",
        ".hidden",
        ".",
        "",
        "-rf",
        "a\x1bb",
        "a\x00b",
        "a\tb",
        "a\nb",
        "a\x7fb",
        "a b",
        "a\\b",
        "a" * 256,
        "caf\u00e9.cab",
        "a\u202eb",
        None,
        5,
        ["a"],
    ],
)
def test_parse_header_refuses_bad_names(name: object) -> None:
    with pytest.raises(FormatError, match="path, control or invalid characters"):
        parse_header(_header([{"name": name, "size": 1}]))


def test_parse_header_refuses_a_name_with_a_trailing_newline() -> None:
    with pytest.raises(FormatError, match="control or invalid characters"):
        parse_header(_header([{"name": "a.cab\n", "size": 1}]))


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("firmware.xml.zst", True),
        ("a", True),
        ("A-b_c+1.cab", True),
        ("a" * 255, True),
        ("a" * 256, False),
        ("", False),
        (".", False),
        ("..", False),
        (".jcat", False),
        ("a/b", False),
        ("a\x00", False),
        ("a\rb", False),
        pytest.param(
            "fw.cab\n",
            False,
            marks=(),
        ),
    ],
)
def test_is_file_name(name: str, ok: bool) -> None:
    assert is_file_name(name) is ok


def test_parse_header_refuses_duplicate_names() -> None:
    with pytest.raises(FormatError, match=r"names a\.cab twice"):
        parse_header(_header([{"name": "a.cab", "size": 1}, {"name": "a.cab", "size": 2}]))


@pytest.mark.parametrize("size", [-1, True, False, "5", 1.5, 1.0, None, [1], {"n": 1}])
def test_parse_header_refuses_bad_sizes(size: object) -> None:
    with pytest.raises(FormatError, match=r"gives a\.cab an invalid size"):
        parse_header(_header([{"name": "a.cab", "size": size}]))


def test_parse_header_refuses_a_missing_size() -> None:
    with pytest.raises(FormatError, match="invalid size"):
        parse_header(_header([{"name": "a.cab"}]))


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=512))
def test_parse_header_arbitrary_bytes_only_raise_broker_errors(line: bytes) -> None:
    with expect_only_our_errors():
        parse_header(line)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)


@settings(
    max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    version=st.one_of(st.just(1), _json),
    files=st.one_of(
        _json,
        st.lists(
            st.one_of(
                _json,
                st.fixed_dictionaries(
                    {"name": st.one_of(st.text(max_size=140), _json), "size": _json}
                ),
            ),
            max_size=10,
        ),
    ),
)
def test_parse_header_structured_input_only_raises_broker_errors(
    version: object, files: object
) -> None:
    line = json.dumps({"version": version, "files": files}).encode()
    try:
        _, parsed = parse_header(line)
    except BrokerError as e:
        assert_user_message(e)
        return
    for f in parsed:
        assert isinstance(f.size, int) and not isinstance(f.size, bool) and f.size >= 0
        assert "/" not in f.name and not f.name.startswith(".")


# --------------------------------------------------------------------------- UntrustedFiles
def test_untrusted_files_are_private_and_removed_on_exit(tmp_path: Path) -> None:
    d = tmp_path / "untrusted"
    with UntrustedFiles(d, "n1") as u:
        fd = u.create("a.cab")
        os.write(fd, b"data")
        path = u.paths["a.cab"]
        assert path.parent == d
        assert path.name == "n1.0.UNTRUSTED"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert path.read_bytes() == b"data"
    assert not path.exists()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed
    assert list(d.iterdir()) == []


def test_untrusted_files_are_removed_on_exception(tmp_path: Path) -> None:
    d = tmp_path / "untrusted"
    with pytest.raises(RuntimeError, match="boom"), UntrustedFiles(d, "n2") as u:
        fds = [u.create("a.cab"), u.create("b.jcat")]
        raise RuntimeError("boom")
    assert list(d.iterdir()) == []
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_untrusted_files_refuse_an_existing_name(tmp_path: Path) -> None:
    d = tmp_path / "untrusted"
    d.mkdir()
    existing = d / "n3.0.UNTRUSTED"
    existing.write_bytes(b"planted")
    with UntrustedFiles(d, "n3") as u, pytest.raises(FileExistsError):
        u.create("a.cab")
    assert existing.read_bytes() == b"planted"  # neither truncated nor removed


def test_untrusted_files_refuse_the_same_name_twice(tmp_path: Path) -> None:
    with UntrustedFiles(tmp_path / "u", "n4") as u:
        u.create("a.cab")
        with pytest.raises(FileExistsError):
            u.create("a.cab")


@pytest.mark.parametrize("dangling", [False, True])
def test_untrusted_files_refuse_a_planted_symlink(tmp_path: Path, dangling: bool) -> None:
    d = tmp_path / "untrusted"
    d.mkdir()
    target = tmp_path / "victim"
    if not dangling:
        target.write_bytes(b"precious")
    (d / "n5.0.UNTRUSTED").symlink_to(target)
    with UntrustedFiles(d, "n5") as u:
        with pytest.raises(FileExistsError):
            u.create("a.cab")
        assert u.paths == {}
    if dangling:
        assert not target.exists()  # not created through the link
    else:
        assert target.read_bytes() == b"precious"
    # the planted link was not ours to remove, and nothing was written through it
    assert (d / "n5.0.UNTRUSTED").is_symlink()


# --------------------------------------------------------------------------- install_file
def test_install_file_moves_atomically(tmp_path: Path) -> None:
    with UntrustedFiles(tmp_path / "untrusted", "n6") as u:
        fd = u.create("a.cab")
        os.write(fd, b"verified bytes")
        src = u.paths["a.cab"]
        inode = os.fstat(fd).st_ino
        dest = tmp_path / "cache" / "cabs" / "abc.cab"
        install_file(fd, src, dest)
        assert not src.exists()
        assert dest.read_bytes() == b"verified bytes"
        assert dest.stat().st_ino == inode  # renamed, the very file that was checked
        # the fd still refers to the installed file
        os.lseek(fd, 0, os.SEEK_SET)
        assert os.read(fd, 100) == b"verified bytes"
    assert dest.read_bytes() == b"verified bytes"  # exit does not remove what was handed over


def test_install_file_replaces_an_existing_file(tmp_path: Path) -> None:
    dest = tmp_path / "cabs" / "abc.cab"
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    with UntrustedFiles(tmp_path / "untrusted", "n7") as u:
        fd = u.create("a.cab")
        os.write(fd, b"new")
        install_file(fd, u.paths["a.cab"], dest)
    assert dest.read_bytes() == b"new"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["abc.cab"]


def test_sha256_fd_hashes_the_whole_file_and_leaves_the_offset(tmp_path: Path) -> None:
    fd = _file_fd(tmp_path, "f", b"hello")
    try:
        os.read(fd, 2)
        assert sha256_fd(fd) == (hashlib.sha256(b"hello").hexdigest(), 5)
        assert os.read(fd, 10) == b"llo"
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- prune_cabs
def _cab(d: Path, n: int, size: int, age: int) -> Path:
    path = d / f"{n:064x}.cab"
    path.write_bytes(b"c" * size)
    os.utime(path, ns=(1_000_000_000 * age, 1_000_000_000 * age))
    return path


def test_prune_cabs_removes_the_oldest_until_under_the_cap_and_never_the_new_one(
    tmp_path: Path,
) -> None:
    old, middle, new = (
        _cab(tmp_path, 1, 400, 1),
        _cab(tmp_path, 2, 400, 2),
        _cab(tmp_path, 3, 400, 3),
    )
    other = tmp_path / "notes.txt"  # not ours to judge
    other.write_bytes(b"x" * 10_000)
    assert prune_cabs(tmp_path, 900, keep=new) == [old.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([middle.name, new.name, other.name])
    # a new cab larger than the cap alone: everything else goes, it stays
    assert prune_cabs(tmp_path, 100, keep=new) == [middle.name]
    assert new.exists() and other.exists()
    assert prune_cabs(tmp_path / "missing", 0) == []


# --------------------------------------------------------------------------- mutation gaps
# (issue 21: each test below kills mutants of broker.transfer that the tests above let live)
class Reads:
    """os.read on one fd, the first reads cut to the sizes given (a sender whose bytes
    arrive in pieces), every size asked for recorded; deterministic, unlike a timed writer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fd: int, cuts: list[int]) -> None:
        self.fd, self.cuts, self.asked = fd, list(cuts), []
        real = os.read

        def read(f: int, n: int) -> bytes:
            if f != self.fd:
                return real(f, n)
            self.asked.append(n)
            return real(f, min(n, self.cuts.pop(0)) if self.cuts else n)

        monkeypatch.setattr(os, "read", read)


def _rest(pipe: Pipe) -> bytes:
    """What the reader left in the pipe (the writer has closed)."""
    pipe.close(pipe.w)
    out = b""
    while chunk := os.read(pipe.r, 65536):
        out += chunk
    return out


def test_header_split_across_reads_is_joined(pipe: Pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    line = _header([{"name": "a.cab", "size": 3}], nonce="ab" * 16)
    os.write(pipe.w, line + b"\nabc")
    Reads(monkeypatch, pipe.r, [5, 7, 1])  # the line arrives in four pieces
    reader = _reader(pipe.r)
    assert reader.readline(HEADER_MAX) == line
    assert reader.read_exact(3) == b"abc"
    pipe.close(pipe.w)
    reader.expect_eof()


def test_header_at_the_cap_split_before_its_newline_is_accepted(
    pipe: Pipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.write(pipe.w, b"a" * 64 + b"\nX")
    Reads(monkeypatch, pipe.r, [64])  # all of the line, then its newline alone
    reader = _reader(pipe.r)
    assert reader.readline(64) == b"a" * 64
    assert reader.read_exact(1) == b"X"


def test_newline_at_the_start_of_a_read_ends_the_line(
    pipe: Pipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.write(pipe.w, b"abc\nX")
    Reads(monkeypatch, pipe.r, [3])
    reader = _reader(pipe.r)
    assert reader.readline(10) == b"abc"
    assert reader.read_exact(1) == b"X"


def test_empty_header_line_is_an_empty_line(pipe: Pipe) -> None:
    pipe.feed(b"\nX")
    reader = _reader(pipe.r)
    assert reader.readline(10) == b""
    assert reader.read_exact(1) == b"X"


def test_readline_stops_at_the_first_newline(pipe: Pipe) -> None:
    pipe.feed(b"h1\nh2\n")
    reader = _reader(pipe.r)
    assert reader.readline(10) == b"h1"
    assert reader.readline(10) == b"h2"


@pytest.mark.parametrize("cuts", [[], [2]])
def test_header_over_the_cap_reads_no_more_than_the_cap_and_one_byte(
    pipe: Pipe, monkeypatch: pytest.MonkeyPatch, cuts: list[int]
) -> None:
    data = b"abcdefghij\nrest"
    os.write(pipe.w, data)
    Reads(monkeypatch, pipe.r, cuts)
    with pytest.raises(LimitExceeded, match=r"^header line longer than 5 bytes$"):
        _reader(pipe.r).readline(5)
    monkeypatch.undo()
    assert _rest(pipe) == data[6:]  # the sender's surplus stays unread


def test_read_exact_joins_pieces(pipe: Pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    os.write(pipe.w, b"12345678")
    Reads(monkeypatch, pipe.r, [3, 2])
    assert _reader(pipe.r).read_exact(8) == b"12345678"


def test_deadline_reached_exactly_refuses_ready_bytes(
    pipe: Pipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.write(pipe.w, b"ready\n")
    monkeypatch.setattr(time, "monotonic", lambda: 1000.0)
    with pytest.raises(TransferError, match=r"^transfer took too long \(deadline reached\)$"):
        StreamReader(pipe.r, 1000.0).readline(100)


def test_deadline_messages_are_exact(pipe: Pipe) -> None:
    reader = StreamReader(pipe.r, time.monotonic() + 0.05)  # nothing ever written
    with pytest.raises(TransferError, match=r"^transfer took too long \(deadline reached\)$"):
        reader.readline(100)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"^stream ended before the header line was complete$"),
        (b"h\nX", r"^unexpected bytes after the last file$"),
    ],
)
def test_stream_end_messages_are_exact(pipe: Pipe, data: bytes, message: str) -> None:
    pipe.feed(data)
    reader = _reader(pipe.r)
    with pytest.raises(TransferError, match=message):
        reader.readline(10)
        reader.expect_eof()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{", r"^header is not valid JSON$"),
        (_header([5]), r"^header file entry is not an object$"),
        (
            _header([{"name": "../a", "size": 1}]),
            r"^header names a file with a path, control or invalid characters$",
        ),
    ],
)
def test_parse_header_messages_are_exact(line: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_header(line)


def test_fsync_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "f")
    fsync_dir(tmp_path)


def test_untrusted_files_make_their_parents(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b" / "untrusted"
    with UntrustedFiles(d, "n8") as u:
        u.create("a.cab")
        with pytest.raises(FileExistsError, match=r"^a\.cab was already received$"):
            u.create("a.cab")
    assert d.is_dir()


def _swap_under(u: UntrustedFiles, tmp_path: Path, symlink: bool) -> Path:
    """Replace the untrusted path after verification: by another file, or by a link to
    the verified file itself (moved away, where its writer can still reach it)."""
    src = u.paths["a.cab"]
    moved = tmp_path / "moved"
    src.rename(moved)
    if symlink:
        src.symlink_to(moved)
    else:
        src.write_bytes(b"swapped in")
    return moved


@pytest.mark.parametrize("symlink", [False, True])
def test_install_file_refuses_what_was_swapped_after_verification(
    tmp_path: Path, symlink: bool
) -> None:
    dest = tmp_path / "cabs" / "abc.cab"
    with UntrustedFiles(tmp_path / "untrusted", "n9") as u:
        fd = u.create("a.cab")
        os.write(fd, b"verified")
        moved = _swap_under(u, tmp_path, symlink)
        with pytest.raises(
            TransferError, match=r"^abc\.cab: replaced between verification and storing$"
        ):
            install_file(fd, u.paths["a.cab"], dest)
    assert not dest.exists() and not dest.is_symlink()
    assert moved.read_bytes() == b"verified"


def _order(monkeypatch: pytest.MonkeyPatch, first: list[str]) -> None:
    """iterdir in a fixed order: the names in ``first``, then the rest sorted."""
    real = Path.iterdir

    def iterdir(self: Path) -> Iterator[Path]:
        paths = sorted(real(self), key=lambda p: (p.name not in first, p.name))
        return iter(paths)

    monkeypatch.setattr(Path, "iterdir", iterdir)


def test_prune_cabs_looks_past_other_files_and_the_kept_cab(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep = _cab(tmp_path, 9, 10, 9)
    old = _cab(tmp_path, 1, 100, 1)
    (tmp_path / "notes.txt").write_bytes(b"x")
    _order(monkeypatch, ["notes.txt", keep.name])
    assert prune_cabs(tmp_path, 50, keep=keep) == [old.name]


def test_prune_cabs_without_keep_stops_at_the_cap_exactly(tmp_path: Path) -> None:
    a, b = _cab(tmp_path, 1, 100, 1), _cab(tmp_path, 2, 100, 2)
    assert prune_cabs(tmp_path, 200) == []
    assert prune_cabs(tmp_path, 199) == [a.name]
    assert b.exists() and not a.exists()


def test_prune_cabs_removes_as_many_as_it_takes(tmp_path: Path) -> None:
    cabs = [_cab(tmp_path, n, 100, n) for n in range(1, 5)]
    assert prune_cabs(tmp_path, 150) == [c.name for c in cabs[:3]]
    assert [p.name for p in tmp_path.iterdir()] == [cabs[3].name]


def test_prune_cabs_counts_a_link_as_a_link_and_leaves_its_target(tmp_path: Path) -> None:
    cabs = tmp_path / "cabs"
    cabs.mkdir()
    target = tmp_path / "big"
    target.write_bytes(b"t" * 10_000)
    link = cabs / f"{7:064x}.cab"
    link.symlink_to(target)
    assert prune_cabs(cabs, 1000) == []  # the link's own size is far under the cap
    assert prune_cabs(cabs, 0) == [link.name]
    assert target.read_bytes() == b"t" * 10_000


def test_prune_cabs_survives_a_concurrent_prune(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone, vanishing = _cab(tmp_path, 1, 100, 1), _cab(tmp_path, 2, 100, 2)
    newest = _cab(tmp_path, 3, 100, 3)
    real_stat = Path.stat

    def stat_(self: Path, *, follow_symlinks: bool = True) -> os.stat_result:
        if self.name == gone.name:  # removed by another run after the listing
            self.unlink()
            raise FileNotFoundError(self)
        st = real_stat(self, follow_symlinks=follow_symlinks)
        if self.name == vanishing.name:  # removed by another run between stat and unlink
            self.unlink()
        return st

    _order(monkeypatch, [gone.name])
    monkeypatch.setattr(Path, "stat", stat_)
    assert prune_cabs(tmp_path, 100) == [vanishing.name]
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [newest.name]


# --------------------------------------------------------------------------- read_small
def test_read_small_reads_up_to_the_cap_exactly(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"12345")
    assert read_small(f, 5) == b"12345"
    with pytest.raises(LimitExceeded, match=rf"^{f} is more than 4 bytes$"):
        read_small(f, 4)


def test_read_small_refuses_a_big_file_without_reading_it(tmp_path: Path) -> None:
    f = tmp_path / "sparse"
    with f.open("wb") as out:
        out.truncate(64 * 1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceeded):
            read_small(f, 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_read_small_follows_a_symlink_only_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"data")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(OSError):
        read_small(link, 100)
    assert read_small(link, 100, follow=True) == b"data"


def test_read_small_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            read_small(fifo, 100)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(2)
    if t.is_alive():  # release the blocked open(2), then fail
        os.close(os.open(fifo, os.O_WRONLY))
        t.join(2)
        pytest.fail("read_small blocked on a FIFO")
    assert len(errors) == 1 and isinstance(errors[0], FormatError)
    assert str(errors[0]) == f"{fifo}: not a regular file"


# --------------------------------------------------------------------------- write_atomic
@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_write_atomic_makes_parents_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.json"
    write_atomic(path, b"one")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["state.json"]  # no temp file left


@pytest.mark.parametrize("mode", [None, 0o600, 0o644])
def test_write_atomic_mode_is_never_wider_than_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask0: None, mode: int | None
) -> None:
    """The mode holds from creation on (a umask of 0 cannot widen it meanwhile) and after
    (a umask of 077 cannot narrow it)."""
    want = 0o640 if mode is None else mode
    seen: list[int] = []
    real_fchmod = os.fchmod

    def fchmod(fd: int, m: int) -> None:
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fchmod(fd, m)

    monkeypatch.setattr(os, "fchmod", fchmod)
    path = tmp_path / "f"
    os.umask(0o077)
    write_atomic(path, b"x") if mode is None else write_atomic(path, b"x", mode)
    assert stat.S_IMODE(path.stat().st_mode) == want
    os.umask(0)
    write_atomic(path, b"y") if mode is None else write_atomic(path, b"y", mode)
    assert seen[1] == want
    assert stat.S_IMODE(path.stat().st_mode) == want


def test_write_atomic_never_writes_through_a_planted_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(secrets, "token_hex", lambda n: "ab" * n)
    path = tmp_path / "state.json"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / f".state.json.{'ab' * 4}.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_atomic(path, b"data")
    assert victim.read_bytes() == b"precious"
    assert not path.exists()


def test_write_atomic_temp_file_is_hidden_beside_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    renamed: list[tuple[str, str]] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        renamed.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / ("n" * 241)  # NAME_MAX with the temp name's 14 characters
    write_atomic(path, b"data")
    ((src, dst),) = renamed
    assert dst == str(path)
    assert Path(src).parent == tmp_path
    assert re.fullmatch(rf"\.{'n' * 241}\.[0-9a-f]{{8}}\.tmp", Path(src).name)
    assert path.read_bytes() == b"data"


# --------------------------------------------------------------------------- ProgressLines
def test_progress_lines_are_json_lines_at_most_every_interval(
    pipe: Pipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1.1]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    report = ProgressLines(pipe.w)
    for t, done, final in [(1.1, 1, False), (1.2, 2, False), (1.35, 3, False),
                           (1.4, 4, False), (1.41, 5, True)]:  # fmt: skip
        now[0] = t
        if final:
            report("a.cab", done, 10, final=True)
        else:
            report("a.cab", done, 10)  # not final unless said
    ProgressLines(pipe.w, unit="%")("dev", 50, None)
    monkeypatch.undo()
    lines = _rest(pipe).split(b"\n")
    assert lines[-1] == b""
    assert [json.loads(line) for line in lines[:-1]] == [
        {"progress": {"name": "a.cab", "done": d, "total": 10, "unit": "bytes"}} for d in (1, 3, 5)
    ] + [{"progress": {"name": "dev", "done": 50, "total": None, "unit": "%"}}]


def test_progress_line_written_after_exactly_the_interval(
    pipe: Pipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    report = ProgressLines(pipe.w)
    report("a", 1, None)
    now[0] = 100.25
    report("a", 2, None)
    monkeypatch.undo()
    assert len(_rest(pipe).splitlines()) == 2


def test_progress_to_a_reader_gone_is_cancelled(pipe: Pipe) -> None:
    pipe.close(pipe.r)
    with pytest.raises(TransferError, match=r"^dom0 went away: cancelled$"):
        ProgressLines(pipe.w)("a", 1, 2, final=True)
