"""The one place that decides how a process starts "in a qube" of the sandbox.

A qube is a directory tree ``DIR/vm/<qube>`` that stands for its root filesystem, plus an
environment: a scrubbed one (``env -i`` style: nothing of the caller leaks in), with
QUBES_FWUPD_ROOT pointing :class:`broker.config.Paths` at that tree, the qube's private
system bus (if it has one) and its qrexec socket. Nothing else in broker/ knows how a
qube is made.

Isolation (where the kernel allows it) stands in for Xen's:

- Each qube has one long-lived *holder* process, started by ``unshare --net --mount``
  (plus ``--user --map-root-user`` when not root) and recorded in the PID table as
  ``ns-holder``; its namespaces are the qube's. Every process of the qube is started by
  ``nsenter`` into them, through fds opened on the holder's ``/proc/PID/ns/*`` and only
  then checked against its recorded start time, so a recycled PID is never entered.
- Network: loopback only. The LVFS mirror runs in the UpdateVM's network namespace
  (:meth:`Launcher.popen_on_network_of`), on its 127.0.0.1, and a second one, serving the
  same files on the same port, in sys-whonix's (the LVFS as reached through Tor); no other
  qube has a route.
- Files: in the holder's private mount namespace the host's mounts are read-only, a
  read-only tmpfs covers DIR (the other qubes' trees, the sandbox CA's key, the mirror's
  files, the PID table) and only ``DIR/vm/<qube>`` is bound back, writable; /tmp,
  /var/tmp and /dev/shm are fresh tmpfs. Unix sockets are reached by path, so the
  qrexec and D-Bus sockets in the qube's tree still work from outside.
- The qrexec daemon runs outside every qube; its pipes are the only way between them.
- Nothing is mounted in the host's namespace and no namespace is named: a namespace
  goes with its last process. ``down`` stops every recorded process, then whatever else
  still runs in a qube's namespaces.
- Without root or unprivileged user namespaces, or with QUBES_FWUPD_ISOLATION=off,
  processes start as before; ``DIR/isolation`` records which was chosen at ``up``.

Users, as in Qubes: dom0's qrexec services run as its login user, in group ``qubes``,
while the manager and the daemons run as root. The sandbox stands for that user with bare
ids (:data:`DOM0_USER_UID`, :data:`DOM0_QUBES_GID`) and drops to them with ``setpriv``
(:meth:`Launcher.popen_service`). Only root can change uid: not run as root, services run
as everything else does. ``DIR/service-user`` records which was chosen at ``up``.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import broker
from broker.config import DOM0_GROUP_ENV, ROOT_ENV, Paths
from broker.sandbox.policy import QubeInfo
from broker.sandbox.processes import ProcessTable, Recorded, proc_stat
from broker.sandbox.qrexec_client import SANDBOX_SOCKET_ENV

SANDBOX_ENV = "QUBES_FWUPD_SANDBOX"
QUBE_ENV = "QUBES_FWUPD_QUBE"
ISOLATION_ENV = "QUBES_FWUPD_ISOLATION"  # "off": no namespaces, even where they could be made
HOLDER_ROLE = "ns-holder"
UPDATEVM_TAG = "fwupd-updatevm"

# dom0 and sys-usb run fwupd; sys-firewall is the networked UpdateVM; sys-whonix is another
# networked qube (a Tor gateway), an UpdateVM only once tagged, as in Qubes
# (`qvm-tags sys-whonix add fwupd-updatevm`: Sandbox.tags_file); work is any other qube
# (and the one adversarial tests act from)
QUBES: dict[str, QubeInfo] = {
    "dom0": QubeInfo("dom0", "AdminVM"),
    "sys-firewall": QubeInfo("sys-firewall", "AppVM", frozenset({UPDATEVM_TAG})),
    "sys-usb": QubeInfo("sys-usb", "AppVM"),
    "sys-whonix": QubeInfo("sys-whonix", "AppVM"),
    "work": QubeInfo("work", "AppVM"),
}
FWUPD_QUBES = ("dom0", "sys-usb")
UPDATEVM = "sys-firewall"
TOR_GATEWAY = "sys-whonix"
USBVM = "sys-usb"
# which of our qrexec services each qube offers (installed to its etc/qubes-rpc)
SERVICES: dict[str, tuple[str, ...]] = {
    "dom0": ("qubes.FwupdReceiveUpdates",),
    "sys-firewall": ("qubes.FwupdDownload",),
    "sys-usb": ("qubes.FwupdUsbvm",),
    # qubes-fwupd-updatevm in the whonix-gateway template, as for a download over Tor
    TOR_GATEWAY: ("qubes.FwupdDownload",),
    # the qube an offline import comes from (a USB stick, a dir received with qvm-copy)
    # has the UpdateVM's package in its template
    "work": ("qubes.FwupdDownload",),
}
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# host scratch dirs would be a channel between qubes that bypasses qrexec
_PRIVATE_SCRATCH = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))  # noqa: S108
_HOLDER_READY_SECONDS = 15.0
_TOOLS = ("unshare", "nsenter", "ip")

# dom0's login user and group qubes, with no entry in the host's /etc/passwd or /etc/group.
# 65536-99999 is a gap no allocator hands out: above Debian's and systemd's ranges (system
# < 1000, users < 60000, Debian's static 60000-64999, systemd's dynamic users to 65519,
# nobody 65534) and below useradd's subordinate ids for rootless containers (/etc/subuid,
# from 100000) and systemd-nspawn's (from 524288)
DOM0_USER_UID = 89101  # also the gid of its own group, as a login user's private group is
DOM0_QUBES_GID = 89100

# <sys/mount.h>, <linux/mount.h>, <fcntl.h>
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC = 2, 4, 4096, 16384
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture
_MOUNT_ATTR_RDONLY, _AT_FDCWD, _AT_RECURSIVE = 1, -100, 0x8000


@dataclass(frozen=True)
class Sandbox:
    dir: Path

    @classmethod
    def from_env(cls) -> Sandbox | None:
        value = os.environ.get(SANDBOX_ENV)
        return cls(Path(value).resolve()) if value else None

    def root(self, qube: str) -> Path:
        return self.dir / "vm" / qube

    def bus_socket(self, qube: str) -> Path:
        return self.root(qube) / "run/dbus/system_bus_socket"

    def bus_address(self, qube: str) -> str:
        return f"unix:path={self.bus_socket(qube)}"

    def qrexec_socket(self, qube: str) -> Path:
        return self.root(qube) / "run/qubes-fwupd/qrexec.sock"

    def rpc_dir(self, qube: str) -> Path:
        return self.root(qube) / "etc/qubes-rpc"

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    @property
    def pids_file(self) -> Path:
        return self.dir / "pids"

    @property
    def pki_dir(self) -> Path:
        return self.dir / "pki"

    @property
    def lvfs_dir(self) -> Path:
        return self.dir / "lvfs"

    @property
    def policy_dir(self) -> Path:
        """The sandbox's /etc/qubes/policy.d: our shipped policies, copied at `up`."""
        return self.dir / "policy.d"

    @property
    def isolation_file(self) -> Path:
        return self.dir / "isolation"

    @property
    def service_user_file(self) -> Path:
        return self.dir / "service-user"

    def tags_file(self, qube: str) -> Path:
        """Tags the qube has besides its own in QUBES, one per line: what `qvm-tags QUBE
        add TAG` would have added (the policy sees them at once)."""
        return self.dir / "tags" / qube

    def halted_file(self, qube: str) -> Path:
        """While it exists, the qube is "down": qrexec calls to it fail as qvm-run's do for
        a qube that cannot start (the emulation cannot stop a qube's daemons for real)."""
        return self.dir / "halted" / qube

    def faults_site(self, qube: str) -> Path:
        """Tests' fault injection (tests/faults.py): while this dir exists, every Python
        process started in the qube imports its sitecustomize first, which may kill -9
        that process at a chosen point. In the qube's own tree, the only part of the
        sandbox it sees. Nothing like it exists in a real qube."""
        return self.root(qube) / "faults" / "site"

    def stopped_file(self, qube: str) -> Path:
        """While it exists, the qube is shut down but startable: qvm-shutdown makes it,
        and qvm-start, or a qrexec call to the qube, removes it (the qube's processes run
        on: the emulation's power state is this marker and :meth:`halted_file`)."""
        return self.dir / "stopped" / qube


