"""qubes-fwupdmgr: fwupdmgr's verbs across dom0's and sys-usb's fwupd, fed by the UpdateVM.

Exit codes (as fwupdmgr): 0 done, 1 failure (usage errors too), 2 nothing to do (or the
update was declined), 3 no such device, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from broker import fwupd_json, versions
from broker.config import Config, Paths
from broker.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_MEANINGS,
    EXIT_OK,
    BrokerError,
    DaemonError,
    FormatError,
    LimitExceeded,
    NotFound,
    NothingToDo,
    QrexecError,
    TransferError,
    VerificationError,
    exit_code_for,
)
from broker.fwupd_json import ERROR_CODES, error_json
from broker.manager import Manager
from broker.metadata import Release
from broker.qrexec import transport_from_env
from broker.routing import DOM0, QubeDevice
from broker.sanitize import printable, printable_tree
from broker.updatevm import Wanted


def _p(text: str) -> str:
    return printable(text, 200)


# ---------------------------------------------------------------------- commands
def cmd_refresh(app: Manager, args: argparse.Namespace) -> int:
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
        for qube, loaded in app.load_into_daemons(remote):
            state = "loaded" if loaded else "already had"
            print(f"{remote.id}: {qube} fwupd {state} the metadata")
            any_new |= loaded
    return _finish(app, EXIT_OK if any_new else NothingToDo.exit_code)


def cmd_get_devices(app: Manager, args: argparse.Namespace) -> int:
    devices = app.devices()
    if args.json:
        # as fwupdmgr, each device with its releases (those dom0's catalog binds, too)
        nested = app.all_releases(devices) if app.catalogs_held() else {}
        doc = [_device_out(app, qd, nested.get(qd.key, [])) for qd in devices]
        print(json.dumps({"Devices": doc}))
        return _finish(app, EXIT_OK)
    for qd in devices:
        d = qd.device
        print(f"{_p(d.name)}  [{qd.qube}]")
        print(f"  DeviceId: {d.device_id}")
        print(f"  Version:  {_p(d.version)}")
        print(f"  Vendor:   {_p(d.vendor)} ({_p(','.join(d.vendor_ids))})")
        print(f"  GUIDs:    {', '.join(d.guids)}")
    return _finish(app, EXIT_OK)


def _release_dbus(app: Manager, qd: QubeDevice, r: Release) -> dict[str, Any]:
    """A kept release as an a{sv} for broker.fwupd_json: the daemon's own offer, with what
    dom0 matched and fetches (id, version, remote, URL, checksums) put in from dom0's
    verified catalog over whatever the daemon said. "Size" stays the daemon's: fwupd
    prints the installed size there, not the download size dom0 checks."""
    offer = app.answered.get((qd.key, r.sha256))
    raw = {k: v for k, v in (offer.raw if offer else {}).items() if k != "Uri"}
    # metadata entries become members; one that would replace a typed member is dropped
    # (fwupdmgr would print a string there; a script and the schema expect the type)
    raw["Metadata"] = _string_metadata(raw.get("Metadata"))
    if isinstance(raw.get("Reports"), list):
        raw["Reports"] = [
            {**rep, "Metadata": _string_metadata(rep.get("Metadata"))}
            for rep in raw["Reports"]
            if isinstance(rep, dict)
        ]
    raw.update(
        AppstreamId=r.component_id,
        Version=r.version,
        RemoteId=r.remote_id,
        Locations=[r.url],
        Checksum=",".join(offer.checksums if offer else (r.sha256,)),
    )
    return raw


# members fwupd_json prints for a release or report whose type is not a string
_TYPED_MEMBERS = frozenset(
    ("Size", "Created", "InstallDuration", "Flags", "Categories", "Issues", "Checksum",
     "Tags", "Locations", "Reports", "VendorId")
)  # fmt: skip


def _string_metadata(metadata: object) -> dict[str, Any]:
    if not isinstance(metadata, dict):
        return {}
    return {k: v for k, v in metadata.items() if k not in _TYPED_MEMBERS}


def _device_out(app: Manager, qd: QubeDevice, releases: list[Release]) -> dict[str, Any]:
    """One device as fwupdmgr --json prints it, plus "Qube"; from sys-usb, every string
    in it made printable (a script reads it as a person would)."""
    out = fwupd_json.device_json(
        qd.device.dbus_form(), releases=[_release_dbus(app, qd, r) for r in releases],
        qube=qd.qube,
    )  # fmt: skip
    return out if qd.qube == DOM0 else printable_tree(out)


def _releases_out(app: Manager, qd: QubeDevice, releases: list[Release]) -> list[Any]:
    out = [fwupd_json.release_json(_release_dbus(app, qd, r)) for r in releases]
    return out if qd.qube == DOM0 else printable_tree(out)


_MAX_PROBLEM_LINES = 20


def _finish(app: Manager, code: int) -> int:
    """The command's exit code, after one line per problem (a hostile qube could cause
    thousands: the first ones are shown, then a count)."""
    for line in app.problems[:_MAX_PROBLEM_LINES]:
        print(f"qubes-fwupdmgr: {printable(line, 400)}", file=sys.stderr)
    if len(app.problems) > _MAX_PROBLEM_LINES:
        more = len(app.problems) - _MAX_PROBLEM_LINES
        print(f"qubes-fwupdmgr: … and {more} more problems like these", file=sys.stderr)
    return EXIT_FAILURE if app.problems else code


def cmd_get_updates(app: Manager, args: argparse.Namespace) -> int:
    app.catalogs()  # before the daemons are asked: without metadata, say so
    found = app.updates(app.devices())
    if args.json:
        print(json.dumps({"Devices": [_device_out(app, qd, rs) for qd, rs in found]}))
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


def cmd_update(app: Manager, args: argparse.Namespace) -> int:
    app.catalogs()
    devices = app.devices()
    if args.device and not any(_matches(qd, args.device) for qd in devices):
        raise NotFound(f"no device matches {printable(args.device, 80)!r} (see get-devices)")
    found = app.updates(devices)
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
        for sha256 in installed:
            app.forget_cab(sha256)
    # every update declined: nothing done, as fwupdmgr says it
    return _finish(app, EXIT_OK if installed else NothingToDo.exit_code)


def _update_each(
    app: Manager,
    args: argparse.Namespace,
    found: list[tuple[QubeDevice, list[Release]]],
    installed: set[str],
) -> None:
    for qd, releases in found:
        # newest first, by fwupd's version rules: take the first
        if _apply(app, args, qd, releases[0], "Update"):
            installed.add(releases[0].sha256)


def _apply(
    app: Manager,
    args: argparse.Namespace,
    qd: QubeDevice,
    release: Release,
    verb: str,
    allow_older: bool = False,
    allow_reinstall: bool = False,
) -> bool:
    """Confirm (unless -y), fetch or reuse the cab, install it through the device's owner;
    False when the admin declined."""
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
            raise BrokerError(f"not a terminal: pass -y to {verb.lower()} without asking")
        try:
            answer = input(f"{verb} {desc}? [y/N] ")
        except EOFError:  # Ctrl-D: no
            answer = ""
            print()
        if answer.strip().lower() not in ("y", "yes"):
            print("skipped")
            return False
    if release.size > app.limits.cab_max_bytes:
        raise LimitExceeded(f"{release.filename} is {release.size} bytes, more than cab_max_bytes")
    if app.cached(release):
        print(f"Using {_p(release.filename)} from dom0's cache")
    else:
        print(f"Downloading {_p(release.filename)} through {app.config.updatevm}…")
        app.download(release)
    print(f"Installing on {qd.qube}…")
    app.install(qd, release, allow_older=allow_older, allow_reinstall=allow_reinstall)
    after, pending = app.after_install(qd, release)
    if pending is not None:
        # as fwupdmgr: done for now (exit 0), and the text says what waits
        print(f"{verb.rstrip('e')}ed {desc}: pending reboot ({pending.what}); now {_p(after)}")
    else:
        print(f"{verb.rstrip('e')}ed {desc}: now {_p(after)}")
    return True


def _apply_one(
    app: Manager,
    args: argparse.Namespace,
    qd: QubeDevice,
    release: Release,
    verb: str,
    allow_older: bool = False,
    allow_reinstall: bool = False,
) -> int:
    """One device, one release (install, reinstall, downgrade): the exit code."""
    done = _apply(app, args, qd, release, verb, allow_older, allow_reinstall)
    if done:
        app.forget_cab(release.sha256)
    return _finish(app, EXIT_OK if done else NothingToDo.exit_code)


def cmd_check_reboot_needed(app: Manager, args: argparse.Namespace) -> int:
    pending = app.pending_reboots()
    if args.json:
        print(json.dumps({"Pending": [
            {"Qube": p.qube, "DeviceId": p.device_id, "Name": p.name, "Version": p.version,
             "Since": p.since, "Action": p.what} for p in pending]}))  # fmt: skip
    for p in [] if args.json else pending:
        waits = f" {_p(p.version)}" if p.version else ""
        print(f"{_p(p.name)} [{p.qube}]{waits} waits: {p.what}")
    if not pending and not args.json:
        print("No reboot is needed")
    return _finish(app, EXIT_OK if pending else NothingToDo.exit_code)


def _device(app: Manager, selector: str) -> QubeDevice:
    """The one device a selector names: a device id or an unambiguous prefix of one, or a
    GUID, in any case; ``QUBE:`` in front limits it to that qube's devices."""
    devices = app.devices()
    qube, sep, rest = selector.partition(":")
    if sep and qube in {DOM0, app.config.usbvm}:
        devices, selector = [qd for qd in devices if qd.qube == qube], rest
    found = [qd for qd in devices if selector and _matches(qd, selector)]
    if not found:
        raise NotFound(f"no device matches {printable(selector, 80)!r} (see get-devices)")
    if len(found) > 1:
        raise BrokerError(
            f"{printable(selector, 80)!r} matches {len(found)} devices: give more of the id, "
            "or QUBE:ID"
        )
    return found[0]


