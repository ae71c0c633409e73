"""qubes-fwupdmgr: fwupdmgr's verbs across dom0's and sys-usb's fwupd, fed by the UpdateVM.

Exit codes (as fwupdmgr): 0 done, 1 failure (usage errors too), 2 nothing to do (or the
update was declined), 3 no such device, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import textwrap
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import broker
from broker import fwupd_json, heads, history, notify, plans, status, versions
from broker.backoff import Backoff
from broker.config import Config, Paths, check_qube_name
from broker.errors import (
    EXIT_CONDITION_BROKEN,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_MEANINGS,
    EXIT_OK,
    EXIT_TERMINATED,
    BrokerError,
    Busy,
    ConfigError,
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
from broker.fwupd import Device
from broker.fwupd_json import ERROR_CODES, error_json
from broker.manager import Manager, Progress
from broker.metadata import Release
from broker.qrexec import FROM_DOM0
from broker.reboots import Pending, what_restarts
from broker.remotes import remote_json
from broker.routing import DOM0, QubeDevice
from broker.runlock import check_inhibit, run_lock
from broker.sanitize import printable, printable_tree
from broker.selection import DeviceFilter, select_all, select_one
from broker.service import log
from broker.session import Wanted, check_source_dir
from broker.transfer import read_small
from broker.unattended import UnattendedPolicy


def _p(text: str) -> str:
    return printable(text, 200)


def _say(args: argparse.Namespace, text: str) -> None:
    """A step, not a result: on stdout for a person, on stderr beside --json (stdout is
    JSON only), nowhere with --quiet."""
    if not args.quiet:
        if _progress is not None:
            _progress.end()
        # flushed: a step is news only while it happens (a pipe would hold it to the end)
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


# ---------------------------------------------------------------------- commands
def cmd_refresh(app: Manager, args: argparse.Namespace) -> int:
    """Refresh, counting failures in a row for the backoff (broker.backoff); an
    unattended refresh waits out the backoff, an admin's never does."""
    backoff, now = Backoff.load(app.paths.refresh_backoff), time.time()
    until = backoff.wait_until()
    if args.unattended and until is not None and now < until:
        when = datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%d %H:%M UTC")
        raise NothingToDo(
            f"backing off: {backoff.failures} refreshes failed in a row (last: "
            f"{backoff.last_error}); the next unattended one after {when}"
        )
    try:
        code = _refresh(app, args)
    except NothingToDo:
        Backoff().save(app.paths.refresh_backoff)
        raise
    except BrokerError as e:
        backoff.failed(now, str(e)).save(app.paths.refresh_backoff)
        raise
    after = backoff.failed(now, "a qube could not be refreshed") if code == EXIT_FAILURE \
        else Backoff()  # fmt: skip
    after.save(app.paths.refresh_backoff)
    return code


def _refresh(app: Manager, args: argparse.Namespace) -> int:
    any_new = False
    if not app.remotes():
        raise NothingToDo("every remote is disabled (see get-remotes, enable-remote)")
    for remote in app.remotes():
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
        _say(args, f"{remote.id}: {_p(outcome.message)}")
        if reason := app.stale(remote.id):
            print(
                f"{remote.id}: warning: {reason}; unattended updates are blocked", file=sys.stderr
            )
        any_new |= not outcome.nothing_new
        for qube, loaded in app.load_into_daemons(remote):
            state = "loaded" if loaded else "already had"
            _say(args, f"{remote.id}: {qube} fwupd {state} the metadata")
            any_new |= loaded
    return _finish(app, EXIT_OK if any_new else NothingToDo.exit_code)


def _devices(app: Manager, args: argparse.Namespace) -> list[QubeDevice]:
    """Every device of both daemons, through --filter."""
    return DeviceFilter.parse(args.filter).apply(app.devices())


def cmd_get_devices(app: Manager, args: argparse.Namespace) -> int:
    devices = _devices(app, args)
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


def _notices(app: Manager) -> None:
    for line in app.notices:
        print(f"qubes-fwupdmgr: warning: {printable(line, 400)}", file=sys.stderr)
    app.notices.clear()  # said once, whichever way the command ends


def _finish(app: Manager, code: int) -> int:
    """The command's exit code, after one line per problem (a hostile qube could cause
    thousands: the first ones are shown, then a count), and each notice (no failure of
    this command: the exit code stays)."""
    _notices(app)
    for line in app.problems[:_MAX_PROBLEM_LINES]:
        print(f"qubes-fwupdmgr: {printable(line, 400)}", file=sys.stderr)
    if len(app.problems) > _MAX_PROBLEM_LINES:
        more = len(app.problems) - _MAX_PROBLEM_LINES
        print(f"qubes-fwupdmgr: … and {more} more problems like these", file=sys.stderr)
    return EXIT_FAILURE if app.problems else code


def cmd_get_updates(app: Manager, args: argparse.Namespace) -> int:
    app.catalogs()  # before the daemons are asked: without metadata, say so
    devices = _devices(app, args)
    if args.device:
        devices = select_all(devices, args.device)
    found = app.updates(devices)
    if args.json:
        # each device's update, as `update` would take it, bound for review (broker.plans)
        by_remote = {c.remote_id: c for c in app.catalogs()}
        plan = [plans.entry_for(qd, rs[0], by_remote[rs[0].remote_id]) for qd, rs in found]
        plan_doc = [e.to_json() for e in plan]
        print(json.dumps({
            "Devices": [_device_out(app, qd, rs) for qd, rs in found],
            "Plan": [d if d["Qube"] == DOM0 else printable_tree(d) for d in plan_doc],
        }))  # fmt: skip
    else:
        for qd, rs in found:
            print(f"{_p(qd.device.name)} [{qd.qube}] {_p(qd.device.version)}")
            for r in rs:
                print(
                    f"  -> {_p(r.version)} ({_p(r.urgency) or 'unknown urgency'}) {_p(r.summary)}"
                )
        if not found:
            print("No updates available")
        # how old the knowledge is that these are all the updates there are
        for remote, signed in _signed(app, found).items() if found else ():
            print(f"{remote} metadata signed {_age(signed)}")
    if args.notify:
        _notify(app, args, found)
    return _finish(app, EXIT_OK if found else NothingToDo.exit_code)


