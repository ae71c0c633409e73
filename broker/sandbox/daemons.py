"""Real fwupd daemons for the sandbox's hardware qubes, one per qube, each on its own
private system-type dbus-daemon and with its own etc/var/run tree.

Everything fwupd writes goes under the qube's root: the FWUPD_* variables move its
paths, the launcher scrubs the rest of the environment, and the bus has no service
directories so nothing on it can be activated from the host. Measured behaviour and the
reasons behind each setting: /work/shared/recipes/README.md (the "gotchas").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from xml.sax.saxutils import escape

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.errors import AuthError, DBusError
from dbus_next.message import Message

from broker.config import Paths
from broker.sandbox.launcher import Launcher, Sandbox
from broker.sandbox.pki import SandboxPki
from broker.sandbox.pq import create_pq_pki
from broker.sandbox.processes import ProcessTable

FWUPD_BIN = "/usr/libexec/fwupd/fwupd"
REMOTE_ID = "lvfs"
# a remote needs an http(s) MetadataURI to be of kind "download"; it is never fetched,
# metadata only arrives through UpdateMetadata. fwupd rewrites the URI of any "lvfs"
# remote to .xml.zst anyway, so say it up front.
METADATA_URI = "https://example.invalid/downloads/firmware.xml.zst"
FWUPD_NAME = "org.freedesktop.fwupd"
DBUS_NAME = "org.freedesktop.DBus"
HOST_PKI_DIRS = (Path("/etc/pki/fwupd"), Path("/etc/pki/fwupd-metadata"))
CA_NAME = "qubes-fwupd-sandbox-CA.pem"
# beside it, as LVFS-CA-2025PQ.pem beside LVFS-CA.pem: an ML-DSA-87 CA (keyUsage set: one
# CA without it breaks every PKCS#7 check in libjcat)
PQ_CA_NAME = "qubes-fwupd-sandbox-CA-2025PQ.pem"
GPG_KEY_NAME = "GPG-KEY-qubes-fwupd-sandbox"
START_TIMEOUT = 30.0
_SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# sockaddr_un.sun_path is 108 bytes, NUL included
_MAX_SOCKET_PATH = 107

_disabled_plugins: list[str] | None = None

_BUS_CONF = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <!-- no servicedir: with activation, a call to a missing name would start the HOST's
       fwupd or polkitd, with host paths -->
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <!-- the policies the fwupd and polkitd packages ship, as on a real system -->
  <include ignore_missing="yes">/usr/share/dbus-1/system.d/org.freedesktop.fwupd.conf</include>
  <include ignore_missing="yes">/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf</include>
</busconfig>
"""


class DaemonStartError(RuntimeError):
    pass


def bus_config(sandbox: Sandbox, qube: str) -> Path:
    return sandbox.root(qube) / "etc/dbus-1/system.conf"


def fwupd_env(root: Path) -> dict[str, str]:
    """The FWUPD_* variables that move every path fwupd reads or writes under ``root``.
    FWUPD_DATADIR stays /usr/share/fwupd: read-only, and it holds the quirks."""
    return {
        "FWUPD_SYSCONFDIR": str(root / "etc"),
        "FWUPD_LOCALSTATEDIR": str(root / "var"),
        "FWUPD_RUNDIR": str(root / "run"),
        "FWUPD_LOCKDIR": str(root / "run/lock"),
    }


