"""Real fwupd daemons, one per hardware qube, on private buses (broker.sandbox.daemons),
and the PID table that stops them (broker.sandbox.processes)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.errors import DaemonError
from broker.fwupd import Device, FwupdClient
from broker.sandbox import daemons
from broker.sandbox.launcher import Launcher, Sandbox
from broker.sandbox.pki import SandboxPki, create_pki
from broker.sandbox.processes import ProcessTable, Recorded, proc_stat

WEBCAM_GUID = "b585990a-003e-5270-89d5-3705a17f9a43"
CAB124 = Path("/usr/share/installed-tests/fwupd/fakedevice124.cab")
QUBES = ("dom0", "sys-usb")
# where a fwupd, its libjcat or gpg would write if the FWUPD_* variables or the scrubbed
# environment failed; none of these belongs to anything else running here
HOST_PATHS = (
    "/etc/fwupd", "/var/lib/fwupd", "/var/cache/fwupd", "/var/etc/fwupd", "/run/fwupd",
    "/run/lock", "/run/reboot-required", "/run/reboot-required.pkgs", "/run/user",
    "/run/motd.d", "/root/.gnupg", "/root/.local/share/libjcat", "/root/.cache/fwupd",
)  # fmt: skip

pytestmark = pytest.mark.sandbox

needs_fwupd = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(daemons.FWUPD_BIN).exists() or not shutil.which("dbus-daemon"),
    reason=f"needs root, {daemons.FWUPD_BIN} (package fwupd) and dbus-daemon",
)
needs_cab = pytest.mark.skipif(not CAB124.exists(), reason=f"needs {CAB124} (fwupd-tests)")


@dataclass
class Box:
    sandbox: Sandbox
    table: ProcessTable
    start_seconds: dict[str, float]

    def client(self, qube: str) -> FwupdClient:
        return FwupdClient(self.sandbox.bus_address(qube))


def webcam(devices: Sequence[Device]) -> Device:
    [cam] = [d for d in devices if WEBCAM_GUID in d.guids]
    return cam


def host_snapshot() -> dict[str, tuple[int, int]]:
    """(mtime, ctime) of every file and directory under HOST_PATHS, to compare later."""
    seen = {}
    for top in HOST_PATHS:
        for dirpath, dirnames, filenames in os.walk(top):
            for name in (".", *dirnames, *filenames):
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                seen[path] = (st.st_mtime_ns, st.st_ctime_ns)
        if os.path.lexists(top) and not os.path.isdir(top):
            st = os.lstat(top)
            seen[top] = (st.st_mtime_ns, st.st_ctime_ns)
    return seen


def written_fds(pid: int) -> list[str]:
    """Paths that ``pid`` holds open for writing (devices, sockets and pipes left out)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except FileNotFoundError:
            continue
        flags = int(next(ln.split()[1] for ln in info.splitlines() if ln.startswith("flags:")), 8)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing and target.startswith("/") and not target.startswith("/dev/"):
            out.append(target)
    return out


@contextmanager
def running(
    pki: SandboxPki, qubes: Sequence[str] = QUBES, test_conf: Mapping[str, str] | None = None
) -> Iterator[Box]:
    # unix socket paths are limited to 107 bytes: keep the sandbox near /
    sandbox = Sandbox(Path(tempfile.mkdtemp(prefix="qfw", dir="/tmp")))
    box = Box(sandbox, ProcessTable(sandbox.pids_file), {})
    launcher = Launcher(box.sandbox)
    try:
        for qube in qubes:
            daemons.install_trust_store(box.sandbox.root(qube), pki)
            daemons.write_fwupd_tree(box.sandbox, qube, test_conf)
            t0 = time.monotonic()
            daemons.start_fwupd(box.sandbox, launcher, box.table, qube)
            box.start_seconds[qube] = time.monotonic() - t0
        timings = {q: f"{s:.2f} s" for q, s in box.start_seconds.items()}
        print("fwupd start (bus + daemon):", timings)
        yield box
    finally:
        for qube in qubes:
            daemons.stop_gpg_agents(box.sandbox, box.table, qube)
        recorded = box.table.entries()
        box.table.stop_all()
        shutil.rmtree(box.sandbox.dir, ignore_errors=True)
        left = [e for e in recorded if box.table.alive(e)]
        assert not left, f"still running after stop_all: {left}"


