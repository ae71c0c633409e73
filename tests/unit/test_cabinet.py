"""broker.cabinet: a header-first cab walk that agrees with cabarchive, and what dom0 refuses."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import struct
import subprocess
import time
import tracemalloc
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cabarchive
import pytest
from cabarchive.utils import _checksum_compute  # type: ignore[attr-defined]  # not in its stubs
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from broker.cabinet import (
    CabInfo,
    CabMember,
    ExpectedRelease,
    _verify_member,
    inspect_cab,
    walk_cab,
)
from broker.config import Limits
from broker.errors import BrokerError, FormatError, LimitExceeded, VerificationError
from broker.jcat import BlobKind, build_jcat, parse_jcat
from broker.sandbox.pki import SandboxPki, sign_pkcs7
from broker.signatures import TrustPolicy, TrustStore
from tests.properties import assert_user_message, expect_only_our_errors

from .conftest import FWUPD_PKI

LIMITS = Limits()
INSTALLED_TESTS = Path("/usr/share/installed-tests/fwupd")
MiB = 1024 * 1024
BLOCK = 32768

FAKE_ID = "org.fwupd.fakedevice.firmware"
FAKE_GUID = "b585990a-003e-5270-89d5-3705a17f9a43"
FAKE_124 = ExpectedRelease(FAKE_ID, "1.2.4", (FAKE_GUID,))

SANDBOX_ID = "org.qubes-os.sandbox.device.firmware"
SANDBOX_GUID = "6f2b0a1c-1b8e-5a4e-9d7e-2a9e4e2b4c11"
SANDBOX_RELEASE = ExpectedRelease(SANDBOX_ID, "2.0.1", (SANDBOX_GUID.upper(),))
FIRMWARE = b"sandbox firmware image\n" * 3000  # spans three blocks


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def memfd(data: bytes) -> Iterator[int]:
    """A regular file holding ``data``, without touching the disk."""
    fd = os.memfd_create("cab", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


def walk(data: bytes, limits: Limits = LIMITS) -> tuple[CabMember, ...]:
    with memfd(data) as fd:
        return walk_cab(fd, limits)


def refused(
    data: bytes,
    error: type[BrokerError] | tuple[type[BrokerError], ...] = FormatError,
    limits: Limits = LIMITS,
) -> str:
    with pytest.raises(error) as e:
        walk(data, limits)
    message = str(e.value)
    assert "\n" not in message
    return message


def reference(data: bytes) -> dict[str, tuple[int, str]]:
    """What cabarchive reads from the same bytes: name -> (size, sha256)."""
    archive = cabarchive.CabArchive()
    archive.parse(data)
    return {n: (len(f.buf), hashlib.sha256(f.buf).hexdigest()) for n, f in archive.items()}


def ours(members: tuple[CabMember, ...]) -> dict[str, tuple[int, str]]:
    return {m.name: (m.size, m.sha256) for m in members}


def cabarchive_cab(files: dict[str, bytes], compress: bool) -> bytes:
    archive = cabarchive.CabArchive()
    for name, content in files.items():
        archive[name] = cabarchive.CabFile(content)
    return bytes(archive.save(compress=compress))


def name_key(name: str) -> str:
    return unicodedata.normalize("NFKC", name).casefold()


# --- a cab writer of our own: every field can be set to what an attacker would send


@dataclass
class RawBlock:
    payload: bytes
    uncomp: int
    comp: int | None = None  # None: len(payload)
    csum: int | None = None  # None: computed (0 when the cab has checksums off)


@dataclass
class RawFolder:
    compress: int
    blocks: list[RawBlock]
    start: int | None = None  # None: right after what precedes it


@dataclass
class RawFile:
    name: bytes
    size: int
    offset: int
    folder: int = 0
    attribs: int = 0


@dataclass
class Layout:
    signature: bytes = b"MSCF"
    version: tuple[int, int] = (3, 1)  # minor, major
    flags: int = 0
    set_id: int = 0
    cabinet_index: int = 0
    reserved: tuple[int, int, int] = (0, 0, 0)
    reserve: tuple[int, int, int] | None = None  # header, folder, data reserve sizes
    size_delta: int = 0  # added to cbCabinet
    files_offset_delta: int = 0
    trailing: bytes = b""
    checksums: bool = True
    extra: dict[str, int] = field(default_factory=dict)


def block_checksum(payload: bytes, comp: int, uncomp: int) -> int:
    return int(_checksum_compute(struct.pack("<HH", comp, uncomp), _checksum_compute(payload)))


def build(folders: list[RawFolder], files: list[RawFile], layout: Layout | None = None) -> bytes:
    lay = layout or Layout()
    header_reserve, folder_reserve, data_reserve = lay.reserve or (0, 0, 0)
    head_size = 36 + (4 + header_reserve if lay.reserve else 0)
    folders_size = len(folders) * (8 + folder_reserve)
    files_size = sum(16 + len(f.name) + 1 for f in files)
    pos = head_size + folders_size + files_size
    folder_table, data_parts = b"", []
    for folder in folders:
        start = pos if folder.start is None else folder.start
        folder_table += struct.pack("<IHH", start, len(folder.blocks), folder.compress)
        folder_table += b"\xaa" * folder_reserve
        for block in folder.blocks:
            comp = len(block.payload) if block.comp is None else block.comp
            csum = block.csum
            if csum is None:
                csum = block_checksum(block.payload, comp, block.uncomp) if lay.checksums else 0
            chunk = struct.pack("<IHH", csum, comp, block.uncomp) + b"\xbb" * data_reserve
            chunk += block.payload
            data_parts.append(chunk)
            pos += len(chunk)
    file_table = b"".join(
        struct.pack("<IIHHHH", f.size, f.offset, f.folder, 0x5821, 0x6000, f.attribs)
        + f.name
        + b"\0"
        for f in files
    )
    data = b"".join(data_parts)
    total = head_size + folders_size + files_size + len(data)
    minor, major = lay.version
    header = struct.pack(
        "<4sIIIIIBBHHHHH",
        lay.signature,
        lay.reserved[0],
        total + lay.size_delta,
        lay.reserved[1],
        head_size + folders_size + lay.files_offset_delta,
        lay.reserved[2],
        minor,
        major,
        lay.extra.get("folders", len(folders)),
        lay.extra.get("files", len(files)),
        lay.flags | (0x0004 if lay.reserve else 0),
        lay.set_id,
        lay.cabinet_index,
    )
    if lay.reserve:
        header += struct.pack("<HBB", header_reserve, folder_reserve, data_reserve)
        header += b"\xcc" * header_reserve
    return header + folder_table + file_table + data + lay.trailing


def chunks(data: bytes, size: int = BLOCK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def stored_blocks(data: bytes) -> list[RawBlock]:
    return [RawBlock(c, len(c)) for c in chunks(data)]


def mszip_blocks(data: bytes) -> list[RawBlock]:
    """MSZIP as the format allows: each block's window primed with the block before."""
    blocks, previous = [], b""
    for c in chunks(data):
        z = (
            zlib.compressobj(9, zlib.DEFLATED, -15, zdict=previous)
            if previous
            else zlib.compressobj(9, zlib.DEFLATED, -15)
        )
        blocks.append(RawBlock(b"CK" + z.compress(c) + z.flush(), len(c)))
        previous = c
    return blocks


