"""qubes-fwupd-sandbox: a local Qubes stand-in on real parts.

up      --dir DIR     PKI, qube trees, LVFS mirror (on sys-firewall's and sys-whonix's
                      networks), two fwupd daemons, qrexec daemon
status  --dir DIR     recorded processes and whether they are alive
publish --dir DIR [--generated N] [CAB...]   add cabs to the mirror (and N LVFS-shaped
                      components) and re-sign its metadata
down    --dir DIR     stop exactly what `up` started
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from broker.sandbox import daemons, lvfs, mirror
from broker.sandbox.launcher import (
    FWUPD_QUBES,
    QUBES,
    SERVICES,
    TOR_GATEWAY,
    UPDATEVM,
    USBVM,
    Launcher,
    Sandbox,
)
from broker.sandbox.pki import certificate_sha256, create_pki
from broker.sandbox.processes import ProcessTable
from broker.sandbox.qrexec_client import install_clients

REPO = Path(__file__).resolve().parents[2]
FWUPD_TESTS = Path("/usr/share/installed-tests/fwupd")
DEFAULT_CABS = (FWUPD_TESTS / "fakedevice123.cab", FWUPD_TESTS / "fakedevice124.cab")
MAX_DIR_CHARS = 40  # unix socket paths under DIR/vm/<qube>/run/... must stay < 107 bytes
# the same LVFS on sys-whonix's network, as through Tor
TOR_MIRROR_ROLE = "tor-mirror"


class SandboxError(Exception):
    pass


def _clean_env() -> dict[str, str]:
    return {"PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8"}  # fmt: skip


def _port(sandbox: Sandbox) -> int:
    return int((sandbox.dir / "lvfs.port").read_text())


def tor_port_file(sandbox: Sandbox) -> Path:
    return sandbox.dir / "lvfs-whonix.port"


def base_url(sandbox: Sandbox) -> str:
    return f"http://127.0.0.1:{_port(sandbox)}"


def write_qube_config(sandbox: Sandbox, qube: str) -> None:
    pki = create_pki(sandbox.pki_dir)
    conf = sandbox.root(qube) / "etc/qubes-fwupd/qubes-fwupd.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        "[qubes-fwupd]\n"
        f"updatevm = {UPDATEVM}\n"
        f"usbvm = {USBVM}\n\n"
        f"[remote {daemons.REMOTE_ID}]\n"
        f"metadata_url = {base_url(sandbox)}/firmware.xml.zst\n"
        # as fwupd's FirmwareBaseURI: the catalog's https locations, rebased on the mirror
        f"firmware_base_uri = {base_url(sandbox)}\n"
        # the mirror serves plain http on the UpdateVM's 127.0.0.1: opted out by name
        "allow_plain_http = yes\n"
        # the sandbox LVFS's own metadata signers: its certificate and its GPG key
        "metadata_signers =\n"
        f"    {certificate_sha256(pki.signer_pem)}\n"
        f"    {pki.gpg_fingerprint}\n"
        # its firmware: the real LVFS's anchors (fwupd-tests' cabs) and the sandbox LVFS's
        f"payload_anchors = lvfs {daemons.CA_NAME} {daemons.PQ_CA_NAME} {daemons.GPG_KEY_NAME}\n"
    )


def install_services(sandbox: Sandbox, qube: str) -> None:
    """The same entry points as in Qubes (qrexec/), linked into the qube's qubes-rpc dir."""
    rpc = sandbox.rpc_dir(qube)
    rpc.mkdir(parents=True, exist_ok=True)
    for service in SERVICES[qube]:
        link = rpc / service
        link.unlink(missing_ok=True)
        link.symlink_to(REPO / "qrexec" / service)


