"""dom0's desktop session in the sandbox: an X server (Xvfb), the login user's D-Bus
session bus and a real notification daemon (Debian's dunst), so a test can see what dom0's
manager shows the user through org.freedesktop.Notifications.

In Qubes the desktop user (uid 1000, group qubes) has its session bus at
/run/user/1000/bus, in the runtime dir systemd-logind makes (the user's own, 0700). Here
the user is the sandbox's stand-in for that user (the service user of
:mod:`broker.sandbox.launcher`) and the bus is at ``DIR/vm/dom0/run/user/UID/bus``. The
three processes run in dom0's qube, as that user, since that is where a desktop session
lives; the bus socket is reached by path from outside dom0's namespaces too. The user has
no passwd entry on the host (by design, see the launcher), which dbus-daemon cannot do
without: the session's processes get one through nss_wrapper.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from broker.sandbox.launcher import Launcher, Sandbox
from broker.sandbox.processes import ProcessTable

QUBE = "dom0"
USER_NAME = "user"  # as a default Qubes install names dom0's login user
NOTIFICATIONS_NAME = "org.freedesktop.Notifications"
URGENCIES = ("LOW", "NORMAL", "CRITICAL")  # the urgency hint's 0, 1, 2, as dunst names them
START_TIMEOUT = 30.0
# in the PID table; not "dbus", which is dom0's system bus (start_fwupd looks for that)
ROLES = ("xvfb", "session-bus", "dunst")
TOOLS = ("Xvfb", "dbus-daemon", "dbus-send", "dunst", "dunstctl", "busctl")
_MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path, NUL included

# a session bus as `dbus-daemon --session` makes it, less the service dirs: with
# activation, a call before dunst owns its name would start the host's dunst (Debian ships
# a .service file for it) with the host's config and no DISPLAY
_BUS_CONF = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <keep_umask/>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <!-- no <allow user>: only the bus's own uid may connect (not even root), as on a real one -->
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""

# A notification stays on screen until closed (only closed ones are in dunst's history),
# none is merged with an identical one or held back, history keeps them all. dunst 1.9's
# history has no urgency: the rules put it on the first line of the formatted message,
# which history has (parse_history reads it there).
_DUNSTRC = """\
[global]
    font = Monospace 8
    format = "<b>%s</b>\\n%b"
    notification_limit = 0
    stack_duplicates = false
    history_length = 1000

[urgency_low]
    timeout = 0

[urgency_normal]
    timeout = 0

[urgency_critical]
    timeout = 0

[urgency-in-message-low]
    msg_urgency = low
    format = "LOW\\n<b>%s</b>\\n%b"

[urgency-in-message-normal]
    msg_urgency = normal
    format = "NORMAL\\n<b>%s</b>\\n%b"

[urgency-in-message-critical]
    msg_urgency = critical
    format = "CRITICAL\\n<b>%s</b>\\n%b"