@dataclass(frozen=True)
class Isolation:
    on: bool
    userns: bool = False  # not root: the namespaces belong to a user namespace of ours
    reason: str = ""  # why it is off

    def __str__(self) -> str:
        if not self.on:
            return f"off ({self.reason})"
        return "on (user namespace)" if self.userns else "on"

    def line(self) -> str:
        return "on userns\n" if self.userns else "on\n" if self.on else f"off {self.reason}\n"

    @classmethod
    def parse(cls, text: str) -> Isolation:
        word, _, rest = text.strip().partition(" ")
        if word == "on":
            return cls(True, rest == "userns")
        return cls(False, reason=rest or "not recorded")


@dataclass(frozen=True)
class ServiceUser:
    """Whom dom0's qrexec services run as: its login user (``dropped``), or, where the
    sandbox cannot change uid, the sandbox's own user, as everything else."""

    dropped: bool
    reason: str = ""  # why not
    uid: int = DOM0_USER_UID
    gid: int = DOM0_USER_UID
    qubes_gid: int = DOM0_QUBES_GID

    def __str__(self) -> str:
        if not self.dropped:
            return f"the sandbox's own user ({self.reason})"
        return f"uid {self.uid}, gid {self.gid}, group qubes {self.qubes_gid}"

    def line(self) -> str:
        if not self.dropped:
            return f"kept {self.reason}\n"
        return f"dropped {self.uid} {self.gid} {self.qubes_gid}\n"

    @classmethod
    def parse(cls, text: str) -> ServiceUser:
        word, _, rest = text.strip().partition(" ")
        if word == "dropped":
            uid, gid, qubes_gid = (int(v) for v in rest.split())
            return cls(True, uid=uid, gid=gid, qubes_gid=qubes_gid)
        return cls(False, reason=rest or "not recorded")

    def setpriv(self) -> list[str]:
        """The prefix that makes a command run as this user and nothing more: no
        capabilities to inherit or regain, and no setuid binary (sudo) to climb back by."""
        if not self.dropped:
            return []
        # setpriv keeps root's capabilities across setresuid (to apply its cap options),
        # so its own exec still has them: env's exec is that one, and env looks up and
        # runs the command with this user's rights only
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
                f"--groups={self.qubes_gid}", "--inh-caps=-all", "--bounding-set=-all",
                "--no-new-privs", "--", "env", "--"]  # fmt: skip


