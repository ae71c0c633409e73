"""Cabinet archives (.cab) as dom0 meets them: bounded from their tables, then streamed.

The Microsoft Cabinet format puts every size, count and offset in tables at the front
(CFHEADER, CFFOLDER, CFFILE) and the data after them in CFDATA blocks of at most 32 KiB
uncompressed. :func:`walk_cab` reads and checks all of those tables, and every CFDATA
header, before it inflates one byte; a compression bomb is refused from what it declares.
It then inflates one block at a time (MSZIP: "CK" + a raw deflate stream whose window is
primed with the previous block), hashing each member as it passes, so memory stays at a
few blocks whatever the cab's size. cabarchive, by contrast, inflates everything into
memory first (shared/DEPENDENCIES.md); it stays the reference in tests.

:func:`inspect_cab` is step 4 of the update flow: the cab's payload jcat must verify the
metainfo before lxml parses it, the metainfo must name the release that dom0's verified
metadata promised, and every payload it names must carry a trusted signature.

What is accepted is deliberately narrower than the format: one cabinet (no sets), folders
stored or MSZIP, tables and data laid out back to back with nothing after them, members
that tile their folder exactly. LVFS cabs (written by cabarchive or libgcab) are all so.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import struct
import unicodedata
import zlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from broker.config import Limits
from broker.errors import FormatError, LimitExceeded, VerificationError
from broker.jcat import Jcat, JcatItem, parse_jcat
from broker.metadata import safe_iterparse
from broker.signatures import TrustPolicy, TrustStore, verify_file
from broker.transfer import anonymous_file, write_all


@dataclass(frozen=True)
class ExpectedRelease:
    """What dom0's verified metadata says the cab must hold."""

    component_id: str
    version: str
    guids: tuple[str, ...]


@dataclass(frozen=True)
class CabMember:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CabInfo:
    members: tuple[CabMember, ...]
    component_id: str
    version: str
    guids: tuple[str, ...]
    payloads: tuple[str, ...]  # member names verified by the payload jcat


# --------------------------------------------------------------------------- format
_SIGNATURE = b"MSCF"
# signature, reserved1, cbCabinet, reserved2, coffFiles, reserved3, versionMinor,
# versionMajor, cFolders, cFiles, flags, setID, iCabinet
_HEADER = struct.Struct("<4sIIIIIBBHHHHH")
_HEADER_RESERVE = struct.Struct("<HBB")  # cbCFHeader, cbCFFolder, cbCFData
_FOLDER = struct.Struct("<IHH")  # coffCabStart, cCFData, typeCompress
_FILE = struct.Struct("<IIHHHH")  # cbFile, uoffFolderStart, iFolder, date, time, attribs
_DATA = struct.Struct("<IHH")  # csum, cbData, cbUncomp

_FLAG_PREV_CABINET = 0x0001
_FLAG_NEXT_CABINET = 0x0002
_FLAG_RESERVE_PRESENT = 0x0004
_ATTR_NAME_IS_UTF = 0x80
_FOLDER_CONTINUED = 0xFFFD  # 0xFFFD-0xFFFF: a member shared with another cabinet of a set
_MAX_HEADER_RESERVE = 60000  # the format's own bound on cbCFHeader
_MAX_NAME_BYTES = 255  # CB_MAX_FILENAME is 256 with its NUL
_MAX_BLOCK = 32768

_COMPRESS_NONE = 0
_COMPRESS_MSZIP = 1
_COMPRESSION_NAMES = {2: "Quantum", 3: "LZX"}

# below this size a cab may exceed the ratio: a 1 KB firmware of 0xff compresses ~1000:1
_RATIO_FLOOR_BYTES = 64 * 1024


@dataclass(frozen=True)
class _Folder:
    index: int
    data_start: int
    blocks: int
    compression: int


@dataclass(frozen=True)
class _Entry:
    index: int  # position in the CFFILE table
    name: str
    size: int
    offset: int  # in the folder's uncompressed stream
    folder: int


@dataclass
class _BlockTable:
    """The CFDATA headers of one folder, read before anything is inflated."""

    comp: array[int]
    uncomp: array[int]
    csum: array[int]
    end: int  # file offset just past the folder's last block
    total: int  # uncompressed bytes