def _start_mirror(
    sandbox: Sandbox,
    launcher: Launcher,
    qube: str,
    role: str,
    port_file: Path,
    log_name: str,
    port: int = 0,
) -> subprocess.Popen[bytes]:
    """An LVFS mirror serving DIR/lvfs on the qube's 127.0.0.1 (0: any free port),
    recorded under role; its port goes to port_file once bound."""
    port_file.unlink(missing_ok=True)
    with (sandbox.log_dir / log_name).open("ab") as log:
        proc = launcher.popen_on_network_of(
            qube,
            [sys.executable, "-m", "broker.sandbox.mirror", "--root", str(sandbox.lvfs_dir),
             "--port-file", str(port_file), "--port", str(port)],
            env=_clean_env(), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    # under no qube: it shares the qube's network, not its files, and `down` finds a
    # qube's namespaces through the processes recorded under it
    launcher.table.record(role, "-", proc.pid)
    return proc


def up(sandbox: Sandbox) -> None:
    if len(str(sandbox.dir)) > MAX_DIR_CHARS:
        raise SandboxError(f"--dir must be at most {MAX_DIR_CHARS} characters (socket paths)")
    t0 = time.monotonic()
    table = ProcessTable(sandbox.pids_file)
    sandbox.log_dir.mkdir(parents=True, exist_ok=True)
    pki = create_pki(sandbox.pki_dir)
    sandbox.policy_dir.mkdir(parents=True, exist_ok=True)
    for policy in sorted((REPO / "policies").glob("*.policy")):
        shutil.copy(policy, sandbox.policy_dir / policy.name)

    launcher = Launcher(sandbox)
    isolation = launcher.create_qubes()

    # the LVFS and its CDN: outside every qube's files, but on the UpdateVM's 127.0.0.1
    # (the host's, when isolation is off)
    sandbox.lvfs_dir.mkdir(parents=True, exist_ok=True)
    port_file = sandbox.dir / "lvfs.port"
    proc = _start_mirror(sandbox, launcher, UPDATEVM, "mirror", port_file, "mirror.log")
    port = mirror.wait_for_port(port_file, 10.0, proc)
    # and on sys-whonix's, at the same URL, as the real LVFS is reached through Tor (with
    # isolation off, every qube shares the host's network and the one mirror serves all)
    tor = None
    if isolation.on:
        tor = _start_mirror(sandbox, launcher, TOR_GATEWAY, TOR_MIRROR_ROLE,
                            tor_port_file(sandbox), "mirror-whonix.log", port)  # fmt: skip
    lvfs.publish(sandbox.lvfs_dir, [c for c in DEFAULT_CABS if c.exists()], pki)
    if tor is not None:
        mirror.wait_for_port(tor_port_file(sandbox), 10.0, tor)

    for qube in QUBES:
        daemons.install_trust_store(sandbox.root(qube), pki)
        write_qube_config(sandbox, qube)
        install_services(sandbox, qube)
        install_clients(sandbox.root(qube), qube)
    # as the package's tmpfiles snippet makes them at boot, in the group of ours
    launcher.paths("dom0").make_dom0_dirs()
    for qube in FWUPD_QUBES:
        daemons.write_fwupd_tree(sandbox, qube)
        daemons.start_fwupd(sandbox, launcher, table, qube)

    ready = sandbox.dir / "qrexecd.ready"
    ready.unlink(missing_ok=True)
    with (sandbox.log_dir / "qrexecd.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.sandbox.qrexecd", "--dir", str(sandbox.dir)],
            env=_clean_env(), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    table.record("qrexecd", "-", proc.pid)
    deadline = time.monotonic() + 10
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SandboxError(f"qrexec daemon did not start; see {sandbox.log_dir}/qrexecd.log")
        time.sleep(0.05)
    print(f"sandbox up in {time.monotonic() - t0:.1f} s: {sandbox.dir}")
    where = f"{UPDATEVM}'s network" if isolation.on else "the host's network"
    print(f"  LVFS mirror  {base_url(sandbox)}/  (in {where}, serving {sandbox.lvfs_dir})")
    if isolation.on:
        print(f"  LVFS mirror  the same, in {TOR_GATEWAY}'s network (the LVFS through Tor)")
    for qube in QUBES:
        extra = " fwupd" if qube in FWUPD_QUBES else ""
        print(f"  qube {qube:<13} {sandbox.root(qube)}{extra}")
    if isolation.on:
        print(f"  isolation: {isolation}: each qube in its own network and mount namespaces")
    else:
        print(f"  isolation: {isolation}: qubes share the host's network and files")
    print(f"  dom0's qrexec services run as {launcher.service_user()}")
    print(f"use: QUBES_FWUPD_SANDBOX={sandbox.dir} qubes-fwupdmgr refresh")


def status(sandbox: Sandbox) -> int:
    table = ProcessTable(sandbox.pids_file)
    entries = table.entries()
    if not entries:
        print(f"no sandbox processes recorded in {sandbox.dir}")
        return 1
    dead = 0
    for e in entries:
        alive = table.alive(e)
        dead += not alive
        print(f"  {e.role:<10} {e.qube:<13} pid {e.pid:<8} {'running' if alive else 'DEAD'}")
    print(f"isolation: {Launcher(sandbox).isolation()}")
    print(f"dom0's qrexec services run as {Launcher(sandbox).service_user()}")
    return 1 if dead else 0


def down(sandbox: Sandbox) -> None:
    table = ProcessTable(sandbox.pids_file)
    for qube in FWUPD_QUBES:
        daemons.stop_gpg_agents(sandbox, table, qube)
    for line in Launcher(sandbox).stop_all():
        print(line)
    for qube in QUBES:
        sandbox.qrexec_socket(qube).unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qubes-fwupd-sandbox",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "status", "down", "publish"):
        p = sub.add_parser(name)
        p.add_argument("--dir", type=Path, default=os.environ.get("QUBES_FWUPD_SANDBOX"))
        if name == "publish":
            p.add_argument("cabs", nargs="*", type=Path)
            p.add_argument(
                "--generated",
                type=int,
                default=0,
                metavar="N",
                help="also N LVFS-shaped components (4400: the LVFS's size today)",
            )
            # an organisation's own remote: its cabs, catalog and jcat, signed by its own
            # certificate, into a dir it serves from any HTTP server or CDN
            p.add_argument("--out", type=Path, metavar="DIR",
                           help="publish an organisation's own remote into DIR (no sandbox)")
            p.add_argument("--signer-cert", type=Path, metavar="PEM")
            p.add_argument("--signer-key", type=Path, metavar="KEY")
            p.add_argument("--location-base", metavar="URL",
                           help="where DIR is served: each cab's location is URL/NAME")
    args = parser.parse_args(argv)
    if args.command == "publish" and args.out is not None:
        if not (args.signer_cert and args.signer_key and args.location_base):
            parser.error("--out needs --signer-cert, --signer-key and --location-base")
        try:
            for path in lvfs.publish_own(args.out, args.cabs, args.signer_cert,
                                         args.signer_key, args.location_base):  # fmt: skip
                print(f"published {path}")
        except (OSError, ValueError, subprocess.CalledProcessError) as e:
            print(f"qubes-fwupd-sandbox: {e}", file=sys.stderr)
            return 1
        return 0
    if args.dir is None:
        parser.error("--dir is required (or set QUBES_FWUPD_SANDBOX)")
    sandbox = Sandbox(Path(args.dir).resolve())
    try:
        if args.command == "up":
            sandbox.dir.mkdir(parents=True, exist_ok=True)
            table = ProcessTable(sandbox.pids_file)
            if any(table.alive(e) for e in table.entries()):
                raise SandboxError(f"a sandbox is already running in {sandbox.dir}; run down first")
            try:
                up(sandbox)
            except BaseException:
                down(sandbox)  # a half-started sandbox leaves nothing running
                raise
        elif args.command == "status":
            return status(sandbox)
        elif args.command == "down":
            down(sandbox)
        elif args.command == "publish":
            pki = create_pki(sandbox.pki_dir)
            for path in lvfs.publish(sandbox.lvfs_dir, args.cabs, pki, generated=args.generated):
                print(f"published {path}")
    except (SandboxError, OSError, subprocess.CalledProcessError) as e:
        print(f"qubes-fwupd-sandbox: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
