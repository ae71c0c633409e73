"""The systemd units of dom0's automated runs (packaging/systemd/, in the dom0 package only):
the chain one timer tick runs, each command a qubes-fwupdmgr that parses, confinement that
leaves the manager what it needs, and systemd's own verdict on them as the package lays
them out."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import broker.cli
from tests.packaging.test_layout import install

REPO = Path(__file__).resolve().parents[2]
UNIT_SOURCE = REPO / "packaging/systemd"
UNIT_DIR = "/usr/lib/systemd/system"  # %{_unitdir}, {prefix}/lib/systemd/system
MANAGER = "/usr/bin/qubes-fwupdmgr"
TIMER = "qubes-fwupd-refresh.timer"
REFRESH = "qubes-fwupd-refresh.service"
UNATTENDED = "qubes-fwupd-unattended.service"
NOTIFY = "qubes-fwupd-notify.service"
SERVICES = (REFRESH, UNATTENDED, NOTIFY)
UNITS = (TIMER, *SERVICES)
# every command the units run, with the arguments they give it
COMMANDS = {
    (REFRESH, "ExecStart"): ["refresh", "--unattended"],
    (UNATTENDED, "ExecCondition"): ["check-unattended"],
    (UNATTENDED, "ExecStart"): ["update", "--unattended"],
    (NOTIFY, "ExecStart"): ["get-updates", "--notify"],
}
# would cut the manager off from what it needs as root in dom0: its own uid (fwupd's
# Install), /dev/xen (qrexec's vchan; ProtectClock= and a device list close the rest),
# /run/user (the desktop's session bus for the notification), abstract sockets
FORBIDDEN = ("User", "Group", "DynamicUser", "PrivateUsers", "PrivateDevices", "DevicePolicy",
             "DeviceAllow", "ProtectClock", "ProtectHome", "PrivateNetwork",
             "RestrictAddressFamilies", "CapabilityBoundingSet", "IPAddressDeny",
             "TimeoutStartSec", "TimeoutSec", "RuntimeMaxSec")  # fmt: skip

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """systemd's unit syntax as far as unit files go: [Section]s of Key=value lines; a key
    given again adds a value (After=, Wants=, Exec*=), an empty value resets it; # and ;
    start comments; a trailing backslash joins the next line with a space."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith(("#", ";"))):
            continue
        if pending and stripped.startswith(("#", ";")):
            continue  # a comment inside a continued line is dropped, as systemd does
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line, pending = pending + stripped, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, equals, value = line.partition("=")
        if current is None or not equals or not key.strip():
            raise ValueError(f"line {number}: {raw!r} is no key in a section")
        values = current.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    if pending:
        raise ValueError("the last line ends with a backslash")
    return sections


def test_the_parser_reads_units_as_systemd_does() -> None:
    unit = parse_unit("# c\n[Unit]\nAfter=a b\n; c\nAfter=c\n[Service]\nExecStart=/x \\\n"
                      "  # dropped\n  -y\nSuccessExitStatus=1\nSuccessExitStatus=\n")  # fmt: skip
    assert unit == {"Unit": {"After": ["a b", "c"]},
                    "Service": {"ExecStart": ["/x  -y"], "SuccessExitStatus": []}}  # fmt: skip
    for bad in ("Key=value\n", "[Unit]\nno equals sign\n", "[Unit]\nA=b \\\n"):
        with pytest.raises(ValueError):
            parse_unit(bad)


def _units() -> dict[str, Unit]:
    return {name: parse_unit((UNIT_SOURCE / name).read_text()) for name in UNITS}


def _one(unit: Unit, section: str, key: str) -> str:
    (value,) = unit.get(section, {}).get(key, [])
    return value


def _names(unit: Unit, section: str, key: str) -> set[str]:
    """A list setting's items, over every line that sets it."""
    return {item for value in unit.get(section, {}).get(key, []) for item in value.split()}