def _show(text: str) -> str:
    """A hostile string, quoted, escaped and short, for a one-line message."""
    return ascii(text[:80] + ("..." if len(text) > 80 else ""))


def _pread_exact(fd: int, size: int, offset: int, what: str) -> bytes:
    chunks = []
    left = size
    while left > 0:
        chunk = os.pread(fd, left, offset + size - left)
        if not chunk:
            raise FormatError(f"cab is truncated in {what}")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _file_state(fd: int) -> tuple[int, int, int, int]:
    st = os.fstat(fd)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _cab_checksum(data: memoryview, header_word: int) -> int:
    """The CFDATA checksum: XOR of the little-endian 32-bit words, the 1-3 trailing bytes
    taken big-endian (a quirk every implementation shares), then the cbData/cbUncomp word.

    Folding one big integer in halves keeps the XOR in C; a word loop in Python would be
    the slowest part of the walk."""
    whole = len(data) & ~3
    x = int.from_bytes(data[:whole], "little")
    words = whole // 4
    while words > 1:
        half = (words + 1) // 2
        bits = half * 32
        x = (x >> bits) ^ (x & ((1 << bits) - 1))
        words = half
    tail = 0
    for byte in data[whole:]:
        tail = (tail << 8) | byte
    return x ^ tail ^ header_word


# --------------------------------------------------------------------------- names
_NAME_REFUSED_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")


def _member_name(raw: bytes, utf8: bool) -> str:
    """A member name that is one plain file name on every system that will see it."""
    if not raw:
        raise FormatError("a cab member has an empty name")
    if utf8:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"cab member name {raw[:80]!a} is not valid UTF-8") from e
    elif raw.isascii():
        name = raw.decode("ascii")
    else:
        # without the flag the bytes are in some unknown code page; fwupd and we could
        # read different names from them
        raise FormatError(f"cab member name {raw[:80]!a} is not ASCII nor marked UTF-8")
    if any(unicodedata.category(c) in _NAME_REFUSED_CATEGORIES for c in name):
        raise FormatError(f"cab member name {_show(name)} holds control or format characters")
    if "/" in name or "\\" in name:
        # fwupd keeps only the part after the last separator: a second name for one member
        raise FormatError(f"cab member name {_show(name)} holds a path separator")
    if ".." in name or name == ".":
        raise FormatError(f"cab member name {_show(name)} holds '..' or is '.'")
    return name


def _name_key(name: str) -> str:
    # what a case-insensitive or normalising file system would make of the name
    return unicodedata.normalize("NFKC", name).casefold()


