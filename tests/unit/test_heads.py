"""broker.heads: the machine's board and Heads version, the release for it, and the ROM staged
in /boot/updates/<version>/ whole or not at all."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from broker.errors import FormatError, NotFound, NothingToDo, TransferError
from broker.heads import ROM_NAME, SUMS_NAME, Machine, choose, read_machine, stage
from broker.metadata import Catalog, Release


def _dmi(tmp_path: Path, bios: str | None, product: str | None = "x230-hotp-maximized") -> Path:
    dmi = tmp_path / "sys/class/dmi/id"
    dmi.mkdir(parents=True)
    if bios is not None:
        (dmi / "bios_version").write_text(bios + "\n")
    if product is not None:
        (dmi / "product_name").write_text(product + "\n")
    return dmi


def test_the_board_and_version_come_from_smbios(tmp_path: Path) -> None:
    # as the existing wrapper's test has it: a BIOS version with the Heads brand in it
    m = read_machine(_dmi(tmp_path, "CBET4000 Heads-v0.2.2-917-g19f0e65"))
    assert m == Machine("x230-hotp-maximized", "CBET4000 Heads-v0.2.2-917-g19f0e65",
                        "0.2.2-917-g19f0e65")  # fmt: skip
    assert m.running_tag == "0.2.2"


def test_the_admin_may_name_the_board(tmp_path: Path) -> None:
    m = read_machine(_dmi(tmp_path, "Heads-v0.2.1", product=None), board="t430")
    assert (m.board, m.running_tag) == ("t430", "0.2.1")


@pytest.mark.parametrize(
    ("bios", "product", "error", "cause"),
    [
        ("N1EET92W (1.67 )", "x230", FormatError, "does not run Heads"),
        ("Heads-vmaster-dirty", "x230", FormatError, "cannot tell which Heads release"),
        (None, "x230", NotFound, "bios_version: no such file"),
        ("Heads-v0.2.2", None, NotFound, "product_name: no such file"),
        ("Heads-v0.2.2", "../../x230", FormatError, "not a Heads board name"),
        ("Heads-v0.2.2", "ThinkPad X230", FormatError, "not a Heads board name"),
    ],
)
def test_what_is_not_a_heads_machine_is_said_in_one_line(
    tmp_path: Path, bios: str | None, product: str | None, error: type[Exception], cause: str
) -> None:
    with pytest.raises(error, match=cause):
        read_machine(_dmi(tmp_path, bios, product))


def test_an_escape_in_smbios_is_not_printed(tmp_path: Path) -> None:
    with pytest.raises(FormatError) as e:
        read_machine(_dmi(tmp_path, "evil\x1b[2J BIOS"))
    assert "\x1b" not in str(e.value)


def _release(component_id: str, version: str) -> Release:
    return Release("lvfs", component_id, "Heads", "", version, ("guid",), "https://x/h.cab",
                   f"{component_id}-{version}.cab", "0" * 64, 1, "high", "")  # fmt: skip


MACHINE = Machine("x230", "Heads-v0.2.2-917-g19f0e65", "0.2.2-917-g19f0e65")


def test_the_newest_release_for_exactly_this_board_is_chosen() -> None:
    catalog = Catalog("lvfs", (
        _release("org.example.heads.x230.firmware", "0.2.3"),
        _release("org.example.heads.x230.firmware", "0.2.10"),
        _release("org.example.heads.x2300.firmware", "9.0.0"),  # another board
        _release("org.example.heads.t430.firmware", "9.0.0"),
        _release("org.example.headsx230.firmware", "9.0.0"),
        _release("org.fwupd.fakedevice.firmware", "9.0.0"),
    ))  # fmt: skip
    chosen = choose([catalog], MACHINE)
    assert (chosen.component_id, chosen.version) == ("org.example.heads.x230.firmware", "0.2.10")


@pytest.mark.parametrize(
    ("versions", "cause"),
    [
        ((), "no Heads release for board x230"),
        (("0.2.2",), "0.2.2, is what runs"),
        (("0.2.1", "0.1.9"), "0.2.1, is older than what runs"),
    ],
)
def test_nothing_older_or_equal_is_chosen(versions: tuple[str, ...], cause: str) -> None:
    catalog = Catalog("lvfs", tuple(_release("org.example.heads.x230", v) for v in versions))
    with pytest.raises(NothingToDo, match=cause):
        choose([catalog], MACHINE)


def test_a_version_that_cannot_name_a_dir_is_refused() -> None:
    catalog = Catalog("lvfs", (_release("org.example.heads.x230", "1.0/../../etc"),))
    with pytest.raises(FormatError, match="cannot name a dir"):
        choose([catalog], MACHINE)


def _payload(data: bytes) -> tuple[int, str]:
    fd = os.memfd_create("rom")
    os.write(fd, data)
    return fd, hashlib.sha256(data).hexdigest()


def test_the_rom_is_staged_whole_with_its_sha256(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    updates = tmp_path / "boot/updates"
    rom = os.urandom(3 * 1024 * 1024 + 17)
    fd, sha = _payload(rom)
    staged = stage(updates, "0.2.3", fd, sha)
    assert not staged.already
    assert staged.rom == updates / "0.2.3" / ROM_NAME
    assert staged.rom.read_bytes() == rom
    assert (updates / "0.2.3" / SUMS_NAME).read_text() == f"{sha}  {ROM_NAME}\n"
    assert sorted(p.name for p in updates.iterdir()) == ["0.2.3"]
    # again: the same ROM is already there, nothing written
    assert stage(updates, "0.2.3", fd, sha).already
    # another ROM under that version: the admin decides, nothing replaced
    other, other_sha = _payload(b"another rom")
    with pytest.raises(FormatError, match="already exists and holds another ROM"):
        stage(updates, "0.2.3", other, other_sha)
    assert staged.rom.read_bytes() == rom


def test_a_rom_that_changed_after_its_check_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    updates = tmp_path / "boot/updates"
    fd, _ = _payload(b"rom")
    with pytest.raises(TransferError, match="changed between its check and its copy"):
        stage(updates, "0.2.3", fd, "1" * 64)
    assert list(updates.iterdir()) == []


def test_a_killed_runs_leftover_goes_and_no_boot_is_said(tmp_path: Path) -> None:
    fd, sha = _payload(b"rom")
    with pytest.raises(NotFound, match="is /boot mounted"):
        stage(tmp_path / "boot/updates", "0.2.3", fd, sha)
    (tmp_path / "boot/updates/.staging-0123456789ab").mkdir(parents=True)
    (tmp_path / "boot/updates/.staging-0123456789ab" / ROM_NAME).write_bytes(b"half")
    stage(tmp_path / "boot/updates", "0.2.3", fd, sha)
    assert sorted(p.name for p in (tmp_path / "boot/updates").iterdir()) == ["0.2.3"]


def test_a_symlinked_updates_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "boot/updates").symlink_to(tmp_path / "elsewhere")
    fd, sha = _payload(b"rom")
    with pytest.raises(FormatError, match="not a dir of this user's"):
        stage(tmp_path / "boot/updates", "0.2.3", fd, sha)
    assert list((tmp_path / "elsewhere").iterdir()) == []
