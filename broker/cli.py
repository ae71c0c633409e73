"""qubes-fwupdmgr: fwupdmgr's verbs across dom0's and sys-usb's fwupd, fed by the UpdateVM.

Exit codes (as fwupdmgr): 0 done, 1 failure, 2 nothing to do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from broker.cabinet import ExpectedRelease, inspect_cab
from broker.config import Config, Limits, Paths, Remote
from broker.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    BrokerError,
    LimitExceeded,
    NothingToDo,
    TransferError,
    VerificationError,
    exit_code_for,
)
from broker.fwupd import Device, FwupdClient, OfferedRelease
from broker.metadata import MetadataStore, Release, iter_catalogs, staleness
from broker.offers import decide
from broker.qrexec import Transport, call, check, transport_from_env
from broker.routing import DOM0, QubeDevice, route
from broker.sanitize import printable
from broker.session import ExpectedFile, Outcome, Sessions
from broker.signatures import TrustStore, sha256_fd
from broker.transfer import write_all
from broker.updatevm import DownloadRequest, Wanted
from broker.usbvm import UsbvmClient

DOWNLOAD_SERVICE = "qubes.FwupdDownload"


@dataclass
class App:
    paths: Paths
    config: Config
    transport: Transport
    # what went wrong without stopping the command (a qube that failed, a refused offer):
    # one line each on stderr at the end, and exit 1 (see :func:`_finish`)
    problems: list[str] = field(default_factory=list)

    @property
    def limits(self) -> Limits:
        return self.config.limits

    def usbvm(self) -> UsbvmClient | None:
        if not self.config.usbvm:
            return None
        return UsbvmClient(self.transport, self.config.usbvm, self.limits)

    # ------------------------------------------------------------------ UpdateVM round trip
    def fetch(
        self,
        kind: str,
        remote_id: str,
        wanted: list[Wanted],
        release: ExpectedRelease | None = None,
        force: bool = False,
    ) -> Outcome:
        """Ask the UpdateVM for files; return dom0's own verdict on what it pushed."""
        sessions = Sessions(self.paths.sessions_dir)
        expected = tuple(ExpectedFile(w.name, w.max_size, w.sha256, w.size) for w in wanted)
        session = sessions.open(
            kind, remote_id, expected, self.limits.session_seconds, release, force
        )
        try:
            request = DownloadRequest(session.nonce, kind, remote_id, tuple(wanted)).to_json()
            updatevm = self.config.updatevm
            result = call(
                self.transport,
                updatevm,
                DOWNLOAD_SERVICE,
                feed=lambda fd: write_all(fd, request),
                max_stdout=4096,
                timeout=self.limits.transfer_seconds + 60,
            )
            outcome = sessions.outcome(session.nonce)
            if outcome is None:
                check(result, updatevm, DOWNLOAD_SERVICE)
                raise TransferError(f"{updatevm} reported success but pushed nothing to dom0")
            if not outcome.ok:
                raise VerificationError(f"dom0 refused what {updatevm} sent: {outcome.message}")
            return outcome
        finally:
            sessions.close(session.nonce)

    # ------------------------------------------------------------------ views
    def unreachable(self, qube: str, error: BrokerError) -> None:
        cause = str(error).removeprefix(f"{qube}: ")  # qrexec errors name the qube too
        self.problems.append(
            f"{qube}: unreachable: {cause}; only the other qube's devices were handled"
        )

    def devices(self) -> list[QubeDevice]:
        dom0 = FwupdClient().get_devices()
        usbvm = self.usbvm()
        usb: list[Device] = []
        if usbvm:
            # sys-usb must not be able to veto dom0's own updates (ARCHITECTURE.md)
            try:
                usb = usbvm.get_devices()
            except BrokerError as e:
                self.unreachable(usbvm.qube, e)
        return route(dom0, usb, self.config.usbvm)

    def stale(self, remote_id: str) -> str | None:
        store = MetadataStore(self.paths)
        return staleness(
            store.accepted(remote_id), self.config.metadata_max_age_days, datetime.now(UTC)
        )

    def offers(
        self, kind: str, devices: list[QubeDevice]
    ) -> dict[tuple[str, str], list[OfferedRelease]]:
        """What each device's own fwupd offers it, one call per qube. A device its daemon
        refuses to answer for is left out, as fwupdmgr get-updates leaves it out."""
        out: dict[tuple[str, str], list[OfferedRelease]] = {}
        by_qube: dict[str, list[QubeDevice]] = {}
        for qd in devices:
            by_qube.setdefault(qd.qube, []).append(qd)
        for qube, qds in by_qube.items():
            ids = [qd.device.device_id for qd in qds]
            if qube == DOM0:
                found = FwupdClient().offers(kind, ids)
            else:
                usbvm = self.usbvm()
                assert usbvm is not None  # noqa: S101  routing only names the usbvm when set
                try:
                    found = usbvm.offers(kind, ids)
                except BrokerError as e:
                    self.unreachable(qube, e)
                    continue
            for qd in qds:
                offered = found.get(qd.device.device_id, [])
                if not isinstance(offered, str):
                    out[qd.key] = offered
        return out

    def updates(self, devices: list[QubeDevice]) -> list[tuple[QubeDevice, list[Release]]]:
        """Per device, the upgrades its owner offers that dom0's catalog binds; each
        offer refused becomes a problem line."""
        asked = [qd for qd in devices if qd.device.has_updates_to_ask_for]
        catalogs = list(iter_catalogs(MetadataStore(self.paths), self.config.remotes, self.limits))
        decided = decide(catalogs, asked, self.offers("upgrades", asked))
        self.problems += [str(r) for r in decided.refused]
        found = [(qd, decided.releases[qd.key]) for qd in asked if qd.key in decided.releases]
        return found