def service_user_available() -> ServiceUser:
    """Whether dom0's services can run as its login user here (before the probe that
    :meth:`Launcher.create_qubes` then runs)."""
    if os.geteuid() != 0:
        return ServiceUser(False, "not root: only root can change uid")
    if shutil.which("setpriv", path=_SYSTEM_PATH) is None:
        return ServiceUser(False, "setpriv not found")
    user = ServiceUser(True)
    taken = [f"uid {user.uid}"] if _known(pwd.getpwuid, user.uid) else []
    taken += [f"gid {g}" for g in (user.gid, user.qubes_gid) if _known(grp.getgrgid, g)]
    if taken:
        # it would be a real account's: that user could reach dom0's dirs
        return ServiceUser(False, f"{', '.join(taken)} already named on this host")
    return user


def _known(lookup: Callable[[int], object], number: int) -> bool:
    try:
        lookup(number)
    except KeyError:
        return False
    return True


def _code_paths() -> list[Path]:
    """What every qube must still see: the interpreter, the venv, and this code (with
    the qrexec/ entry points beside it in a source checkout)."""
    return [
        Path(sys.prefix).resolve(),
        Path(sys.base_prefix).resolve(),
        Path(sys.executable).resolve().parent,
        Path(broker.__file__).resolve().parents[1],
    ]