def _signed(app: Manager, found: list[tuple[QubeDevice, list[Release]]]) -> dict[str, str]:
    """When the metadata of each remote with an update here was signed."""
    remotes = {rs[0].remote_id for _, rs in found}
    return {c.remote_id: c.signed_at for c in app.catalogs() if c.remote_id in remotes}


def _age(signed_at: str) -> str:
    age = notify.ago(signed_at, notify.now())
    if age is None:
        return "at an unknown time"
    when = datetime.fromisoformat(signed_at).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{when} ({age})"


def _notify(
    app: Manager, args: argparse.Namespace, found: list[tuple[QubeDevice, list[Release]]]
) -> None:
    """Detect-and-notify (broker.notify): what waits goes into the state file and, when
    anything does, to each desktop session in dom0. Nothing is installed."""
    waiting = [
        notify.WaitingUpdate(qd.qube, qd.device.device_id, qd.device.name, qd.device.version,
                             rs[0].version, rs[0].urgency, rs[0].remote_id)
        for qd, rs in found
    ]  # fmt: skip
    state = notify.record(app.paths.updates_waiting, waiting, _signed(app, found), notify.now())
    if state is None:
        return
    summary, body, urgency = notify.message(state, notify.now())
    sessions = notify.desktop_sessions(app.paths.root)
    for session in sessions:
        why = notify.send(session, summary, body, urgency)
        if why is None:
            _say(args, f"Notified the desktop of uid {session.uid}: {summary}")
        else:
            _warn([f"uid {session.uid}'s desktop was not notified: {why}"])
    if not sessions:
        _say(args, f"No desktop session in dom0 to notify: {summary} "
             f"(since {state.since}; status shows it)")  # fmt: skip


def cmd_status(app: Manager, args: argparse.Namespace) -> int:
    state = status.gather(app.paths, app.config)
    if args.json:
        print(json.dumps({"Status": printable_tree(state.to_json())}))
    else:
        print("\n".join(state.lines(notify.now())))
    return _finish(app, EXIT_OK)


def cmd_check_unattended(app: Manager, args: argparse.Namespace) -> int:
    """What unattended.conf allows: 0 when some install may run without a person (the
    unattended service's ExecCondition), 2 when it allows nothing."""
    try:
        policy = UnattendedPolicy.load(app.paths.unattended_file)
    except ConfigError as e:
        print(f"qubes-fwupdmgr: {printable(str(e))}", file=sys.stderr)
        return EXIT_CONDITION_BROKEN
    _warn(policy.warnings)
    if not policy.qubes:
        print(f"{app.paths.unattended_file} allows no unattended install: refresh and "
              "report only")  # fmt: skip
        return NothingToDo.exit_code
    print(f"unattended installs allowed: {policy.summary()}")
    return EXIT_OK


def cmd_update(app: Manager, args: argparse.Namespace) -> int:
    if args.plan is not None and (args.unattended or args.devices):
        raise BrokerError("--plan names its own devices: not with --unattended or DEVICE")
    # the plan first: a bad file is refused before any daemon is asked
    plan = plans.parse(_read_capped(args.plan, plans.MAX_BYTES)) if args.plan else None
    app.catalogs()
    devices = _devices(app, args)
    if args.devices:
        named = {qd.key: qd for sel in args.devices for qd in select_all(devices, sel)}
        devices = list(named.values())
    if plan is not None:
        keys = {e.key for e in plan}
        devices = [qd for qd in devices if qd.key in keys]
    found = app.updates(devices)
    if plan is not None:
        if app.problems:  # a qube that did not answer: its entries cannot be checked
            return _finish(app, EXIT_FAILURE)
        found = plans.match(plan, app.catalogs(), found)
        args.assume_yes = True  # the plan is the review
        # what would stop an entry half-way stops the plan before its first install
        for _, releases in found:
            if not args.no_metadata_check:  # its warning comes once, at the install
                _stale_check(app, args, releases[0])
            _size_check(app, releases[0])
    if not found:
        if app.problems:
            return _finish(app, EXIT_FAILURE)
        named_text = f" for {', '.join(_p(d) for d in args.devices)}" if args.devices else ""
        raise NothingToDo(f"no updates available{named_text}")
    if args.unattended:
        args.assume_yes = True  # nobody is there to ask
        found = _unattended(app, args, found)
        if not found:
            return _finish(app, NothingToDo.exit_code)
    limit = app.config.update_max_devices
    if not args.devices and plan is None and len(found) > limit:
        print(
            f"qubes-fwupdmgr: {len(found) - limit} more devices have updates; one run updates "
            f"at most update_max_devices={limit} unless devices are named: run again",
            file=sys.stderr,
        )
        found = found[:limit]
    done: list[Applied] = []
    try:
        for qd, releases in found:
            # newest first, by fwupd's version rules: take the first
            release = releases[0]
            # only after an install on the same qube: its fwupd is the one that says so
            earlier = any(a.qd.qube == qd.qube for a in done)
            if earlier and (taken := _taken_along(app, args, qd, release)) is not None:
                done.append(taken)
                continue
            applied = _apply(app, args, qd, release, "Update")
            if applied is not None:
                done.append(applied)
    finally:
        for applied in done:
            app.forget_cab(applied.release.sha256)
        _print_applied(app, args, done)
    # every update declined: nothing done, as fwupdmgr says it
    return _finish(app, EXIT_OK if done else NothingToDo.exit_code)


