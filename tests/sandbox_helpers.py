"""Driving a running sandbox from tests: as dom0's admin, or as a (hostile) qube."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message

from broker.config import Paths
from broker.fwupd import FwupdClient
from broker.sandbox.launcher import SANDBOX_ENV, Launcher, Sandbox

WEBCAM_GUID = "b585990a-003e-5270-89d5-3705a17f9a43"
WEBCAM_ID = "08d460be0f1f9f128413f816022a6439e0078018"  # the same in both daemons


def sandbox_prerequisites() -> str | None:
    """Why the sandbox cannot run here, or None."""
    if os.geteuid() != 0:
        return "the sandbox runs fwupd daemons and needs root"
    if not Path("/usr/libexec/fwupd/fwupd").exists():
        return "Debian's fwupd is not installed"
    if not Path("/usr/share/installed-tests/fwupd/fakedevice124.cab").exists():
        return "fwupd-tests is not installed"
    return None


def short_tmpdir(prefix: str) -> Path:
    # unix socket paths under it are limited to 107 bytes
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def sandbox_cli(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """qubes-fwupd-sandbox, with our environment plus ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "broker.sandbox.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def up(directory: Path) -> Sandbox:
    r = sandbox_cli("up", "--dir", str(directory))
    if r.returncode != 0:
        pytest.fail(f"sandbox up failed:\n{r.stdout}\n{r.stderr}")
    return Sandbox(directory)


def _manager_command(sandbox: Sandbox, args: tuple[str, ...]) -> dict[str, Any]:
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", SANDBOX_ENV: str(sandbox.dir)}
    return {
        "args": [sys.executable, "-m", "broker.cli", *args],
        "env": env,
        "text": True,
        "stdin": subprocess.DEVNULL,
    }


JSON_SCHEMA = json.loads(
    (Path(__file__).parents[1] / "docs" / "qubes-fwupdmgr.schema.json").read_text()
)


def manager(sandbox: Sandbox, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """qubes-fwupdmgr as the admin types it, acting as the sandbox's dom0. With --json,
    whatever it printed must be one JSON document valid against the schema, in every test
    (a failure too: its {"Error": ...} object)."""
    r = subprocess.run(**_manager_command(sandbox, args), capture_output=True, timeout=timeout)
    if "--json" in args and r.stdout:
        jsonschema.validate(json.loads(r.stdout), JSON_SCHEMA)
    return r


def start_manager(sandbox: Sandbox, *args: str) -> subprocess.Popen[str]:
    """The same, left running: for two admins (or the timer and an admin) at once."""
    return subprocess.Popen(
        **_manager_command(sandbox, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def call_from(
    sandbox: Sandbox, qube: str, target: str, service: str, data: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """A qrexec call made from inside `qube`, as its own (possibly compromised) code would."""
    proc = Launcher(sandbox).popen(
        qube,
        [sys.executable, "-m", "broker.sandbox.qrexec_client", target, service],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(data, timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def probe(sandbox: Sandbox, qube: str, code: str, as_service: bool = False) -> Any:
    """Run Python code in the qube, as its own code would run there (``as_service``: as
    its qrexec services run, e.g. dom0's as the login user); the code prints one JSON
    value, which is returned."""
    launcher = Launcher(sandbox)
    proc = (launcher.popen_service if as_service else launcher.popen)(
        qube,
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"probe in {qube} failed: {err.decode(errors='replace')}"
    return json.loads(out)


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or under directory in our (the host's) mount namespace."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        # octal escapes (\040 for a space) do not matter for the short dirs we make
        point = Path(line.split()[1])
        if point == directory or point.is_relative_to(directory):
            found.append(line)
    return found


def netns_names() -> set[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


def webcam_version(sandbox: Sandbox, qube: str) -> str:
    devices = FwupdClient(sandbox.bus_address(qube)).get_devices()
    versions = [d.version for d in devices if WEBCAM_GUID in d.guids]
    assert len(versions) == 1, devices
    return versions[0]


def qube_paths(sandbox: Sandbox, qube: str) -> Paths:
    return Paths(sandbox.root(qube))


def tree_snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under a directory with its bytes: to prove nothing changed there."""
    if not directory.exists():
        return {}
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(directory))] = b"->" + os.readlink(p).encode()
        elif p.is_file():
            out[str(p.relative_to(directory))] = p.read_bytes()
    return out


def processes_mentioning(text: str) -> list[str]:
    """Live (non-zombie) processes whose command line or environment mentions text."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            blob = (
                Path(f"/proc/{pid}/cmdline").read_bytes()
                + Path(f"/proc/{pid}/environ").read_bytes()
            )
        except OSError:
            continue
        if text.encode() in blob:
            found.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()!r}")
    return found


def fwupd_call(sandbox: Sandbox, qube: str, member: str, signature: str, *body: str) -> None:
    """A D-Bus call on that qube's fwupd (ModifyConfig, ResetConfig), as an admin would
    make it with busctl (fwupdmgr modify-config would make the daemon quit)."""

    async def call() -> None:
        bus = await MessageBus(bus_address=sandbox.bus_address(qube)).connect()
        try:
            reply = await bus.call(
                Message(destination="org.freedesktop.fwupd", path="/",
                        interface="org.freedesktop.fwupd", member=member,
                        signature=signature, body=list(body))
            )  # fmt: skip
        finally:
            bus.disconnect()
        assert reply is not None and reply.message_type == MessageType.METHOD_RETURN, reply

    asyncio.run(call())


@contextmanager
def plugin_knobs(sandbox: Sandbox, qube: str, **knobs: str) -> Iterator[None]:
    """fwupd's test plugin in that qube with these ``[test]`` knobs (WriteSupported,
    NeedsReboot, WriteDelay...) for the block, and reset to its defaults after it."""
    for key, value in knobs.items():
        fwupd_call(sandbox, qube, "ModifyConfig", "sss", "test", key, value)
    try:
        yield
    finally:
        fwupd_call(sandbox, qube, "ResetConfig", "s", "test")


def fwupd_log(sandbox: Sandbox, qube: str, lines: int = 30) -> str:
    """The end of that qube's fwupd log, for a failure message."""
    try:
        text = (sandbox.log_dir / f"{qube}-fwupd.log").read_text(errors="replace")
    except OSError as e:
        return f"(no fwupd log: {e.strerror})"
    return "\n".join(text.splitlines()[-lines:])


class LogMark:
    """Where a sandbox log ends now: :meth:`since` is what was appended after."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def since(self) -> str:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""


# each networked qube's LVFS mirror (with isolation on: one per network namespace)
MIRROR_LOGS = {"sys-firewall": "mirror.log", "sys-whonix": "mirror-whonix.log"}
_REQUEST = re.compile(r'^mirror: \S+ "(\S+) (\S+) HTTP/[\d.]+" (\d{3}) ', re.MULTILINE)


def mirror_marks(sandbox: Sandbox) -> dict[str, LogMark]:
    """A mark on the log of the mirror on each networked qube's 127.0.0.1."""
    return {qube: LogMark(sandbox.log_dir / name) for qube, name in MIRROR_LOGS.items()}


def served(mark: LogMark) -> list[str]:
    """The requests that mirror answered since the mark, as ``GET /path 200``."""
    return [" ".join(m.groups()) for m in _REQUEST.finditer(mark.since())]


@contextmanager
def halted(sandbox: Sandbox, qube: str) -> Iterator[None]:
    """The qube down for the block, as qvm-run sees one that cannot start (qrexec calls to
    it fail with one line); up again after it."""
    path = sandbox.halted_file(qube)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
