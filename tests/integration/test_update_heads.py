"""update-heads on the sandbox (issue 19): dom0's DMI says the machine runs Heads on a board,
the mirror's signed metadata holds Heads releases, the cab comes through the UpdateVM and
dom0's checks like any cab, and the ROM lands in dom0's /boot/updates/<version>/. The DMI
and /boot are files in the sandbox's dom0 tree; nothing is flashed anywhere.

A signed ROM is staged, byte for byte; an unsigned one, an older release, another board's
release and another board's cab in this board's place are refused, with nothing staged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.cabinet import ExpectedRelease
from broker.heads import ROM_NAME, SUMS_NAME
from broker.sandbox import lvfs
from broker.sandbox.launcher import Sandbox
from broker.sandbox.pki import create_pki
from tests.adversarial.hostile import (
    HOSTILE_PREFIX,
    cab_session_push,
    metainfo,
    restore_mirror,
    signed_cab,
    trusted_signer,
)
from tests.sandbox_helpers import manager, qube_paths

pytestmark = pytest.mark.sandbox

BOARD = "x230-hotp-maximized"
HEADS_ID = f"org.example.heads.{BOARD}.firmware"
HEADS_GUID = "7c4b2d2e-2f4c-5e3a-9b8a-3f1f0c0d4e21"
RUNNING = "CBET4000 Heads-v0.2.2-917-g19f0e65"
ROM_SIZE = 12 * 1024 * 1024  # an x230's whole flash, as Heads builds it


@dataclass
class HeadsMachine:
    sandbox: Sandbox
    dmi: Path
    updates: Path
    rom: bytes
    tmp: Path

    def says(self, bios: str = RUNNING, board: str = BOARD) -> None:
        (self.dmi / "bios_version").write_text(bios + "\n")
        (self.dmi / "product_name").write_text(board + "\n")

    def cab(self, version: str, component_id: str = HEADS_ID, signed: bool = True) -> Path:
        """A Heads cab as the LVFS would ship one: metainfo, firmware.rom, a jcat signed by
        the sandbox LVFS (the payload's signature left out where ``signed`` is False)."""
        meta = metainfo(version, component_id, HEADS_GUID, self.rom, ROM_NAME, name="Heads")
        data = signed_cab(self.tmp, meta, trusted_signer(self.sandbox), self.rom, ROM_NAME,
                          sign_payload=signed)  # fmt: skip
        path = self.tmp / f"{HOSTILE_PREFIX}heads-{component_id}-{version}.cab"
        path.write_bytes(data)
        return path

    def publish(self, *cabs: Path) -> None:
        lvfs.publish(self.sandbox.lvfs_dir, cabs, create_pki(self.sandbox.pki_dir))
        r = manager(self.sandbox, "refresh")
        assert r.returncode == 0, r.stdout + r.stderr

    def staged(self) -> list[str]:
        return sorted(p.name for p in self.updates.iterdir()) if self.updates.exists() else []


@pytest.fixture
def heads(refreshed: Sandbox, tmp_path: Path) -> Iterator[HeadsMachine]:
    """dom0's DMI says Heads on an x230, dom0 has an empty /boot, and the lvfs remote is
    trusted to carry Heads under org.example.heads; undone after, and the mirror back to
    the releases `up` published (HOSTILE_PREFIX cabs are dropped)."""
    root = refreshed.root("dom0")
    dmi = root / "sys/class/dmi/id"
    dmi.mkdir(parents=True)
    (root / "boot").mkdir()
    conf = qube_paths(refreshed, "dom0").config_file
    original = conf.read_bytes()
    assert original.count(b"[remote lvfs]\n") == 1
    conf.write_bytes(original.replace(b"[remote lvfs]\n",
                                      b"[remote lvfs]\nheads_components = org.example.heads\n"))
    machine = HeadsMachine(refreshed, dmi, root / "boot/updates", os.urandom(ROM_SIZE), tmp_path)
    machine.says()
    try:
        yield machine
    finally:
        conf.write_bytes(original)
        shutil.rmtree(root / "sys")
        shutil.rmtree(root / "boot")
        restore_mirror(refreshed)


def _nothing_in_flight(sandbox: Sandbox) -> None:
    paths = qube_paths(sandbox, "dom0")
    assert os.listdir(paths.untrusted_dir) == []
    assert not [p for p in os.listdir(paths.cabs_dir) if "heads" in p]


def test_a_signed_rom_is_staged_and_older_or_other_boards_are_not(heads: HeadsMachine) -> None:
    sandbox = heads.sandbox
    cab = heads.cab("0.2.3")
    other_board = heads.cab("0.2.9", "org.example.heads.t430-hotp-maximized.firmware")
    # Heads tags its releases v0.1.0: fwupd's string rules would call that newer than 0.2.2
    old_tag = heads.cab("v0.1.0")
    # a vendor on the same remote, outside the prefix the remote carries Heads under
    other_vendor = heads.cab("0.9.9", f"com.acme.heads.{BOARD}.firmware")
    heads.publish(cab, other_board, old_tag, other_vendor)

    r = manager(sandbox, "update-heads", "-y")
    assert r.returncode == 0, r.stdout + r.stderr
    target = heads.updates / "0.2.3"
    assert heads.staged() == ["0.2.3"]
    assert (target / ROM_NAME).read_bytes() == heads.rom
    sha = hashlib.sha256(heads.rom).hexdigest()
    assert (target / SUMS_NAME).read_text() == f"{sha}  {ROM_NAME}\n"
    assert f"Staged Heads 0.2.2-917-g19f0e65 -> 0.2.3 for {BOARD}: {target / ROM_NAME}" in r.stdout
    assert "Nothing is flashed yet" in r.stdout
    _nothing_in_flight(sandbox)  # the cab went with the staging: the ROM is in /boot

    # again: already staged, nothing written
    mtime = (target / ROM_NAME).stat().st_mtime_ns
    r = manager(sandbox, "update-heads", "-y")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "already staged" in r.stdout
    assert (target / ROM_NAME).stat().st_mtime_ns == mtime

    # as JSON, valid against the schema (manager() checks it)
    shutil.rmtree(target)
    r = manager(sandbox, "update-heads", "-y", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)["Heads"]
    assert (doc["Board"], doc["VersionOld"], doc["Version"]) == (BOARD, "0.2.2-917-g19f0e65",
                                                                 "0.2.3")  # fmt: skip
    assert (doc["Sha256"], doc["Size"]) == (sha, ROM_SIZE)

    # a machine that runs a newer Heads than any release: nothing older is staged
    shutil.rmtree(target)
    heads.says(bios="Heads-v0.2.5")
    r = manager(sandbox, "update-heads", "-y")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "0.2.3, is older than what runs (0.2.5)" in r.stdout
    assert heads.staged() == []

    # another board: its releases are not this machine's (0.2.9 is t430's)
    heads.says(board="x220")
    r = manager(sandbox, "update-heads", "-y")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "No Heads release for board x220 in dom0's verified metadata" in r.stdout
    assert heads.staged() == []

    # a machine that does not run Heads at all: one line, exit 1
    heads.says(bios="N1EET92W (1.67 )")
    r = manager(sandbox, "update-heads", "-y")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.splitlines() == [
        "qubes-fwupdmgr: this machine does not run Heads (its BIOS version is "
        "'N1EET92W (1.67 )'): update-heads stages ROMs for Heads only"
    ]
    assert heads.staged() == []
    _nothing_in_flight(sandbox)


def test_another_boards_rom_in_this_boards_place_is_refused(heads: HeadsMachine) -> None:
    """A compromised UpdateVM (or a metadata mix-up) hands dom0 the t430's validly signed cab
    for the x230's release: the cab's own metainfo names its board, and dom0 reads it."""
    t430 = heads.cab("0.2.3", "org.example.heads.t430-hotp-maximized.firmware").read_bytes()
    r, outcome = cab_session_push(heads.sandbox, t430,
                                  ExpectedRelease(HEADS_ID, "0.2.3", (HEADS_GUID,)))  # fmt: skip
    assert outcome is not None and not outcome.ok, (r, outcome)
    assert "is not the expected org.example.heads.x230-hotp-maximized.firmware" in outcome.message
    _nothing_in_flight(heads.sandbox)


def test_an_unsigned_rom_is_refused_and_nothing_is_staged(heads: HeadsMachine) -> None:
    """Signed metadata names the cab and its sha256, and the metainfo is signed: only the
    ROM itself carries no signature. The existing wrapper would stage it; dom0 does not."""
    heads.publish(heads.cab("0.2.3"), heads.cab("0.2.4", signed=False))
    r = manager(heads.sandbox, "update-heads", "-y")
    assert r.returncode == 1, r.stdout + r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("qubes-fwupdmgr: dom0 refused what sys-firewall sent: "), line
    assert "firmware.rom: no signature for it in firmware.jcat" in line, line
    assert heads.staged() == []
    _nothing_in_flight(heads.sandbox)


def test_no_remote_carries_heads_unless_the_admin_says_so(heads: HeadsMachine) -> None:
    heads.publish(heads.cab("0.2.3"))
    conf = qube_paths(heads.sandbox, "dom0").config_file
    conf.write_bytes(conf.read_bytes().replace(b"heads_components = org.example.heads\n", b""))
    r = manager(heads.sandbox, "update-heads", "-y")
    assert r.returncode == 1, r.stdout + r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("qubes-fwupdmgr: no remote carries Heads ROMs: "), line
    assert heads.staged() == []
    _nothing_in_flight(heads.sandbox)