def _taken_along(
    app: Manager, args: argparse.Namespace, qd: QubeDevice, release: Release
) -> Applied | None:
    """The device, if an earlier install of this run already brought it to the release:
    fwupd installs a cab on every device of a composite it matches (a dock's hub and its
    ports), and asked again it would refuse, as already installed."""
    now = app.now(qd)
    if now is None or now.version != release.version or now.version == qd.device.version:
        return None
    desc = f"{_p(qd.device.name)} [{qd.qube}] {_p(qd.device.version)} -> {_p(release.version)}"
    _say(args, f"Updated {desc}: now {_p(now.version)}, with an earlier device of this run")
    app.record(qd, release, history.SUCCESS)
    return Applied(qd, release, now, None)


def cmd_update_heads(app: Manager, args: argparse.Namespace) -> int:
    """Stage the newest Heads ROM for this board in /boot/updates/<version>/: Heads, not
    fwupd, verifies and flashes it at the next boot."""
    board = heads.check_board(args.board, "--board") if args.board else None
    machine = heads.read_machine(app.paths.dmi_dir, board)
    carriers = {r.id: r.heads_components for r in app.config.remotes}
    release = heads.choose(app.catalogs(), machine, carriers)
    target = app.paths.boot_updates_dir / release.version
    desc = f"Heads {_p(machine.running)} -> {_p(release.version)} for {machine.board}"
    _stale_check(app, args, release)
    if not _confirm(args, f"Stage {desc} in {target}?"):
        _say(args, "skipped")
        return _finish(app, NothingToDo.exit_code)
    _fetch(app, args, release)
    with app.verified_payload(release) as (payload_fd, member):
        staged = heads.stage(app.paths.boot_updates_dir, release.version, payload_fd,
                             member.sha256)  # fmt: skip
    app.forget_cab(release.sha256)
    for older in heads.prune_older(app.paths.boot_updates_dir, release.version):
        _say(args, f"Removed {app.paths.boot_updates_dir / older}: an older ROM this replaces")
    if staged.already:
        raise NothingToDo(f"{desc} is already staged in {staged.rom}: reboot into Heads to "
                          "flash it")  # fmt: skip
    log(app.paths, f"update-heads: staged {desc} in {staged.rom} (sha256 {staged.sha256}, "
                   f"from {release.remote_id})")  # fmt: skip
    if args.json:
        print(json.dumps({"Heads": {
            "Board": machine.board, "VersionOld": machine.running, "Version": release.version,
            "RemoteId": release.remote_id, "Rom": str(staged.rom), "Sha256": staged.sha256,
            "Size": staged.size,
        }}, indent=2))  # fmt: skip
        return _finish(app, EXIT_OK)
    _say(args, f"Staged {desc}: {staged.rom} ({_size(staged.size)}, sha256 {staged.sha256})")
    _say(args, "Nothing is flashed yet. Reboot; in the Heads menu choose Options, then "
               "Flash/Update the BIOS, and pick this ROM, which Heads flashes. Its signature "
               f"was checked here, in dom0. Until then the machine runs Heads "
               f"{_p(machine.running)}.")  # fmt: skip
    return _finish(app, EXIT_OK)


def _read_capped(name: str, cap: int) -> bytes:
    """A file the admin named (a symlink to it too), at most ``cap`` bytes."""
    try:
        return read_small(Path(name), cap, follow=True)
    except OSError as e:
        raise NotFound(f"{_p(name)}: {e.strerror}") from e


def _unattended(
    app: Manager, args: argparse.Namespace, found: list[tuple[QubeDevice, list[Release]]]
) -> list[tuple[QubeDevice, list[Release]]]:
    """The updates unattended.conf allows, to be installed without a question; each of
    the others named on stdout with why it waits for a person."""
    policy = UnattendedPolicy.load(app.paths.unattended_file)
    _warn(policy.warnings)
    allowed = []
    for qd, releases in found:
        why = policy.refusal(qd, releases[0])
        if why is None:
            allowed.append((qd, releases))
            continue
        desc = f"{_p(qd.device.name)} [{qd.qube}] {_p(qd.device.version)} -> "
        # why may quote the catalog's urgency: verified, not printable for all that
        _say(args, f"Waits for a person: {desc}{_p(releases[0].version)}: {_p(why)}")
    return allowed


def _warn(warnings: Sequence[str]) -> None:
    for warning in warnings:
        print(f"qubes-fwupdmgr: warning: {printable(warning, 300)}", file=sys.stderr)


@dataclass(frozen=True)
class Applied:
    """One install done: what the device's daemon reports after it."""

    qd: QubeDevice
    release: Release
    now: Device | None
    pending: Pending | None


def _print_applied(app: Manager, args: argparse.Namespace, done: list[Applied]) -> None:
    """With --json: each device installed, as its daemon reports it now, with the release
    installed and its UpdateState (2 success, 4 needs-reboot: the pending state)."""
    if not args.json or not done:
        return
    out = []
    for a in done:
        device = a.now or a.qd.device
        state = history.UPDATE_STATES[history.NEEDS_REBOOT if a.pending else history.SUCCESS]
        form = {**device.dbus_form(), "UpdateState": state}
        doc = fwupd_json.device_json(
            form, releases=[_release_dbus(app, a.qd, a.release)], qube=a.qd.qube
        )
        out.append(doc if a.qd.qube == DOM0 else printable_tree(doc))
    print(json.dumps({"Devices": out}))


def _interactive(args: argparse.Namespace) -> bool:
    return not args.assume_yes and sys.stdin.isatty()


def _choose(args: argparse.Namespace, what: str, options: list[str]) -> int:
    """fwupdmgr's numbered choice (0 cancels): the index chosen. Without a terminal, or
    with -y, nobody can choose: one line says what to name instead."""
    if len(options) == 1:
        return 0
    if not _interactive(args):
        listed = "; ".join(options[:8]) + ("; …" if len(options) > 8 else "")
        raise BrokerError(f"several {what}s qualify ({listed}): name one")
    print(f"Choose a {what}:")
    print("0. Cancel")
    for n, option in enumerate(options, 1):
        print(f"{n}. {option}")
    for _ in range(3):
        try:
            answer = input(f"[0-{len(options)}]: ").strip()
        except EOFError:  # Ctrl-D: cancel
            print()
            answer = "0"
        if answer == "0":
            raise NothingToDo("cancelled")
        if answer.isdigit() and 1 <= int(answer) <= len(options):
            return int(answer) - 1
        print(f"qubes-fwupdmgr: {printable(answer, 20)!r} is not one of 0-{len(options)}",
              file=sys.stderr)  # fmt: skip
    raise NothingToDo("no choice made")