# --------------------------------------------------------------------------- tables
def _read_tables(
    fd: int, size: int, limits: Limits
) -> tuple[list[_Folder], list[_Entry], int, int]:
    """Folders, members (table order), the CFDATA reserve size and where data starts."""
    if size < _HEADER.size:
        if os.pread(fd, 4, 0) == _SIGNATURE:
            raise FormatError("cab is truncated in its header")
        raise FormatError("not a cabinet archive (no MSCF signature)")
    (
        signature,
        reserved1,
        cab_size,
        reserved2,
        files_offset,
        reserved3,
        minor,
        major,
        n_folders,
        n_files,
        flags,
        _set_id,
        cabinet_index,
    ) = _HEADER.unpack(_pread_exact(fd, _HEADER.size, 0, "its header"))
    if signature != _SIGNATURE:
        raise FormatError("not a cabinet archive (no MSCF signature)")
    if (major, minor) != (1, 3):
        raise FormatError(f"cab format version {major}.{minor} is not supported (only 1.3)")
    if reserved1 or reserved2 or reserved3:
        raise FormatError("cab header has non-zero reserved fields")
    if flags & (_FLAG_PREV_CABINET | _FLAG_NEXT_CABINET) or cabinet_index:
        raise FormatError("cab is part of a multi-cabinet set, which is not supported")
    if flags & ~_FLAG_RESERVE_PRESENT:
        raise FormatError(f"cab header has unknown flags 0x{flags:04x}")
    if cab_size > size:
        raise FormatError(f"cab is truncated: its header says {cab_size} bytes, it has {size}")
    if cab_size < size:
        raise FormatError(f"cab has {size - cab_size} bytes after its declared end")
    if not n_folders or not n_files:
        raise FormatError("cab holds no folder or no file")
    if n_folders > limits.cab_max_folders:
        raise LimitExceeded(f"cab has {n_folders} folders, more than {limits.cab_max_folders}")
    if n_files > limits.cab_max_members:
        raise LimitExceeded(f"cab has {n_files} members, more than {limits.cab_max_members}")

    pos = _HEADER.size
    folder_reserve = data_reserve = 0
    if flags & _FLAG_RESERVE_PRESENT:
        header_reserve, folder_reserve, data_reserve = _HEADER_RESERVE.unpack(
            _pread_exact(fd, _HEADER_RESERVE.size, pos, "its reserve sizes")
        )
        if header_reserve > _MAX_HEADER_RESERVE:
            raise FormatError(f"cab header reserve of {header_reserve} bytes is over 60000")
        pos += _HEADER_RESERVE.size + header_reserve  # skipped: we give it no meaning

    entry_size = _FOLDER.size + folder_reserve
    if pos + n_folders * entry_size > size:
        raise FormatError("cab is truncated in its folder table")
    raw = _pread_exact(fd, n_folders * entry_size, pos, "its folder table")
    folders = []
    total_blocks = 0
    for i in range(n_folders):
        start, blocks, compress = _FOLDER.unpack_from(raw, i * entry_size)
        kind = compress & 0x000F
        if kind in _COMPRESSION_NAMES:
            raise FormatError(
                f"cab folder {i} uses {_COMPRESSION_NAMES[kind]} compression, which is not "
                "supported (only stored and MSZIP)"
            )
        if compress not in (_COMPRESS_NONE, _COMPRESS_MSZIP):
            raise FormatError(f"cab folder {i} uses unknown compression 0x{compress:04x}")
        if not blocks:
            raise FormatError(f"cab folder {i} has no data blocks")
        total_blocks += blocks
        folders.append(_Folder(i, start, blocks, compress))
    if total_blocks > limits.cab_max_data_blocks:
        raise LimitExceeded(
            f"cab has {total_blocks} data blocks, more than {limits.cab_max_data_blocks}"
        )
    pos += n_folders * entry_size

    if files_offset != pos:
        raise FormatError("cab file table does not follow its folder table")
    # each entry: 16 bytes and a name of at most 255 bytes plus its NUL
    span = min(n_files * (_FILE.size + _MAX_NAME_BYTES + 1), size - pos)
    raw = _pread_exact(fd, span, pos, "its file table")
    entries: list[_Entry] = []
    seen: dict[str, str] = {}
    at = 0
    for i in range(n_files):
        if at + _FILE.size > len(raw):
            raise FormatError("cab is truncated in its file table")
        member_size, offset, folder, _date, _time, attribs = _FILE.unpack_from(raw, at)
        at += _FILE.size
        end = raw.find(b"\0", at, at + _MAX_NAME_BYTES + 1)
        if end < 0:
            if at + _MAX_NAME_BYTES + 1 > len(raw):
                raise FormatError("cab is truncated in its file table")
            raise FormatError(f"cab member {i} has a name longer than {_MAX_NAME_BYTES} bytes")
        name = _member_name(raw[at:end], bool(attribs & _ATTR_NAME_IS_UTF))
        at = end + 1
        key = _name_key(name)
        if key in seen:
            raise FormatError(
                f"cab has two members named {_show(seen[key])} and {_show(name)} "
                "(the same once case and Unicode forms are folded)"
            )
        seen[key] = name
        if folder >= _FOLDER_CONTINUED:
            raise FormatError(f"cab member {_show(name)} continues in another cabinet")
        if folder >= n_folders:
            raise FormatError(f"cab member {_show(name)} names folder {folder} of {n_folders}")
        if member_size > limits.cab_max_member_bytes:
            raise LimitExceeded(
                f"cab member {_show(name)} declares {member_size} bytes, "
                f"more than {limits.cab_max_member_bytes}"
            )
        entries.append(_Entry(i, name, member_size, offset, folder))
    data_start = pos + at

    total = sum(e.size for e in entries)
    if total > limits.cab_max_uncompressed_bytes:
        raise LimitExceeded(
            f"cab members declare {total} bytes, more than {limits.cab_max_uncompressed_bytes}"
        )
    ratio_cap = max(size, _RATIO_FLOOR_BYTES) * limits.cab_max_ratio
    if total > ratio_cap:
        raise LimitExceeded(
            f"cab members declare {total} bytes from {size}, "
            f"more than {limits.cab_max_ratio} times its size"
        )
    return folders, entries, data_reserve, data_start


