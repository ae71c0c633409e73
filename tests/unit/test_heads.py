"""broker.heads: the machine's board and Heads version, the release for it, and the ROM staged
in /boot/updates/<version>/ whole or not at all."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from broker.errors import (
    ConfigError,
    FormatError,
    NotFound,
    NothingToDo,
    TransferError,
    VerificationError,
)
from broker.heads import (
    ROM_NAME,
    SUMS_NAME,
    Machine,
    choose,
    numeric_version,
    prune_older,
    read_machine,
    stage,
)
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


def _release(component_id: str, version: str, remote: str = "lvfs", sha: str = "0") -> Release:
    return Release(remote, component_id, "Heads", "", version, ("guid",), "https://x/h.cab",
                   f"{component_id}-{version}.cab", sha * 64, 1, "high", "")  # fmt: skip


MACHINE = Machine("x230", "Heads-v0.2.2-917-g19f0e65", "0.2.2-917-g19f0e65")
CARRIERS = {"lvfs": ("org.example.heads",)}


def test_the_newest_release_for_exactly_this_board_from_a_carrier_is_chosen() -> None:
    catalog = Catalog("lvfs", (
        _release("org.example.heads.x230.firmware", "0.2.3"),
        _release("org.example.heads.x230", "0.2.10"),
        _release("org.example.heads.x2300.firmware", "9.0.0"),  # another board
        _release("org.example.heads.t430.firmware", "9.0.0"),
        _release("org.example.headsx230.firmware", "9.0.0"),
        _release("com.acme.heads.x230.firmware", "9.0.0"),  # not a prefix lvfs carries
        _release("org.fwupd.fakedevice.firmware", "9.0.0"),
    ))  # fmt: skip
    other = Catalog("corp", (_release("org.example.heads.x230", "9.0.0", "corp"),))
    chosen = choose([catalog, other], MACHINE, CARRIERS)
    assert (chosen.component_id, chosen.version) == ("org.example.heads.x230", "0.2.10")
    # the same release from a remote that carries it
    chosen = choose([catalog, other], MACHINE, {**CARRIERS, "corp": ("org.example.heads",)})
    assert (chosen.remote_id, chosen.version) == ("corp", "9.0.0")


def test_no_remote_carries_heads_unless_its_config_says_so() -> None:
    catalog = Catalog("lvfs", (_release("org.example.heads.x230", "0.2.3"),))
    with pytest.raises(ConfigError, match="no remote carries Heads ROMs"):
        choose([catalog], MACHINE, {"lvfs": ()})


@pytest.mark.parametrize(
    ("versions", "cause"),
    [
        ((), "no Heads release for board x230"),
        (("0.2.2",), "0.2.2, is what runs"),
        (("0.2.2.0",), "0.2.2.0, is what runs"),
        (("0.2.1", "0.1.9"), "0.2.1, is older than what runs"),
        # fwupd's string rules put v0.1.0 after 0.2.2: as numbers it is older
        (("v0.1.0",), "v0.1.0, is older than what runs"),
        (("0.2.2a", "9.0 x", "0.2.3-rc1"), "no Heads release for board x230"),
    ],
)
def test_nothing_older_or_equal_is_chosen(versions: tuple[str, ...], cause: str) -> None:
    catalog = Catalog("lvfs", tuple(_release("org.example.heads.x230", v) for v in versions))
    with pytest.raises(NothingToDo, match=cause):
        choose([catalog], MACHINE, CARRIERS)


def test_a_version_that_is_no_number_never_hides_one_that_is() -> None:
    catalog = Catalog("lvfs", (_release("org.example.heads.x230", "0.2.3"),
                               _release("org.example.heads.x230", "9.0 x"),
                               _release("org.example.heads.x230", "1.0/../../etc")))  # fmt: skip
    assert choose([catalog], MACHINE, CARRIERS).version == "0.2.3"


def test_two_cabs_for_the_newest_version_are_refused() -> None:
    a = Catalog("lvfs", (_release("org.example.heads.x230", "0.2.3", sha="a"),))
    b = Catalog("corp", (_release("org.example.heads.x230", "v0.2.3", "corp", sha="b"),))
    carriers = {"lvfs": ("org.example.heads",), "corp": ("org.example.heads",)}
    with pytest.raises(VerificationError, match=r"offered as different cabs .*corp, lvfs"):
        choose([a, b], MACHINE, carriers)


@pytest.mark.parametrize(
    ("text", "number"),
    [("0.2.3", (0, 2, 3)), ("v0.2.3", (0, 2, 3)), ("0.2.3.0", (0, 2, 3)), ("1", (1,)),
     ("0.0", (0,)), ("0.2.3a", None), ("vv1", None), ("", None), ("1..2", None),
     ("1.2.3.4.5.6.7.8.9", None)],
)  # fmt: skip
def test_numeric_version(text: str, number: tuple[int, ...] | None) -> None:
    assert numeric_version(text) == number


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


def test_older_roms_update_heads_staged_are_removed_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    updates = tmp_path / "boot/updates"
    for version in ("0.2.1", "0.2.3", "0.2.4"):
        fd, sha = _payload(version.encode())
        stage(updates, version, fd, sha)
    (updates / "0.1.0").mkdir()
    (updates / "0.1.0" / "notes.txt").write_text("the admin's")  # not ours alone: kept
    (updates / "old-heads").mkdir()  # no version: kept
    assert prune_older(updates, "0.2.3") == ["0.2.1"]
    assert sorted(p.name for p in updates.iterdir()) == ["0.1.0", "0.2.3", "0.2.4", "old-heads"]


def test_a_symlinked_version_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "boot/updates").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    fd, sha = _payload(b"rom")
    (elsewhere / ROM_NAME).write_bytes(b"rom")
    (tmp_path / "boot/updates/0.2.3").symlink_to(elsewhere)
    with pytest.raises(FormatError, match="not a dir of this user's"):
        stage(tmp_path / "boot/updates", "0.2.3", fd, sha)