def test_the_dom0_package_alone_installs_the_four_units() -> None:
    assert sorted(p.name for p in UNIT_SOURCE.iterdir()) == sorted(UNITS)
    for unit in UNITS:
        entry = (f"packaging/systemd/{unit}", f"{{prefix}}/lib/systemd/system/{unit}")
        assert entry in install.DATA["dom0"], unit
    for component, data in install.DATA.items():
        if component != "dom0":  # the VM packages (and so debian/) carry none
            assert not any("systemd" in source for source, _ in data), component
    spec = (REPO / "packaging/rpm/qubes-fwupd-dom0.spec").read_text()
    # Debian's rpm, which builds it in CI, has no _unitdir; Fedora's names the same dir
    assert "%{!?_unitdir: %global _unitdir %{_prefix}/lib/systemd/system}\n" in spec
    listed = re.findall(r"^%\{_unitdir\}/(\S+)$", spec, re.MULTILINE)
    assert sorted(listed) == sorted(UNITS)
    # off as shipped: the admin enables the timer (no preset, no enable in a scriptlet)
    commands = [line for line in spec.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in commands
                if re.search(r"systemctl.*\b(enable|preset)\b|%systemd_post", line)]  # fmt: skip
    expected = (REPO / "packaging/expected-files.txt").read_text()
    for unit in UNITS:
        assert f"rpm qubes-fwupd-dom0 -rw-r--r-- {UNIT_DIR}/{unit}\n" in expected, unit
    elsewhere = [line for line in expected.splitlines() if " qubes-fwupd-dom0 " not in line]
    assert not [line for line in elsewhere if "systemd" in line]


def test_one_timer_tick_runs_refresh_then_unattended_installs_then_the_notification() -> None:
    units = _units()
    timer = units[TIMER]
    assert _one(timer, "Timer", "OnCalendar") == "daily"
    assert _one(timer, "Timer", "RandomizedDelaySec") == "12h"
    assert _one(timer, "Timer", "Persistent") == "true"
    assert _one(timer, "Install", "WantedBy") == "timers.target"
    # the unit it starts is its namesake, qubes-fwupd-refresh.service
    assert timer["Timer"].get("Unit", [REFRESH]) == [REFRESH]
    # the refresh pulls in the rest; they order themselves after it, notify last
    assert {UNATTENDED, NOTIFY} <= _names(units[REFRESH], "Unit", "Wants")
    assert REFRESH in _names(units[UNATTENDED], "Unit", "After")
    assert {REFRESH, UNATTENDED} <= _names(units[NOTIFY], "Unit", "After")
    # no ordering back up the chain (a cycle), and no hard dependency: a failed refresh
    # leaves the others to act on the metadata dom0 verified before
    assert not {UNATTENDED, NOTIFY} & _names(units[REFRESH], "Unit", "After")
    assert NOTIFY not in _names(units[UNATTENDED], "Unit", "After")
    for name, unit in units.items():
        for key in ("Requires", "Requisite", "BindsTo", "PartOf", "Before"):
            assert not unit["Unit"].get(key), (name, key)
        # a name of ours anywhere is one we ship (systemd-analyze verify lets a wanted
        # unit that does not exist pass without a word)
        items = {item for section in unit.values() for values in section.values()
                 for value in values for item in value.split()}  # fmt: skip
        ours = {item for item in items if item.startswith("qubes-fwupd-")}
        assert ours <= set(UNITS), (name, ours - set(UNITS))
    # one switch: only the timer can be enabled
    assert [name for name, unit in units.items() if "Install" in unit] == [TIMER]