def _scan_blocks(fd: int, folder: _Folder, start: int, reserve: int, size: int) -> _BlockTable:
    """Every CFDATA header of a folder: sizes, bounds, layout. Nothing is inflated."""
    if folder.data_start != start:
        raise FormatError(f"cab folder {folder.index} data does not follow what precedes it")
    table = _BlockTable(array("H"), array("H"), array("I"), start, 0)
    pos = start
    for i in range(folder.blocks):
        where = f"data block {i} of folder {folder.index}"
        if pos + _DATA.size + reserve > size:
            raise FormatError(f"cab is truncated in {where}")
        csum, comp, uncomp = _DATA.unpack(_pread_exact(fd, _DATA.size, pos, where))
        if not uncomp or uncomp > _MAX_BLOCK:
            raise FormatError(f"cab {where} declares {uncomp} bytes (1 to {_MAX_BLOCK} allowed)")
        if folder.compression == _COMPRESS_NONE and comp != uncomp:
            raise FormatError(f"cab {where} is stored but its two sizes differ")
        if folder.compression == _COMPRESS_MSZIP and comp < 3:
            raise FormatError(f"cab {where} is too short for MSZIP")
        pos += _DATA.size + reserve + comp
        if pos > size:
            raise FormatError(f"cab is truncated in {where}")
        table.comp.append(comp)
        table.uncomp.append(uncomp)
        table.csum.append(csum)
        table.total += uncomp
    table.end = pos
    return table


def _check_tiling(folder: _Folder, members: list[_Entry], total: int) -> list[_Entry]:
    """Members of a folder, in stream order, covering its bytes exactly once."""
    cursor = 0
    ordered = sorted((e for e in members if e.size), key=lambda e: e.offset)
    previous: _Entry | None = None
    for e in ordered:
        if e.offset + e.size > total:
            raise FormatError(
                f"cab member {_show(e.name)} extends past the end of folder {folder.index}"
            )
        if e.offset < cursor:
            assert previous is not None  # noqa: S101  cursor > 0 only after a member
            raise FormatError(f"cab members {_show(previous.name)} and {_show(e.name)} overlap")
        if e.offset > cursor:
            raise FormatError(
                f"cab folder {folder.index} bytes {cursor}-{e.offset} belong to no member"
            )
        cursor = e.offset + e.size
        previous = e
    if cursor != total:
        raise FormatError(f"cab folder {folder.index} bytes {cursor}-{total} belong to no member")
    for e in members:
        if not e.size and e.offset > total:
            raise FormatError(f"cab member {_show(e.name)} lies past the end of its folder")
    return ordered


# --------------------------------------------------------------------------- the walk
class _Inflater:
    """One folder's blocks, inflated one at a time, each checked against its header."""

    def __init__(self, folder: _Folder) -> None:
        self.folder = folder
        self.previous = b""

    def block(self, i: int, payload: memoryview, uncomp: int) -> bytes:
        where = f"cab data block {i} of folder {self.folder.index}"
        if self.folder.compression == _COMPRESS_NONE:
            return bytes(payload)
        if bytes(payload[:2]) != b"CK":
            raise FormatError(f"{where} lacks the MSZIP 'CK' signature")
        # MSZIP primes each block's window with the block before (as fwupd and cabarchive)
        d = (
            zlib.decompressobj(-zlib.MAX_WBITS, zdict=self.previous)
            if self.previous
            else zlib.decompressobj(-zlib.MAX_WBITS)
        )
        try:
            # one byte over the declared size is enough to know that it lies
            out = d.decompress(payload[2:], uncomp + 1)
        except zlib.error as e:
            raise FormatError(f"{where} does not inflate: {e}") from e
        if len(out) > uncomp or d.unconsumed_tail:
            raise FormatError(f"{where} inflates to more than its declared {uncomp} bytes")
        if not d.eof:
            raise FormatError(f"{where} ends inside its deflate stream")
        if len(out) != uncomp:
            raise FormatError(f"{where} inflates to {len(out)} bytes, not its declared {uncomp}")
        if d.unused_data:
            raise FormatError(f"{where} has bytes after its deflate stream")
        self.previous = out
        return out