def cmd_get_releases(app: Manager, args: argparse.Namespace) -> int:
    qd = _device(app, args.device)
    rs = app.releases(qd, "releases")
    if args.json:
        print(json.dumps({"Releases": _releases_out(app, qd, rs)}))
    else:
        print(f"{_p(qd.device.name)} [{qd.qube}] {_p(qd.device.version)}")
        for r in rs:
            print(f"  {_p(r.version)} ({_p(r.urgency) or 'unknown urgency'}) {_p(r.summary)}")
        if not rs:
            print("No releases available")
    return _finish(app, EXIT_OK if rs else NothingToDo.exit_code)


def _one_release(app: Manager, qd: QubeDevice, version: str) -> Release:
    for r in app.releases(qd, "releases"):
        fmt = versions.version_format(r.version_format)
        if versions.compare(r.version, version, fmt) == 0:
            return r
    raise NotFound(
        f"{_p(qd.device.name)} [{qd.qube}]: no release {printable(version, 64)} that its fwupd "
        "offers and dom0's catalog holds (see get-releases)"
    )


def cmd_install(app: Manager, args: argparse.Namespace) -> int:
    """A chosen version: older ones with allow-older, the same with allow-reinstall, as
    fwupdmgr install DEVICE VERSION."""
    qd = _device(app, args.device)
    release = _one_release(app, qd, args.version)
    order = versions.compare(
        release.version, qd.device.version, versions.version_format(release.version_format)
    )
    return _apply_one(
        app, args, qd, release, "Install", allow_older=order < 0, allow_reinstall=order == 0
    )