def disabled_plugins() -> list[str]:
    """Every plugin but "test": fwupd has no allow-list, and without this the host's own
    hardware (the CPU, at least) shows up in every sandbox qube."""
    global _disabled_plugins
    if _disabled_plugins is None:
        with tempfile.TemporaryDirectory(prefix="qfw-probe-") as tmp:
            root = Path(tmp)
            (root / "etc/fwupd").mkdir(parents=True)
            (root / "var").mkdir()
            (root / "run/lock").mkdir(parents=True)
            (root / "etc/fwupd/fwupd.conf").write_text("[fwupd]\nTestDevices=true\n")
            env = {
                "PATH": _SYSTEM_PATH,
                "LANG": "C.UTF-8",
                "HOME": tmp,
                "TMPDIR": tmp,
                # a bus that does not exist: the probe must not talk to a host daemon
                "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={root / 'no-bus'}",
                **fwupd_env(root),
            }
            proc = subprocess.run(
                ["fwupdtool", "get-plugins", "--json"],
                env=env, cwd=tmp, capture_output=True, check=False, timeout=60,
            )  # fmt: skip
        try:
            names = [str(p["Name"]) for p in json.loads(proc.stdout)["Plugins"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DaemonStartError(
                f"fwupdtool get-plugins --json (exit {proc.returncode}) gave no plugin "
                f"list: {e}; stderr: {proc.stderr.decode(errors='replace')[-500:]}"
            ) from e
        if "test" not in names:
            raise DaemonStartError("fwupd has no 'test' plugin: is fwupd-tests installed?")
        _disabled_plugins = sorted(n for n in names if n != "test")
    return list(_disabled_plugins)


def install_trust_store(root: Path, pki: SandboxPki) -> None:
    """The real LVFS keys (the fwupd-tests cabs are LVFS-signed) plus the sandbox LVFS's
    CA and GPG key, in the qube's copy of /etc/pki/fwupd{,-metadata}. fwupd loads both
    directories into one pool, so each gets both of ours."""
    paths = Paths(root)
    qube_dirs = (*paths.pki_firmware_dirs, *paths.pki_metadata_dirs)
    for host_dir, dest in zip(HOST_PKI_DIRS, qube_dirs, strict=True):
        dest.mkdir(parents=True, exist_ok=True)
        if host_dir.is_dir():
            for src in sorted(host_dir.iterdir()):
                if src.is_file():
                    shutil.copyfile(src, dest / src.name)
        shutil.copyfile(pki.ca_pem, dest / CA_NAME)
        shutil.copyfile(create_pq_pki(pki.pq_dir).ca_pem, dest / PQ_CA_NAME)
        shutil.copyfile(pki.gpg_public_key, dest / GPG_KEY_NAME)


def _conf_value(key: str, value: str) -> str:
    if not key.isidentifier() or any(c in value for c in "\r\n"):
        raise ValueError(f"bad fwupd.conf entry {key!r}={value!r}")
    return f"{key}={value}\n"


def write_fwupd_tree(
    sandbox: Sandbox, qube: str, test_conf: Mapping[str, str] | None = None
) -> None:
    root = sandbox.root(qube)
    socket = sandbox.bus_socket(qube)
    if len(str(socket)) > _MAX_SOCKET_PATH:
        raise DaemonStartError(f"{socket}: longer than a unix socket path may be")
    for sub in ("etc/fwupd/remotes.d", "etc/dbus-1", "var", "run/lock", "run/dbus"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    sandbox.log_dir.mkdir(parents=True, exist_ok=True)
    bus_config(sandbox, qube).write_text(_BUS_CONF.format(socket=escape(str(socket))))

    conf = (
        "[fwupd]\n"
        # the webcam of the test plugin and the fwupd-tests remote (shadowed below)
        + _conf_value("TestDevices", "true")
        # the default (300 s) makes fwupd exit when idle, and nothing here restarts it
        + _conf_value("IdleTimeout", "0")
        + _conf_value("UpdateMotd", "false")
        + _conf_value("P2pPolicy", "nothing")
        + _conf_value("DisabledPlugins", ";".join(disabled_plugins()))
    )
    if test_conf:
        conf += "\n[test]\n" + "".join(_conf_value(k, v) for k, v in test_conf.items())
    (root / "etc/fwupd/fwupd.conf").write_text(conf)

    remotes = root / "etc/fwupd/remotes.d"
    # TestDevices also loads /usr/share/fwupd/remotes.d/fwupd-tests.conf, stale metadata
    # for the same webcam; a remote of the same id found first wins, and ours is first
    (remotes / "fwupd-tests.conf").write_text(
        "[fwupd Remote]\nEnabled=false\n"
        "Title=fwupd test suite (off: the sandbox pushes its own signed metadata)\n"
        "MetadataURI=file:///usr/share/installed-tests/fwupd/fwupd-tests.xml\n"
    )
    (remotes / f"{REMOTE_ID}.conf").write_text(
        "[fwupd Remote]\nEnabled=true\n"
        "Title=Sandbox LVFS (metadata only via UpdateMetadata)\n"
        f"MetadataURI={METADATA_URI}\n"
        "ApprovalRequired=false\n"
    )


async def _name_has_owner(address: str, name: str) -> bool:
    bus = await MessageBus(bus_address=address).connect()
    try:
        reply = await bus.call(
            Message(
                destination=DBUS_NAME, path="/org/freedesktop/DBus", interface=DBUS_NAME,
                member="NameHasOwner", signature="s", body=[name],
            )
        )  # fmt: skip
    finally:
        bus.disconnect()  # type: ignore[no-untyped-call]
    return (
        reply is not None
        and reply.message_type == MessageType.METHOD_RETURN
        and reply.body == [True]
    )


def name_has_owner(address: str, name: str, timeout: float = 2.0) -> bool:
    """Whether ``name`` has an owner on the bus; False also when the bus does not answer."""
    try:
        return asyncio.run(asyncio.wait_for(_name_has_owner(address, name), timeout))
    except (OSError, EOFError, TimeoutError, AuthError, DBusError):
        return False


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _wait_for_name(
    address: str, name: str, proc: subprocess.Popen[bytes], log: Path, what: str
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not name_has_owner(address, name):
        if proc.poll() is not None:
            raise DaemonStartError(
                f"{what} exited ({proc.returncode}) during startup; {log}:\n{_log_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise DaemonStartError(
                f"{what} did not own {name} in {START_TIMEOUT:.0f} s; {log}:\n{_log_tail(log)}"
            )
        time.sleep(0.02)


def _start(
    launcher: Launcher, qube: str, argv: list[str], env: Mapping[str, str], log: Path
) -> subprocess.Popen[bytes]:
    # append: the log of an earlier start stays readable after a restart
    with log.open("ab") as out:
        # own session: a ^C in the terminal that ran `up` must not reach the daemons
        return launcher.popen(
            qube, argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def start_fwupd(sandbox: Sandbox, launcher: Launcher, table: ProcessTable, qube: str) -> None:
    """Start the qube's bus, then its fwupd, and return once fwupd is on the bus.
    Both are in ``table`` as soon as they exist: on failure, ``stop_all`` cleans up."""
    for entry in table.entries():
        if entry.qube == qube and entry.role in ("dbus", "fwupd") and table.alive(entry):
            raise DaemonStartError(f"{entry} is still running: stop it first")
    address = sandbox.bus_address(qube)
    # the bus, and so fwupd, is reached by address even from qubes the launcher does not
    # give a bus of their own
    env = {"DBUS_SYSTEM_BUS_ADDRESS": address}
    sandbox.bus_socket(qube).unlink(missing_ok=True)

    log = sandbox.log_dir / f"{qube}-dbus.log"
    argv = ["dbus-daemon", f"--config-file={bus_config(sandbox, qube)}", "--nofork", "--nopidfile"]
    bus = _start(launcher, qube, argv, env, log)
    table.record("dbus", qube, bus.pid)
    _wait_for_name(address, DBUS_NAME, bus, log, f"dbus-daemon of {qube}")

    _start_fwupd_on_bus(sandbox, launcher, table, qube)


def _start_fwupd_on_bus(
    sandbox: Sandbox, launcher: Launcher, table: ProcessTable, qube: str
) -> None:
    address = sandbox.bus_address(qube)
    log = sandbox.log_dir / f"{qube}-fwupd.log"
    env = {"DBUS_SYSTEM_BUS_ADDRESS": address} | fwupd_env(sandbox.root(qube))
    env["FWUPD_MACHINE_ID"] = f"qubes-fwupd-{qube}"
    fwupd = _start(launcher, qube, [FWUPD_BIN], env, log)
    table.record("fwupd", qube, fwupd.pid)
    _wait_for_name(address, FWUPD_NAME, fwupd, log, f"fwupd of {qube}")


def fwupd_pid(sandbox: Sandbox, qube: str) -> int:
    """The qube's running fwupd: the one whose FWUPD_SYSCONFDIR is the qube's (to crash it
    on purpose, or measure it)."""
    root = f"FWUPD_SYSCONFDIR={sandbox.root(qube)}/etc".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() != FWUPD_BIN.encode() + b"\0":
                continue
            if root not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        return int(pid)
    raise RuntimeError(f"no fwupd of {qube} running")


def restart_fwupd(sandbox: Sandbox, launcher: Launcher, table: ProcessTable, qube: str) -> None:
    """The qube's fwupd stopped and started again on the same bus: what a reboot (of the
    machine, or of sys-usb) does to it, as far as the emulation can. Its history stays; the
    test plugin's device comes back at 1.2.2 (it lives in memory)."""
    table.stop_all(qube, roles=("fwupd",))
    _start_fwupd_on_bus(sandbox, launcher, table, qube)


def stop_gpg_agents(sandbox: Sandbox, table: ProcessTable, qube: str) -> None:
    """Record the gpg-agent that fwupd's libjcat starts for its keyring the first time it
    checks a GPG signature: it outlives fwupd. Call before ``stop_all``."""
    home = sandbox.root(qube) / "var/lib/fwupd/gnupg"
    if not home.is_dir():
        return
    env = {"PATH": _SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": str(sandbox.root(qube) / "home")}
    # --no-autostart: asking must not start the agent it asks about
    proc = subprocess.run(
        ["gpg-connect-agent", "--homedir", str(home), "--no-autostart", "getinfo pid", "/bye"],
        env=env, capture_output=True, text=True, check=False, timeout=10,
    )  # fmt: skip
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "D" and parts[1].isdigit():
            pid = int(parts[1])
            if not any(e.pid == pid and table.alive(e) for e in table.entries()):
                # it may have gone on its own since it answered: nothing left to stop
                with contextlib.suppress(ProcessLookupError):
                    table.record("gpg-agent", qube, pid)