class _Outputs:
    """Hands a folder's uncompressed stream to its members in order, hashing each."""

    def __init__(
        self,
        ordered: list[_Entry],
        sink: Callable[[str, int], int] | None,
        results: dict[int, CabMember],
    ) -> None:
        self.ordered = ordered
        self.sink = sink
        self.results = results
        self.next = 0
        self.current: _Entry | None = None
        self.left = 0
        self.fd = -1
        self.hash = hashlib.sha256()

    def _start(self) -> None:
        entry = self.ordered[self.next]
        self.next += 1
        self.current, self.left, self.hash = entry, entry.size, hashlib.sha256()
        self.fd = self.sink(entry.name, entry.size) if self.sink else -1

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.current is None:
                # tiling was checked: data only arrives while a member is still owed it
                self._start()
            assert self.current is not None  # noqa: S101
            part = view[: self.left]
            self.hash.update(part)
            if self.fd >= 0:
                write_all(self.fd, part)
            self.left -= len(part)
            view = view[len(part) :]
            if not self.left:
                e = self.current
                self.results[e.index] = CabMember(e.name, e.size, self.hash.hexdigest())
                self.current = None


def walk_cab(
    fd: int, limits: Limits, sink: Callable[[str, int], int] | None = None
) -> tuple[CabMember, ...]:
    """The members of the cab behind ``fd`` (CFFILE table order), each hashed.

    Every table and CFDATA header is read and checked before the first byte is inflated;
    FormatError or LimitExceeded (one line, naming the cause) otherwise. With ``sink``,
    ``sink(name, size)`` is called as each member starts (folder by folder in data order,
    each folder's empty members first) and returns a descriptor that receives the member's
    bytes; the caller owns it.
    ``fd`` is read with pread only: its offset is left alone."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise FormatError("cab is not a regular file")
    if st.st_size > limits.cab_max_bytes:
        raise LimitExceeded(f"cab is {st.st_size} bytes, more than {limits.cab_max_bytes}")
    before = _file_state(fd)
    size = st.st_size

    folders, entries, reserve, data_start = _read_tables(fd, size, limits)
    tables: list[_BlockTable] = []
    plans: list[list[_Entry]] = []
    pos = data_start
    for folder in folders:
        table = _scan_blocks(fd, folder, pos, reserve, size)
        members = [e for e in entries if e.folder == folder.index]
        plans.append(_check_tiling(folder, members, table.total))
        tables.append(table)
        pos = table.end
    if pos != size:
        raise FormatError(f"cab has {size - pos} bytes after its last data block")

    results: dict[int, CabMember] = {}
    empty_hash = hashlib.sha256(b"").hexdigest()
    for folder, table, ordered in zip(folders, tables, plans, strict=True):
        for e in entries:
            if e.folder == folder.index and not e.size:
                if sink is not None:
                    sink(e.name, 0)
                results[e.index] = CabMember(e.name, 0, empty_hash)
        inflater = _Inflater(folder)
        outputs = _Outputs(ordered, sink, results)
        pos = folder.data_start
        for i in range(folder.blocks):
            comp, uncomp, csum = table.comp[i], table.uncomp[i], table.csum[i]
            length = _DATA.size + reserve + comp
            raw = _pread_exact(fd, length, pos, f"data block {i} of folder {folder.index}")
            if _DATA.unpack_from(raw) != (csum, comp, uncomp):
                raise FormatError("cab changed while it was being read")
            payload = memoryview(raw)[_DATA.size + reserve :]
            if csum and _cab_checksum(payload, comp | uncomp << 16) != csum:
                raise FormatError(f"cab data block {i} of folder {folder.index} fails its checksum")
            outputs.feed(inflater.block(i, payload, uncomp))
            pos += length
    if _file_state(fd) != before:
        raise FormatError("cab changed while it was being read")
    return tuple(results[e.index] for e in entries)


# --------------------------------------------------------------------------- metainfo
@dataclass(frozen=True)
class _Checksum:
    filename: str
    kind: str  # hashlib name
    value: str


@dataclass(frozen=True)
class _Metainfo:
    component_id: str
    version: str
    guids: tuple[str, ...]
    payloads: tuple[str, ...]
    checksums: tuple[_Checksum, ...]


_XML_DECL_ENCODING = re.compile(rb"^\s*<\?xml[^>]*?encoding\s*=\s*[\"']([^\"']*)[\"']")
_HEX = re.compile(r"^[0-9a-f]+$")
_CHECKSUM_KINDS = {"sha1": "sha1", "sha256": "sha256", "sha384": "sha384", "sha512": "sha512"}
_CHECKSUM_BY_LENGTH = {40: "sha1", 64: "sha256", 96: "sha384", 128: "sha512"}
# fwupd's payload name when the release names none
_DEFAULT_PAYLOAD = "firmware.bin"


def _text(el: etree._Element | None) -> str:
    return "".join(str(t) for t in el.itertext()).strip() if el is not None else ""


def _payload_name(filename: str, metainfo: str) -> str:
    # fwupd looks members up by basename
    name = filename.strip().rsplit("/", 1)[-1]
    if not name:
        raise FormatError(f"{metainfo} names a payload with an empty file name")
    return name


def _checksum(el: etree._Element, filename: str, metainfo: str) -> _Checksum | None:
    value = _text(el).lower()
    declared = (el.get("type") or "").strip().lower()
    kind = _CHECKSUM_KINDS.get(declared) if declared else _CHECKSUM_BY_LENGTH.get(len(value))
    if kind is None:
        return None  # a kind we cannot compute: the payload's jcat signature still binds it
    if not _HEX.match(value) or len(value) != hashlib.new(kind).digest_size * 2:
        raise FormatError(f"{metainfo} has a malformed {kind} checksum for {_show(filename)}")
    return _Checksum(filename, kind, value)


def _parse_metainfo(data: bytes, name: str) -> _Metainfo:
    """The release a verified metainfo describes. libxml2 meets no DOCTYPE, no entity
    declaration, no network and no encoding but UTF-8."""
    if data.startswith((b"\xfe\xff", b"\xff\xfe")) or b"\0" in data:
        raise FormatError(f"{name} is not UTF-8")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{name} is not UTF-8") from e
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise FormatError(f"{name} has a DOCTYPE or entity declarations")
    declared = _XML_DECL_ENCODING.match(data.removeprefix(b"\xef\xbb\xbf"))
    if declared and declared.group(1).lower() not in (b"utf-8", b"utf8"):
        raise FormatError(f"{name} declares an encoding other than UTF-8")
    context = safe_iterparse(io.BytesIO(data), ("start",), encoding="utf-8")
    root: etree._Element | None = None
    try:
        for _event, el in context:
            if root is None:
                root = el
                if el.getroottree().docinfo.doctype or el.tag != "component":
                    raise FormatError(f"{name} has a DOCTYPE or is not a component document")
    except etree.XMLSyntaxError as e:
        raise FormatError(f"{name} is not well-formed XML (line {e.lineno})") from e
    if root is None:
        raise FormatError(f"{name} is empty")
    if root.get("type") != "firmware":
        raise FormatError(f"{name} does not describe a firmware component")

    component_id = _text(root.find("id"))
    guids = tuple(
        g for el in root.iterfind("provides/firmware[@type='flashed']") if (g := _text(el))
    )
    # the first release is the one fwupd and the LVFS take from a cab
    release = root.find("releases/release")
    if release is None:
        raise FormatError(f"{name} has no release")
    version = (release.get("version") or "").strip()

    payloads: list[str] = []
    checksums: list[_Checksum] = []
    for el in release.iterfind("checksum[@target='content']"):
        filename = _payload_name(el.get("filename") or _DEFAULT_PAYLOAD, name)
        payloads.append(filename)
        if (c := _checksum(el, filename, name)) is not None:
            checksums.append(c)
    for artifact in release.iterfind("artifacts/artifact"):
        filename_el = artifact.find("filename")
        if filename_el is None:
            continue  # an artifact that lives outside the cab
        filename = _payload_name(_text(filename_el), name)
        payloads.append(filename)
        for el in artifact.iterfind("checksum"):
            if (c := _checksum(el, filename, name)) is not None:
                checksums.append(c)
    if not payloads:
        payloads.append(_DEFAULT_PAYLOAD)
    return _Metainfo(
        component_id=component_id,
        version=version,
        guids=guids,
        payloads=tuple(dict.fromkeys(payloads)),
        checksums=tuple(checksums),
    )


def _version_matches(metainfo_version: str, expected: str) -> bool:
    if metainfo_version == expected:
        return True
    # the LVFS publishes a "0x..." metainfo version as its decimal value
    if metainfo_version.lower().startswith("0x"):
        try:
            return str(int(metainfo_version[2:], 16)) == expected
        except ValueError:
            return False
    return False


# --------------------------------------------------------------------------- inspection
_DEFAULT_POLICY = TrustPolicy()  # frozen: one shared default is safe


def _read_member(fd: int, size: int) -> bytes:
    return _pread_exact(fd, size, 0, "a member copy")


def _digest(fd: int, kind: str) -> str:
    h = hashlib.new(kind)
    offset = 0
    while chunk := os.pread(fd, 1024 * 1024, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def _jcat_item(jcat: Jcat, name: str, jcat_name: str) -> JcatItem:
    """The item for one member, by exact id: inside a cab nothing renames members, so the
    single-item fallback of :meth:`Jcat.item_for` has no place here."""
    items = [item for item in jcat.items if item.id == name]
    if not items:
        raise VerificationError(f"{name}: no signature for it in {jcat_name}")
    if len(items) > 1:
        raise FormatError(f"{jcat_name} has {len(items)} items for {name}")
    return items[0]


def _only_member(members: tuple[CabMember, ...], suffix: str) -> CabMember:
    found = [m for m in members if m.name.lower().endswith(suffix)]
    if len(found) != 1:
        raise FormatError(f"cab holds {len(found)} *{suffix} members, not exactly one")
    if not found[0].name.endswith(suffix):
        raise FormatError(f"cab member {_show(found[0].name)} is not named *{suffix}")
    return found[0]


def _verify_member(
    member: CabMember, fd: int, jcat: Jcat, jcat_name: str, trust: TrustStore, policy: TrustPolicy
) -> None:
    verified = verify_file(fd, _jcat_item(jcat, member.name, jcat_name), trust, policy,
                           name=member.name)  # fmt: skip
    if verified.sha256 != member.sha256 or verified.size != member.size:
        raise VerificationError(f"{member.name}: its copy changed while it was verified")


def _inspect(
    members: tuple[CabMember, ...],
    fds: dict[str, int],
    expected: ExpectedRelease,
    trust: TrustStore,
    limits: Limits,
    policy: TrustPolicy,
) -> CabInfo:
    metainfo = _only_member(members, ".metainfo.xml")
    jcat_member = _only_member(members, ".jcat")
    if jcat_member.size > limits.jcat_max_bytes:
        raise LimitExceeded(
            f"{jcat_member.name} is {jcat_member.size} bytes, more than {limits.jcat_max_bytes}"
        )
    if metainfo.size > limits.cab_max_metainfo_bytes:
        raise LimitExceeded(
            f"{metainfo.name} is {metainfo.size} bytes, more than {limits.cab_max_metainfo_bytes}"
        )
    jcat = parse_jcat(
        _read_member(fds[jcat_member.name], jcat_member.size),
        limits.jcat_max_bytes,
        limits.jcat_json_max_bytes,
    )
    # verify before parse: libxml2 meets only metainfo bytes a trusted signature binds
    _verify_member(metainfo, fds[metainfo.name], jcat, jcat_member.name, trust, policy)
    info = _parse_metainfo(_read_member(fds[metainfo.name], metainfo.size), metainfo.name)

    if info.component_id != expected.component_id:
        raise VerificationError(
            f"{metainfo.name}: component id {_show(info.component_id)} is not the expected "
            f"{expected.component_id}"
        )
    if not _version_matches(info.version, expected.version):
        raise VerificationError(
            f"{metainfo.name}: release version {_show(info.version)} is not the expected "
            f"{expected.version}"
        )
    wanted = {g.strip().lower() for g in expected.guids}
    if not wanted & {g.lower() for g in info.guids}:
        shown = ", ".join(_show(g) for g in info.guids[:4]) or "none"
        raise VerificationError(
            f"{metainfo.name}: its GUIDs ({shown}) include none of the expected "
            f"{', '.join(expected.guids)}"
        )

    by_name = {m.name: m for m in members}
    for payload in info.payloads:
        if payload not in by_name:
            raise FormatError(f"{metainfo.name} names payload {_show(payload)}, not in the cab")
    # each kind of each member hashed once, however often the metainfo repeats a checksum
    # (make fuzz: 5,000 repeated sha512 lines over 8 MiB took 45 s)
    digests: dict[tuple[str, str], str] = {}
    for c in info.checksums:
        member = by_name[c.filename]
        if c.kind == "sha256":
            actual = member.sha256
        else:
            if (member.name, c.kind) not in digests:
                digests[(member.name, c.kind)] = _digest(fds[member.name], c.kind)
            actual = digests[(member.name, c.kind)]
        if actual != c.value:
            raise VerificationError(
                f"{member.name}: its {c.kind} is not the one {metainfo.name} gives"
            )
    for payload in info.payloads:
        _verify_member(by_name[payload], fds[payload], jcat, jcat_member.name, trust, policy)
    return CabInfo(
        members=members,
        component_id=info.component_id,
        version=info.version,
        guids=info.guids,
        payloads=info.payloads,
    )


def inspect_cab(
    fd: int,
    expected: ExpectedRelease,
    trust: TrustStore,
    limits: Limits,
    scratch_dir: Path,
    policy: TrustPolicy = _DEFAULT_POLICY,
) -> CabInfo:
    """Walk the cab behind ``fd`` into private copies in ``scratch_dir`` and check that it
    is the release dom0 expects, signed where it matters; VerificationError, FormatError
    or LimitExceeded otherwise. Nothing is left in ``scratch_dir`` either way.
    ``policy`` is the configured one (``Config.trust``) for the metainfo and payloads."""
    return _inspect_cab(fd, expected, trust, limits, scratch_dir, policy, keep=False)[0]


def payload_of(
    fd: int,
    expected: ExpectedRelease,
    trust: TrustStore,
    limits: Limits,
    scratch_dir: Path,
    policy: TrustPolicy = _DEFAULT_POLICY,
) -> tuple[CabInfo, int]:
    """:func:`inspect_cab` for a cab of exactly one payload, and a descriptor of the very
    copy of it that verified (unlinked, private): what is used is what was checked. The
    caller closes it."""
    info, kept = _inspect_cab(fd, expected, trust, limits, scratch_dir, policy, keep=True)
    if kept is None:  # keep=True returns one or raises
        raise FormatError("the cab's payload was not kept")
    return info, kept


def _inspect_cab(
    fd: int,
    expected: ExpectedRelease,
    trust: TrustStore,
    limits: Limits,
    scratch_dir: Path,
    policy: TrustPolicy,
    keep: bool,
) -> tuple[CabInfo, int | None]:
    fds: dict[str, int] = {}

    def sink(name: str, size: int) -> int:
        # nameless: the member's name is only checked, never used, and a kill between
        # this open and the end leaves nothing behind
        member_fd = anonymous_file(scratch_dir)
        fds[name] = member_fd
        return member_fd

    kept: int | None = None
    try:
        members = walk_cab(fd, limits, sink)
        info = _inspect(members, fds, expected, trust, limits, policy)
        if keep:
            if len(info.payloads) != 1:
                raise FormatError(f"the cab names {len(info.payloads)} payloads, not one")
            kept = fds.pop(info.payloads[0])
            os.lseek(kept, 0, os.SEEK_SET)
        return info, kept
    finally:
        for member_fd in fds.values():
            os.close(member_fd)