def _p(text: str) -> str:
    return printable(text, 200)


# ---------------------------------------------------------------------- commands
def cmd_refresh(app: App, args: argparse.Namespace) -> int:
    any_new = False
    for remote in app.config.remotes:
        outcome = app.fetch(
            "metadata",
            remote.id,
            [
                Wanted(remote.metadata_name, remote.metadata_url, app.limits.metadata_max_bytes),
                Wanted(
                    remote.signature_name,
                    f"{remote.metadata_url}.{remote.signature}",
                    app.limits.jcat_max_bytes,
                ),
            ],
            force=args.force,
        )
        print(f"{remote.id}: {_p(outcome.message)}")
        if reason := app.stale(remote.id):
            print(
                f"{remote.id}: warning: {reason}; unattended updates are blocked", file=sys.stderr
            )
        any_new |= not outcome.nothing_new
        any_new |= _load_into_daemons(app, remote)
    return _finish(app, EXIT_OK if any_new else NothingToDo.exit_code)


def _load_into_daemons(app: App, remote: Remote) -> bool:
    opened = MetadataStore(app.paths).open_current(remote)
    if opened is None:
        return False
    data_fd, jcat_fd = opened
    try:
        loaded = FwupdClient().update_metadata(remote.id, data_fd, jcat_fd)
        print(f"{remote.id}: dom0 fwupd {'loaded' if loaded else 'already had'} the metadata")
        usbvm = app.usbvm()
        if usbvm:
            try:
                usb_loaded = usbvm.refresh(remote, data_fd, jcat_fd)
            except BrokerError as e:
                app.unreachable(usbvm.qube, e)
                return loaded
            loaded |= usb_loaded
            state = "loaded" if usb_loaded else "already had"
            print(f"{remote.id}: {usbvm.qube} fwupd {state} the metadata")
        return loaded
    finally:
        os.close(data_fd)
        os.close(jcat_fd)


def cmd_get_devices(app: App, args: argparse.Namespace) -> int:
    devices = app.devices()
    if args.json:
        print(json.dumps({"Devices": [{"Qube": d.qube, **d.device.to_json()} for d in devices]}))
        return _finish(app, EXIT_OK)
    for qd in devices:
        d = qd.device
        print(f"{_p(d.name)}  [{qd.qube}]")
        print(f"  DeviceId: {d.device_id}")
        print(f"  Version:  {_p(d.version)}")
        print(f"  Vendor:   {_p(d.vendor)} ({_p(','.join(d.vendor_ids))})")
        print(f"  GUIDs:    {', '.join(d.guids)}")
    return _finish(app, EXIT_OK)