def _details(qd: QubeDevice, release: Release) -> list[str]:
    """What the admin weighs before saying yes: urgency, size, what must restart after,
    and the release notes (AppStream markup as text), all from dom0's verified catalog
    except the device's own flags."""
    after = what_restarts(qd.qube) if qd.device.needs_reboot else "nothing to restart"
    lines = [
        f"  Urgency:  {_p(release.urgency) or 'unknown'}",
        f"  Download: {_size(release.size)} ({_p(release.filename)} from {release.remote_id})",
        f"  After:    {after}",
    ]
    if release.summary:
        lines.append(f"  {_p(release.summary)}")
    for paragraph in release.description.splitlines()[:40]:
        # whole paragraphs (not _p's 200 characters): they are wrapped, not cut
        lines += textwrap.wrap(printable(paragraph, 2000), 76, initial_indent="  ",
                               subsequent_indent="    ")  # fmt: skip
    return lines


def _confirm(args: argparse.Namespace, question: str) -> bool:
    if args.assume_yes:
        return True
    if not sys.stdin.isatty():
        raise BrokerError("not a terminal: pass -y to answer yes without being asked")
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:  # Ctrl-D: no
        answer = ""
        print()
    return answer.strip().lower() in ("y", "yes")


def _stale_check(app: Manager, args: argparse.Namespace, release: Release) -> None:
    reason = app.stale(release.remote_id)
    if reason is None:
        return
    if args.no_metadata_check:
        note = f"{release.remote_id}: {reason}; installing anyway (--no-metadata-check)"
        log(app.paths, f"qubes-fwupdmgr: {note}")
        print(f"warning: {note}", file=sys.stderr)
    elif args.assume_yes:
        raise VerificationError(
            f"{release.remote_id}: {reason}; refusing an unattended update "
            "(refresh first, or pass --no-metadata-check)"
        )
    else:
        print(f"warning: {release.remote_id}: {reason}", file=sys.stderr)


def _size_check(app: Manager, release: Release) -> None:
    if release.size > app.limits.cab_max_bytes:
        raise LimitExceeded(f"{release.filename} is {release.size} bytes, more than cab_max_bytes")


def _fetch(app: Manager, args: argparse.Namespace, release: Release) -> None:
    """The release's cab into dom0's cache, unless a checked copy is there already."""
    _size_check(app, release)
    if app.cached(release):
        _say(args, f"Using {_p(release.filename)} from dom0's cache")
        return
    doing = "Importing" if app.source_dir is not None else "Downloading"
    _say(args, f"{doing} {_p(release.filename)} {app.source(release.remote_id)}…")
    app.download(release)


def _apply(
    app: Manager,
    args: argparse.Namespace,
    qd: QubeDevice,
    release: Release,
    verb: str,
    allow_older: bool = False,
    allow_reinstall: bool = False,
) -> Applied | None:
    """Confirm (unless -y), fetch or reuse the cab, install it through the device's owner;
    None when the admin declined."""
    desc = f"{_p(qd.device.name)} [{qd.qube}] {_p(qd.device.version)} -> {_p(release.version)}"
    _stale_check(app, args, release)
    if _interactive(args):
        print("\n".join([desc, *_details(qd, release)]))
    if not _confirm(args, f"{verb} {desc}?"):
        _say(args, "skipped")
        return None
    _fetch(app, args, release)
    _say(args, f"Installing on {qd.qube}…")
    try:
        app.install(qd, release, allow_older=allow_older or args.allow_older,
                    allow_reinstall=allow_reinstall or args.allow_reinstall)  # fmt: skip
    except BrokerError as e:
        app.record(qd, release, history.FAILED, str(e))
        raise
    now, pending = app.after_install(qd, release)
    app.record(qd, release, history.NEEDS_REBOOT if pending else history.SUCCESS)
    after = _p(now.version) if now else "unknown"
    past = f"{verb.rstrip('e')}ed"
    if pending is not None:
        # as fwupdmgr: done for now (exit 0), and the text says what waits
        _say(args, f"{past} {desc}: pending reboot ({pending.what}); now {after}")
        if not args.no_reboot_check:
            _say(args, f"To finish, {pending.what}: check-reboot-needed lists what waits")
    else:
        _say(args, f"{past} {desc}: now {after}")
    return Applied(qd, release, now, pending)


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
    applied = _apply(app, args, qd, release, verb, allow_older, allow_reinstall)
    if applied is not None:
        app.forget_cab(release.sha256)
        _print_applied(app, args, [applied])
    return _finish(app, EXIT_OK if applied else NothingToDo.exit_code)


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