@pytest.fixture(scope="module")
def pki() -> Iterator[SandboxPki]:
    # shared by the module's sandboxes: RSA-3072 and GPG key generation take seconds
    directory = Path(tempfile.mkdtemp(prefix="qfwpki", dir="/tmp"))
    try:
        yield create_pki(directory / "pki")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def host_before() -> dict[str, tuple[int, int]]:
    return host_snapshot()


@pytest.fixture(scope="module")
def box(pki: SandboxPki, host_before: dict[str, tuple[int, int]]) -> Iterator[Box]:
    with running(pki) as b:
        yield b


@needs_fwupd
def test_each_hardware_qube_has_its_own_webcam(box: Box) -> None:
    devices = {q: box.client(q).get_devices() for q in QUBES}
    for qube, devs in devices.items():
        # DisabledPlugins holds every other plugin: no host CPU, disks, firmware...
        assert {d.plugin for d in devs} == {"test"}, (qube, devs)
        assert webcam(devs).version == "1.2.2"
    # one and the same fake device in both: a merged view must key by (qube, DeviceId)
    assert webcam(devices["dom0"]).device_id == webcam(devices["sys-usb"]).device_id
    assert all(s < daemons.START_TIMEOUT for s in box.start_seconds.values())


@needs_fwupd
def test_fwupd_writes_only_under_its_qube(
    box: Box, host_before: dict[str, tuple[int, int]]
) -> None:
    sandbox_dir = str(box.sandbox.dir) + "/"
    fwupd_pids = [e.pid for e in box.table.entries() if e.role == "fwupd"]
    assert len(fwupd_pids) == 2
    for pid in fwupd_pids:
        outside = [p for p in written_fds(pid) if not p.startswith(sandbox_dir)]
        assert not outside, f"fwupd {pid} writes outside the sandbox: {outside}"
    for qube in QUBES:
        root = box.sandbox.root(qube)
        assert (root / "var/lib/fwupd/pending.db").is_file()
        assert (root / "var/cache/fwupd").is_dir()
        assert box.sandbox.bus_socket(qube).is_socket()
    assert host_snapshot() == host_before


@needs_fwupd
@needs_cab
def test_install_stays_in_its_qube_and_stop_all_leaves_nothing(
    pki: SandboxPki, host_before: dict[str, tuple[int, int]]
) -> None:
    with running(pki) as b:
        dom0 = b.client("dom0")
        cam = webcam(dom0.get_devices())
        with CAB124.open("rb") as f:
            dom0.install(cam.device_id, f.fileno(), CAB124.name)
        assert webcam(dom0.get_devices()).version == "1.2.4"
        assert webcam(b.client("sys-usb").get_devices()).version == "1.2.2"

        # the cab's jcat has a GPG blob: libjcat started a gpg-agent for dom0's keyring
        daemons.stop_gpg_agents(b.sandbox, b.table, "dom0")
        daemons.stop_gpg_agents(b.sandbox, b.table, "sys-usb")
        recorded = b.table.entries()
        assert sorted((e.qube, e.role) for e in recorded) == [
            ("dom0", "dbus"), ("dom0", "fwupd"), ("dom0", "gpg-agent"),
            ("sys-usb", "dbus"), ("sys-usb", "fwupd"),
        ]  # fmt: skip
        assert all(b.table.alive(e) for e in recorded)

        report = b.table.stop_all()
        assert report == [f"{e}: stopped" for e in reversed(recorded)]
        assert not [e for e in recorded if b.table.alive(e)]
        assert b.table.entries() == []
        for qube in QUBES:
            address = b.sandbox.bus_address(qube)
            assert not daemons.name_has_owner(address, "org.freedesktop.DBus")
            with socket.socket(socket.AF_UNIX) as s, pytest.raises(OSError):
                s.connect(str(b.sandbox.bus_socket(qube)))
    assert host_snapshot() == host_before


