"""Framed streams between qubes, and dom0's receiving end (qubes.FwupdReceiveUpdates).

Wire format (UpdateVM -> dom0, dom0 -> sys-usb), everything bounded before it is parsed:
    one JSON object on one line (at most Limits.header_max_bytes), with a "files" list of
    {"name", "size"}; then the bytes of each file in that order, exactly "size" each; then EOF.

dom0's receiver trusts none of it: the caller must be the configured UpdateVM, the nonce
must name a pending session, the names and caps come from that session, bytes land in the
untrusted dir, and only verified files are renamed into the trusted cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import select
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.errors import FormatError, LimitExceeded, TransferError

CHUNK = 256 * 1024
FRAME_VERSION = 1
# NAME_MAX: the LVFS names cabs <sha1>-<Vendor>-<Model>-<version>.cab, 187 chars at most
# today; the name never reaches a path in dom0 (cabs are stored by sha256)
MAX_FILE_NAME = 255
_FILE_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._+-]{{0,{MAX_FILE_NAME - 1}}}$")


def is_file_name(name: str) -> bool:
    """A plain file name: no path, no leading dot, no control or shell-special characters."""
    return bool(_FILE_NAME.fullmatch(name))


@dataclass(frozen=True)
class FrameFile:
    name: str
    size: int


class StreamReader:
    """Reads a pipe or socket with a deadline for the whole stream and exact lengths.

    A sender that stalls, dribbles or stops early gets a TransferError, never a hang."""

    def __init__(self, fd: int, deadline: float) -> None:
        self.fd = fd
        self.deadline = deadline
        self._buf = b""

    def _read_some(self, n: int) -> bytes:
        if self._buf:
            out, self._buf = self._buf[:n], self._buf[n:]
            return out
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TransferError("transfer took too long (deadline reached)")
        ready, _, _ = select.select([self.fd], [], [], remaining)
        if not ready:
            raise TransferError("transfer took too long (deadline reached)")
        return os.read(self.fd, n)

    def readline(self, max_bytes: int) -> bytes:
        """One line without its newline; refuses a line longer than max_bytes."""
        line = b""
        while True:
            chunk = self._read_some(min(CHUNK, max_bytes + 1 - len(line)))
            if not chunk:
                raise TransferError("stream ended before the header line was complete")
            nl = chunk.find(b"\n")
            if nl >= 0:
                self._buf = chunk[nl + 1 :] + self._buf
                line += chunk[:nl]
                if len(line) > max_bytes:
                    break
                return line
            line += chunk
            if len(line) > max_bytes:
                break
        raise LimitExceeded(f"header line longer than {max_bytes} bytes")

    def copy_exact(self, out_fd: int, size: int, hasher: Any = None) -> None:
        """Copy exactly ``size`` bytes to ``out_fd`` (hashing as it goes)."""
        left = size
        while left:
            chunk = self._read_some(min(CHUNK, left))
            if not chunk:
                raise TransferError(f"stream ended after {size - left} of {size} bytes")
            if hasher is not None:
                hasher.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(out_fd, view) :]
            left -= len(chunk)

    def read_exact(self, size: int) -> bytes:
        parts, left = [], size
        while left:
            chunk = self._read_some(min(CHUNK, left))
            if not chunk:
                raise TransferError(f"stream ended after {size - left} of {size} bytes")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def expect_eof(self) -> None:
        if self._read_some(1):
            raise TransferError("unexpected bytes after the last file")


def parse_header(line: bytes, max_files: int = 8) -> tuple[dict[str, Any], tuple[FrameFile, ...]]:
    """The header object and its file list; names are plain file names, sizes whole numbers."""
    try:
        untrusted = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError("header is not valid JSON") from e
    version = untrusted.get("version") if isinstance(untrusted, dict) else None
    if type(version) is not int or version != FRAME_VERSION:
        raise FormatError(f"header is not a version {FRAME_VERSION} object")
    untrusted_files = untrusted.get("files")
    if not isinstance(untrusted_files, list) or len(untrusted_files) > max_files:
        raise FormatError(f"header needs a list of at most {max_files} files")
    files: list[FrameFile] = []
    for untrusted_f in untrusted_files:
        if not isinstance(untrusted_f, dict):
            raise FormatError("header file entry is not an object")
        untrusted_name, untrusted_size = untrusted_f.get("name"), untrusted_f.get("size")
        if not isinstance(untrusted_name, str) or not is_file_name(untrusted_name):
            raise FormatError("header names a file with a path, control or invalid characters")
        if (
            not isinstance(untrusted_size, int)
            or isinstance(untrusted_size, bool)
            or untrusted_size < 0
        ):
            raise FormatError(f"header gives {untrusted_name} an invalid size")
        if any(f.name == untrusted_name for f in files):
            raise FormatError(f"header names {untrusted_name} twice")
        files.append(FrameFile(untrusted_name, untrusted_size))
    return untrusted, tuple(files)


def write_frame(out_fd: int, header: dict[str, Any], files: Sequence[tuple[str, int]]) -> None:
    """Send a header and the files (name, open fd); sizes come from fstat of the fds."""
    sizes = [os.fstat(fd).st_size for _, fd in files]
    entries = [{"name": name, "size": size} for (name, _), size in zip(files, sizes, strict=True)]
    line = json.dumps({**header, "version": FRAME_VERSION, "files": entries}).encode() + b"\n"
    write_all(out_fd, line)
    for (name, fd), size in zip(files, sizes, strict=True):
        os.lseek(fd, 0, os.SEEK_SET)
        left = size
        while left:
            chunk = os.read(fd, min(CHUNK, left))
            if not chunk:
                raise TransferError(f"{name} shrank while being sent")
            write_all(out_fd, chunk)
            left -= len(chunk)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write may write less than asked (pipes, signals): loop until all is out."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def flocked(lock: Path) -> Iterator[None]:
    """An exclusive flock(2) on a lock file of its own (one that an atomic rename never
    replaces, so a waiter never holds a lock on a file no longer linked)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(lock, flags, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_small(path: Path, cap: int, follow: bool = False) -> bytes:
    """A small file whole, as long as it is a regular file of at most ``cap`` bytes: never
    blocks on a FIFO or device left in its place, and (unless ``follow``) never follows a
    symlink. FileNotFoundError and other OSErrors as open(2) raises them; FormatError or
    LimitExceeded for what is not such a file."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(f"{path}: not a regular file")
        data = f.read(cap + 1)
    if len(data) > cap:
        raise LimitExceeded(f"{path} is more than {cap} bytes")
    return data


def write_atomic(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Old or new, never half: a private temp file, fsync, rename, fsync the directory.
    Group-readable by default: in dom0 the receive service runs as the login user (group
    qubes) and the manager as root; packaging makes the dirs root:qubes 2770."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # a umask of 077 would leave the other side unable to read it
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        # a full disk (ENOSPC) must not leave half a file behind, even under a temp name
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def anonymous_file(directory: Path) -> int:
    """A read-write file with no name at all (O_TMPFILE), private to this process: no other
    path reaches its inode, and a kill leaves nothing behind. Where the filesystem lacks
    O_TMPFILE, a random name unlinked at once."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    path = directory / f"qfw-anon-{secrets.token_hex(8)}"
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    os.unlink(path)
    return fd


def private_copy(src_fd: int, directory: Path, cap: int) -> tuple[int, str]:
    """A copy of what ``src_fd`` holds (from its start) in an :func:`anonymous_file`, and
    the sha256 of exactly the bytes written there. The source may still be written through
    another path (the same inode) after any check of it; the copy cannot, so a check of
    the copy's digest binds what its reader gets. At most ``cap`` bytes."""
    fd = anonymous_file(directory)
    try:
        h, total = hashlib.sha256(), 0
        os.lseek(src_fd, 0, os.SEEK_SET)
        while chunk := os.read(src_fd, CHUNK):
            total += len(chunk)
            if total > cap:
                raise LimitExceeded(f"more than {cap} bytes")
            h.update(chunk)
            write_all(fd, chunk)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd, h.hexdigest()
    except BaseException:
        os.close(fd)
        raise


_TEMP = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def temp_name(path: Path) -> Path:
    """Where a new version of ``path`` is written before its rename: a hidden name of ours
    beside it, which :func:`sweep_temps` knows."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def sweep_temps(directory: Path, older_than: float = 0.0) -> list[str]:
    """Remove what a write killed before its rename left (kill -9, power loss): only our own
    temp names (:func:`temp_name`), only files and symlinks, only those whose mtime is more
    than ``older_than`` seconds ago (0 where a lock the caller holds already excludes any
    write in progress). Returns the names removed."""
    removed: list[str] = []
    if not directory.is_dir():
        return removed
    cutoff = time.time() - older_than
    for path in directory.iterdir():
        if not _TEMP.fullmatch(path.name):
            continue
        # gone already (a concurrent sweep), or another user's in a sticky dir: not ours
        with contextlib.suppress(FileNotFoundError, PermissionError):
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode) or (older_than and st.st_mtime > cutoff):
                continue
            path.unlink()
            removed.append(path.name)
    return sorted(removed)


def sweep_untrusted(directory: Path, older_than: float) -> list[str]:
    """Remove received files (``*.UNTRUSTED``) a killed transfer left, once older than any
    transfer still running could be. Returns the names removed."""
    removed: list[str] = []
    if not directory.is_dir():
        return removed
    cutoff = time.time() - older_than
    for path in directory.iterdir():
        with contextlib.suppress(FileNotFoundError):
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and path.name.endswith(".UNTRUSTED") \
                    and st.st_mtime < cutoff:  # fmt: skip
                path.unlink()
                removed.append(path.name)
    return sorted(removed)


class ProgressLines:
    """Progress as JSON lines on a service's stdout, at most a few a second (the UpdateVM's
    download in bytes, sys-usb's install in percent). dom0 shows them, never decides on
    them; a write that fails means dom0 is gone (Ctrl-C), and the work stops there
    rather than running on for nobody."""

    def __init__(self, fd: int, interval: float = 0.25, unit: str = "bytes") -> None:
        self.fd, self.interval, self.unit, self._last = fd, interval, unit, 0.0

    def __call__(self, name: str, done: int, total: int | None, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < self.interval:
            return
        self._last = now
        doc = {"name": name, "done": done, "total": total, "unit": self.unit}
        try:
            write_all(self.fd, json.dumps({"progress": doc}).encode() + b"\n")
        except OSError as e:
            raise TransferError("dom0 went away: cancelled") from e


class UntrustedFiles:
    """Files received from another qube, in the untrusted dir; removed on exit unless
    handed over. O_EXCL + 0600: never follows or reuses something already there."""

    def __init__(self, directory: Path, prefix: str) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir = directory
        self.prefix = prefix
        self.paths: dict[str, Path] = {}
        self.fds: dict[str, int] = {}

    def create(self, name: str) -> int:
        if name in self.paths:
            raise FileExistsError(f"{name} was already received")
        # by position, not by name: a 255-character name must not make the path too long
        path = self.dir / f"{self.prefix}.{len(self.paths)}.UNTRUSTED"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        self.paths[name], self.fds[name] = path, fd
        return fd

    def __enter__(self) -> UntrustedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            os.close(fd)
        for path in self.paths.values():
            path.unlink(missing_ok=True)


def install_file(fd: int, untrusted_path: Path, dest: Path) -> None:
    """Move a verified file into the trusted cache: fsync, atomic rename, fsync the dir."""
    os.fsync(fd)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(untrusted_path, dest)
    # the file renamed must be the file verified (the fd), not something put at the path
    if os.stat(dest, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
        dest.unlink()
        raise TransferError(f"{dest.name}: replaced between verification and storing")
    fsync_dir(dest.parent)


_CACHED_CAB = re.compile(r"[0-9a-f]{64}\.cab")


def prune_cabs(cabs_dir: Path, max_bytes: int, keep: Path | None = None) -> list[str]:
    """Delete cached cabs (only ``<sha256>.cab`` files) oldest first until they total at
    most ``max_bytes``; never ``keep``. Returns the names deleted."""
    if not cabs_dir.is_dir():
        return []
    cabs = []
    for path in cabs_dir.iterdir():
        if not _CACHED_CAB.fullmatch(path.name) or path == keep:
            continue
        try:
            st = path.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # a concurrent run's prune
        cabs.append((st.st_mtime_ns, path.name, st.st_size))
    total = sum(size for *_, size in cabs) + (keep.stat().st_size if keep else 0)
    deleted = []
    for _, name, size in sorted(cabs):
        if total <= max_bytes:
            break
        (cabs_dir / name).unlink(missing_ok=True)
        total -= size
        deleted.append(name)
    return deleted