def simple(members: dict[str, bytes], compress: bool = True, layout: Layout | None = None) -> bytes:
    """One folder, members back to back, names flagged UTF-8 when they are not ASCII."""
    files, offset = [], 0
    for name, content in members.items():
        raw = name.encode()
        files.append(RawFile(raw, len(content), offset, attribs=0 if raw.isascii() else 0x80))
        offset += len(content)
    stream = b"".join(members.values())
    blocks = mszip_blocks(stream) if compress else stored_blocks(stream)
    return build([RawFolder(1 if compress else 0, blocks)], files, layout)


def named(names: list[bytes], attribs: int = 0) -> bytes:
    """A stored cab whose members have these raw names, one byte each."""
    files = [RawFile(n, 1, i, attribs=attribs) for i, n in enumerate(names)]
    return build([RawFolder(0, stored_blocks(b"x" * len(names)))], files)


# --------------------------------------------------------------------------- real cabs
def real_cab(name: str) -> Path:
    path = INSTALLED_TESTS / name
    if not path.exists():
        pytest.skip(f"{path} missing (Debian package fwupd-tests)")
    return path


@pytest.mark.parametrize("cab", ["fakedevice123.cab", "fakedevice124.cab"])
def test_real_cab_walk_agrees_with_cabarchive(cab: str) -> None:
    data = real_cab(cab).read_bytes()
    members = walk(data)
    assert ours(members) == reference(data)
    stem = cab.removesuffix(".cab")
    assert [m.name for m in members] == [f"{stem}.bin", f"{stem}.jcat", f"{stem}.metainfo.xml"]