def isolation_available(sandbox: Sandbox) -> Isolation:
    """Whether namespaces can be made here, and of which kind; probed, not guessed."""
    if os.environ.get(ISOLATION_ENV, "").lower() == "off":
        return Isolation(False, reason=f"{ISOLATION_ENV}=off")
    missing = [tool for tool in _TOOLS if shutil.which(tool, path=_SYSTEM_PATH) is None]
    if missing:
        return Isolation(False, reason=f"{', '.join(missing)} not found")
    hidden = [p for p in _code_paths() if p.is_relative_to(sandbox.dir)]
    if hidden:
        return Isolation(False, reason=f"{hidden[0]} is inside {sandbox.dir}, hidden from qubes")
    userns = os.geteuid() != 0
    probe = subprocess.run(
        ["unshare", *_unshare_flags(userns), "--", "true"],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["failed"])[-1]
        who = "not root, and no unprivileged user namespaces" if userns else "as root"
        return Isolation(False, reason=f"{who}: unshare: {why}")
    return Isolation(True, userns)


def _unshare_flags(userns: bool) -> list[str]:
    flags = ["--net", "--mount", "--propagation", "private"]
    return ["--user", "--map-root-user", *flags] if userns else flags


class HostNamespaces(ProcessLookupError):
    """A qube's recorded namespaces are the caller's own: never to be treated as a qube's."""


@dataclass(frozen=True)
class _Held:
    """Open fds on a living holder's namespaces: they name them race-free."""

    user: int | None
    net: int
    mnt: int

    def fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.user, self.net, self.mnt) if fd is not None)

    def nsenter(self, net: bool = True, mnt: bool = True) -> list[str]:
        argv = ["nsenter"]
        if self.user is not None:
            # the qube's root is our uid mapped to 0: keep it, setgroups is denied there
            argv += [f"--user=/proc/self/fd/{self.user}", "--preserve-credentials"]
        if net:
            argv.append(f"--net=/proc/self/fd/{self.net}")
        if mnt:
            argv.append(f"--mount=/proc/self/fd/{self.mnt}")
        return argv

    def close(self) -> None:
        for fd in self.fds():
            os.close(fd)