@needs_fwupd
@needs_cab
def test_test_plugin_knob_write_supported_false(pki: SandboxPki) -> None:
    with running(pki, ("sys-usb",), {"WriteSupported": "false"}) as b:
        client = b.client("sys-usb")
        cam = webcam(client.get_devices())
        with CAB124.open("rb") as f, pytest.raises(DaemonError, match="not in supported mode"):
            client.install(cam.device_id, f.fileno(), CAB124.name)
        assert webcam(client.get_devices()).version == "1.2.2"


@needs_fwupd
def test_start_fails_fast_with_the_log_when_fwupd_dies(pki: SandboxPki) -> None:
    sandbox = Sandbox(Path(tempfile.mkdtemp(prefix="qfw", dir="/tmp")))
    table = ProcessTable(sandbox.pids_file)
    try:
        daemons.install_trust_store(sandbox.root("dom0"), pki)
        daemons.write_fwupd_tree(sandbox, "dom0")
        # a remote without MetadataURI is fatal at fwupd's startup
        remote = sandbox.root("dom0") / "etc/fwupd/remotes.d/nouri.conf"
        remote.write_text("[fwupd Remote]\nEnabled=true\n")
        t0 = time.monotonic()
        with pytest.raises(daemons.DaemonStartError, match=r"(?s)exited.*nouri\.conf"):
            daemons.start_fwupd(sandbox, Launcher(sandbox), table, "dom0")
        assert time.monotonic() - t0 < 10
    finally:
        recorded = table.entries()
        table.stop_all()
        shutil.rmtree(sandbox.dir, ignore_errors=True)
    assert [e.role for e in recorded] == ["dbus", "fwupd"]
    assert not [e for e in recorded if table.alive(e)]


# --- the PID table on plain processes: no root, no fwupd


def _sleeper(table: ProcessTable, qube: str, ignore_term: bool = False) -> subprocess.Popen[str]:
    code = "import signal, sys, time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('ready', flush=True)\ntime.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    table.record("sleeper", qube, proc.pid)
    return proc


def test_process_table_stops_only_what_it_recorded(tmp_path: Path) -> None:
    table = ProcessTable(tmp_path / "pids")
    a, b = _sleeper(table, "a"), _sleeper(table, "b")
    stubborn = _sleeper(table, "a", ignore_term=True)
    try:
        entry_b = table.entries()[1]
        stranger = Recorded("sleeper", "b", b.pid, entry_b.starttime + 1)
        assert not table.alive(stranger)
        assert table.stop(stranger) == "recycled"
        assert b.poll() is None

        report = table.stop_all("a", timeout=0.3)
        assert report == [f"a: sleeper {stubborn.pid}: killed", f"a: sleeper {a.pid}: stopped"]
        assert proc_stat(a.pid) is None  # the table reaped its own child: no zombie
        assert [e.qube for e in table.entries()] == ["b"]
        assert table.alive(table.entries()[0])
    finally:
        for p in (a, b, stubborn):
            p.kill()
            p.wait()
        for p in (a, b, stubborn):
            if p.stdout:
                p.stdout.close()
    assert table.stop_all() == [f"b: sleeper {b.pid}: gone"]
    assert not (tmp_path / "pids").exists()


def test_process_table_treats_a_zombie_as_gone(tmp_path: Path) -> None:
    table = ProcessTable(tmp_path / "pids")
    proc = subprocess.Popen(["true"])
    table.record("true", "q", proc.pid)
    deadline = time.monotonic() + 5
    while (proc_stat(proc.pid) or ("Z", 0))[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    [entry] = table.entries()
    assert not table.alive(entry)
    assert table.stop(entry) == "gone"
    assert proc_stat(proc.pid) is None  # reaped: no zombie left behind
    proc.wait()