def _device(app: Manager, selector: str, args: argparse.Namespace | None = None) -> QubeDevice:
    """The one device a selector names (broker.selection); on a terminal, a selector that
    names several (a GUID both qubes report) is a numbered choice."""
    found = select_all(app.devices(), selector)
    if len(found) > 1 and args is not None and _interactive(args):
        names = [f"{_p(qd.device.name)} [{qd.qube}:{qd.device.device_id[:12]}]" for qd in found]
        return found[_choose(args, "device", names)]
    return select_one(found, selector)


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
    fwupdmgr install DEVICE VERSION; without VERSION, chosen from a numbered list."""
    qd = _device(app, args.device, args)
    if args.version is None:
        offered = app.releases(qd, "releases")
        if not offered:
            if app.problems:
                return _finish(app, EXIT_FAILURE)
            raise NothingToDo(f"{_p(qd.device.name)} [{qd.qube}]: no releases available")
        release = offered[_choose(args, "release", [_release_line(r) for r in offered])]
    else:
        release = _one_release(app, qd, args.version)
    order = versions.compare(
        release.version, qd.device.version, versions.version_format(release.version_format)
    )
    return _apply_one(
        app, args, qd, release, "Install", allow_older=order < 0, allow_reinstall=order == 0
    )


def cmd_local_install(app: Manager, args: argparse.Namespace) -> int:
    """A cab file in dom0, as fwupdmgr local-install: only one that dom0's verified
    catalog holds (by sha256) for the device, checked as a download is, then installed
    through the device's owner. Older or the same version only when the flag says so."""
    app.catalogs()
    devices = _devices(app, args)
    if args.device:
        devices = select_all(devices, args.device)
    try:
        found = app.local_cab(Path(args.file), devices)
    except OSError as e:  # reading the admin's file failed (EIO, EACCES...)
        raise BrokerError(f"{_p(args.file)}: {e.strerror or type(e).__name__}") from e
    names = [f"{_p(qd.device.name)} [{qd.qube}:{qd.device.device_id[:12]}] "
             f"{_p(qd.device.version)} -> {_p(r.version)}" for qd, r in found]  # fmt: skip
    qd, release = found[_choose(args, "device", names)]
    order = versions.compare(
        release.version, qd.device.version, versions.version_format(release.version_format)
    )
    if order < 0 and not args.allow_older:
        raise BrokerError(f"{_p(release.version)} is older than {_p(qd.device.version)} on "
                          f"{_p(qd.device.name)}: pass --allow-older to install it")  # fmt: skip
    if order == 0 and not args.allow_reinstall:
        raise BrokerError(f"{_p(qd.device.name)} already runs {_p(release.version)}: pass "
                          "--allow-reinstall to install it again")  # fmt: skip
    try:
        return _apply_one(app, args, qd, release, "Install")
    finally:
        app.forget_cab(release.sha256)  # the admin keeps the file; dom0 keeps no copy


def cmd_reinstall(app: Manager, args: argparse.Namespace) -> int:
    qd = _device(app, args.device)
    release = _one_release(app, qd, qd.device.version)
    return _apply_one(app, args, qd, release, "Reinstall", allow_reinstall=True)


def cmd_downgrade(app: Manager, args: argparse.Namespace) -> int:
    """The newest release older than the device's version, as its owner offers it."""
    if args.device:
        candidates = [_device(app, args.device)]
    else:
        candidates = [qd for qd in _devices(app, args) if qd.device.has_updates_to_ask_for]
    offered = [(qd, rs) for qd in candidates if (rs := app.releases(qd, "downgrades"))]
    if not offered:
        if app.problems:
            return _finish(app, EXIT_FAILURE)
        raise NothingToDo("no downgrades available")
    names = [f"{_p(qd.device.name)} [{qd.qube}:{qd.device.device_id[:12]}] "
             f"{_p(qd.device.version)}" for qd, _ in offered]  # fmt: skip
    qd, rs = offered[_choose(args, "device", names)]
    # the newest older one unless the admin picks another
    release = rs[_choose(args, "release", [_release_line(r) for r in rs])] if len(rs) > 1 else rs[0]
    return _apply_one(app, args, qd, release, "Downgrade", allow_older=True)


def _release_line(r: Release) -> str:
    return f"{_p(r.version)} ({_p(r.urgency) or 'unknown urgency'}) {_p(r.summary)}"


def _tidy(app: Manager) -> None:
    """What a killed run left goes before this one starts; a tidy that fails is a warning,
    never the reason a refresh or update does not happen."""
    try:
        removed = app.tidy()
    except OSError as e:
        logging.warning("could not remove what an earlier run left: %s", printable(str(e)))
        return
    for line in removed:
        logging.info("removed what an earlier run left: %s", printable(line))


def cmd_clean(app: Manager, args: argparse.Namespace) -> int:
    """Empty dom0's cab cache, leftovers in its untrusted dir and sessions no run holds.
    Verified metadata stays: it is what the daemons hold, and rollback needs its state."""
    removed = app.clean()
    for line in removed:
        print(f"removed {_p(line)}")
    if not removed:
        print("Nothing to clean")
    return _finish(app, EXIT_OK if removed else NothingToDo.exit_code)


# ---------------------------------------------------------------------- progress
class ProgressLine:
    """One line on stderr, rewritten in place, per step of long work: the qube, bytes so
    far of how many, rate and time left (as qubes-vm-update shows each qube), or a
    daemon's install status and percentage. Only on a terminal, never with --json or
    --quiet (main decides)."""

    def __init__(self, min_interval: float = 0.2) -> None:
        self.min_interval = min_interval
        self._started: dict[tuple[str, str], float] = {}
        self._finished: set[tuple[str, str]] = set()
        self._shown = 0.0
        self._open = False  # a line is on the terminal without its newline yet

    def end(self) -> None:
        """Before anything else is printed: the open line keeps what it last said."""
        if self._open:
            print(file=sys.stderr, flush=True)
            self._open = False

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if p.unit == "%":
            if p.what in ("idle", "unknown") or (
                now - self._shown < self.min_interval and p.done < 100
            ):
                return
            self._shown, self._open = now, True
            print(f"\r\033[K{p.qube}: {p.what} {p.done}%", end="", file=sys.stderr, flush=True)
            return
        key = (p.qube, p.what)
        if key in self._finished:
            return  # the UpdateVM's last word repeats the end: once is enough
        start = self._started.setdefault(key, now)
        finished = p.total is not None and p.done >= p.total
        if finished:
            self._finished.add(key)
        elif now - self._shown < self.min_interval:
            return
        self._shown = now
        # the clock starts at the first report, so the first half second says nothing
        # true about the rate
        elapsed = now - start
        rate = p.done / elapsed if elapsed >= 0.5 else 0.0
        of = f"/{_size(p.total)}" if p.total else ""
        left = ""
        if p.total and rate > 0 and not finished:
            left = f", {max(0, (p.total - p.done) / rate):.0f} s left"
        speed = f" at {_size(int(rate))}/s" if rate else ""
        text = f"{p.qube}: {p.what} {_size(p.done)}{of}{speed}{left}"
        print(f"\r\033[K{text}", end="\n" if finished else "", file=sys.stderr, flush=True)
        self._open = not finished


