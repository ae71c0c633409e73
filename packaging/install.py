"""`make install`: lays out one package's files under DESTDIR, as the rpm specs and the
Debian rules list them (tests/packaging holds the three together).

    python3 packaging/install.py --destdir D --prefix /usr --sysconfdir /etc COMPONENT

COMPONENT is dom0, vm-common, updatevm or usbvm (vm: the last three). Each package carries
only the modules its entry points import (a test compares these lists with the imports).
The python code goes to PREFIX/share/qubes-fwupd, outside site-packages, so one layout
serves Fedora's python 3.11 to 3.13 and Debian's; each entry point finds it from its own
path, so an unpacked or chrooted tree runs its own copy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1]
CODE_DIR = "share/qubes-fwupd"  # under PREFIX

_COMMON = ("__init__", "cabinet", "config", "errors", "jcat", "metadata", "qrexec",
           "sanitize", "service", "session", "signatures", "transfer")  # fmt: skip
MODULES: dict[str, tuple[str, ...]] = {
    "dom0": (*_COMMON, "backoff", "cli", "fwupd", "fwupd_json", "heads", "history", "manager",
             "offers", "notify", "plans", "power", "receive", "reboots", "remotes", "routing",
             "runlock", "selection", "status", "unattended", "usbvm", "versions"),
    # both VM services, in one package: sys-usb and the UpdateVM often share a template
    "vm-common": (*_COMMON, "fwupd", "fwupd_json", "updatevm", "usbvm"),
}  # fmt: skip
# entry points: (source in the checkout, installed path, module it runs)
ENTRIES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "dom0": (
        ("packaging/qubes-fwupdmgr", "{bindir}/qubes-fwupdmgr", "broker.cli"),
        ("qrexec/qubes.FwupdReceiveUpdates", "{sysconfdir}/qubes-rpc/qubes.FwupdReceiveUpdates",
         "broker.receive"),
    ),
    "updatevm": (
        ("qrexec/qubes.FwupdDownload", "{sysconfdir}/qubes-rpc/qubes.FwupdDownload",
         "broker.updatevm"),
    ),
    "usbvm": (
        ("qrexec/qubes.FwupdUsbvm", "{sysconfdir}/qubes-rpc/qubes.FwupdUsbvm", "broker.usbvm"),
    ),
}  # fmt: skip
DATA: dict[str, tuple[tuple[str, str], ...]] = {
    "dom0": (
        ("policies/85-qubes-fwupd.policy", "{sysconfdir}/qubes/policy.d/85-qubes-fwupd.policy"),
        ("packaging/qubes-fwupd.conf", "{sysconfdir}/qubes-fwupd/qubes-fwupd.conf"),
        ("packaging/unattended.conf", "{sysconfdir}/qubes-fwupd/unattended.conf"),
        ("packaging/tmpfiles.d/qubes-fwupd-dom0.conf",
         "{prefix}/lib/tmpfiles.d/qubes-fwupd-dom0.conf"),
        # the automated runs, off until the admin enables the timer
        ("packaging/systemd/qubes-fwupd-refresh.timer",
         "{prefix}/lib/systemd/system/qubes-fwupd-refresh.timer"),
        ("packaging/systemd/qubes-fwupd-refresh.service",
         "{prefix}/lib/systemd/system/qubes-fwupd-refresh.service"),
        ("packaging/systemd/qubes-fwupd-unattended.service",
         "{prefix}/lib/systemd/system/qubes-fwupd-unattended.service"),
        ("packaging/systemd/qubes-fwupd-notify.service",
         "{prefix}/lib/systemd/system/qubes-fwupd-notify.service"),
    ),
    "updatevm": (
        ("packaging/rpc-config/qubes.FwupdDownload",
         "{sysconfdir}/qubes/rpc-config/qubes.FwupdDownload"),
    ),
    "usbvm": (
        ("packaging/rpc-config/qubes.FwupdUsbvm", "{sysconfdir}/qubes/rpc-config/qubes.FwupdUsbvm"),
    ),
}  # fmt: skip
# written at build time from the parser --help uses: (module, installed path)
GENERATED: dict[str, tuple[tuple[str, str], ...]] = {
    "dom0": (
        ("broker.manpage", "{prefix}/share/man/man1/qubes-fwupdmgr.1"),
        ("broker.completion", "{prefix}/share/bash-completion/completions/qubes-fwupdmgr"),
    ),
}
COMPONENTS = ("dom0", "vm-common", "updatevm", "usbvm")
GROUPS = {"vm": ("vm-common", "updatevm", "usbvm")}


@dataclass(frozen=True)
class Layout:
    destdir: Path
    prefix: str
    sysconfdir: str
    python: str  # the interpreter the entry points name in their #! line

    def path(self, template: str) -> str:
        """The installed path, as the running system sees it (no DESTDIR)."""
        return template.format(
            prefix=self.prefix, sysconfdir=self.sysconfdir, bindir=f"{self.prefix}/bin"
        )

    def staged(self, template: str) -> Path:
        return self.destdir / self.path(template).lstrip("/")


def entry_point(source: str, installed: str, layout: Layout) -> str:
    """The checkout's thin entry point, with the packaged python in its #! line (-I: no
    PYTHON* variables, no user site-packages, not the script's own dir, /etc/qubes-rpc)
    and broker/ first on sys.path, found relative to the script's real path. Without that
    dir (a removed package's leftover conffile) it stops with one line, never falling
    back to some other broker on the path."""
    lines = (SOURCE / source).read_text().splitlines(keepends=True)[1:]
    header = [line for line in lines if line.startswith("#")]
    header = lines[: len(header)] if lines[: len(header)] == header else []
    code = f"{layout.prefix}/{CODE_DIR}"
    relative = os.path.relpath(code, os.path.dirname(installed))
    name = os.path.basename(installed)
    return "".join([
        f"#!{layout.python} -I\n",
        *header,
        "import os as _os\n",
        "import sys as _sys\n\n",
        "# where the package put broker/ (relative: an unpacked tree runs its own copy)\n",
        "_code = _os.path.normpath(_os.path.join(\n",
        f"    _os.path.dirname(_os.path.realpath(__file__)), {relative!r}))\n",
        "if not _os.path.isdir(_os.path.join(_code, 'broker')):\n",
        f"    _sys.exit(f'{name}: {{_code}}/broker is missing (is qubes-fwupd installed?)')\n",
        "_sys.path.insert(0, _code)\n",
        *lines[len(header):],
    ])


def _put(target: Path, data: bytes, mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    target.chmod(mode)


def install(component: str, layout: Layout) -> list[str]:
    """Stage one component's files; returns their installed paths."""
    done = []
    for module in MODULES.get(component, ()):
        installed = f"{layout.prefix}/{CODE_DIR}/broker/{module}.py"
        _put(layout.staged(installed), (SOURCE / "broker" / f"{module}.py").read_bytes(), 0o644)
        done.append(installed)
    for source, template, _module in ENTRIES.get(component, ()):
        installed = layout.path(template)
        _put(layout.staged(template), entry_point(source, installed, layout).encode(), 0o755)
        done.append(installed)
    for source, template in DATA.get(component, ()):
        _put(layout.staged(template), (SOURCE / source).read_bytes(), 0o644)
        done.append(layout.path(template))
    for module, template in GENERATED.get(component, ()):
        out = subprocess.run(
            [sys.executable, "-m", module], cwd=SOURCE, capture_output=True, check=True
        ).stdout
        _put(layout.staged(template), out, 0o644)
        done.append(layout.path(template))
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--destdir", default="")
    parser.add_argument("--prefix", default="/usr")
    parser.add_argument("--sysconfdir", default="/etc")
    parser.add_argument("--python", default="/usr/bin/python3")
    parser.add_argument("component", choices=(*COMPONENTS, *GROUPS, "all"))
    args = parser.parse_args(argv)
    layout = Layout(Path(args.destdir or "/"), args.prefix.rstrip("/"),
                    args.sysconfdir.rstrip("/"), args.python)  # fmt: skip
    chosen = COMPONENTS if args.component == "all" else GROUPS.get(args.component,
                                                                   (args.component,))  # fmt: skip
    for component in chosen:
        for path in install(component, layout):
            print(f"{component}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
