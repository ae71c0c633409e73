"""broker.transfer: framing between qubes, bounded reads, header checks, untrusted files."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time
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
    StreamReader,
    UntrustedFiles,
    install_file,
    is_file_name,
    parse_header,
    prune_cabs,
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