def cmd_reinstall(app: Manager, args: argparse.Namespace) -> int:
    qd = _device(app, args.device)
    release = _one_release(app, qd, qd.device.version)
    return _apply_one(app, args, qd, release, "Reinstall", allow_reinstall=True)


def cmd_downgrade(app: Manager, args: argparse.Namespace) -> int:
    """The newest release older than the device's version, as its owner offers it."""
    if args.device:
        candidates = [_device(app, args.device)]
    else:
        candidates = [qd for qd in app.devices() if qd.device.has_updates_to_ask_for]
    offered = [(qd, rs) for qd in candidates if (rs := app.releases(qd, "downgrades"))]
    if not offered:
        if app.problems:
            return _finish(app, EXIT_FAILURE)
        raise NothingToDo("no downgrades available")
    if len(offered) > 1:
        names = ", ".join(f"{qd.qube}:{qd.device.device_id[:12]}" for qd, _ in offered)
        raise BrokerError(f"several devices can be downgraded ({names}): name one")
    qd, rs = offered[0]
    return _apply_one(app, args, qd, rs[0], "Downgrade", allow_older=True)


def cmd_clean(app: Manager, args: argparse.Namespace) -> int:
    """Empty dom0's cab cache, leftovers in its untrusted dir and sessions no run holds.
    Verified metadata stays: it is what the daemons hold, and rollback needs its state."""
    removed = app.clean()
    for line in removed:
        print(f"removed {_p(line)}")
    if not removed:
        print("Nothing to clean")
    return _finish(app, EXIT_OK if removed else NothingToDo.exit_code)