def _release_json(r: Release) -> dict[str, Any]:
    return {
        "Version": r.version,
        "AppstreamId": r.component_id,
        "RemoteId": r.remote_id,
        "Uri": r.url,
        "Checksum": r.sha256,
        "Size": r.size,
        "Urgency": r.urgency,
        "Summary": r.summary,
    }


_MAX_PROBLEM_LINES = 20


def _finish(app: App, code: int) -> int:
    """The command's exit code, after one line per problem (a hostile qube could cause
    thousands: the first ones are shown, then a count)."""
    for line in app.problems[:_MAX_PROBLEM_LINES]:
        print(f"qubes-fwupdmgr: {printable(line, 400)}", file=sys.stderr)
    if len(app.problems) > _MAX_PROBLEM_LINES:
        more = len(app.problems) - _MAX_PROBLEM_LINES
        print(f"qubes-fwupdmgr: … and {more} more problems like these", file=sys.stderr)
    return EXIT_FAILURE if app.problems else code


def cmd_get_updates(app: App, args: argparse.Namespace) -> int:
    found = app.updates(app.devices())
    if args.json:
        doc = {
            "Devices": [
                {"Qube": qd.qube, **qd.device.to_json(), "Releases": [_release_json(r) for r in rs]}
                for qd, rs in found
            ]
        }
        print(json.dumps(doc))
    else:
        for qd, rs in found:
            print(f"{_p(qd.device.name)} [{qd.qube}] {_p(qd.device.version)}")
            for r in rs:
                print(
                    f"  -> {_p(r.version)} ({_p(r.urgency) or 'unknown urgency'}) {_p(r.summary)}"
                )
        if not found:
            print("No updates available")
    return _finish(app, EXIT_OK if found else NothingToDo.exit_code)


def _matches(qd: QubeDevice, selector: str) -> bool:
    s = selector.lower()
    d = qd.device
    return d.device_id.startswith(s) or s in (g.lower() for g in d.guids)


def cmd_update(app: App, args: argparse.Namespace) -> int:
    found = app.updates(app.devices())
    if args.device:
        found = [(qd, rs) for qd, rs in found if _matches(qd, args.device)]
    if not found:
        if app.problems:
            return _finish(app, EXIT_FAILURE)
        raise NothingToDo("no updates available" + (f" for {args.device}" if args.device else ""))
    limit = app.config.update_max_devices
    if not args.device and len(found) > limit:
        print(
            f"qubes-fwupdmgr: {len(found) - limit} more devices have updates; one run updates "
            f"at most update_max_devices={limit} unless a device is named: run again",
            file=sys.stderr,
        )
        found = found[:limit]
    installed: set[str] = set()
    try:
        _update_each(app, args, found, installed)
    finally:
        # installed: no longer worth their room in dom0's cache
        for sha256 in installed:
            (app.paths.cabs_dir / f"{sha256}.cab").unlink(missing_ok=True)
    return _finish(app, EXIT_OK)


def _update_each(
    app: App,
    args: argparse.Namespace,
    found: list[tuple[QubeDevice, list[Release]]],
    installed: set[str],
) -> None:
    for qd, releases in found:
        # the owner offered these newest first, by its version rules: take its first
        release = releases[0]
        desc = f"{_p(qd.device.name)} [{qd.qube}] {_p(qd.device.version)} -> {_p(release.version)}"
        if reason := app.stale(release.remote_id):
            if args.assume_yes:
                raise VerificationError(
                    f"{release.remote_id}: {reason}; refusing an unattended update "
                    "(refresh first, or run without -y to decide)"
                )
            print(f"warning: {release.remote_id}: {reason}", file=sys.stderr)
        if not args.assume_yes:
            if not sys.stdin.isatty():
                raise BrokerError("not a terminal: pass -y to update without asking")
            if input(f"Update {desc}? [y/N] ").strip().lower() not in ("y", "yes"):
                print("skipped")
                continue
        if release.size > app.limits.cab_max_bytes:
            raise LimitExceeded(
                f"{release.filename} is {release.size} bytes, more than cab_max_bytes"
            )
        if _cached(app, release):
            print(f"Using {_p(release.filename)} from dom0's cache")
        else:
            print(f"Downloading {_p(release.filename)} through {app.config.updatevm}…")
            app.fetch(
                "cab",
                release.remote_id,
                [Wanted(release.filename, release.url, release.size, release.sha256, release.size)],
                expected_release(release),
            )
        _install(app, qd, release)
        installed.add(release.sha256)
        after = _version_now(app, qd)
        print(f"Updated {desc}: now {_p(after)}")


