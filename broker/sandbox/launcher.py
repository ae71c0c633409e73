"""The one place that decides how a process starts "in a qube" of the sandbox.

A qube is a directory tree ``DIR/vm/<qube>`` that stands for its root filesystem, plus an
environment: a scrubbed one (``env -i`` style: nothing of the caller leaks in), with
QUBES_FWUPD_ROOT pointing :class:`broker.config.Paths` at that tree, the qube's private
system bus (if it has one) and its qrexec socket. Nothing else in broker/ knows how a
qube is made.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.config import ROOT_ENV
from broker.qrexec import SANDBOX_SOCKET_ENV
from broker.sandbox.policy import QubeInfo

SANDBOX_ENV = "QUBES_FWUPD_SANDBOX"
QUBE_ENV = "QUBES_FWUPD_QUBE"
UPDATEVM_TAG = "fwupd-updatevm"

# dom0 and sys-usb run fwupd; sys-firewall is the networked UpdateVM; work is any other
# qube (and the one adversarial tests act from)
QUBES: dict[str, QubeInfo] = {
    "dom0": QubeInfo("dom0", "AdminVM"),
    "sys-firewall": QubeInfo("sys-firewall", "AppVM", frozenset({UPDATEVM_TAG})),
    "sys-usb": QubeInfo("sys-usb", "AppVM"),
    "work": QubeInfo("work", "AppVM"),
}
FWUPD_QUBES = ("dom0", "sys-usb")
UPDATEVM = "sys-firewall"
USBVM = "sys-usb"
# which of our qrexec services each qube offers (installed to its etc/qubes-rpc)
SERVICES: dict[str, tuple[str, ...]] = {
    "dom0": ("qubes.FwupdReceiveUpdates",),
    "sys-firewall": ("qubes.FwupdDownload",),
    "sys-usb": ("qubes.FwupdUsbvm",),
    "work": (),
}
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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


class Launcher:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def env(self, qube: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        root = self.sandbox.root(qube)
        venv_bin = str(Path(sys.executable).parent)
        env = {
            "PATH": f"{venv_bin}:{_SYSTEM_PATH}",
            "LANG": "C.UTF-8",
            "HOME": str(root / "home"),
            "TMPDIR": str(root / "tmp"),
            ROOT_ENV: str(root),
            QUBE_ENV: qube,
            SANDBOX_SOCKET_ENV: str(self.sandbox.qrexec_socket(qube)),
        }
        if qube in FWUPD_QUBES:
            env["DBUS_SYSTEM_BUS_ADDRESS"] = self.sandbox.bus_address(qube)
        env.update(extra or {})
        return env

    def popen(
        self,
        qube: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[bytes]:
        """Start argv in the qube: its tree, its environment (and nothing of ours)."""
        root = self.sandbox.root(qube)
        for sub in ("home", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(list(argv), env=self.env(qube, env), cwd=root / "home", **kwargs)

    def run(self, qube: str, argv: Sequence[str], **kwargs: Any) -> int:
        proc = self.popen(qube, argv, **kwargs)
        return proc.wait()
