"""dom0's qubes.FwupdReceiveUpdates: the second, authoritative check.

1. the caller (from qrexec) must be the configured UpdateVM;
2. the header is read under a cap and must carry the nonce of a pending dom0 session;
3. the files must be exactly the ones that session expects, within its caps;
4. bytes stream into the untrusted dir (O_EXCL, 0600) under a whole-transfer deadline;
5. metadata: jcat signature + checksum over the received fd, rollback check, then parse;
   cab: sha256 and size against dom0's verified metadata;
6. only then an atomic rename into the trusted cache; anything else leaves nothing behind.
The verdict is written to the session for the manager, and is the exit status.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.cabinet import inspect_cab
from broker.errors import LimitExceeded, NothingToDo, TransferError, VerificationError
from broker.metadata import (
    MetadataStore,
    check_rollback,
    open_catalog,
    parse_catalog,
    verify_metadata_files,
)
from broker.sanitize import printable
from broker.service import ServiceContext, log, run_service
from broker.session import Outcome, Session, Sessions, check_nonce
from broker.transfer import (
    FrameFile,
    StreamReader,
    UntrustedFiles,
    install_file,
    parse_header,
    prune_cabs,
)

# a signed catalog could make every release odd: the log names the first ones only
_MAX_SKIP_LINES = 200


def _check_files(session: Session, files: tuple[FrameFile, ...]) -> None:
    expected = {f.name: f for f in session.files}
    if sorted(f.name for f in files) != sorted(expected):
        raise TransferError(
            "pushed files do not match what dom0 asked for "
            f"(expected {', '.join(sorted(expected))})"
        )
    for f in files:
        exp = expected[f.name]
        if f.size > exp.max_size:
            raise LimitExceeded(f"{f.name} is {f.size} bytes, more than the cap {exp.max_size}")
        if exp.size is not None and f.size != exp.size:
            raise VerificationError(
                f"{f.name} is {f.size} bytes, verified metadata says {exp.size}"
            )


# besides the pushed files: our jcat, the catalog's index and records beside the metadata
_ROOM_MARGIN = 4 << 20


def _check_room(directory: Path, files: tuple[FrameFile, ...]) -> None:
    """A push that cannot fit is refused before its first byte is written: the sizes are
    in the header, and a full disk mid-write would only be found out later."""
    need = sum(f.size for f in files) + _ROOM_MARGIN
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise LimitExceeded(
            f"dom0's cache filesystem has {free // 1024} KiB free; this push needs "
            f"{need // 1024} KiB: nothing was stored"
        )


def receive(ctx: ServiceContext) -> int:
    config, paths, limits = ctx.config, ctx.paths, ctx.config.limits
    sessions = Sessions(paths.sessions_dir)
    # before a byte is read: only the configured UpdateVM, or a qube a pending session
    # asked (qubes-fwupdmgr --updatevm), may push at all
    if ctx.caller != config.updatevm and ctx.caller not in sessions.asked():
        raise TransferError(
            f"qube {printable(ctx.caller, 64)} is not the configured UpdateVM "
            f"({config.updatevm}); refused"
        )
    reader = StreamReader(ctx.stdin_fd, time.monotonic() + limits.transfer_seconds)
    untrusted_header, files = parse_header(reader.readline(limits.header_max_bytes))
    nonce = check_nonce(untrusted_header.get("nonce"))
    # a session counts only for the qube it was opened for
    session = sessions.take(nonce, ctx.caller, config.updatevm)
    try:
        try:
            outcome = _receive_for(ctx, session, reader, files)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise LimitExceeded(
                f"dom0's cache filesystem is full ({paths.cache_dir}): nothing was stored"
            ) from e
    except NothingToDo as e:
        sessions.finish(nonce, Outcome(True, str(e), nothing_new=True))
        log(paths, f"receive {session.kind}: {e}")
        return 0
    except Exception as e:
        sessions.finish(nonce, Outcome(False, printable(str(e))))
        raise
    sessions.finish(nonce, outcome)
    log(paths, f"receive {session.kind}: {outcome.message}")
    return 0


def _receive_for(
    ctx: ServiceContext, session: Session, reader: StreamReader, files: tuple[FrameFile, ...]
) -> Outcome:
    paths, limits = ctx.paths, ctx.config.limits
    _check_files(session, files)
    _check_room(paths.untrusted_dir, files)
    with UntrustedFiles(paths.untrusted_dir, session.nonce) as untrusted:
        digests = {}
        for f in files:
            h = hashlib.sha256()
            reader.copy_exact(untrusted.create(f.name), f.size, h)
            digests[f.name] = h.hexdigest()
        reader.expect_eof()

        if session.kind == "metadata":
            remote = ctx.config.remote(session.remote_id)
            data_fd = untrusted.fds[remote.metadata_name]
            verified = verify_metadata_files(
                data_fd, untrusted.fds[remote.signature_name], remote, paths, ctx.config
            )
            # verified: now, and only now, the decompressor and libxml2 may see it
            with open_catalog(data_fd, remote.metadata_name, limits) as stream:
                catalog = parse_catalog(stream, remote, limits)
            store = MetadataStore(paths)
            with store.locked():
                # what a store killed midway left (an unlinked generation, a temp file)
                for name in store.tidy_locked():
                    name = printable(name, 300)  # a name in a dir others can write
                    log(paths, f"metadata: removed {name}, left by an interrupted store")
                baseline = check_rollback(
                    verified,
                    store.accepted(remote.id),
                    datetime.now(UTC),
                    timedelta(hours=ctx.config.metadata_future_margin_hours),
                    force=session.force,
                )
                store.store(
                    remote,
                    (data_fd, untrusted.paths[remote.metadata_name]),
                    verified,
                    baseline,
                    catalog,
                )
            # one line per release dom0 will never offer, and why: the catalog stands
            for skipped in catalog.skipped[:_MAX_SKIP_LINES]:
                log(paths, f"metadata for {remote.id}: skipped {printable(str(skipped), 300)}")
            if len(catalog.skipped) > _MAX_SKIP_LINES:
                more = len(catalog.skipped) - _MAX_SKIP_LINES
                log(paths, f"metadata for {remote.id}: skipped {more} more releases")
            for note in verified.unverifiable:
                log(paths, f"metadata for {remote.id}: not checked: {printable(note, 300)}")
            kinds = ", ".join(sorted({s.kind for s in verified.signatures}))
            skipped_note = f" ({len(catalog.skipped)} skipped)" if catalog.skipped else ""
            return Outcome(
                True,
                f"metadata for {remote.id} accepted: signed {verified.signed_at:%Y-%m-%d %H:%M}"
                f" ({kinds}), {len(catalog.releases)} releases{skipped_note}",
                stored=(str(paths.metadata_dir / remote.id),),
            )

        if session.kind == "cab":
            (expected,) = session.files
            if digests[expected.name] != expected.sha256:
                raise VerificationError(
                    f"{expected.name}: sha256 does not match dom0's verified metadata"
                )
            if session.release is None:
                raise TransferError("cab session without an expected release")
            # the sha256 binds these bytes to verified metadata: only now may they be parsed
            cab_fd = untrusted.fds[expected.name]
            # the payload counts only under the anchors and signers of the release's remote
            anchors, policy = ctx.config.payload_trust(session.remote_id, paths.pki_firmware_dirs)
            info = inspect_cab(
                cab_fd, session.release, anchors, limits, paths.untrusted_dir, policy
            )
            dest = paths.cabs_dir / f"{expected.sha256}.cab"
            install_file(cab_fd, untrusted.paths[expected.name], dest)
            for name in prune_cabs(
                paths.cabs_dir, ctx.config.cab_cache_max_mib * 1024 * 1024, keep=dest
            ):
                log(paths, f"cab cache over cab_cache_max_mib: removed {name}")
            return Outcome(
                True,
                f"{expected.name} accepted: sha256 verified, {info.component_id} "
                f"{info.version}, payload {', '.join(info.payloads)} signed",
                (str(dest),),
            )
    raise TransferError(f"unknown session kind {session.kind!r}")


def main() -> int:
    return run_service("qubes.FwupdReceiveUpdates", receive)


if __name__ == "__main__":
    sys.exit(main())