def _cached(app: App, release: Release) -> bool:
    """dom0's cache already holds this cab (its name is the sha256 dom0 verified when it
    stored it): checked again against this release before it counts as fetched."""
    cab = app.paths.cabs_dir / f"{release.sha256}.cab"
    try:
        fd = os.open(cab, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if sha256_fd(fd)[0] != release.sha256:
            return False
        inspect_cab(
            fd,
            expected_release(release),
            TrustStore.from_dirs(app.paths.pki_firmware_dirs),
            app.limits,
            app.paths.untrusted_dir,
            app.config.trust,
        )
        return True
    except BrokerError:
        return False
    finally:
        os.close(fd)


def expected_release(release: Release) -> ExpectedRelease:
    return ExpectedRelease(
        release.component_id, release.version, tuple(g.lower() for g in release.guids)
    )


def _install(app: App, qd: QubeDevice, release: Release) -> None:
    cab = app.paths.cabs_dir / f"{release.sha256}.cab"
    fd = os.open(cab, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        # the fd we hash is the fd we hand over: nothing can be swapped in between
        if sha256_fd(fd)[0] != release.sha256:
            raise VerificationError(f"{cab.name}: cached cab no longer matches its sha256")
        print(f"Installing on {qd.qube}…")
        if qd.qube == DOM0:
            FwupdClient().install(qd.device.device_id, fd, release.filename)
        else:
            usbvm = app.usbvm()
            assert usbvm is not None  # noqa: S101  routing only names the usbvm when configured
            usbvm.install(qd.device.device_id, fd, release, expected_release(release))
    finally:
        os.close(fd)


def _version_now(app: App, qd: QubeDevice) -> str:
    for d in app.devices():
        if d.key == qd.key:
            return d.device.version
    return "unknown"


# ---------------------------------------------------------------------- entry
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qubes-fwupdmgr", description="Firmware updates for Qubes OS (dom0 and sys-usb)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("refresh", help="fetch metadata through the UpdateVM and load it")
    p.add_argument(
        "--force",
        action="store_true",
        help="recover from accepted metadata whose signing time lies in the future: compare "
        "with the signing time accepted before it (older metadata is still refused)",
    )
    p.set_defaults(func=cmd_refresh)
    p = sub.add_parser("get-devices", help="devices of dom0 and sys-usb")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_get_devices)
    p = sub.add_parser("get-updates", help="available updates per device")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_get_updates)
    p = sub.add_parser("update", help="update one device or all")
    p.add_argument("device", nargs="?", help="device id (or prefix) or GUID")
    p.add_argument("-y", "--assume-yes", action="store_true")
    p.set_defaults(func=cmd_update)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    from broker.sandbox.launcher import QUBE_ENV, Sandbox  # the seam: only read at entry

    sandbox = Sandbox.from_env()
    if sandbox is not None and not os.environ.get(QUBE_ENV):
        # acting as dom0 of a sandbox: start ourselves in its dom0, as the launcher does
        from broker.sandbox.launcher import Launcher

        return Launcher(sandbox).run("dom0", [sys.executable, "-m", "broker.cli", *args_list])
    args = build_parser().parse_args(args_list)
    paths = Paths.from_env()
    app: App | None = None
    try:
        app = App(paths, Config.load(paths), transport_from_env())
        code: int = args.func(app, args)
        return code
    except BrokerError as e:
        if args.verbose:
            traceback.print_exc()
        # what went wrong before the error still deserves its line
        code = _finish(app, exit_code_for(e)) if app else exit_code_for(e)
        if isinstance(e, NothingToDo):
            print(printable(str(e)).capitalize())
        else:
            print(f"qubes-fwupdmgr: {printable(str(e))}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