def test_each_service_is_a_root_oneshot_whose_nothing_to_do_is_success() -> None:
    units = _units()
    for name, unit in units.items():
        assert unit["Unit"].get("Description"), name
        assert unit["Unit"].get("Documentation") == ["man:qubes-fwupdmgr(1)"], name
    confinement = {}
    for name in SERVICES:
        service = units[name]["Service"]
        assert service["Type"] == ["oneshot"], name
        # 2 is "nothing to do" (nothing new, backing off, inhibited, none may be installed,
        # none waits): a quiet day, not a failed unit; 1 stays a failure
        success = _names(units[name], "Service", "SuccessExitStatus")
        assert "2" in success and "1" not in success, name
        assert service["SyslogIdentifier"] == ["qubes-fwupdmgr"], name
        # as root: setuid() down to the desktop user stays possible
        assert not [key for key in FORBIDDEN if key in service], name
        assert service.get("ProtectSystem", ["full"]) != ["strict"], name
        exec_keys = sorted(key for key in service if key.startswith("Exec"))
        assert exec_keys == sorted(key for unit, key in COMMANDS if unit == name), name
        confinement[name] = {key: value for key, value in service.items()
                             if key.startswith(("Protect", "Private", "Restrict", "Lock",
                                                "NoNew", "SystemCall"))}  # fmt: skip
    # one confinement, explained once (in the refresh service)
    assert confinement[REFRESH], "no confinement"
    assert confinement[UNATTENDED] == confinement[REFRESH] == confinement[NOTIFY]


def _without(argv: list[str], option: str) -> list[str]:
    return [arg for arg in argv if arg != option]


def _parse(argv: list[str]) -> argparse.Namespace:
    try:
        return broker.cli.parse_args(argv)
    except SystemExit as e:  # argparse's error: the reason went to stderr
        pytest.fail(f"qubes-fwupdmgr {shlex.join(argv)}: usage error (exit {e.code})")


@pytest.mark.parametrize(("unit", "key"), sorted(COMMANDS), ids=lambda v: v)
def test_each_command_is_one_qubes_fwupdmgr_parses(unit: str, key: str) -> None:
    (line,) = parse_unit((UNIT_SOURCE / unit).read_text())["Service"][key]
    argv = shlex.split(line)
    # no prefix (-, +, !, @, :): a failure counts, and it runs as root as it stands
    assert argv[0] == MANAGER, line
    assert argv[1:] == COMMANDS[unit, key], line
    args = _parse(argv[1:])
    assert args.command == argv[1]
    # each option is one the verb takes, not swallowed as an argument: it changes the parse
    for option in (arg for arg in argv[2:] if arg.startswith("-")):
        assert _parse(_without(argv[1:], option)) != args, option


def _host_unit_dirs() -> list[Path]:
    dirs: list[Path] = []
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if candidate.is_dir() and candidate.resolve() not in [d.resolve() for d in dirs]:
            dirs.append(candidate)
    return dirs


def _verify(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify of the units as the package lays them out under root: --root
    makes it look for each ExecStart= binary in that tree; MANPATH makes `man` look for
    Documentation='s page among the pages the package installs."""
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8",
           "MANPATH": str(root / "usr/share/man")}  # fmt: skip
    man = [] if shutil.which("man") else ["--man=no"]
    units = [str(root / UNIT_DIR.lstrip("/") / unit) for unit in UNITS]
    argv = ["systemd-analyze", "verify", f"--root={root}", *man, *extra, *units]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path: Path) -> None:
    root = tmp_path / "root"
    # the units ours depend on (sysinit.target, timers.target, ...) are the host's
    # systemd's: a root that lacks them fails with "Unit sysinit.target not found"
    for host in _host_unit_dirs():
        shutil.copytree(host, root / UNIT_DIR.lstrip("/"), symlinks=True, dirs_exist_ok=True)
    install.install("dom0", install.Layout(root, "/usr", "/etc", "/usr/bin/python3"))
    r = _verify(root)
    said = r.stdout + r.stderr
    # an unknown key or a bad value is a warning line, not an exit code
    assert r.returncode == 0 and "qubes-fwupd" not in said, said
    # it did look in the tree: without its executable there, each command is refused
    (root / MANAGER.lstrip("/")).chmod(0o644)
    r = _verify(root)
    assert r.returncode != 0, r
    for unit in SERVICES:
        assert f"{unit}: Command {MANAGER} is not executable" in r.stdout + r.stderr, unit