"""


class DesktopError(RuntimeError):
    pass


@dataclass(frozen=True)
class Notification:
    appname: str
    summary: str
    body: str  # as sent, markup and all
    urgency: str  # one of URGENCIES


def missing_tools() -> str | None:
    """What the desktop needs and this host lacks, or None."""
    lacking = [tool for tool in TOOLS if shutil.which(tool) is None]
    if nss_wrapper() is None:
        lacking.append("libnss_wrapper.so")
    if lacking:
        return f"{', '.join(lacking)} not found (tools/system-deps.sh installs them)"
    return None


def nss_wrapper() -> Path | None:
    # it has no soname, so ldconfig does not list it; Debian puts it in the multiarch dir
    for pattern in ("usr/lib/*/libnss_wrapper.so", "usr/lib64/libnss_wrapper.so"):
        for found in sorted(Path("/").glob(pattern)):
            return found
    return None


class Desktop:
    """dom0's desktop session; ``start()`` returns once dunst owns the notifications name,
    ``stop()`` stops it. One at a time in a sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.launcher = Launcher(sandbox)
        self.table = ProcessTable(sandbox.pids_file)
        self.user = self.launcher.service_user()
        self.uid = self.user.uid
        self.display: str | None = None  # ":N", once Xvfb has one
        self._scratch: Path | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._log_offsets: dict[str, int] = {}

    @property
    def runtime_dir(self) -> Path:
        """XDG_RUNTIME_DIR, /run/user/UID in dom0's tree."""
        return self.sandbox.root(QUBE) / "run/user" / str(self.uid)

    @property
    def bus_socket(self) -> Path:
        return self.runtime_dir / "bus"

    @property
    def bus_address(self) -> str:
        return f"unix:path={self.bus_socket}"

    def env(self) -> dict[str, str]:
        """What the session adds to the launcher's scrubbed environment for dom0."""
        if self._scratch is None:
            raise DesktopError("the desktop is not started")
        env = {
            "DBUS_SESSION_BUS_ADDRESS": self.bus_address,
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            # empty: neither the host's nor dom0's user config is read
            "XDG_CONFIG_HOME": str(self._scratch / "config"),
            "XDG_CACHE_HOME": str(self._scratch / "cache"),
            "LD_PRELOAD": str(nss_wrapper()),
            "NSS_WRAPPER_PASSWD": str(self._scratch / "passwd"),
            "NSS_WRAPPER_GROUP": str(self._scratch / "group"),
        }
        if self.display is not None:
            env["DISPLAY"] = self.display
        return env

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Xvfb, the session bus, dunst: each in the PID table as soon as it exists, so
        that on failure stop() here (or the sandbox's `down`) stops what did start."""
        if not self.user.dropped:
            raise DesktopError(f"dom0's services run as {self.user}: no desktop user to be")
        why = missing_tools()
        if why:
            raise DesktopError(why)
        for entry in self.table.entries():
            if entry.qube == QUBE and entry.role in ROLES and self.table.alive(entry):
                raise DesktopError(f"{entry} is still running: stop that desktop first")
        if len(str(self.bus_socket)) > _MAX_SOCKET_PATH:
            raise DesktopError(f"{self.bus_socket}: longer than a unix socket path may be")
        deadline = time.monotonic() + timeout
        try:
            self._prepare()
            self.display = self._start_xvfb(deadline)
            self._start_bus(deadline)
            # info: its log then names the config it read
            self._start("dunst", ["dunst", "-config", str(self._scratch_path("dunstrc")),
                                  "-verbosity", "info"])  # fmt: skip
            self._wait_for_dunst(deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> list[str]:
        """Stop the desktop's processes (only them: dom0's daemons go on), then remove
        what start() made."""
        report = self.table.stop_all(qube=QUBE, roles=ROLES)
        for proc in self._procs.values():
            proc.poll()  # the table reaped it: this only notes that it is gone
        self._procs.clear()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        # as logind removes it when the user's last session ends
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        self.display = None
        return report

    def __enter__(self) -> Desktop:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ what it showed
    def notifications(self) -> list[Notification]:
        """Every notification dunst was sent, oldest first. Its history holds only closed
        ones, so this first closes those still on screen."""
        self.run_as_user(["dunstctl", "close-all"])
        return parse_history(self.run_as_user(["dunstctl", "history"]))

    def run_as_user(self, argv: Sequence[str], timeout: float = 30.0) -> str:
        """A command of the desktop user's, in dom0, in the session; its stdout."""
        proc = self._popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise DesktopError(f"{' '.join(argv)} did not finish in {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise DesktopError(f"{' '.join(argv)} exited {proc.returncode}: "
                               f"{err.decode(errors='replace').strip()}")  # fmt: skip
        return out.decode()

    # ------------------------------------------------------------------ internals
    def _scratch_path(self, name: str) -> Path:
        if self._scratch is None:
            raise DesktopError("the desktop is not started")
        return self._scratch / name

    def _popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return self.launcher.popen(QUBE, [*self.user.setpriv(), *argv], env=self.env(), **kwargs)

    def _prepare(self) -> None:
        root = self.sandbox.root(QUBE)
        # in dom0's own tmp: the user reads it there inside dom0's namespaces and out
        self._scratch = Path(tempfile.mkdtemp(prefix="desktop-", dir=root / "tmp"))
        os.chmod(self._scratch, 0o755)  # noqa: S103  the user must read what is in it
        (self._scratch / "config").mkdir(mode=0o755)
        (self._scratch / "cache").mkdir(mode=0o700)
        os.chown(self._scratch / "cache", self.uid, self.user.gid)
        files = {
            "bus.conf": _BUS_CONF.format(socket=escape(str(self.bus_socket))),
            "dunstrc": _DUNSTRC,
            # dbus-daemon refuses every connection while its own uid has no passwd entry,
            # and by design the host has none for this uid: the session's processes get
            # one through nss_wrapper, as dom0's login user has in Qubes
            "passwd": Path("/etc/passwd").read_text().rstrip("\n")
            + f"\n{USER_NAME}:x:{self.uid}:{self.user.gid}::{root / 'home'}:/bin/sh\n",
            "group": Path("/etc/group").read_text().rstrip("\n")
            + f"\n{USER_NAME}:x:{self.user.gid}:\nqubes:x:{self.user.qubes_gid}:{USER_NAME}\n",
        }
        for name, text in files.items():
            (self._scratch / name).write_text(text)
            os.chmod(self._scratch / name, 0o644)
        # as logind makes it, under a /run/user anyone may traverse
        self.runtime_dir.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.runtime_dir.parent, 0o755)  # noqa: S103  as /run/user is
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        self.runtime_dir.mkdir(mode=0o700)
        os.chown(self.runtime_dir, self.uid, self.user.gid)
        # as systemd-tmpfiles makes it at boot (x11.conf): Xvfb, not root, may not; in
        # dom0's namespaces /tmp is a tmpfs of dom0's own
        x11_dir = "/tmp/.X11-unix"  # noqa: S108  dom0's /tmp, as X servers use it
        code = self.launcher.run(QUBE, ["mkdir", "-p", "-m", "1777", x11_dir],
                                 stdin=subprocess.DEVNULL)  # fmt: skip
        if code != 0:
            raise DesktopError(f"mkdir {x11_dir} in {QUBE} exited {code}")
        self.sandbox.log_dir.mkdir(parents=True, exist_ok=True)

    def _log(self, role: str) -> Path:
        return self.sandbox.log_dir / f"{QUBE}-{role}.log"

    def _start(self, role: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        log = self._log(role)
        # appended to, as the daemons' logs are: this start's lines begin here
        self._log_offsets[role] = log.stat().st_size if log.exists() else 0
        with log.open("ab") as out:
            # own session: a ^C in the terminal that ran the tests must not reach them
            proc = self._popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                               start_new_session=True, **kwargs)  # fmt: skip
        self._procs[role] = proc
        # nsenter, setpriv and env each exec the next in place: the PID is the program's
        self.table.record(role, QUBE, proc.pid)
        return proc

    def _start_announcing(self, role: str, argv: Sequence[str], deadline: float) -> str:
        """Start a server that writes a line to the fd named "{fd}" in argv once it accepts
        connections; that line."""
        read, write = os.pipe()
        try:
            argv = [arg.replace("{fd}", str(write)) for arg in argv]
            proc = self._start(role, argv, pass_fds=(write,))
            os.close(write)
            write = -1
            line = b""
            while not line.endswith(b"\n"):
                ready, _, _ = select.select([read], [], [], max(0.0, deadline - time.monotonic()))
                chunk = os.read(read, 4096) if ready else b""
                if not chunk:  # closed: it exited; or the time is up
                    raise DesktopError(f"{role} did not start (exit status {proc.poll()})"
                                       + self._logs(role))  # fmt: skip
                line += chunk
        finally:
            os.close(read)
            if write >= 0:
                os.close(write)
        return line.decode(errors="replace").strip()

    def _start_xvfb(self, deadline: float) -> str:
        # -displayfd: Xvfb takes the first free display and writes its number once it
        # accepts connections, so no two sandboxes (nor a host X) race for one
        argv = ["Xvfb", "-nolisten", "tcp", "-nolisten", "local", "-screen", "0", "1024x768x24",
                "-displayfd", "{fd}"]  # fmt: skip
        number = self._start_announcing("xvfb", argv, deadline)
        if not number.isdigit():
            raise DesktopError(f"Xvfb gave display {number!r}" + self._logs("xvfb"))
        return f":{int(number)}"

    def _start_bus(self, deadline: float) -> None:
        # it prints its address once it listens: dunst started before that cannot connect
        argv = ["dbus-daemon", f"--config-file={self._scratch_path('bus.conf')}", "--nofork",
                "--nopidfile", "--print-address={fd}"]  # fmt: skip
        self._start_announcing("session-bus", argv, deadline)

    def _wait_for_dunst(self, deadline: float) -> None:
        while not self._name_owned():
            dead = [role for role, proc in self._procs.items() if proc.poll() is not None]
            if dead:
                raise DesktopError(f"{', '.join(dead)} exited during startup" + self._logs(*ROLES))
            if time.monotonic() > deadline:
                raise DesktopError(f"dunst did not own {NOTIFICATIONS_NAME} in time"
                                   + self._logs(*ROLES))  # fmt: skip
            time.sleep(0.05)

    def _name_owned(self) -> bool:
        # asked as the user: the bus lets no one else in
        proc = self._popen(
            ["dbus-send", "--session", "--print-reply=literal", "--dest=org.freedesktop.DBus",
             "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
             f"string:{NOTIFICATIONS_NAME}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        out = _communicate(proc, 10.0)
        return proc.returncode == 0 and out.split() == [b"boolean", b"true"]

    def _logs(self, *roles: str) -> str:
        text = ""
        for role in roles:
            log = self._log(role)
            try:
                with log.open("rb") as f:
                    f.seek(self._log_offsets.get(role, 0))
                    lines = f.read().decode(errors="replace").strip().splitlines()[-15:]
            except FileNotFoundError:
                lines = ["(no log)"]
            text += f"\n{role} ({log}):\n" + "\n".join(lines or ["(nothing)"])
        return text


def _communicate(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """Its stdout; b"" (and it killed) if it hangs."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return b""
    return out


def parse_history(text: str) -> list[Notification]:
    """``dunstctl history``: busctl's JSON of dunst's NotificationListHistory, an aa{sv}
    whose values are each {"type": ..., "data": ...}, newest first (oldest first here)."""
    try:
        (entries,) = json.loads(text)["data"]
        found = []
        for entry in entries:
            field = {key: entry[key]["data"] for key in
                     ("id", "appname", "summary", "body", "message")}  # fmt: skip
            urgency = str(field["message"]).partition("\n")[0]
            if urgency not in URGENCIES:
                raise ValueError(f"message {field['message']!r} starts with no urgency")
            shown = Notification(str(field["appname"]), str(field["summary"]),
                                 str(field["body"]), urgency)  # fmt: skip
            found.append((int(field["id"]), shown))
    except (ValueError, KeyError, TypeError) as e:
        raise DesktopError(f"dunstctl history printed no history ({e}): {text[:500]!r}") from e
    return [n for _, n in sorted(found, key=lambda pair: pair[0])]