# ---------------------------------------------------------------------- entry
class _Parser(argparse.ArgumentParser):
    """A usage error is one line and exit 1 (argparse's own 2 means "nothing to do" here)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE)


def _global_flags(defaults: bool) -> _Parser:
    """Flags accepted anywhere on the line, before or after the verb, as fwupdmgr does.
    Only the top-level parser sets their defaults: a verb's copy must not reset what was
    given before it."""
    flags = _Parser(add_help=False)

    def value(default: object) -> object:
        return default if defaults else argparse.SUPPRESS

    flags.add_argument(
        "--json",
        action="store_true",
        default=value(False),
        help="machine-readable output on stdout",
    )
    flags.add_argument(
        "-y",
        "--assume-yes",
        action="store_true",
        default=value(False),
        help="answer yes to every question",
    )
    flags.add_argument("-v", "--verbose", action="store_true", default=value(False),
                       help="tracebacks on errors")  # fmt: skip
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qubes-fwupdmgr",
        description="Firmware updates for Qubes OS (dom0 and sys-usb)",
        epilog="exit codes: " + "; ".join(f"{code} {what}" for code, what in EXIT_MEANINGS),
        parents=[_global_flags(defaults=True)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    verb_flags = _global_flags(defaults=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser(
        "refresh", help="fetch metadata through the UpdateVM and load it", parents=[verb_flags]
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="recover from accepted metadata whose signing time lies in the future: compare "
        "with the signing time accepted before it (older metadata is still refused)",
    )
    p.set_defaults(func=cmd_refresh)
    p = sub.add_parser("get-devices", help="devices of dom0 and sys-usb", parents=[verb_flags])
    p.set_defaults(func=cmd_get_devices)
    p = sub.add_parser("get-updates", help="available updates per device", parents=[verb_flags])
    p.set_defaults(func=cmd_get_updates)
    p = sub.add_parser("update", help="update one device or all", parents=[verb_flags])
    p.add_argument("device", nargs="?", help=_DEVICE_HELP)
    p.set_defaults(func=cmd_update)
    p = sub.add_parser(
        "get-releases", help="releases a device may take (its fwupd's word, dom0's catalog)",
        parents=[verb_flags],
    )  # fmt: skip
    p.add_argument("device", help=_DEVICE_HELP)
    p.set_defaults(func=cmd_get_releases)
    p = sub.add_parser("install", help="install a chosen version", parents=[verb_flags])
    p.add_argument("device", help=_DEVICE_HELP)
    p.add_argument("version")
    p.set_defaults(func=cmd_install)
    p = sub.add_parser("reinstall", help="install the current version again",
                       parents=[verb_flags])  # fmt: skip
    p.add_argument("device", help=_DEVICE_HELP)
    p.set_defaults(func=cmd_reinstall)
    p = sub.add_parser(
        "check-reboot-needed", help="installs that wait for a reboot (of the machine or sys-usb)",
        parents=[verb_flags],
    )  # fmt: skip
    p.set_defaults(func=cmd_check_reboot_needed)
    p = sub.add_parser(
        "clean", help="empty dom0's cab cache, untrusted leftovers and stale sessions",
        parents=[verb_flags],
    )  # fmt: skip
    p.set_defaults(func=cmd_clean)
    p = sub.add_parser("downgrade", help="install the newest older version",
                       parents=[verb_flags])  # fmt: skip
    p.add_argument("device", nargs="?", help=_DEVICE_HELP)
    p.set_defaults(func=cmd_downgrade)
    return parser


_DEVICE_HELP = "device id (or an unambiguous prefix) or GUID; QUBE:ID for one qube's"


def _fwupd_error_code(error: BrokerError) -> int:
    """The FwupdError code a script of fwupdmgr's would expect for one of our errors."""
    for kind, name in (
        (NotFound, "NotFound"),
        (NothingToDo, "NothingToDo"),
        (VerificationError, "SignatureInvalid"),
        (LimitExceeded, "InvalidFile"),
        (FormatError, "InvalidData"),
        (TransferError, "NotReachable"),
        (QrexecError, "NotReachable"),
        (DaemonError, "NotSupported"),
    ):
        if isinstance(error, kind):
            return ERROR_CODES[name]
    return ERROR_CODES["Internal"]


def _version() -> str:
    try:
        return importlib.metadata.version("qubes-fwupd-broker")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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
    app: Manager | None = None
    try:
        config = Config.load(paths)
        for warning in config.warnings:
            print(f"qubes-fwupdmgr: warning: {printable(warning, 300)}", file=sys.stderr)
        app = Manager(paths, config, transport_from_env())
        code: int = args.func(app, args)
        return code
    except KeyboardInterrupt:
        print("\nqubes-fwupdmgr: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokerError as e:
        if args.verbose:
            traceback.print_exc()
        # what went wrong before the error still deserves its line
        code = _finish(app, exit_code_for(e)) if app else exit_code_for(e)
        if args.json:
            # as fwupdmgr --json: the failure as JSON on stdout, nothing else there
            message = printable(str(e)).capitalize()
            print(json.dumps(error_json("FwupdError", _fwupd_error_code(e), message)))
        elif isinstance(e, NothingToDo):
            print(printable(str(e)).capitalize())
        else:
            print(f"qubes-fwupdmgr: {printable(str(e))}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
