"""broker.cli: flags anywhere on the line, and exit codes as fwupdmgr documents them."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest

from broker import cli
from broker.config import ROOT_ENV, Paths
from broker.errors import EXIT_FAILURE, EXIT_INTERRUPTED, NotFound, NothingToDo


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "-y", "update", "abc", "--filter", "updatable", "--updatevm", "sys-whonix"],
        ["update", "--json", "-y", "abc", "--filter=updatable", "--updatevm=sys-whonix"],
        ["-y", "--filter", "updatable", "update", "abc", "--json", "--updatevm", "sys-whonix"],
        ["--updatevm", "sys-whonix", "--json", "upgrade", "-y", "abc", "--filter", "updatable"],
    ],
)
def test_global_flags_go_anywhere_as_with_fwupdmgr(argv: list[str]) -> None:
    args = cli.build_parser().parse_args(argv)
    assert (args.json, args.assume_yes, args.devices, args.verbose) == (
        True, True, ["abc"], False,
    )  # fmt: skip
    assert (args.filter, args.updatevm) == ("updatable", "sys-whonix")


_SWITCHES = ("json", "assume_yes", "verbose", "quiet", "force", "allow_older",
             "allow_reinstall", "no_reboot_check", "no_metadata_check")  # fmt: skip


@pytest.mark.parametrize("verb", ["get-devices", "refresh", "get-upgrades", "clean"])
def test_flags_default_to_off_whatever_the_verb(verb: str) -> None:
    args = cli.build_parser().parse_args([verb])
    assert [getattr(args, name) for name in _SWITCHES] == [False] * len(_SWITCHES)
    assert (args.filter, args.updatevm) == (None, None)


@pytest.mark.parametrize("switch", _SWITCHES)
def test_each_switch_is_taken_before_and_after_the_verb(switch: str) -> None:
    flag = "--" + switch.replace("_", "-")
    for argv in ([flag, "get-devices"], ["get-devices", flag]):
        assert getattr(cli.build_parser().parse_args(argv), switch) is True


def test_update_takes_several_devices_and_get_updates_one() -> None:
    assert cli.build_parser().parse_args(["update", "a", "b"]).devices == ["a", "b"]
    assert cli.build_parser().parse_args(["get-upgrades", "a"]).device == "a"


@pytest.fixture
def dom0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """main() as in a dom0 rooted at tmp_path (defaults: no config file), no sandbox."""
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    monkeypatch.delenv("QUBES_FWUPD_SANDBOX", raising=False)
    return tmp_path


@pytest.mark.parametrize(
    "argv", [["nope"], ["get-updates", "--bogus"], [], ["get-updates", "a", "b"], ["--json"]]
)
def test_a_usage_error_is_one_line_and_exit_1(
    dom0: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == EXIT_FAILURE
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("qubes-fwupdmgr: ") and err.strip().endswith("(see --help)")


def test_version_exits_0(dom0: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("qubes-fwupdmgr ")


@pytest.mark.parametrize(
    ("raised", "code", "stream", "text"),
    [
        (KeyboardInterrupt(), EXIT_INTERRUPTED, "err", "qubes-fwupdmgr: interrupted"),
        (NothingToDo("no updates available"), 2, "out", "No updates available"),
        (NotFound("no device matches 'x' (see get-devices)"), 3, "err",
         "qubes-fwupdmgr: no device matches 'x' (see get-devices)"),
    ],
)  # fmt: skip
def test_exit_codes_of_what_a_command_ends_with(
    dom0: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    raised: BaseException,
    code: int,
    stream: str,
    text: str,
) -> None:
    def command(app: cli.Manager, args: argparse.Namespace) -> int:
        raise raised

    monkeypatch.setattr(cli, "cmd_get_devices", command)
    assert cli.main(["get-devices"]) == code
    out, err = capsys.readouterr()
    assert (out if stream == "out" else err).strip() == text


def test_with_json_a_failure_is_fwupdmgrs_error_object_on_stdout(
    dom0: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def command(app: cli.Manager, args: argparse.Namespace) -> int:
        raise NotFound("no device matches 'x' (see get-devices)")

    monkeypatch.setattr(cli, "cmd_get_devices", command)
    assert cli.main(["get-devices", "--json"]) == 3
    out, err = capsys.readouterr()
    assert json.loads(out) == {
        "Error": {
            "Domain": "FwupdError",
            "Code": 8,  # FWUPD_ERROR_NOT_FOUND, as fwupdmgr --json says it
            "Message": "No device matches 'x' (see get-devices)",
        }
    }
    assert err == ""


def test_clean_empties_the_cab_cache_untrusted_leftovers_and_dead_sessions(
    dom0: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = Paths(dom0)
    paths.cabs_dir.mkdir(parents=True)
    (paths.cabs_dir / f"{'a' * 64}.cab").write_bytes(b"cab")
    paths.untrusted_dir.mkdir(parents=True)
    (paths.untrusted_dir / "n1.0.UNTRUSTED").write_bytes(b"half")
    running = paths.untrusted_dir / "n2.0.UNTRUSTED"  # a push being written right now
    running.write_bytes(b"in flight")
    paths.sessions_dir.mkdir(parents=True)
    dead, alive = paths.sessions_dir / "d.pending", paths.sessions_dir / "a.pending"
    dead.write_text("{}")
    alive.write_text("{}")
    old = time.time() - 4000  # older than any session (1800 s) or transfer (900 s) lives
    os.utime(dead, (old, old))
    os.utime(paths.untrusted_dir / "n1.0.UNTRUSTED", (old, old))
    assert cli.main(["clean"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"removed cab {'a' * 64}.cab", "removed untrusted n1.0.UNTRUSTED",
                   "removed session d.pending"]  # fmt: skip
    assert alive.exists() and not dead.exists()
    assert running.exists()
    assert cli.main(["clean"]) == 2  # nothing left


@pytest.mark.parametrize("verb", ["get-updates", "update"])
def test_before_the_first_refresh_the_admin_is_told_to_refresh(
    dom0: Path, verb: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([verb, "-y"] if verb == "update" else [verb]) == 1
    assert capsys.readouterr().err == (
        "qubes-fwupdmgr: dom0 holds no verified metadata yet: run qubes-fwupdmgr refresh\n"
    )


def test_a_misspelt_config_key_is_named_in_a_warning(
    dom0: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = Paths(dom0)
    paths.config_dir.mkdir(parents=True)
    paths.config_file.write_text("[qubes-fwupd]\nupdate_vm = sys-whonix\nusbvm = sys-usb\n")
    assert cli.main(["clean"]) == 2
    assert capsys.readouterr().err == (
        f"qubes-fwupdmgr: warning: {paths.config_file}: unknown key 'update_vm' in "
        "[qubes-fwupd] (ignored)\n"
    )


def test_flags_between_a_verbs_positionals_as_getopt_allows() -> None:
    args = cli.parse_args(["local-install", "f.cab", "-y", "--updatevm", "sys-whonix",
                           "--filter=updatable", "08d4", "--json", "--", ])  # fmt: skip
    assert (args.file, args.device, args.assume_yes, args.json) == ("f.cab", "08d4", True, True)
    assert (args.updatevm, args.filter) == ("sys-whonix", "updatable")
    args = cli.parse_args(["install", "-y", "08d4", "--allow-older", "1.2.3"])
    assert (args.device, args.version, args.allow_older) == ("08d4", "1.2.3", True)


def test_a_value_flag_at_the_end_does_not_swallow_the_verb() -> None:
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["refresh", "update", "--updatevm"])
    assert e.value.code == EXIT_FAILURE