# the run's progress display, if it shows one: a step printed closes its open line
_progress: ProgressLine | None = None


def _size(n: int) -> str:
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def cmd_get_remotes(app: Manager, args: argparse.Namespace) -> int:
    states = app.remote_states()
    if args.json:
        interval = app.config.metadata_max_age_days * 86400
        print(json.dumps({"Remotes": [remote_json(st, interval) for st in states]}))
        return _finish(app, EXIT_OK)
    for st in states:
        signed = f"metadata signed {st.signed_at:%Y-%m-%d %H:%M} UTC" if st.signed_at else (
            "never refreshed")  # fmt: skip
        state = "enabled" if st.enabled else "disabled"
        print(f"{st.remote.id}: {state}, {signed}  ({_p(st.remote.metadata_url)})")
    return _finish(app, EXIT_OK)


def _switch_remote(app: Manager, args: argparse.Namespace, enabled: bool) -> int:
    word = "enabled" if enabled else "disabled"
    if not app.switches.set_enabled(app.config, args.remote, enabled):
        raise NothingToDo(f"{_p(args.remote)} is already {word}")
    _say(args, f"{args.remote}: {word}")
    if not enabled:
        _say(args, f"{args.remote}: not refreshed and none of its releases offered until "
             "enable-remote; the daemons keep the metadata they hold")  # fmt: skip
    return _finish(app, EXIT_OK)


def cmd_enable_remote(app: Manager, args: argparse.Namespace) -> int:
    return _switch_remote(app, args, True)


def cmd_disable_remote(app: Manager, args: argparse.Namespace) -> int:
    return _switch_remote(app, args, False)


def cmd_get_history(app: Manager, args: argparse.Namespace) -> int:
    events, skipped = app.history()
    if skipped:
        print(f"qubes-fwupdmgr: warning: {skipped} unreadable history lines skipped",
              file=sys.stderr)  # fmt: skip
    if args.json:
        out = []
        for e in events:
            device, release = e.dbus_form()
            doc = fwupd_json.device_json(device, releases=[release], qube=e.qube)
            out.append(doc if e.qube == DOM0 else printable_tree(doc))
        print(json.dumps({"Devices": out}))
    for e in [] if args.json else events:
        error = f": {_p(e.error)}" if e.error else ""
        print(f"{_p(e.time)}  {_p(e.qube)}  {_p(e.device_name)} ({_p(e.device_id[:12])})  "
              f"{_p(e.version_old)} -> {_p(e.version_new)}  {e.result}{error}")  # fmt: skip
    if not events and not args.json:
        print("No history")
    return _finish(app, EXIT_OK if events else NothingToDo.exit_code)


def cmd_get_results(app: Manager, args: argparse.Namespace) -> int:
    qd = _device(app, args.device)
    raw = app.results(qd)
    if raw is None:
        raise NothingToDo(f"{_p(qd.device.name)} [{qd.qube}] has no update results")
    doc = fwupd_json.device_json(raw, qube=qd.qube)
    doc = doc if qd.qube == DOM0 else printable_tree(doc)
    if args.json:
        print(json.dumps(doc))
        return _finish(app, EXIT_OK)
    state = doc.get("UpdateState", 0)
    print(f"{_p(qd.device.name)} [{qd.qube}] {_p(str(doc.get('Version', '')))}: "
          f"{fwupd_json.UPDATE_STATES.get(state, 'unknown')}")  # fmt: skip
    if doc.get("UpdateError"):
        print(f"  {_p(str(doc['UpdateError']))}")
    return _finish(app, EXIT_OK)


def cmd_clear_results(app: Manager, args: argparse.Namespace) -> int:
    qd = _device(app, args.device)
    app.clear_results(qd)
    _say(args, f"{_p(qd.device.name)} [{qd.qube}]: results cleared")
    return _finish(app, EXIT_OK)


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

    def switch(*names: str, help: str) -> None:
        flags.add_argument(*names, action="store_true", default=value(False), help=help)

    switch("--json", help="machine-readable output on stdout, as fwupdmgr --json")
    switch("-y", "--assume-yes", help="answer yes to every question")
    switch("-v", "--verbose", help="debug logging and tracebacks on stderr")
    switch("-q", "--quiet", help="only results and errors: no progress, no step lines")
    switch("--force", help="refresh: accept metadata after a signing time in the future "
           "(still never older than what came before it); no other check is relaxed")  # fmt: skip
    switch("--allow-older", help="install and local-install may go to an older version")
    switch("--allow-reinstall", help="install and local-install may install the same version")
    switch("--no-reboot-check", help="do not say what must restart after an install (the "
           "pending state is still kept, so the release is not offered again)")  # fmt: skip
    switch("--no-metadata-check", help="install even from stale metadata without asking "
           "(logged); without it, -y refuses stale metadata")  # fmt: skip
    flags.add_argument("--filter", metavar="FLAGS", default=value(None),
                       help="only devices with these flags set (and ~FLAG: not set), "
                       "comma-separated, e.g. updatable,~internal")  # fmt: skip
    flags.add_argument("--updatevm", metavar="QUBE", default=value(None),
                       help="download through this qube for this run (it must be tagged "
                       "fwupd-updatevm in the qrexec policy)")  # fmt: skip
    return flags