def test_real_cab_walk_writes_members_to_the_sink(tmp_path: Path) -> None:
    path = real_cab("fakedevice124.cab")
    archive = cabarchive.CabArchive(path.read_bytes())
    written: dict[str, Path] = {}
    opened: list[int] = []

    def sink(name: str, size: int) -> int:
        written[name] = tmp_path / f"m{len(written)}"
        opened.append(os.open(written[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return opened[-1]

    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 7, os.SEEK_SET)
        walk_cab(fd, LIMITS, sink)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 7  # pread only: the caller's offset stays
    finally:
        os.close(fd)
        for member_fd in opened:
            os.close(member_fd)
    assert {n: p.read_bytes() for n, p in written.items()} == {
        n: bytes(f.buf) for n, f in archive.items()
    }


def fwupd_trust() -> TrustStore:
    if not (FWUPD_PKI / "LVFS-CA.pem").exists():
        pytest.skip(f"{FWUPD_PKI}/LVFS-CA.pem missing")
    return TrustStore.from_dirs([FWUPD_PKI])


def inspect_real(expected: ExpectedRelease, scratch: Path) -> CabInfo:
    fd = os.open(real_cab("fakedevice124.cab"), os.O_RDONLY)
    try:
        return inspect_cab(fd, expected, fwupd_trust(), LIMITS, scratch)
    finally:
        os.close(fd)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "scratch"
    d.mkdir()
    yield d
    assert list(d.iterdir()) == []  # nothing left, whatever the outcome


def test_real_cab_inspects(scratch: Path) -> None:
    info = inspect_real(FAKE_124, scratch)
    assert info.component_id == FAKE_ID
    assert info.version == "1.2.4"
    assert info.guids == (FAKE_GUID,)
    assert info.payloads == ("fakedevice124.bin",)
    assert [m.name for m in info.members] == [
        "fakedevice124.bin",
        "fakedevice124.jcat",
        "fakedevice124.metainfo.xml",
    ]


def test_real_cab_guid_matches_ignoring_case(scratch: Path) -> None:
    info = inspect_real(ExpectedRelease(FAKE_ID, "1.2.4", ("other", FAKE_GUID.upper())), scratch)
    assert info.payloads == ("fakedevice124.bin",)


@pytest.mark.parametrize(
    ("expected", "cause"),
    [
        (ExpectedRelease(FAKE_ID, "1.2.3", (FAKE_GUID,)), "release version '1.2.4'"),
        (ExpectedRelease("org.fwupd.other", "1.2.4", (FAKE_GUID,)), "component id"),
        (ExpectedRelease(FAKE_ID, "1.2.4", ("d7b3a1ea-0000-5000-8000-000000000000",)), "GUIDs"),
    ],
)
def test_real_cab_other_release_is_refused(
    expected: ExpectedRelease, cause: str, scratch: Path
) -> None:
    with pytest.raises(VerificationError) as e:
        inspect_real(expected, scratch)
    assert cause in str(e.value)
    assert str(e.value).startswith("fakedevice124.metainfo.xml: ")


# --------------------------------------------------------------------------- agreement
CASES: dict[str, dict[str, bytes]] = {
    "one small": {"firmware.bin": b"\x01\x02\x03"},
    "several": {"a.bin": b"a" * 100, "b.metainfo.xml": b"<component/>", "c.jcat": b"\x1f\x8b"},
    "with an empty member": {"a.bin": b"abc", "empty.txt": b"", "z.bin": b"z" * 5000},
    "spanning blocks": {"a.bin": os.urandom(BLOCK - 10), "b.bin": os.urandom(BLOCK + 20)},
    "over 32 KiB": {"big.bin": os.urandom(5 * BLOCK + 123), "small.bin": b"s"},
    "compressible": {"zeros.bin": bytes(300_000), "ff.bin": b"\xff" * 70_000},
    "exact blocks": {"x.bin": os.urandom(2 * BLOCK)},
    "utf-8 name": {"prüfung-ファーム.bin": b"data"},
}


@pytest.mark.parametrize("compress", [False, True], ids=["stored", "mszip"])
@pytest.mark.parametrize("case", list(CASES))
def test_walk_agrees_with_cabarchive_on_its_own_cabs(case: str, compress: bool) -> None:
    data = cabarchive_cab(CASES[case], compress)
    assert ours(walk(data)) == reference(data)
    assert ours(walk(data)) == {
        n: (len(c), hashlib.sha256(c).hexdigest()) for n, c in CASES[case].items()
    }


@pytest.mark.parametrize("compress", [False, True], ids=["stored", "mszip"])
@pytest.mark.parametrize("case", list(CASES))
def test_walk_agrees_with_cabarchive_on_primed_windows(case: str, compress: bool) -> None:
    # our writer primes each MSZIP block with the one before, as makecab does
    data = simple(CASES[case], compress)
    assert ours(walk(data)) == reference(data)


def test_walk_agrees_on_several_folders_and_reserve_areas() -> None:
    first, second = os.urandom(40_000), b"second folder " * 5000
    folders = [RawFolder(0, stored_blocks(first)), RawFolder(1, mszip_blocks(second))]
    files = [
        RawFile(b"one.bin", 30_000, 0, folder=0),
        RawFile(b"two.bin", 10_000, 30_000, folder=0),
        RawFile(b"three.bin", len(second), 0, folder=1),
    ]
    data = build(folders, files, Layout(reserve=(20, 4, 8)))
    assert ours(walk(data)) == reference(data)
    assert [m.name for m in walk(data)] == ["one.bin", "two.bin", "three.bin"]


def test_walk_agrees_with_gcab(tmp_path: Path) -> None:
    if not Path("/usr/bin/gcab").exists():
        pytest.skip("gcab missing")
    (tmp_path / "a.bin").write_bytes(os.urandom(100_000))
    (tmp_path / "b.txt").write_bytes(b"hello " * 40_000)
    (tmp_path / "empty").write_bytes(b"")
    for flag in ([], ["-z"]):
        subprocess.run(
            ["gcab", "-c", *flag, "out.cab", "a.bin", "b.txt", "empty"], cwd=tmp_path, check=True
        )
        data = (tmp_path / "out.cab").read_bytes()
        contents = {n: (tmp_path / n).read_bytes() for n in ("a.bin", "b.txt", "empty")}
        assert ours(walk(data)) == {
            n: (len(c), hashlib.sha256(c).hexdigest()) for n, c in contents.items()
        }
        (tmp_path / "out.cab").unlink()


def test_walk_without_checksums_agrees() -> None:
    data = simple({"a.bin": os.urandom(50_000)}, layout=Layout(checksums=False))
    assert ours(walk(data)) == reference(data)


_NAME_CHARS = st.characters(categories=("L", "N"), include_characters="-_+~")
_NAMES = st.one_of(
    st.from_regex(r"[A-Za-z0-9_-]{1,24}(\.[a-z]{1,8}){0,2}", fullmatch=True),
    st.text(_NAME_CHARS, min_size=1, max_size=30),
)
_CONTENT = st.one_of(
    st.binary(max_size=3 * BLOCK),
    st.builds(lambda n, b: bytes([b]) * n, st.integers(0, 4 * BLOCK), st.integers(0, 255)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    members=st.dictionaries(_NAMES, _CONTENT, min_size=1, max_size=8),
    compress=st.booleans(),
    primed=st.booleans(),
)
def test_walk_agrees_with_cabarchive_on_generated_members(
    members: dict[str, bytes], compress: bool, primed: bool
) -> None:
    # different names for every file system: the ones that fold case or normalise too
    keys = [name_key(n) for n in members]
    assume(len(set(keys)) == len(keys))
    # cabarchive's writer, or ours that primes each MSZIP window with the block before
    data = simple(members, compress) if primed else cabarchive_cab(members, compress)
    if not any(members.values()):
        # nothing to put in a data block: cabarchive and we both refuse such a cab
        with pytest.raises(cabarchive.CorruptionError):
            reference(data)
        refused(data)
        return
    assert ours(walk(data)) == reference(data)


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("raw", "cause"),
    [
        (b"../x", "path separator"),
        (b"/etc/x", "path separator"),
        (b"a/b", "path separator"),
        (b"a\\b", "path separator"),
        (b"..\\..\\boot.ini", "path separator"),
        (b"..", "'..'"),
        (b"a..b", "'..'"),
        (b".", "'.'"),
        (b"a\x1b[31mb", "control"),
        (b"a\nb", "control"),
        (b"a\x7fb", "control"),
        (b"\xe2\x80\xaefirmware.bin", "control or format"),  # U+202E, bidi override
        (b"\xc2\x9bfirmware.bin", "control"),  # C1 CSI
    ],
)
def test_hostile_names_are_refused(raw: bytes, cause: str) -> None:
    message = refused(named([raw, b"ok.bin"], attribs=0x80))
    assert cause in message
    assert "\x1b" not in message and "\u202e" not in message


def test_empty_name_is_refused() -> None:
    assert "empty name" in refused(named([b"", b"ok.bin"]))


def test_non_utf8_name_marked_utf8_is_refused() -> None:
    assert "not valid UTF-8" in refused(named([b"caf\xe9.bin"], attribs=0x80))


def test_non_ascii_name_not_marked_utf8_is_refused() -> None:
    assert "not ASCII" in refused(named(["café.bin".encode()]))


def test_utf8_name_marked_utf8_is_accepted() -> None:
    assert [m.name for m in walk(named(["café.bin".encode()], attribs=0x80))] == ["café.bin"]


def test_name_of_255_bytes_is_accepted_and_256_refused() -> None:
    assert walk(named([b"n" * 255]))[0].name == "n" * 255
    assert "longer than 255 bytes" in refused(named([b"n" * 256]))


@pytest.mark.parametrize(
    "names",
    [
        [b"firmware.bin", b"firmware.bin"],
        [b"firmware.bin", b"FIRMWARE.BIN"],
        [b"Firmware.Bin", b"firmware.bin", b"x"],
        ["ﬁrmware.bin".encode(), b"firmware.bin"],  # U+FB01: NFKC makes it "fi"
    ],
)
def test_duplicate_names_are_refused(names: list[bytes]) -> None:
    assert "two members named" in refused(named(names, attribs=0x80))


# --------------------------------------------------------------------------- counts, sizes
def test_too_many_members_are_refused() -> None:
    message = refused(named([f"m{i}".encode() for i in range(65)]), LimitExceeded)
    assert "65 members, more than 64" in message


def test_too_many_folders_are_refused() -> None:
    folders = [RawFolder(0, stored_blocks(b"x")) for _ in range(17)]
    files = [RawFile(f"f{i}".encode(), 1, 0, folder=i) for i in range(17)]
    assert "17 folders" in refused(build(folders, files), LimitExceeded)


def test_too_many_data_blocks_are_refused() -> None:
    data = simple({"a.bin": os.urandom(5 * BLOCK)})
    message = refused(data, LimitExceeded, Limits(cab_max_data_blocks=4))
    assert "5 data blocks" in message


def test_cab_over_the_size_cap_is_refused() -> None:
    data = simple({"a.bin": os.urandom(1000)})
    assert "more than 100" in refused(data, LimitExceeded, Limits(cab_max_bytes=100))


def test_total_over_the_uncompressed_cap_is_refused() -> None:
    data = simple({"a.bin": b"a" * 3000, "b.bin": b"b" * 3000})
    limits = Limits(cab_max_uncompressed_bytes=5000)
    assert "declare 6000 bytes" in refused(data, LimitExceeded, limits)


def zero_bomb(size: int) -> bytes:
    """A well-formed MSZIP cab of one member of ``size`` zero bytes, built without ever
    holding them: every full block compresses to the same few bytes."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = b"CK" + z.compress(bytes(BLOCK)) + z.flush()
    n = size // BLOCK
    folder = RawFolder(1, [RawBlock(payload, BLOCK)] * n)
    return build([folder], [RawFile(b"zeros.bin", size, 0)])


def bounded(data: bytes, limits: Limits = LIMITS) -> tuple[BrokerError, float, int]:
    """Walk ``data`` from a file; the refusal, the seconds and the peak of Python memory."""
    with memfd(data) as fd:
        del data
        tracemalloc.start()
        start = time.monotonic()
        try:
            walk_cab(fd, limits)
        except BrokerError as e:
            error = e
        else:
            raise AssertionError("the cab was accepted")
        finally:
            seconds = time.monotonic() - start
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    return error, seconds, peak


def test_declared_1gib_member_is_refused_from_the_table() -> None:
    data = zero_bomb(1024 * MiB)
    assert len(data) < 4 * MiB  # what the UpdateVM would have to send
    error, seconds, peak = bounded(data)
    assert isinstance(error, LimitExceeded)
    assert "declares 1073741824 bytes" in str(error)
    assert seconds < 0.5
    assert peak < 20 * MiB


def test_bomb_under_the_member_cap_is_refused_by_its_ratio() -> None:
    # 1 GiB allowed per member: the ratio to the cab's size still stops it uninflated
    limits = Limits(cab_max_member_bytes=2048 * MiB, cab_max_uncompressed_bytes=2048 * MiB)
    error, seconds, peak = bounded(zero_bomb(1024 * MiB), limits)
    assert isinstance(error, LimitExceeded)
    assert "times its size" in str(error)
    assert seconds < 0.5
    assert peak < 20 * MiB


def test_deflate_bomb_block_is_refused_while_inflating() -> None:
    # a block that declares 32 KiB and inflates to 64 MiB of zeros
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = b"CK" + z.compress(bytes(64 * MiB)) + z.flush()
    data = build([RawFolder(1, [RawBlock(bomb, BLOCK)])], [RawFile(b"a.bin", BLOCK, 0)])
    error, seconds, peak = bounded(data)
    assert isinstance(error, FormatError)
    assert "inflates to more than its declared 32768 bytes" in str(error)
    assert peak < 4 * MiB
    assert seconds < 1


def test_block_that_inflates_to_fewer_bytes_is_refused() -> None:
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    short = b"CK" + z.compress(b"x" * 1000) + z.flush()
    data = build([RawFolder(1, [RawBlock(short, 2000)])], [RawFile(b"a.bin", 2000, 0)])
    assert "inflates to 1000 bytes, not its declared 2000" in refused(data)


def test_big_cab_is_walked_in_bounded_memory() -> None:
    data = simple({"a.bin": os.urandom(8 * MiB), "b.bin": bytes(4 * MiB)})
    with memfd(data) as fd:
        del data
        tracemalloc.start()
        try:
            members = walk_cab(fd, LIMITS)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert [m.size for m in members] == [8 * MiB, 4 * MiB]
    assert peak < 2 * MiB


# --------------------------------------------------------------------------- structure
def test_truncated_cab_is_refused_at_every_length() -> None:
    data = simple({"a.bin": os.urandom(300), "b.bin": b"b" * 200})
    for n in range(len(data)):
        with pytest.raises(FormatError):
            walk(data[:n])


def test_truncation_is_named() -> None:
    data = simple({"a.bin": os.urandom(3000)})
    assert "truncated" in refused(data[:-10])


def test_bad_signature_is_refused() -> None:
    data = simple({"a.bin": b"abc"})
    assert "not a cabinet" in refused(b"MSCE" + data[4:])
    assert "not a cabinet" in refused(b"")
    assert "not a cabinet" in refused(b"PK\x03\x04" + bytes(100))


@pytest.mark.parametrize(
    ("layout", "cause"),
    [
        (Layout(version=(2, 1)), "version 1.2"),
        (Layout(version=(3, 2)), "version 2.3"),
        (Layout(flags=0x0001), "multi-cabinet"),
        (Layout(flags=0x0002), "multi-cabinet"),
        (Layout(cabinet_index=1), "multi-cabinet"),
        (Layout(flags=0x0010), "unknown flags"),
        (Layout(reserved=(1, 0, 0)), "reserved"),
        (Layout(reserved=(0, 0, 7)), "reserved"),
        (Layout(trailing=b"garbage"), "bytes after its declared end"),
        (Layout(trailing=b"garbage", size_delta=7), "bytes after its last data block"),
        (Layout(size_delta=5), "truncated"),
        (Layout(files_offset_delta=2), "file table does not follow"),
        (Layout(reserve=(60001, 0, 0)), "60000"),
    ],
)
def test_header_fields_we_do_not_support_are_refused(layout: Layout, cause: str) -> None:
    assert cause in refused(simple({"a.bin": b"abc" * 100}, layout=layout))


def test_no_files_or_no_folders_are_refused() -> None:
    assert "no folder or no file" in refused(build([RawFolder(0, stored_blocks(b"x"))], []))
    assert "no folder or no file" in refused(build([], [RawFile(b"a", 0, 0)]))


@pytest.mark.parametrize(
    ("compress", "name"), [(0x1503, "LZX"), (0x0F03, "LZX"), (0x0002, "Quantum")]
)
def test_unsupported_compression_is_refused_by_name(compress: int, name: str) -> None:
    data = build([RawFolder(compress, stored_blocks(b"abc"))], [RawFile(b"a.bin", 3, 0)])
    message = refused(data)
    assert f"{name} compression" in message
    assert "not supported" in message


def test_unknown_compression_is_refused() -> None:
    data = build([RawFolder(0x0004, stored_blocks(b"abc"))], [RawFile(b"a.bin", 3, 0)])
    assert "unknown compression" in refused(data)
    data = build([RawFolder(0x0101, mszip_blocks(b"abc"))], [RawFile(b"a.bin", 3, 0)])
    assert "unknown compression" in refused(data)


@pytest.mark.parametrize(
    ("files", "cause"),
    [
        ([RawFile(b"a", 100, 0), RawFile(b"b", 60, 100)], "extends past the end of folder 0"),
        ([RawFile(b"a", 2**32 - 1, 0)], "more than"),
        ([RawFile(b"a", 10, 2**32 - 5)], "extends past"),
        ([RawFile(b"a", 100, 0), RawFile(b"b", 50, 90)], "overlap"),
        ([RawFile(b"a", 150, 0), RawFile(b"b", 10, 20)], "overlap"),
        ([RawFile(b"a", 100, 0), RawFile(b"b", 40, 110)], "bytes 100-110 belong to no member"),
        ([RawFile(b"a", 100, 0)], "bytes 100-150 belong to no member"),
        ([RawFile(b"a", 150, 0), RawFile(b"e", 0, 151)], "past the end of its folder"),
        ([RawFile(b"a", 150, 0, folder=1)], "names folder 1 of 1"),
        ([RawFile(b"a", 150, 0, folder=0xFFFD)], "continues in another cabinet"),
        ([RawFile(b"a", 150, 0, folder=0xFFFF)], "continues in another cabinet"),
    ],
)
def test_members_outside_their_folder_are_refused(files: list[RawFile], cause: str) -> None:
    data = build([RawFolder(0, stored_blocks(os.urandom(150)))], files)
    assert cause in refused(data, (FormatError, LimitExceeded))


def test_empty_member_anywhere_inside_its_folder_is_accepted() -> None:
    files = [RawFile(b"a", 150, 0), RawFile(b"e", 0, 75), RawFile(b"f", 0, 150)]
    members = walk(build([RawFolder(0, stored_blocks(os.urandom(150)))], files))
    assert [m.size for m in members] == [150, 0, 0]


def test_folders_that_overlap_or_leave_gaps_are_refused() -> None:
    blocks = stored_blocks(b"x" * 10)
    files = [RawFile(b"a", 10, 0, folder=0), RawFile(b"b", 10, 0, folder=1)]
    shared = build([RawFolder(0, blocks), RawFolder(0, blocks)], files)
    # the second folder pointing back at the first one's data
    first_start = struct.unpack_from("<I", shared, 36)[0]
    same = build([RawFolder(0, blocks), RawFolder(0, blocks, start=first_start)], files)
    assert "does not follow" in refused(same)
    gap = build([RawFolder(0, blocks, start=first_start + 1), RawFolder(0, blocks)], files)
    assert "does not follow" in refused(gap)


@pytest.mark.parametrize(
    ("block", "cause"),
    [
        (RawBlock(b"x" * 10, 0), "declares 0 bytes"),
        (RawBlock(b"x" * 40000, 40000), "declares 40000 bytes"),
        (RawBlock(b"x" * 10, 12), "two sizes differ"),
        (RawBlock(b"x" * 10, 5000, comp=5000), "truncated"),
    ],
)
def test_stored_blocks_that_lie_are_refused(block: RawBlock, cause: str) -> None:
    data = build([RawFolder(0, [block])], [RawFile(b"a", block.uncomp, 0)])
    assert cause in refused(data)


def deflate(data: bytes) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    return z.compress(data) + z.flush()


@pytest.mark.parametrize(
    ("payload", "cause"),
    [
        (b"XY" + deflate(b"a" * 100), "'CK'"),
        (b"CK" + deflate(b"a" * 100) + b"hidden", "after its deflate stream"),
        (b"CK" + deflate(b"a" * 100)[:-3], "ends inside its deflate stream"),
        (b"CK" + zlib.compress(b"a" * 100), "does not inflate"),  # a zlib header, not raw
        (b"CK", "too short"),
    ],
)
def test_mszip_blocks_that_lie_are_refused(payload: bytes, cause: str) -> None:
    data = build([RawFolder(1, [RawBlock(payload, 100)])], [RawFile(b"a", 100, 0)])
    assert cause in refused(data)


def test_block_checksum_is_checked_when_present() -> None:
    data = bytearray(simple({"a.bin": b"abcdef" * 100}, compress=False))
    data[-1] ^= 0x01
    assert "fails its checksum" in refused(bytes(data))


def test_block_checksum_zero_means_none() -> None:
    data = bytearray(simple({"a.bin": b"abcdef" * 100}, False, Layout(checksums=False)))
    data[-1] ^= 0x01
    (member,) = walk(bytes(data))
    assert member.sha256 == hashlib.sha256(bytes(data[-600:])).hexdigest()


def test_pipe_is_refused() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(FormatError, match="regular file"):
            walk_cab(r, LIMITS)
    finally:
        os.close(r)
        os.close(w)


# --------------------------------------------------------------------------- fuzzing
def _base_cabs() -> list[bytes]:
    rich = {"a.bin": b"0123456789" * 5000, "b.metainfo.xml": b"<x/>" * 40, "e": b""}
    return [
        simple(rich, compress=True, layout=Layout(checksums=False)),
        simple(rich, compress=False, layout=Layout(checksums=False)),
        simple({"x.bin": b"xy" * 40000}, compress=True),
        cabarchive_cab(rich, compress=True),
    ]


BASES = _base_cabs()


def check_walk_only_refuses(data: bytes) -> None:
    try:
        walk(data)
    except BrokerError as e:
        assert_user_message(e)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_only_raise_broker_errors(data: bytes) -> None:
    check_walk_only_refuses(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_after_a_signature_only_raise_broker_errors(tail: bytes) -> None:
    check_walk_only_refuses(b"MSCF" + tail)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 6))):
        # mostly the tables at the front, where every field is a size or an offset
        limit = len(data) - 1 if draw(st.booleans()) else min(len(data) - 1, 200)
        pos = draw(st.integers(0, max(limit, 0)))
        kind = draw(st.sampled_from(["byte", "word", "cut", "insert"]))
        if kind == "byte":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "word":
            data[pos : pos + 4] = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
        elif kind == "cut":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    if len(data) >= 12 and draw(st.booleans()):
        # keep the signature and the declared size true, so the walk goes deeper
        data[0:4] = b"MSCF"
        data[8:12] = struct.pack("<I", len(data))
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_cabs_only_raise_broker_errors_in_bounded_memory(data: bytes) -> None:
    with memfd(data) as fd:
        tracemalloc.start()
        try:
            with expect_only_our_errors():
                walk_cab(fd, LIMITS)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 4 * MiB


# --------------------------------------------------------------------------- inspect_cab
Signer = tuple[Path, Path]  # signer.pem, signer.key


def metainfo(
    *,
    component_id: str = SANDBOX_ID,
    version: str = "2.0.1",
    guid: str = SANDBOX_GUID,
    payload: str = "firmware.bin",
    sha256: str | None = None,
    prolog: str = '<?xml version="1.0" encoding="UTF-8"?>\n',
    release_extra: str = "",
) -> bytes:
    digest = sha256 or hashlib.sha256(FIRMWARE).hexdigest()
    return (
        f'{prolog}<component type="firmware">\n'
        f"  <id>{component_id}</id>\n  <name>Sandbox</name>\n"
        f'  <provides><firmware type="flashed">{guid}</firmware></provides>\n'
        f'  <releases><release version="{version}" date="2025-01-01">\n'
        f'    <checksum type="sha256" filename="{payload}" target="content">{digest}'
        f"</checksum>{release_extra}\n"
        f"  </release></releases>\n</component>\n"
    ).encode()


@dataclass
class Signing:
    tmp: Path
    trusted: Signer
    untrusted: Signer
    trust: TrustStore

    def pkcs7(self, content: bytes, signer: Signer) -> str:
        path = self.tmp / f"signed-{hashlib.sha256(content).hexdigest()[:16]}"
        path.write_bytes(content)
        return sign_pkcs7(signer[0], signer[1], path)

    def jcat(self, items: dict[str, tuple[bytes, Signer]]) -> bytes:
        return build_jcat(
            {
                name: [
                    (BlobKind.SHA256, hashlib.sha256(content).hexdigest()),
                    (BlobKind.PKCS7, self.pkcs7(content, signer)),
                ]
                for name, (content, signer) in items.items()
            }
        )

    def cab(
        self,
        meta: bytes | None = None,
        firmware: bytes = FIRMWARE,
        signed: dict[str, tuple[bytes, Signer]] | None = None,
        extra: dict[str, bytes] | None = None,
    ) -> bytes:
        meta = metainfo() if meta is None else meta
        if signed is None:
            signed = {
                "firmware.metainfo.xml": (meta, self.trusted),
                "firmware.bin": (firmware, self.trusted),
            }
        members = {
            "firmware.bin": firmware,
            "firmware.jcat": self.jcat(signed),
            "firmware.metainfo.xml": meta,
            **(extra or {}),
        }
        return cabarchive_cab(members, compress=True)


@pytest.fixture(scope="module")
def signing(
    sandbox_pki: SandboxPki,
    other_ca: tuple[Path, Path, Path],
    trust_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Signing:
    return Signing(
        tmp=tmp_path_factory.mktemp("cab-signing"),
        trusted=(sandbox_pki.signer_pem, sandbox_pki.signer_key),
        untrusted=(other_ca[1], other_ca[2]),
        trust=TrustStore.from_dirs([trust_dir]),
    )


def inspect(
    data: bytes, signing: Signing, scratch: Path, expected: ExpectedRelease = SANDBOX_RELEASE
) -> CabInfo:
    with memfd(data) as fd:
        return inspect_cab(fd, expected, signing.trust, LIMITS, scratch)


def inspect_refused(
    data: bytes,
    signing: Signing,
    scratch: Path,
    error: type[BrokerError] = VerificationError,
) -> str:
    with pytest.raises(error) as e:
        inspect(data, signing, scratch)
    assert list(scratch.iterdir()) == []
    message = str(e.value)
    assert "\n" not in message
    return message


def test_signed_cab_inspects(signing: Signing, scratch: Path) -> None:
    info = inspect(signing.cab(), signing, scratch)
    assert info.payloads == ("firmware.bin",)
    assert info.guids == (SANDBOX_GUID,)
    assert info.version == "2.0.1"
    assert {m.name for m in info.members} == {
        "firmware.bin",
        "firmware.jcat",
        "firmware.metainfo.xml",
    }


def test_artifact_payload_is_verified_too(signing: Signing, scratch: Path) -> None:
    extra_fw = b"second image" * 100
    artifact = (
        '<artifacts><artifact type="binary"><filename>second.bin</filename>'
        f'<checksum type="sha256">{hashlib.sha256(extra_fw).hexdigest()}</checksum>'
        "</artifact></artifacts>"
    )
    meta = metainfo(release_extra=artifact)
    signed = {
        "firmware.metainfo.xml": (meta, signing.trusted),
        "firmware.bin": (FIRMWARE, signing.trusted),
        "second.bin": (extra_fw, signing.trusted),
    }
    data = signing.cab(meta, signed=signed, extra={"second.bin": extra_fw})
    assert inspect(data, signing, scratch).payloads == ("firmware.bin", "second.bin")

    del signed["second.bin"]
    data = signing.cab(meta, signed=signed, extra={"second.bin": extra_fw})
    assert "second.bin: no signature" in inspect_refused(data, signing, scratch)


BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE component [\n <!ENTITY lol "lol">\n'
    + "".join(
        f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n'
        for i in range(1, 10)
    )
    + "]>\n"
)


@pytest.mark.parametrize(
    ("meta", "cause"),
    [
        (metainfo(prolog=BILLION_LAUGHS, component_id="&lol9;"), "DOCTYPE"),
        (metainfo(prolog='<!DOCTYPE component SYSTEM "file:///etc/passwd">\n'), "DOCTYPE"),
        (metainfo(component_id="&xxe;"), "not well-formed"),
        (metainfo().decode().replace("UTF-8", "UTF-16").encode("utf-16"), "not UTF-8"),
        (metainfo(prolog='<?xml version="1.0" encoding="UTF-7"?>\n'), "encoding other than"),
        (metainfo(prolog="<?xml version='1.0' encoding='ISO-8859-1'?>\n"), "encoding other than"),
        (b"<components><component type='firmware'/></components>", "not a component document"),
        (metainfo().replace(b'type="firmware"', b'type="desktop"'), "not describe a firmware"),
        (metainfo().replace(b"<releases>", b"<x>").replace(b"</releases>", b"</x>"), "no release"),
        (b"<component type='firmware'><id>", "not well-formed"),
    ],
)
def test_hostile_signed_metainfo_is_refused_by_the_parser(
    meta: bytes, cause: str, signing: Signing, scratch: Path
) -> None:
    # the trusted CA signs it: only the parser's hardening stands in the way
    message = inspect_refused(signing.cab(meta), signing, scratch, FormatError)
    assert cause in message


def test_unsigned_metainfo_is_refused_before_it_is_parsed(signing: Signing, scratch: Path) -> None:
    # not XML at all: a parser would say so; the signature check must speak first
    signed = {"firmware.bin": (FIRMWARE, signing.trusted)}
    data = signing.cab(b"<<< not xml", signed=signed)
    assert "firmware.metainfo.xml: no signature" in inspect_refused(data, signing, scratch)


def test_metainfo_signed_by_untrusted_ca_is_refused(signing: Signing, scratch: Path) -> None:
    meta = metainfo()
    signed = {
        "firmware.metainfo.xml": (meta, signing.untrusted),
        "firmware.bin": (FIRMWARE, signing.trusted),
    }
    message = inspect_refused(signing.cab(meta, signed=signed), signing, scratch)
    assert message.startswith("firmware.metainfo.xml: no trusted signature")


def test_unsigned_payload_is_refused(signing: Signing, scratch: Path) -> None:
    meta = metainfo()
    signed = {"firmware.metainfo.xml": (meta, signing.trusted)}
    message = inspect_refused(signing.cab(meta, signed=signed), signing, scratch)
    assert message == "firmware.bin: no signature for it in firmware.jcat"


def test_payload_signed_by_untrusted_ca_is_refused(signing: Signing, scratch: Path) -> None:
    meta = metainfo()
    signed = {
        "firmware.metainfo.xml": (meta, signing.trusted),
        "firmware.bin": (FIRMWARE, signing.untrusted),
    }
    message = inspect_refused(signing.cab(meta, signed=signed), signing, scratch)
    assert message.startswith("firmware.bin: no trusted signature")
    assert "not signed by a trusted CA" in message


def test_payload_whose_jcat_signs_other_bytes_is_refused(signing: Signing, scratch: Path) -> None:
    meta = metainfo()
    signed = {
        "firmware.metainfo.xml": (meta, signing.trusted),
        "firmware.bin": (b"the firmware that was really signed", signing.trusted),
    }
    message = inspect_refused(signing.cab(meta, signed=signed), signing, scratch)
    assert message == "firmware.bin: sha256 checksum does not match the file"


def test_payload_whose_signature_covers_other_bytes_is_refused(
    signing: Signing, scratch: Path
) -> None:
    # the checksum is recomputed for the swapped firmware; only the signature holds
    meta = metainfo()
    items = {
        "firmware.metainfo.xml": [
            (BlobKind.SHA256, hashlib.sha256(meta).hexdigest()),
            (BlobKind.PKCS7, signing.pkcs7(meta, signing.trusted)),
        ],
        "firmware.bin": [
            (BlobKind.SHA256, hashlib.sha256(FIRMWARE).hexdigest()),
            (BlobKind.PKCS7, signing.pkcs7(b"the firmware that was signed", signing.trusted)),
        ],
    }
    data = cabarchive_cab(
        {
            "firmware.bin": FIRMWARE,
            "firmware.jcat": build_jcat(items),
            "firmware.metainfo.xml": meta,
        },
        compress=False,
    )
    message = inspect_refused(data, signing, scratch)
    assert "signature does not match the file" in message


def test_content_checksum_mismatch_is_refused(signing: Signing, scratch: Path) -> None:
    meta = metainfo(sha256="0" * 64)
    message = inspect_refused(signing.cab(meta), signing, scratch)
    assert message == "firmware.bin: its sha256 is not the one firmware.metainfo.xml gives"


def test_payload_missing_from_the_cab_is_refused(signing: Signing, scratch: Path) -> None:
    meta = metainfo(payload="elsewhere.bin")
    message = inspect_refused(signing.cab(meta), signing, scratch, FormatError)
    assert "names payload 'elsewhere.bin', not in the cab" in message


@pytest.mark.parametrize(
    ("expected", "cause"),
    [
        (ExpectedRelease(SANDBOX_ID, "2.0.2", (SANDBOX_GUID,)), "release version '2.0.1'"),
        (ExpectedRelease("org.other.firmware", "2.0.1", (SANDBOX_GUID,)), "component id"),
        (ExpectedRelease(SANDBOX_ID, "2.0.1", (FAKE_GUID,)), "GUIDs"),
    ],
)
def test_signed_cab_of_another_release_is_refused(
    expected: ExpectedRelease, cause: str, signing: Signing, scratch: Path
) -> None:
    with pytest.raises(VerificationError) as e:
        inspect(signing.cab(), signing, scratch, expected)
    assert cause in str(e.value)


def test_configured_policy_applies_to_the_cab(signing: Signing, scratch: Path) -> None:
    # the sandbox cab carries PKCS#7 only: an admin who accepts only GPG gets a refusal
    with memfd(signing.cab()) as fd, pytest.raises(VerificationError) as e:
        inspect_cab(
            fd,
            SANDBOX_RELEASE,
            signing.trust,
            LIMITS,
            scratch,
            TrustPolicy(accepted=frozenset({"gpg"})),
        )
    assert str(e.value) == "firmware.metainfo.xml: no signature of an accepted kind (gpg)"


def test_hex_version_matches_its_decimal_form(signing: Signing, scratch: Path) -> None:
    data = signing.cab(metainfo(version="0x10002"))
    expected = ExpectedRelease(SANDBOX_ID, "65538", (SANDBOX_GUID,))
    assert inspect(data, signing, scratch, expected).version == "0x10002"


@pytest.mark.parametrize(
    ("extra", "cause"),
    [
        ({"other.metainfo.xml": b"<component/>"}, "2 *.metainfo.xml members"),
        ({"OTHER.METAINFO.XML": b"<component/>"}, "2 *.metainfo.xml members"),
        ({"second.jcat": b""}, "2 *.jcat members"),
    ],
)
def test_ambiguous_cabs_are_refused(
    extra: dict[str, bytes], cause: str, signing: Signing, scratch: Path
) -> None:
    message = inspect_refused(signing.cab(extra=extra), signing, scratch, FormatError)
    assert cause in message


def test_cab_without_jcat_is_refused(signing: Signing, scratch: Path) -> None:
    data = cabarchive_cab({"firmware.bin": FIRMWARE, "firmware.metainfo.xml": metainfo()}, True)
    assert "0 *.jcat members" in inspect_refused(data, signing, scratch, FormatError)


def test_cab_that_breaks_while_inflating_leaves_scratch_empty(
    signing: Signing, scratch: Path
) -> None:
    # its tables hold, so members are already written out when the last block fails
    data = bytearray(
        simple({"firmware.bin": FIRMWARE, "x.bin": b"x" * 100}, True, Layout(checksums=False))
    )
    data[-4:] = b"\xff\xff\xff\xff"
    message = inspect_refused(bytes(data), signing, scratch, FormatError)
    assert "data block 2 of folder 0" in message


# --------------------------------------------------------------------------- mutation gaps
# (issue 21: each test below kills mutants of broker.cabinet that the tests above let live)
@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("a/" + "b" * 78, "'a/" + "b" * 78 + "'"),  # 80 characters: shown whole
        ("a/" + "b" * 79, "'a/" + "b" * 78 + "...'"),  # 81: cut to 80 and marked
        ("a/" + "b" * 200, "'a/" + "b" * 78 + "...'"),
    ],
)
def test_hostile_names_are_shown_cut_to_80_characters(name: str, shown: str) -> None:
    assert refused(named([name.encode()])) == f"cab member name {shown} holds a path separator"


def test_payload_is_looked_up_by_its_basename(signing: Signing, scratch: Path) -> None:
    meta = metainfo(payload=" some/dir/firmware.bin ")
    assert inspect(signing.cab(meta), signing, scratch).payloads == ("firmware.bin",)


def test_payload_with_an_empty_basename_is_refused(signing: Signing, scratch: Path) -> None:
    message = inspect_refused(signing.cab(metainfo(payload="dir/")), signing, scratch, FormatError)
    assert message == "firmware.metainfo.xml names a payload with an empty file name"


def _without_type(meta: bytes) -> bytes:
    return meta.replace(b' type="sha256" filename', b" filename")


def test_declared_checksum_kind_wins_over_the_length(signing: Signing, scratch: Path) -> None:
    # a sha1 value under type="sha256" is a malformed sha256, not a sha1 to check instead
    meta = metainfo(sha256=hashlib.sha1(FIRMWARE).hexdigest())  # noqa: S324  what is tested
    message = inspect_refused(signing.cab(meta), signing, scratch, FormatError)
    assert message == "firmware.metainfo.xml has a malformed sha256 checksum for 'firmware.bin'"


def test_undeclared_checksum_kind_comes_from_its_length(signing: Signing, scratch: Path) -> None:
    wrong = _without_type(metainfo(sha256="0" * 64))
    message = inspect_refused(signing.cab(wrong), signing, scratch)
    assert message == "firmware.bin: its sha256 is not the one firmware.metainfo.xml gives"
    sha512 = hashlib.sha512(FIRMWARE).hexdigest()
    assert inspect(signing.cab(_without_type(metainfo(sha256=sha512))), signing, scratch)
    wrong512 = _without_type(metainfo(sha256="0" * 128))
    message = inspect_refused(signing.cab(wrong512), signing, scratch)
    assert message == "firmware.bin: its sha512 is not the one firmware.metainfo.xml gives"


def test_declared_checksum_kind_is_read_loosely(signing: Signing, scratch: Path) -> None:
    sha512 = hashlib.sha512(FIRMWARE).hexdigest()
    meta = metainfo(sha256=sha512).replace(b'type="sha256"', b'type=" SHA512 "')
    assert inspect(signing.cab(meta), signing, scratch).payloads == ("firmware.bin",)
    meta = metainfo(sha256="0" * 128).replace(b'type="sha256"', b'type="SHA512"')
    assert "its sha512 is not the one" in inspect_refused(signing.cab(meta), signing, scratch)


def test_a_payload_over_a_mib_is_hashed_whole(signing: Signing, scratch: Path) -> None:
    firmware = bytes(range(256)) * (6 * 1024 + 100)  # 1.5 MiB and a bit: two reads
    sha384 = hashlib.sha384(firmware).hexdigest()
    meta = metainfo(sha256=sha384).replace(b'type="sha256"', b'type="sha384"')
    assert inspect(signing.cab(meta, firmware=firmware), signing, scratch)
    meta = metainfo(sha256="0" * 96).replace(b'type="sha256"', b'type="sha384"')
    message = inspect_refused(signing.cab(meta, firmware=firmware), signing, scratch)
    assert message == "firmware.bin: its sha384 is not the one firmware.metainfo.xml gives"


@pytest.mark.parametrize("version", ["0xZZ", "0x", "0x1.2"])
def test_a_hex_version_that_does_not_parse_matches_nothing(
    version: str, signing: Signing, scratch: Path
) -> None:
    data = signing.cab(metainfo(version=version))
    for expected in ("2.0.1", "0"):
        with pytest.raises(VerificationError, match="release version"):
            inspect(data, signing, scratch, ExpectedRelease(SANDBOX_ID, expected, (SANDBOX_GUID,)))


@pytest.mark.parametrize(
    "lie",
    [
        {"sha256": "0" * 64},  # same size, other bytes: the checksum must count
        {"size": len(FIRMWARE) + 1},
    ],
)
def test_a_member_copy_that_differs_from_the_walk_is_refused(
    lie: dict[str, Any], signing: Signing
) -> None:
    """The signature verifies the copy on disk; it must also be the copy the walk hashed."""
    jcat = parse_jcat(signing.jcat({"firmware.bin": (FIRMWARE, signing.trusted)}), MiB, MiB)
    walked = CabMember("firmware.bin", len(FIRMWARE), hashlib.sha256(FIRMWARE).hexdigest())
    with memfd(FIRMWARE) as fd:
        _verify_member(walked, fd, jcat, "firmware.jcat", signing.trust, TrustPolicy())
        member = CabMember(
            walked.name, lie.get("size", walked.size), lie.get("sha256", walked.sha256)
        )
        with pytest.raises(
            VerificationError, match=r"^firmware\.bin: its copy changed while it was verified$"
        ):
            _verify_member(member, fd, jcat, "firmware.jcat", signing.trust, TrustPolicy())


def _sizes(data: bytes) -> dict[str, int]:
    return {m.name: m.size for m in walk(data)}


@pytest.mark.parametrize(
    ("member", "limit"),
    [("firmware.jcat", "jcat_max_bytes"), ("firmware.metainfo.xml", "cab_max_metainfo_bytes")],
)
def test_jcat_and_metainfo_are_capped_before_they_are_read(
    member: str, limit: str, signing: Signing, scratch: Path
) -> None:
    data = signing.cab()
    size = _sizes(data)[member]
    with memfd(data) as fd:
        at_cap = replace(LIMITS, **{limit: size})
        assert inspect_cab(fd, SANDBOX_RELEASE, signing.trust, at_cap, scratch).payloads
        under = replace(LIMITS, **{limit: size - 1})
        with pytest.raises(LimitExceeded) as e:
            inspect_cab(fd, SANDBOX_RELEASE, signing.trust, under, scratch)
    assert str(e.value) == f"{member} is {size} bytes, more than {size - 1}"


def test_expected_guids_match_whatever_their_case_and_spaces(
    signing: Signing, scratch: Path
) -> None:
    expected = ExpectedRelease(SANDBOX_ID, "2.0.1", ("00000000-0000-0000-0000-000000000000",
                                                    f" {SANDBOX_GUID.upper()} "))  # fmt: skip
    assert inspect(signing.cab(), signing, scratch, expected).guids == (SANDBOX_GUID,)


def test_a_guid_mismatch_names_at_most_four_of_the_cabs_guids(
    signing: Signing, scratch: Path
) -> None:
    guids = [f"{n:08x}-0000-0000-0000-000000000000" for n in range(6)]
    provides = "".join(f'<firmware type="flashed">{g}</firmware>' for g in guids)
    meta = metainfo().replace(
        f'<firmware type="flashed">{SANDBOX_GUID}</firmware>'.encode(), provides.encode()
    )
    message = inspect_refused(signing.cab(meta), signing, scratch)
    shown = ", ".join(f"'{g}'" for g in guids[:4])
    assert message == (
        f"firmware.metainfo.xml: its GUIDs ({shown}) include none of the expected "
        f"{SANDBOX_GUID.upper()}"
    )
    meta = metainfo().replace(f'<firmware type="flashed">{SANDBOX_GUID}</firmware>'.encode(), b"")
    two = ExpectedRelease(SANDBOX_ID, "2.0.1", (SANDBOX_GUID, FAKE_GUID))
    with memfd(signing.cab(meta)) as fd, pytest.raises(VerificationError) as e:
        inspect_cab(fd, two, signing.trust, LIMITS, scratch)
    assert str(e.value) == (
        "firmware.metainfo.xml: its GUIDs (none) include none of the expected "
        f"{SANDBOX_GUID}, {FAKE_GUID}"
    )


def test_an_unsigned_metainfo_names_the_jcat_it_is_missing_from(
    signing: Signing, scratch: Path
) -> None:
    data = signing.cab(signed={"firmware.bin": (FIRMWARE, signing.trusted)})
    message = inspect_refused(data, signing, scratch)
    assert message == "firmware.metainfo.xml: no signature for it in firmware.jcat"


def test_a_metainfo_named_in_another_case_is_refused_by_name(
    signing: Signing, scratch: Path
) -> None:
    meta = metainfo()
    jcat = signing.jcat({"Firmware.METAINFO.xml": (meta, signing.trusted)})
    data = cabarchive_cab(
        {"firmware.bin": FIRMWARE, "firmware.jcat": jcat, "Firmware.METAINFO.xml": meta}, True
    )
    message = inspect_refused(data, signing, scratch, FormatError)
    assert message == "cab member 'Firmware.METAINFO.xml' is not named *.metainfo.xml"


def test_a_jcat_with_two_items_for_one_member_is_refused(signing: Signing, scratch: Path) -> None:
    meta = metainfo()
    jcat = signing.jcat(
        {
            "firmware.metainfo.xml": (meta, signing.trusted),
            "firmware.bin": (FIRMWARE, signing.trusted),
        }
    )
    doc = json.loads(gzip.decompress(jcat))
    (item,) = [i for i in doc["Items"] if i["Id"] == "firmware.bin"]
    doc["Items"].append(item)  # the same, valid, item twice: still not one answer
    twice = gzip.compress(json.dumps(doc).encode())
    data = cabarchive_cab(
        {"firmware.bin": FIRMWARE, "firmware.jcat": twice, "firmware.metainfo.xml": meta}, True
    )
    message = inspect_refused(data, signing, scratch, FormatError)
    assert message == "firmware.jcat has 2 items for firmware.bin"