class Launcher:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.table = ProcessTable(sandbox.pids_file)

    def isolation(self) -> Isolation:
        try:
            return Isolation.parse(self.sandbox.isolation_file.read_text())
        except FileNotFoundError:
            return Isolation(False, reason="no sandbox was started here")

    def service_user(self) -> ServiceUser:
        try:
            return ServiceUser.parse(self.sandbox.service_user_file.read_text())
        except FileNotFoundError:
            return ServiceUser(False, "no sandbox was started here")

    def paths(self, qube: str) -> Paths:
        """The qube's Paths; dom0's name the group its dirs are made in at `up` (ours,
        where its services run as everything else)."""
        user = self.service_user()
        root = self.sandbox.root(qube)
        if qube == "dom0":
            return Paths(root, user.qubes_gid if user.dropped else os.getgid())
        return Paths(root)

    def env(self, qube: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        root = self.sandbox.root(qube)
        venv_bin = str(Path(sys.executable).parent)
        env = {
            # the qube's own usr/bin first: qrexec's clients (qvm-run in dom0,
            # qrexec-client-vm in a VM), as the sandbox's up puts them there
            "PATH": f"{root / 'usr/bin'}:{venv_bin}:{_SYSTEM_PATH}",
            "LANG": "C.UTF-8",
            "HOME": str(root / "home"),
            "TMPDIR": str(root / "tmp"),
            ROOT_ENV: str(root),
            QUBE_ENV: qube,
            SANDBOX_SOCKET_ENV: str(self.sandbox.qrexec_socket(qube)),
        }
        if self.sandbox.faults_site(qube).is_dir():
            env["PYTHONPATH"] = str(self.sandbox.faults_site(qube))
        if qube in FWUPD_QUBES:
            env["DBUS_SYSTEM_BUS_ADDRESS"] = self.sandbox.bus_address(qube)
        user = self.service_user()
        if qube == "dom0" and user.dropped:
            # the host has no group qubes: the manager's Paths must name ours
            env[DOM0_GROUP_ENV] = str(user.qubes_gid)
        env.update(extra or {})
        return env

    def popen(
        self,
        qube: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[bytes]:
        """Start argv in the qube: its tree, its environment (and nothing of ours), and,
        with isolation on, its namespaces."""
        root = self.sandbox.root(qube)
        home = root / "home"
        for sub in ("home", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        if not self.isolation().on:
            return subprocess.Popen(list(argv), env=self.env(qube, env), cwd=home, **kwargs)
        with self._held(qube) as held:
            # nsenter execs argv itself (no fork without --pid): the PID we return is
            # argv's, for the PID table and for wait()
            enter = [*held.nsenter(), f"--wdns={home}", "--"]
            return self._popen_passing(held, [*enter, *argv], env=self.env(qube, env),
                                       cwd=home, **kwargs)  # fmt: skip

    def popen_service(
        self,
        qube: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[bytes]:
        """A qrexec service in the qube, as the user qrexec runs it as: in dom0, the login
        user (a VM's services still run as whoever the sandbox runs as)."""
        prefix = self.service_user().setpriv() if qube == "dom0" else []
        return self.popen(qube, [*prefix, *argv], env=env, **kwargs)

    def popen_on_network_of(
        self, qube: str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        """A host process (host files, the caller's env and cwd) that shares only the
        qube's network: an LVFS mirror, on a networked qube's 127.0.0.1."""
        if not self.isolation().on:
            return subprocess.Popen(list(argv), **kwargs)
        with self._held(qube) as held:
            enter = [*held.nsenter(mnt=False), "--"]
            return self._popen_passing(held, [*enter, *argv], **kwargs)

    def run(self, qube: str, argv: Sequence[str], **kwargs: Any) -> int:
        proc = self.popen(qube, argv, **kwargs)
        return proc.wait()

    # ------------------------------------------------------------------ lifecycle
    def create_qubes(self) -> Isolation:
        """Make every qube's tree root and, where the kernel allows it, its namespaces
        (one holder process each, in the PID table as soon as it exists); then decide
        whom dom0's services run as."""
        for qube in QUBES:
            for sub in ("home", "tmp"):
                (self.sandbox.root(qube) / sub).mkdir(parents=True, exist_ok=True)
            # the qube's /tmp: its services' scratch whatever user they run as
            os.chmod(self.sandbox.root(qube) / "tmp", 0o1777)  # noqa: S103  as /tmp is
        isolation = isolation_available(self.sandbox)
        # written before the first holder: from now on no process of a qube may start
        # outside its namespaces, whatever happens to `up`
        self.sandbox.isolation_file.write_text(isolation.line())
        if isolation.on:
            self._start_holders(isolation)
        self.sandbox.service_user_file.write_text(self._choose_service_user().line())
        return isolation

    def _choose_service_user(self) -> ServiceUser:
        user = service_user_available()
        if not user.dropped:
            return user
        # dom0's tree must be reachable through DIR, which may be mkdtemp's 0700
        for d in (self.sandbox.dir, self.sandbox.dir / "vm", self.sandbox.root("dom0")):
            os.chmod(d, stat.S_IMODE(d.stat().st_mode) | stat.S_IXOTH)
        # probed, not guessed: the python3 our entry points' #! finds, the code and dom0's
        # tree, as that user (a venv's interpreter under root's 0700 home is out of reach,
        # and PATH then finds another)
        code = (f"import os, sys\nif sys.prefix != {sys.prefix!r}:\n"
                f"    sys.exit(f'python3 is {{sys.executable}}, not {sys.executable}')\n"
                f"import broker.receive\nos.listdir(os.environ[{ROOT_ENV!r}])")  # fmt: skip
        proc = self.popen("dom0", [*user.setpriv(), "python3", "-c", code],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)  # fmt: skip
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            why = (err.decode(errors="replace").strip().splitlines() or ["failed"])[-1]
            return ServiceUser(False, f"uid {user.uid} cannot run dom0's code here: {why}")
        return user

    def _start_holders(self, isolation: Isolation) -> None:
        self.sandbox.log_dir.mkdir(parents=True, exist_ok=True)
        started = []
        for qube in QUBES:
            with (self.sandbox.log_dir / f"{qube}-ns.log").open("ab") as log:
                proc = subprocess.Popen(
                    ["unshare", *_unshare_flags(isolation.userns), "--", sys.executable,
                     "-m", "broker.sandbox.launcher", "--dir", str(self.sandbox.dir),
                     "--qube", qube],
                    env={"PATH": _SYSTEM_PATH, "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                )  # fmt: skip
            # unshare without --fork execs python: this PID is the holder's
            self.table.record(HOLDER_ROLE, qube, proc.pid)
            started.append((qube, proc))
        for qube, proc in started:
            _wait_ready(proc, self.sandbox.log_dir / f"{qube}-ns.log", qube)

    def stop_all(self) -> list[str]:
        """Stop every recorded process (newest first: the holders go last), then anything
        else still running in a qube's namespaces (a qrexec service in flight, an agent
        some daemon spawned). A namespace goes with its last process."""
        held: dict[str, _Held] = {}
        refused: list[str] = []
        if self.isolation().on:
            for qube in QUBES:
                try:
                    held[qube] = self._open_holder(qube, or_any=True)
                except HostNamespaces as e:
                    refused.append(str(e))
                except ProcessLookupError:
                    pass
        try:
            report = refused + self.table.stop_all()
            for qube, ns in held.items():
                report += self._stop_strays(qube, ns)
        finally:
            for ns in held.values():
                ns.close()
        if not self.table.entries():
            self.sandbox.isolation_file.unlink(missing_ok=True)
            self.sandbox.service_user_file.unlink(missing_ok=True)
        return report

    # ------------------------------------------------------------------ internals
    def _popen_passing(
        self, held: _Held, argv: list[str], **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        kwargs["pass_fds"] = (*kwargs.get("pass_fds", ()), *held.fds())
        return subprocess.Popen(argv, **kwargs)

    @contextlib.contextmanager
    def _held(self, qube: str) -> Iterator[_Held]:
        held = self._open_holder(qube)
        try:
            yield held
        finally:
            held.close()

    def _open_holder(self, qube: str, or_any: bool = False) -> _Held:
        """Fds on the namespaces of the qube's holder (or, ``or_any``, of any recorded
        process of the qube, all being in the same ones), opened first and then checked
        against the recorded start time: they can only name the recorded process's."""
        userns = self.isolation().userns
        names = ("user", "net", "mnt") if userns else ("net", "mnt")
        entries = [e for e in self.table.entries() if e.qube == qube]
        for entry in sorted(reversed(entries), key=lambda e: e.role != HOLDER_ROLE):
            if entry.role != HOLDER_ROLE and not or_any:
                continue
            opened: list[int] = []
            try:
                for ns in names:
                    opened.append(os.open(f"/proc/{entry.pid}/ns/{ns}", os.O_RDONLY))
            except OSError:
                for fd in opened:
                    os.close(fd)
                continue
            held = _Held(opened[0] if userns else None, opened[-2], opened[-1])
            if not self.table.alive(entry):
                held.close()
                continue
            # a holder read before it made its own namespaces (or a table naming some host
            # process) would make the host a qube: everything in it a "stray" of down
            host = _namespaces_of(os.getpid()) | _namespaces_of(1)
            if {_ns_id(os.fstat(held.net)), _ns_id(os.fstat(held.mnt))} & host:
                held.close()
                raise HostNamespaces(
                    f"qube {qube}: its recorded process {entry.pid} is in this host's own "
                    "namespaces, not a qube's: refused (nothing is started or stopped there)"
                )
            return held
        raise ProcessLookupError(
            f"qube {qube} is not running (its namespace holder is gone): run "
            f"`qubes-fwupd-sandbox down --dir {self.sandbox.dir}`, then up"
        )

    def _stop_strays(self, qube: str, held: _Held) -> list[str]:
        ours = {_ns_id(os.fstat(fd)) for fd in (held.net, held.mnt)}
        report = []
        for _ in range(5):  # a stray may fork while we stop it
            strays = [r for r in _processes(qube) if _namespaces_of(r.pid) & ours]
            if not strays:
                break
            report += [f"{stray}: {self.table.stop(stray, timeout=2.0)}" for stray in strays]
        return report


def _ns_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _namespaces_of(pid: int) -> set[tuple[int, int]]:
    ids = set()
    for ns in ("net", "mnt"):
        with contextlib.suppress(OSError):
            ids.add(_ns_id(os.stat(f"/proc/{pid}/ns/{ns}")))
    return ids


def _processes(qube: str) -> Iterator[Recorded]:
    """Every live process, with the start time read *before* its namespaces are: a PID
    recycled in between fails the start-time check of ProcessTable.stop."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = proc_stat(int(name))
            if stat is not None and stat[0] != "Z":
                yield Recorded("stray", qube, int(name), stat[1])


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, qube: str) -> None:
    out = cast(IO[bytes], proc.stdout)  # stdout=PIPE
    try:
        ready, _, _ = select.select([out], [], [], _HOLDER_READY_SECONDS)
        line = out.readline() if ready else b""
    finally:
        out.close()
    if line != b"ready\n":
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        raise ProcessLookupError(
            f"the namespaces of {qube} could not be made; {log}: {' | '.join(tail)}"
        )


# ---------------------------------------------------------------------- the holder itself
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: Path, fstype: str | None, flags: int, data: str = "") -> None:
    fs = fstype.encode() if fstype else None
    result = _libc.mount(source.encode(), str(target).encode(), fs, ctypes.c_ulong(flags),
                         data.encode() or None)  # fmt: skip
    _check(result, f"mount {source} on {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("set", "clr", "propagation", "userns")]


def _read_only(target: Path, readonly: bool, recursive: bool) -> None:
    """mount_setattr(2): unlike a remount, it changes this one flag and nothing else."""
    attr = _MountAttr(_MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else _MOUNT_ATTR_RDONLY)
    # syscall(2) is variadic: every argument must be given its full width
    result = _libc.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_long(_AT_FDCWD),
        ctypes.c_char_p(str(target).encode()),
        ctypes.c_long(_AT_RECURSIVE if recursive else 0), ctypes.byref(attr),
        ctypes.c_long(ctypes.sizeof(attr)),
    )  # fmt: skip
    _check(result, f"mount_setattr {target}")


def hold(sandbox: Sandbox, qube: str) -> None:
    """Run as the holder, in the fresh namespaces unshare made: the qube's view of the
    files, loopback up, "ready" on stdout, then sleep until SIGTERM."""
    root = sandbox.root(qube)
    # a handle on the qube's tree, to bind it back once DIR is covered
    keep = os.open(root, os.O_PATH | os.O_DIRECTORY)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, stdin=subprocess.DEVNULL)
    # what every qube shares (the code, /etc, /usr, /var, /run) is read-only to each, so
    # none can leave anything there for another to find
    _read_only(Path("/"), readonly=True, recursive=True)
    code = _code_paths()
    for scratch in _PRIVATE_SCRATCH:
        if not scratch.is_dir():
            continue
        # a checkout or venv under /tmp (a CI clone) must stay visible, read-only, inside
        # the fresh scratch: handles first, since the tmpfs hides the paths
        inside = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in code
                  if p.is_relative_to(scratch) and p != scratch]  # fmt: skip
        _mount("tmpfs", scratch, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777")
        for path, handle in inside:
            path.mkdir(parents=True, exist_ok=True)
            _mount(f"/proc/self/fd/{handle}", path, None, _MS_BIND | _MS_REC)
            os.close(handle)
            _read_only(path, readonly=True, recursive=True)
    sandbox.dir.mkdir(parents=True, exist_ok=True)
    _mount("qubes-fwupd-sandbox", sandbox.dir, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755")
    root.mkdir(parents=True)
    _mount(f"/proc/self/fd/{keep}", root, None, _MS_BIND | _MS_REC)
    os.close(keep)
    _read_only(root, readonly=False, recursive=True)
    # nor can a qube leave files where the others' trees would be
    _read_only(sandbox.dir, readonly=True, recursive=False)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        signal.pause()


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="a sandbox qube's namespace holder")
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--qube", required=True, choices=sorted(QUBES))
    args = parser.parse_args(argv)
    hold(Sandbox(args.dir.resolve()), args.qube)
    return 0


if __name__ == "__main__":
    sys.exit(main())
