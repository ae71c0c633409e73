"""Heads (coreboot + a Linux boot firmware): which release this machine may take, and its
ROM staged in /boot/updates/<version>/ for Heads to verify and flash at the next boot.

No fwupd device stands for the boot firmware here, so dom0 decides alone, and only on what
it verified: the board and the running version come from the firmware's own SMBIOS (Heads
builds set the product name to the board and the BIOS version to ``Heads-v<git describe>``),
the release from dom0's verified catalogs, only from a remote whose config names the
component prefix it carries Heads under (``PREFIX.<board>[.…]``), the cab through the same
download and checks as any cab (sha256 from verified metadata, metainfo, a payload signature
under its remote's anchors). Heads, at flash time, checks the ROM against what dom0 wrote at
most: this is where its authenticity is decided. The ROM staged is the very payload copy
that verified. Nothing is flashed here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from broker.errors import (
    ConfigError,
    FormatError,
    NotFound,
    NothingToDo,
    TransferError,
    VerificationError,
)
from broker.metadata import Catalog, Release
from broker.sanitize import printable
from broker.signatures import sha256_fd
from broker.transfer import CHUNK, fsync_dir, read_small, write_all

ROM_NAME = "firmware.rom"
SUMS_NAME = "sha256sum.txt"  # as `sha256sum firmware.rom` prints it; Heads' zips carry one
_DMI_CAP = 256
# Heads' board names (boards/<name>/ in its tree): x230-hotp-maximized, librem_14, t480-…
_BOARD = re.compile(r"[a-z0-9][a-z0-9_+-]{0,63}")
_HEADS_VERSION = re.compile(r"Heads-v([0-9A-Za-z.+~_-]{1,64})")
_NUMERIC = re.compile(r"v?([0-9]{1,9}(?:\.[0-9]{1,9}){0,7})")
# a version names a dir under /boot/updates: no separators, no dot files
_DIR_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+~_-]{0,63}")
_STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class Machine:
    board: str  # lowercased
    bios_version: str  # as SMBIOS says it, printable
    running: str  # the Heads version, "0.2.2-917-g19f0e65"

    @property
    def running_tag(self) -> str:
        """The release tag the running build descends from (``git describe``'s first part)."""
        return self.running.split("-", 1)[0]


def _dmi(dmi_dir: Path, name: str) -> str:
    try:
        raw = read_small(dmi_dir / name, _DMI_CAP)
    except FileNotFoundError as e:
        raise NotFound(f"{dmi_dir / name}: no such file: this machine's firmware does not "
                       "say it") from e  # fmt: skip
    except OSError as e:
        raise FormatError(f"{dmi_dir / name}: {e.strerror}") from e
    return printable(raw.decode("utf-8", "replace").strip(), 200)


def check_board(board: str, what: str) -> str:
    low = board.strip().lower()
    if not _BOARD.fullmatch(low):
        raise FormatError(f"{what} {printable(board, 80)!r} is not a Heads board name")
    return low


def read_machine(dmi_dir: Path, board: str | None = None) -> Machine:
    """The board (``board`` when the admin names it) and the running Heads version."""
    bios = _dmi(dmi_dir, "bios_version")
    found = _HEADS_VERSION.search(bios)
    if found is None:
        raise FormatError(
            f"this machine does not run Heads (its BIOS version is {bios!r}): update-heads "
            "stages ROMs for Heads only"
        )
    running = found.group(1)
    if numeric_version(running.split("-", 1)[0]) is None:
        raise FormatError(f"cannot tell which Heads release runs: BIOS version {bios!r}")
    if board is None:
        board = check_board(_dmi(dmi_dir, "product_name"), "DMI product name")
    return Machine(board, bios, running)


def numeric_version(version: str) -> tuple[int, ...] | None:
    """``0.2.3`` or ``v0.2.3`` as (0, 2, 3), trailing zeros dropped (``0.2.3.0`` is 0.2.3);
    None for anything else. Heads ROMs are compared as numbers, never as fwupd compares
    strings, where ``v0.1.0`` would sort after ``0.2.2`` and be staged as an update."""
    found = _NUMERIC.fullmatch(version)
    if found is None:
        return None
    parts = [int(x) for x in found.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _for_board(component_id: str, board: str, prefixes: tuple[str, ...]) -> bool:
    cid = component_id.lower()
    return any(cid == f"{p}.{board}" or cid.startswith(f"{p}.{board}.") for p in prefixes)


def choose(
    catalogs: list[Catalog], machine: Machine, prefixes: dict[str, tuple[str, ...]]
) -> Release:
    """The newest release for this board among the components each remote is trusted to
    carry Heads under (``prefixes``: remote id -> its heads_components), if it is newer
    than the running build's release tag; NothingToDo (exit 2) otherwise, naming both."""
    if not any(prefixes.values()):
        raise ConfigError(
            "no remote carries Heads ROMs: name the components in the section of the remote "
            "that does (heads_components = org.example.heads), ideally with its "
            "payload_signers pinned"
        )
    running = numeric_version(machine.running_tag)
    if running is None:
        raise FormatError(f"cannot tell which Heads release runs: {machine.running!r}")
    releases = [(v, r) for c in catalogs for r in c.releases
                if _for_board(r.component_id, machine.board, prefixes.get(c.remote_id, ()))
                and (v := numeric_version(r.version)) is not None]  # fmt: skip
    if not releases:
        raise NothingToDo(
            f"no Heads release for board {machine.board} in dom0's verified metadata"
        )
    top = max(v for v, _ in releases)
    newest = [r for v, r in releases if v == top]
    if len({r.sha256 for r in newest}) > 1:
        raise VerificationError(
            f"Heads {printable(newest[0].version, 64)} for {machine.board} is offered as "
            f"different cabs (remotes {', '.join(sorted({r.remote_id for r in newest}))}): "
            "refusing to choose"
        )
    if top <= running:
        relation = "is what runs" if top == running else "is older than what runs"
        raise NothingToDo(
            f"Heads is up to date: the newest release for {machine.board}, "
            f"{printable(newest[0].version, 64)}, {relation} ({machine.running}); "
            "update-heads never stages an older one"
        )
    return newest[0]


def prune_older(updates: Path, version: str) -> list[str]:
    """Version dirs older than ``version`` that a past run staged (a ROM and its sums, and
    nothing else): superseded, and no longer to be picked from Heads' menu by mistake."""
    staged = numeric_version(version)
    removed: list[str] = []
    if staged is None:
        return removed
    for entry in sorted(updates.iterdir()):
        older = numeric_version(entry.name)
        if older is None or older >= staged or entry.is_symlink() or not entry.is_dir():
            continue
        if {p.name for p in entry.iterdir()} != {ROM_NAME, SUMS_NAME}:
            continue  # not only what update-heads writes: the admin's to judge
        shutil.rmtree(entry)
        removed.append(entry.name)
    if removed:
        fsync_dir(updates)
    return removed


@dataclass(frozen=True)
class Staged:
    rom: Path
    sha256: str
    size: int
    already: bool  # the same ROM was staged before: nothing written


def _staged_rom(path: Path) -> tuple[str, int] | None:
    """sha256 and size of a regular file at ``path`` (no symlink followed), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return sha256_fd(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    finally:
        os.close(fd)


def _updates_dir(updates: Path) -> Path:
    boot = updates.parent
    if not boot.is_dir() or boot.is_symlink():
        raise NotFound(f"{boot} is not there: is /boot mounted?")
    with contextlib.suppress(FileExistsError):
        os.mkdir(updates, 0o755)
    st = os.lstat(updates)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise FormatError(f"{updates} is not a dir of this user's: refusing to stage there")
    # what a killed run left: ours by name, never a version's dir
    for leftover in updates.glob(f"{_STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return updates


def stage(updates: Path, version: str, payload_fd: int, sha256: str) -> Staged:
    """The verified payload behind ``payload_fd`` (whose sha256 the payload signature bound)
    as ``updates/<version>/firmware.rom`` beside a sha256sum.txt: written in a private dir,
    checked, synced, then renamed into place, so /boot holds a whole version dir or none."""
    if not _DIR_VERSION.fullmatch(version):
        raise FormatError(f"release version {printable(version, 64)!r} cannot name a dir")
    updates = _updates_dir(updates)
    final = updates / version
    if final.exists() or final.is_symlink():
        st = os.lstat(final)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise FormatError(f"{final} is not a dir of this user's: refusing to stage there")
        there = _staged_rom(final / ROM_NAME)
        if there is not None and there[0] == sha256:
            return Staged(final / ROM_NAME, sha256, there[1], True)
        raise FormatError(
            f"{final} already exists and holds another ROM: look at it, remove it, and run "
            "update-heads again"
        )
    work = updates / f"{_STAGING_PREFIX}{secrets.token_hex(6)}"
    os.mkdir(work, 0o755)
    try:
        rom = os.open(work / ROM_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o644)  # fmt: skip
        h, size, offset = hashlib.sha256(), 0, 0
        try:
            while chunk := os.pread(payload_fd, CHUNK, offset):
                h.update(chunk)
                write_all(rom, chunk)
                offset += len(chunk)
            size = offset
            os.fsync(rom)
        finally:
            os.close(rom)
        if h.hexdigest() != sha256:
            raise TransferError("the ROM changed between its check and its copy to /boot")
        sums = os.open(work / SUMS_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                       | os.O_CLOEXEC, 0o644)  # fmt: skip
        try:
            write_all(sums, f"{sha256}  {ROM_NAME}\n".encode())
            os.fsync(sums)
        finally:
            os.close(sums)
        fsync_dir(work)
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    fsync_dir(updates)
    return Staged(final / ROM_NAME, sha256, size, False)
