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

from broker.config import Config, Paths
from broker.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    BrokerError,
    LimitExceeded,
    NotFound,
    NothingToDo,
    VerificationError,
    exit_code_for,
)
from broker.manager import Manager
from broker.metadata import Release
from broker.qrexec import transport_from_env
from broker.routing import QubeDevice
from broker.sanitize import printable
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
        "ManagerstreamId": r.component_id,
        "RemoteId": r.remote_id,
        "Uri": r.url,
        "Checksum": r.sha256,
        "Size": r.size,
        "Urgency": r.urgency,
        "Summary": r.summary,
    }


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


def cmd_update(app: Manager, args: argparse.Namespace) -> int:
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
            try:
                answer = input(f"Update {desc}? [y/N] ")
            except EOFError:  # Ctrl-D: no
                answer = ""
                print()
            if answer.strip().lower() not in ("y", "yes"):
                print("skipped")
                continue
        if release.size > app.limits.cab_max_bytes:
            raise LimitExceeded(
                f"{release.filename} is {release.size} bytes, more than cab_max_bytes"
            )
        if app.cached(release):
            print(f"Using {_p(release.filename)} from dom0's cache")
        else:
            print(f"Downloading {_p(release.filename)} through {app.config.updatevm}…")
            app.download(release)
        print(f"Installing on {qd.qube}…")
        app.install(qd, release)
        installed.add(release.sha256)
        after = app.version_now(qd)
        print(f"Updated {desc}: now {_p(after)}")


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
        epilog="exit codes: 0 done, 1 failure or usage error, 2 nothing to do (or declined), "
        "3 no such device, 130 interrupted",
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
    p.add_argument("device", nargs="?", help="device id (or prefix) or GUID")
    p.set_defaults(func=cmd_update)
    return parser


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
        app = Manager(paths, Config.load(paths), transport_from_env())
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
        if isinstance(e, NothingToDo):
            print(printable(str(e)).capitalize())
        else:
            print(f"qubes-fwupdmgr: {printable(str(e))}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