def _import_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-qube", metavar="QUBE",
                   help="offline import: take the files from a dir in this qube (a USB "
                   "stick in sys-usb, a dir received with qvm-copy) instead of downloading; "
                   "checked as downloads are (the qube needs the fwupd-import tag)")  # fmt: skip
    p.add_argument("--dir", metavar="DIR",
                   help="with --from-qube: the absolute path of the dir in that qube, with "
                   "the metadata, its signature and the cabs (named as the LVFS names "
                   "them)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qubes-fwupdmgr",
        description="Firmware updates for Qubes OS (dom0 and sys-usb)",
        epilog="exit codes: " + "; ".join(f"{code} {what}" for code, what in EXIT_MEANINGS),
        parents=[_global_flags(defaults=True)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {broker.__version__}")
    verb_flags = _global_flags(defaults=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser(
        "refresh", help="fetch metadata through the UpdateVM and load it", parents=[verb_flags]
    )
    p.add_argument("--unattended", action="store_true",
                   help="as a timer runs it: wait out the backoff after failures")  # fmt: skip
    _import_flags(p)
    p.set_defaults(func=cmd_refresh)
    p = sub.add_parser("get-devices", help="devices of dom0 and sys-usb", parents=[verb_flags])
    p.set_defaults(func=cmd_get_devices)
    p = sub.add_parser("get-updates", aliases=["get-upgrades"], parents=[verb_flags],
                       help="available updates per device")  # fmt: skip
    p.add_argument("device", nargs="?", help=_DEVICE_HELP)
    p.add_argument("--notify", action="store_true",
                   help="detect and notify: record what waits in dom0's state and tell each "
                   "desktop session in dom0; installs nothing")  # fmt: skip
    p.set_defaults(func=cmd_get_updates)
    p = sub.add_parser("update", aliases=["upgrade"], parents=[verb_flags],
                       help="update the named devices, or all")  # fmt: skip
    p.add_argument("devices", nargs="*", metavar="DEVICE", help=_DEVICE_HELP)
    p.add_argument("--unattended", action="store_true",
                   help="install, without asking, only what /etc/qubes-fwupd/unattended.conf "
                   "allows (by default nothing) and name the rest")  # fmt: skip
    p.add_argument("--plan", metavar="FILE",
                   help="install exactly the plan that get-updates --json wrote (its \"Plan\", "
                   "perhaps cut down), refusing it all if anything in it no longer "
                   "matches dom0's verified metadata or the offered cab")  # fmt: skip
    _import_flags(p)
    p.set_defaults(func=cmd_update)
    p = sub.add_parser(
        "status", parents=[verb_flags],
        help="the automated runs' state: run lock, inhibit, backoff, unattended policy, "
        "what waits, pending reboots, metadata age (asks no qube)",
    )  # fmt: skip
    p.set_defaults(func=cmd_status)
    p = sub.add_parser(
        "check-unattended", parents=[verb_flags],
        help="what unattended.conf allows: exit 0 if any install, 2 if none",
    )  # fmt: skip
    p.set_defaults(func=cmd_check_unattended)
    p = sub.add_parser(
        "get-releases", help="releases a device may take (its fwupd's word, dom0's catalog)",
        parents=[verb_flags],
    )  # fmt: skip
    p.add_argument("device", help=_DEVICE_HELP)
    p.set_defaults(func=cmd_get_releases)
    p = sub.add_parser("install", help="install a chosen version", parents=[verb_flags])
    p.add_argument("device", help=_DEVICE_HELP)
    p.add_argument("version", nargs="?", help="without it: a numbered choice of releases")
    p.set_defaults(func=cmd_install)
    p = sub.add_parser(
        "local-install", parents=[verb_flags],
        help="install a cab file in dom0 that dom0's verified metadata holds",
    )  # fmt: skip
    p.add_argument("file", metavar="FILE.cab")
    p.add_argument("device", nargs="?", help=_DEVICE_HELP)
    p.set_defaults(func=cmd_local_install)
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
    p = sub.add_parser("get-history", help="every install dom0 made, and how it ended",
                       parents=[verb_flags])  # fmt: skip
    p.set_defaults(func=cmd_get_history)
    p = sub.add_parser("get-results", parents=[verb_flags],
                       help="the result of a device's last update, as its fwupd says")  # fmt: skip
    p.add_argument("device", help=_DEVICE_HELP)
    p.set_defaults(func=cmd_get_results)
    p = sub.add_parser("clear-results", parents=[verb_flags],
                       help="forget the result of a device's last update")  # fmt: skip
    p.add_argument("device", help=_DEVICE_HELP)
    p.set_defaults(func=cmd_clear_results)
    p = sub.add_parser("get-remotes", help="the configured remotes, and their metadata's age",
                       parents=[verb_flags])  # fmt: skip
    p.set_defaults(func=cmd_get_remotes)
    p = sub.add_parser(
        "update-heads", parents=[verb_flags],
        help="stage the newest Heads ROM for this board in /boot/updates/VERSION/, for "
        "Heads to check and flash at the next boot",
    )  # fmt: skip
    p.add_argument("--board", help="the Heads board, when DMI's product name is not it "
                   "(x230-hotp-maximized, librem_14, ...)")  # fmt: skip
    _import_flags(p)
    p.set_defaults(func=cmd_update_heads)
    for verb, func, text in (("enable-remote", cmd_enable_remote, "use a remote again"),
                             ("disable-remote", cmd_disable_remote,
                              "stop refreshing a remote and offering its releases")):  # fmt: skip
        p = sub.add_parser(verb, help=text, parents=[verb_flags])
        p.add_argument("remote", metavar="REMOTE-ID")
        p.set_defaults(func=func)
    return parser


# what an inhibit file holds back (remotes, results and clean still work)
_REFRESHES_OR_INSTALLS = frozenset({
    cmd_refresh, cmd_update, cmd_install, cmd_local_install, cmd_reinstall, cmd_downgrade,
    cmd_update_heads,
})  # fmt: skip
# the verbs that change state, one run at a time (broker.runlock); the others never wait
_CHANGES_STATE = _REFRESHES_OR_INSTALLS | {
    cmd_clean, cmd_clear_results, cmd_enable_remote, cmd_disable_remote,
}  # fmt: skip


def _flags_first(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The global flags moved in front of the verb, as getopt lets fwupdmgr take them
    anywhere (argparse wants a verb's positionals together: `local-install F -y DEV`)."""
    takes_value = {o for a in parser._actions if a.nargs != 0 for o in a.option_strings}
    known = {o for a in parser._actions for o in a.option_strings} - {"-h", "--help"}
    flags: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        name = arg.split("=", 1)[0]
        needs_value = name in takes_value and "=" not in arg
        if name in known and not (needs_value and i + 1 == len(argv)):
            flags.append(arg)
            if needs_value:
                i += 1
                flags.append(argv[i])
        else:
            rest.append(arg)
        i += 1
    return flags + rest


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    return parser.parse_args(_flags_first(parser, list(argv)))


_DEVICE_HELP = "device id (or an unambiguous prefix) or GUID; QUBE:ID for one qube's"


def _fwupd_error_code(error: BrokerError) -> int:
    """The FwupdError code a script of fwupdmgr's would expect for one of our errors."""
    for kind, name in (
        (NotFound, "NotFound"),
        (NothingToDo, "NothingToDo"),
        (Busy, "Busy"),
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


def _sentence(text: str) -> str:
    """The first letter up, the rest as it was (str.capitalize lowers device names)."""
    return text[:1].upper() + text[1:]


def _in_sandbox_dom0(args_list: list[str]) -> int | None:
    """With QUBES_FWUPD_SANDBOX set, outside a qube: this run restarted in the sandbox's
    dom0, as the launcher starts a qube's process; its exit code. None: run here. No
    package ships the sandbox, so an installed qubes-fwupdmgr always runs here."""
    try:
        from broker.sandbox.launcher import QUBE_ENV, Launcher, Sandbox  # the seam
    except ModuleNotFoundError:
        if os.environ.get("QUBES_FWUPD_SANDBOX"):
            # meant for a sandbox, it must not act on this machine's dom0 instead
            print("qubes-fwupdmgr: QUBES_FWUPD_SANDBOX is set, but this qubes-fwupdmgr "
                  "has no sandbox (it is the installed one): unset it",
                  file=sys.stderr)  # fmt: skip
            return EXIT_FAILURE
        return None
    sandbox = Sandbox.from_env()
    if sandbox is None or os.environ.get(QUBE_ENV):
        return None
    if not sandbox.bus_socket("dom0").exists():
        print(f"qubes-fwupdmgr: no sandbox is up in {sandbox.dir} (qubes-fwupd-sandbox up "
              f"--dir {sandbox.dir})", file=sys.stderr)  # fmt: skip
        return EXIT_FAILURE
    proc = Launcher(sandbox).popen("dom0", [sys.executable, "-m", "broker.cli", *args_list])
    # a stop meant for this run (systemctl, a test) reaches dom0's run, which unwinds
    signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue  # a terminal's Ctrl-C reached dom0's run too: it says what happened


class _Terminated(KeyboardInterrupt):
    """SIGTERM, as an interruption: the run unwinds as for Ctrl-C, so what it holds (the
    run lock, untrusted files, a qube it started) is released, not left behind."""


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up is not cut short again
    raise _Terminated


def _import_source(args: argparse.Namespace) -> str | None:
    """--from-qube QUBE --dir DIR (refresh, update): the dir, or None for a download."""
    qube, directory = getattr(args, "from_qube", None), getattr(args, "dir", None)
    if qube is None and directory is None:
        return None
    if qube is None or directory is None:
        raise BrokerError("--from-qube and --dir go together: the qube, and the dir in it")
    if args.updatevm:
        raise BrokerError("--from-qube replaces --updatevm for this run: not both")
    try:
        return check_source_dir(directory)
    except FormatError as e:
        raise BrokerError(f"--dir {_p(directory)}: {e}") from e


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    relaunched = _in_sandbox_dom0(args_list)
    if relaunched is not None:
        return relaunched
    args = parse_args(args_list)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="qubes-fwupdmgr: %(message)s",
    )
    paths = Paths.from_env()
    app: Manager | None = None
    signal.signal(signal.SIGTERM, _terminate)
    try:
        paths.make_dom0_dirs()
        config = Config.load(paths)
        _warn(config.warnings)
        source_dir = _import_source(args)
        # an import's qube stands where the UpdateVM stands, no higher
        flag, qube = ("--from-qube", args.from_qube) if source_dir is not None \
            else ("--updatevm", args.updatevm)  # fmt: skip
        if qube:
            config = dataclasses.replace(
                config, updatevm=check_qube_name(qube, flag), updatevm_chosen_by="run"
            )
        app = Manager(paths, config, FROM_DOM0, on_step=lambda text: _say(args, text),
                      source_dir=source_dir)  # fmt: skip
        if not args.json and not args.quiet and sys.stderr.isatty():
            global _progress
            app.on_progress = _progress = ProgressLine()
        changes = args.func in _CHANGES_STATE
        with run_lock(paths.run_lock, args.command, config.lock_wait_seconds) if changes \
                else contextlib.nullcontext():  # fmt: skip
            try:
                if args.func in _REFRESHES_OR_INSTALLS:
                    check_inhibit(paths.root, config.inhibit_files)
                    _tidy(app)
                code: int = args.func(app, args)
            finally:
                app.close()  # however the run ends: a qube it started goes down again
                _notices(app)
        return code
    except _Terminated:
        print("qubes-fwupdmgr: terminated", file=sys.stderr)
        return EXIT_TERMINATED
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
            message = _sentence(printable(str(e)))
            print(json.dumps(error_json("FwupdError", _fwupd_error_code(e), message)))
        elif isinstance(e, NothingToDo):
            print(_sentence(printable(str(e))))
        else:
            print(f"qubes-fwupdmgr: {printable(str(e))}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
