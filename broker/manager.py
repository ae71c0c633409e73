"""dom0's orchestration behind qubes-fwupdmgr: which devices there are and who owns them,
which releases may cross, and fetching and installing them. Argument parsing and what the
user reads stay in broker.cli, so automation and tests can drive this without argparse.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker import history, reboots, remotes
from broker.cabinet import CabMember, ExpectedRelease, inspect_cab, payload_of
from broker.config import Config, Limits, Paths, Remote, check_qube_name
from broker.errors import (
    BrokerError,
    ConfigError,
    DaemonError,
    FormatError,
    LimitExceeded,
    NoMetadata,
    NotFound,
    NothingToDo,
    QrexecError,
    TransferError,
    VerificationError,
)
from broker.fwupd import Device, FwupdClient, OfferedRelease
from broker.fwupd_json import STATUSES
from broker.history import Event, History
from broker.metadata import Catalog, MetadataStore, Release, iter_catalogs, staleness
from broker.offers import decide
from broker.power import AdminTools
from broker.qrexec import Transport, call, check
from broker.reboots import Pending, PendingReboots
from broker.remotes import RemoteState, RemoteSwitches
from broker.routing import DOM0, QubeDevice, route
from broker.sanitize import printable
from broker.session import DownloadRequest, ExpectedFile, Outcome, Sessions, Wanted
from broker.signatures import sha256_fd
from broker.transfer import (
    CHUNK,
    UntrustedFiles,
    install_file,
    private_copy,
    prune_cabs,
    sweep_temps,
    sweep_untrusted,
    write_all,
)
from broker.usbvm import UsbvmClient

DOWNLOAD_SERVICE = "qubes.FwupdDownload"
_PROGRESS_INTERVAL = 0.1  # seconds between progress reports taken from a qube
# a temp file this much older than its write was killed: any live write takes milliseconds
_TEMP_AGE = 60.0


@dataclass(frozen=True)
class Progress:
    """A step of long work in one qube: ``done`` of ``total`` bytes (None: unknown)."""

    qube: str
    what: str
    done: int
    total: int | None
    unit: str = "bytes"  # or "%": a daemon's install


@dataclass
class Manager:
    """dom0's orchestration: devices, routing, what may be updated, fetching through the
    UpdateVM, installing through the owning daemon. Prints nothing: what went wrong without
    stopping is in :attr:`problems`, what happened is returned."""

    paths: Paths
    config: Config
    transport: Transport
    # what went wrong without stopping the command (a qube that failed, a refused offer):
    # one line each on stderr at the end, and exit 1 (see :func:`_finish`)
    problems: list[str] = field(default_factory=list)
    # what the user should know that is no failure of this command (an install that
    # waited for a reboot and did not apply): one line each on stderr, exit code unchanged
    notices: list[str] = field(default_factory=list)
    # (device key, release sha256) -> the daemon's offer a kept release answers (--json)
    answered: dict[tuple[tuple[str, str], str], OfferedRelease] = field(
        default_factory=dict, repr=False
    )
    # how far long work got (the UpdateVM's download), for a progress display; None: quiet
    on_progress: Callable[[Progress], None] | None = field(default=None, repr=False)
    # a step worth a line (starting a halted UpdateVM); None: quiet
    on_step: Callable[[str], None] | None = field(default=None, repr=False)
    # starts and stops qubes: dom0's admin tools (the sandbox's stand-ins in tests)
    power: AdminTools = field(default_factory=AdminTools, repr=False)
    # an offline import (--from-qube, --dir): the dir in config.updatevm to read from
    source_dir: str | None = None
    _checked_up: set[str] = field(default_factory=set, repr=False)
    _started: list[str] = field(default_factory=list, repr=False)
    _catalogs: list[Catalog] | None = field(default=None, repr=False)
    _last_progress: float = field(default=0.0, repr=False)
    _ended: set[tuple[str, str]] = field(default_factory=set, repr=False)

    @property
    def limits(self) -> Limits:
        return self.config.limits

    @functools.cached_property
    def updatevm(self) -> str:
        """The qube downloads go through: the admin's choice (the config, --updatevm,
        --from-qube), else dom0's own UpdateVM (qubes-prefs updatevm) where one is set, as
        dom0's package updates use it, else the default."""
        if self.config.updatevm_chosen_by:
            return self.config.updatevm
        chosen = self.power.qubes_pref("updatevm")
        if not chosen:
            return self.config.updatevm
        try:
            return check_qube_name(chosen, "qubes-prefs updatevm")
        except ConfigError as e:
            raise QrexecError(printable(str(e), 200)) from e

    def updatevm_for(self, remote_id: str) -> str:
        """The qube a remote's files come through: the run's choice, else the remote's own
        (an organisation's remote through its VPN qube), else :attr:`updatevm`."""
        if self.config.updatevm_chosen_by != "run":
            own = self.config.remote(remote_id).updatevm
            if own is not None:
                return own
        return self.updatevm

    def source(self, remote_id: str) -> str:
        """Where a remote's files come from, for a step line."""
        if self.source_dir is not None:
            return f"from {self.updatevm}:{printable(self.source_dir, 200)}"
        return f"through {self.updatevm_for(remote_id)}"

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
        self._ended.clear()  # a new step: its end shows again
        sessions = Sessions(self.paths.sessions_dir)
        expected = tuple(ExpectedFile(w.name, w.max_size, w.sha256, w.size) for w in wanted)
        updatevm = self.updatevm_for(remote_id)
        self._running(updatevm)
        # a session outlives the longest transfer the UpdateVM may take (transfer_seconds
        # is the admin's, raised for a slow link)
        ttl = max(self.limits.session_seconds, self.limits.transfer_seconds + 120)
        session = sessions.open(kind, remote_id, expected, ttl, release, force, updatevm)
        try:
            request = DownloadRequest(
                session.nonce, kind, remote_id, tuple(wanted), self.source_dir
            ).to_json()
            result = call(
                self.transport,
                updatevm,
                DOWNLOAD_SERVICE,
                feed=lambda fd: write_all(fd, request),
                max_stdout=4096,
                timeout=self.limits.transfer_seconds + 60,
                on_line=lambda line: self._progress_line(
                    updatevm, line, "bytes", frozenset(w.name for w in wanted)
                ),
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

    def _running(self, qube: str) -> None:
        """Start the qube if it is halted (once a run), to be shut down by :meth:`close`."""
        if qube in self._checked_up:
            return
        self._checked_up.add(qube)
        if self.power.is_running(qube):
            return
        if self.on_step is not None:
            self.on_step(f"Starting {qube}: it was halted and is shut down again after this run")
        # before the start: one that fails half-way (timed out, interrupted) may still
        # come up, and must not be left up
        self._started.append(qube)
        self.power.start(qube)

    def close(self) -> None:
        """The end of the run: each qube it started is shut down again (one that will not
        go, because another qube now uses it as its netvm, say, is a notice)."""
        while self._started:
            qube = self._started.pop()
            try:
                if not self.power.is_running(qube):
                    continue  # its start failed, or it went down on its own
                self.power.shutdown(qube)
            except BrokerError as e:
                self.notices.append(f"{e}; it was halted before this run and is left running")
            else:
                if self.on_step is not None:
                    self.on_step(f"Shut {qube} down again")

    def _progress_line(
        self, qube: str, untrusted_line: bytes, unit: str, names: frozenset[str]
    ) -> None:
        """A qube's word on how far its work got: shown, never decided on. Only the names
        dom0 expects (the files it asked for, fwupd's status names) and a few lines a
        second: a qube sending a new name per line must not grow dom0's memory or flood
        its terminal."""
        now = time.monotonic()
        if self.on_progress is None:
            return
        try:
            untrusted = json.loads(untrusted_line)["progress"]
            done, total, name = untrusted["done"], untrusted["total"], untrusted["name"]
            unit_said = untrusted.get("unit", "bytes")
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        if not isinstance(name, str) or name not in names or unit_said != unit:
            return
        if type(done) is not int or not 0 <= done < 2**63:
            return
        if not (total is None or (type(total) is int and 0 < total < 2**63)):
            return
        # the end of each expected step always shows, once; the rest a few times a second
        end = (qube, name) if total is not None and done >= total else None
        if (end is not None and end in self._ended) or (
            end is None and now - self._last_progress < _PROGRESS_INTERVAL
        ):
            return
        if end is not None:
            self._ended.add(end)
        self._last_progress = now
        self.on_progress(Progress(qube, name, done, total, unit))

    # ------------------------------------------------------------------ views
    def unreachable(self, qube: str, error: BrokerError) -> None:
        cause = str(error).removeprefix(f"{qube}: ")  # qrexec errors name the qube too
        self.problems.append(
            f"{qube}: unreachable: {cause}; only the other qube's devices were handled"
        )

    def devices(self) -> list[QubeDevice]:
        usbvm = self.usbvm()
        try:
            dom0 = FwupdClient(qube=DOM0).get_devices()
        except DaemonError as e:
            if usbvm is None:
                raise
            # nor may dom0's stopped fwupd hide sys-usb's devices: one line, and the rest
            self.unreachable(DOM0, e)
            dom0 = []
        usb: list[Device] = []
        if usbvm:
            # sys-usb must not be able to veto dom0's own updates (ARCHITECTURE.md)
            try:
                usb = usbvm.get_devices()
            except BrokerError as e:
                self.unreachable(usbvm.qube, e)
        return route(dom0, usb, self.config.usbvm)

    @functools.cached_property
    def switches(self) -> RemoteSwitches:
        """The admin's enable/disable choices, read once per run."""
        return RemoteSwitches(self.paths)

    def remotes(self) -> tuple[Remote, ...]:
        """The configured remotes the admin has not disabled."""
        return remotes.enabled(self.config, self.switches)

    def remote_states(self) -> list[RemoteState]:
        off = self.switches.disabled()
        store = MetadataStore(self.paths)
        out = []
        for r in self.config.remotes:
            accepted = store.accepted(r.id)
            signed = datetime.fromisoformat(accepted["signed_at"]) if accepted else None
            out.append(RemoteState(r, r.id not in off, signed))
        return out

    def record(self, qd: QubeDevice, release: Release, result: str, error: str = "") -> None:
        """One install, as it ended, in dom0's history (get-history)."""
        History(self.paths).append(Event(
            history.now(), qd.qube, qd.device.device_id, qd.device.name, qd.device.version,
            release.version, release.component_id, release.remote_id, release.sha256,
            result, error,
        ))  # fmt: skip

    def history(self) -> tuple[list[Event], int]:
        """dom0's installs, oldest first, and how many unreadable lines were skipped."""
        log = History(self.paths)
        return log.events(), log.skipped

    def results(self, qd: QubeDevice) -> dict[str, Any] | None:
        """The owner's fwupd's result of the device's last update (its a{sv})."""
        if qd.qube == DOM0:
            return FwupdClient(qube=DOM0).get_results(qd.device.device_id)
        usbvm = self.usbvm()
        assert usbvm is not None  # noqa: S101  routing names the usbvm only when set
        return usbvm.results(qd.device.device_id)

    def clear_results(self, qd: QubeDevice) -> None:
        if qd.qube == DOM0:
            FwupdClient(qube=DOM0).clear_results(qd.device.device_id)
            return
        usbvm = self.usbvm()
        assert usbvm is not None  # noqa: S101  routing names the usbvm only when set
        usbvm.clear_results(qd.device.device_id)

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
                found = FwupdClient(qube=DOM0).offers(kind, ids)
            else:
                usbvm = self.usbvm()
                assert usbvm is not None  # noqa: S101  routing only names the usbvm when set
                try:
                    found = usbvm.offers(kind, ids)
                except BrokerError as e:
                    self.unreachable(qube, e)
                    continue
            # what a daemon still offers from a remote the admin disabled: left out quietly
            off = self.switches.disabled()
            for qd in qds:
                offered = found.get(qd.device.device_id, [])
                if not isinstance(offered, str):
                    out[qd.key] = [o for o in offered if o.remote_id not in off]
        return out

    def catalogs(self) -> list[Catalog]:
        """dom0's verified catalogs (read once per run); none at all is an error to act on,
        not 'no updates'."""
        if self._catalogs is None:
            store = MetadataStore(self.paths)
            self._catalogs = list(iter_catalogs(store, self.remotes(), self.limits))
        if not self._catalogs:
            if not self.remotes():
                raise NothingToDo("every remote is disabled (see get-remotes, enable-remote)")
            raise NoMetadata("dom0 holds no verified metadata yet: run qubes-fwupdmgr refresh")
        return self._catalogs

    def catalogs_held(self) -> bool:
        """dom0 holds verified metadata for some remote (get-devices works without)."""
        try:
            return bool(self.catalogs())
        except NoMetadata:
            return False

    def _decided(
        self, kind: str, devices: list[QubeDevice]
    ) -> list[tuple[QubeDevice, list[Release]]]:
        """What each device's owner offers it (kind: upgrades, downgrades, releases) that
        dom0's verified catalog binds, newest first; each refusal becomes a problem line."""
        decided = decide(self.catalogs(), devices, self.offers(kind, devices))
        self.problems += [str(r) for r in decided.refused]
        self.answered.update(decided.offers)
        return [(qd, decided.releases[qd.key]) for qd in devices if qd.key in decided.releases]

    def all_releases(self, devices: list[QubeDevice]) -> dict[tuple[str, str], list[Release]]:
        """What get-devices --json nests in each device, as fwupdmgr nests GetReleases:
        every device's releases that its owner offers and dom0's catalog binds."""
        return dict((qd.key, rs) for qd, rs in self._decided("releases", devices))

    def releases(self, qd: QubeDevice, kind: str) -> list[Release]:
        found = self._decided(kind, [qd])
        return found[0][1] if found else []

    def settle_reboots(self, devices: list[QubeDevice]) -> list[Pending]:
        """The installs still waiting for a reboot, given what the daemons report now.
        Each that ended (the reboot or sys-usb restart happened) goes into the history
        as it ended, with its owner's result (GetResults); a failed one is also a line
        in :attr:`notices`."""
        still, ended = PendingReboots(self.paths).settle(devices)
        for p, device in ended:
            qd = QubeDevice(p.qube, device)
            try:
                results = self.results(qd)
            except BrokerError:
                results = None  # the version the device reports decides alone
            error = reboots.outcome(p, device, results)
            History(self.paths).append(Event(
                history.now(), p.qube, p.device_id, p.name, p.version_old, p.version,
                p.appstream_id, p.remote_id, p.sha256,
                history.FAILED if error else history.SUCCESS, error,
            ))  # fmt: skip
            if error:
                self.notices.append(f"{p.name} [{p.qube}]: the pending install of "
                                    f"{p.version} failed: {error} (see get-history)")  # fmt: skip
        return still

    def updates(self, devices: list[QubeDevice]) -> list[tuple[QubeDevice, list[Release]]]:
        # a device whose install waits for a reboot is not offered that install again
        waiting = {(p.qube, p.device_id) for p in self.settle_reboots(devices)}
        return self._decided(
            "upgrades",
            [qd for qd in devices if qd.device.has_updates_to_ask_for and qd.key not in waiting],
        )

    def load_into_daemons(self, remote: Remote) -> list[tuple[str, bool]]:
        """Hand the current verified metadata to each daemon: [(qube, loaded)], where
        False means the daemon already had it. A failing sys-usb is a problem line."""
        with MetadataStore(self.paths).reading(remote) as opened:
            if opened is None:
                return []
            data_fd, jcat_fd = opened
            usbvm = self.usbvm()
            if usbvm is None:
                return [(DOM0, FwupdClient(qube=DOM0).update_metadata(remote.id, *opened))]
            # both daemons at once (a refresh's longest step after the download): dom0's
            # load in a thread, on descriptors of its own (new open file descriptions of
            # the same verified files, so neither moves the other's offset), while this
            # thread feeds sys-usb and keeps Ctrl-C and SIGTERM as they were
            own = [os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC) for fd in opened]
            dom0: dict[str, bool | BaseException] = {}

            def load_dom0() -> None:
                try:
                    dom0["loaded"] = FwupdClient(qube=DOM0).update_metadata(remote.id, *own)
                except BaseException as e:  # handed to the caller's thread
                    dom0["error"] = e
                finally:
                    for fd in own:
                        os.close(fd)

            # a daemon thread: an interrupted run must not wait for dom0's load to end
            worker = threading.Thread(target=load_dom0, name="dom0-fwupd-load", daemon=True)
            worker.start()
            usbvm_done: list[tuple[str, bool]] = []
            try:
                usbvm_done.append((usbvm.qube, usbvm.refresh(remote, data_fd, jcat_fd)))
            except BrokerError as e:
                self.unreachable(usbvm.qube, e)
            worker.join()
            error = dom0.get("error")
            if isinstance(error, BaseException):
                raise error
            return [(DOM0, bool(dom0["loaded"])), *usbvm_done]

    def cached(self, release: Release) -> bool:
        """dom0's cache already holds this cab (its name is the sha256 dom0 verified when
        it stored it): checked again against this release before it counts as fetched."""
        cab = self.paths.cabs_dir / f"{release.sha256}.cab"
        try:
            fd = os.open(cab, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            if sha256_fd(fd)[0] != release.sha256:
                return False
            anchors, policy = self.config.payload_trust(
                release.remote_id, self.paths.pki_firmware_dirs
            )
            inspect_cab(fd, expected_release(release), anchors, self.limits,
                        self.paths.untrusted_dir, policy)  # fmt: skip
            return True
        except BrokerError:
            return False
        finally:
            os.close(fd)

    def local_cab(self, path: Path, devices: list[QubeDevice]) -> list[tuple[QubeDevice, Release]]:
        """A cab file in dom0 (``local-install``) into dom0's cache, as if downloaded:
        copied into the untrusted dir while hashed, and accepted only if dom0's verified
        catalog holds a release with that sha256 for one of ``devices`` (so the cab layer,
        the decompressors and libxml2 meet only bytes verified metadata binds), then the
        same cab and payload checks as a download, then an atomic rename. Returns each
        device with the release this cab is for it."""
        try:
            src = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise NotFound(f"{printable(str(path), 200)}: {e.strerror}") from e
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(f"{printable(str(path), 200)}: not a regular file")
            if st.st_size > self.limits.cab_max_bytes:
                raise LimitExceeded(
                    f"{printable(path.name, 200)} is {st.st_size} bytes, more than cab_max_bytes"
                )
            # a random prefix: a killed run's leftover with our pid must not collide
            prefix = f"local-{secrets.token_hex(8)}"
            with UntrustedFiles(self.paths.untrusted_dir, prefix) as untrusted:
                fd = untrusted.create("cab")
                h = hashlib.sha256()
                left = self.limits.cab_max_bytes + 1
                while chunk := os.read(src, min(CHUNK, left)):
                    h.update(chunk)
                    write_all(fd, chunk)
                    left -= len(chunk)
                    if left <= 0:
                        raise LimitExceeded(f"{printable(path.name, 200)} grew past cab_max_bytes")
                sha256 = h.hexdigest()
                found = [
                    (qd, r) for qd in devices for c in self.catalogs()
                    for r in c.find(sha256, qd.device.guids)
                ]  # fmt: skip
                if not found:
                    raise VerificationError(
                        f"{printable(path.name, 200)} (sha256 {sha256[:16]}…) is no release in "
                        "dom0's verified metadata for these devices: refused unread"
                    )
                # each release it may be installed as: the metainfo must say each of them,
                # and its payload be signed as that release's remote wants
                for release in dict.fromkeys(r for _, r in found):
                    anchors, policy = self.config.payload_trust(
                        release.remote_id, self.paths.pki_firmware_dirs
                    )
                    inspect_cab(fd, expected_release(release), anchors, self.limits,
                                self.paths.untrusted_dir, policy)  # fmt: skip
                install_file(fd, untrusted.paths["cab"], self.paths.cabs_dir / f"{sha256}.cab")
                del untrusted.paths["cab"]  # handed over: not to be removed on exit
                return found
        finally:
            os.close(src)

    def download(self, release: Release) -> None:
        """The release's cab into dom0's cache, through the UpdateVM and dom0's checks."""
        self.fetch(
            "cab",
            release.remote_id,
            [Wanted(release.filename, release.url, release.size, release.sha256, release.size)],
            expected_release(release),
        )

    def install(
        self,
        qd: QubeDevice,
        release: Release,
        allow_older: bool = False,
        allow_reinstall: bool = False,
    ) -> None:
        """The cached cab, as a private copy whose bytes were hashed as they were written,
        to the daemon that owns the device."""
        self._ended.clear()
        cab = self.paths.cabs_dir / f"{release.sha256}.cab"
        cached = os.open(cab, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            # a rename over the name cannot reach an open fd, but a write to the same inode
            # through another path (the cache file is the receive service's) could, after
            # any check: the daemon reads a nameless copy of root's that nothing else can
            fd, sha256 = private_copy(cached, self.paths.manager_dir, self.limits.cab_max_bytes)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise LimitExceeded(
                f"no room in {self.paths.manager_dir} for dom0's copy of {cab.name} "
                f"({e.strerror}): nothing was installed"
            ) from e
        finally:
            os.close(cached)
        try:
            if sha256 != release.sha256:
                raise VerificationError(f"{cab.name}: cached cab no longer matches its sha256")
            if qd.qube == DOM0:
                FwupdClient(qube=DOM0).install(
                    qd.device.device_id,
                    fd,
                    release.filename,
                    allow_reinstall=allow_reinstall,
                    allow_older=allow_older,
                    progress=lambda status, percent: self._installing(status, percent),
                )
            else:
                usbvm = self.usbvm()
                assert usbvm is not None  # noqa: S101  routing names the usbvm only when set
                usbvm.install(
                    qd.device.device_id,
                    fd,
                    release,
                    expected_release(release),
                    allow_older=allow_older,
                    allow_reinstall=allow_reinstall,
                    on_line=lambda line: self._progress_line(
                        qd.qube, line, "%", frozenset(STATUSES.values())
                    ),
                )
        finally:
            os.close(fd)

    def _installing(self, status: str, percent: int) -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(DOM0, status, percent, 100, "%"))

    def clean(self) -> list[str]:
        """Every cached cab, and what killed runs left (:meth:`tidy`): what was removed,
        one line each."""
        return [f"cab {name}" for name in prune_cabs(self.paths.cabs_dir, 0)] + self.tidy()

    def tidy(self) -> list[str]:
        """What a killed run (kill -9, power loss) left, and only what no live run can
        still be using: unlinked metadata generations and temp files (under the metadata
        lock), the manager's own temp files, received files older than a transfer may
        take, and sessions past their lifetime. Every refresh and update starts with it."""
        paths = self.paths
        removed = [f"metadata {name}" for name in MetadataStore(paths).tidy()]
        removed += [f"temp {name}" for name in sweep_temps(paths.manager_dir, _TEMP_AGE)]
        untrusted_age = self.limits.transfer_seconds + 60
        removed += [f"untrusted {n}" for n in sweep_untrusted(paths.untrusted_dir, untrusted_age)]
        if paths.sessions_dir.is_dir():
            sessions = Sessions(paths.sessions_dir)
            removed += [f"session {n}" for n in sessions.sweep(self.limits.session_seconds)]
        return removed

    @contextlib.contextmanager
    def verified_payload(self, release: Release) -> Iterator[tuple[int, CabMember]]:
        """The one payload of this release's cab in dom0's cache, checked again (sha256,
        metainfo, payload signature under its remote's anchors): the descriptor of the
        copy that verified, for a use that is not fwupd's (update-heads)."""
        cab = self.paths.cabs_dir / f"{release.sha256}.cab"
        fd = os.open(cab, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if sha256_fd(fd)[0] != release.sha256:
                raise VerificationError(f"{cab.name}: not the cab dom0 verified")
            anchors, policy = self.config.payload_trust(
                release.remote_id, self.paths.pki_firmware_dirs
            )
            info, payload_fd = payload_of(fd, expected_release(release), anchors, self.limits,
                                          self.paths.untrusted_dir, policy)  # fmt: skip
        finally:
            os.close(fd)
        try:
            (member,) = (m for m in info.members if m.name == info.payloads[0])
            yield payload_fd, member
        finally:
            os.close(payload_fd)

    def forget_cab(self, sha256: str) -> None:
        """Installed: no longer worth its room in dom0's cache."""
        (self.paths.cabs_dir / f"{sha256}.cab").unlink(missing_ok=True)

    def _owner_devices(self, qube: str) -> list[QubeDevice]:
        """What one qube's fwupd reports now (the other qube is not asked)."""
        if qube == DOM0:
            return [QubeDevice(DOM0, d) for d in FwupdClient(qube=DOM0).get_devices()]
        usbvm = self.usbvm()
        assert usbvm is not None  # noqa: S101  routing names the usbvm only when set
        return [QubeDevice(qube, d) for d in usbvm.get_devices()]

    def now(self, qd: QubeDevice) -> Device | None:
        """The device as its owner reports it now (None if it is gone)."""
        return next((d.device for d in self._owner_devices(qd.qube) if d.key == qd.key), None)

    def after_install(
        self, qd: QubeDevice, release: Release
    ) -> tuple[Device | None, Pending | None]:
        """The device as its owner reports it now (the other qube is not asked; None if
        it is gone), and the pending reboot if its daemon says the install waits for one."""
        devices = self._owner_devices(qd.qube)
        now = next((d.device for d in devices if d.key == qd.key), None)
        if now is not None and now.needs_reboot and now.version != release.version:
            return now, PendingReboots(self.paths).record(qd, release, qd.device.version)
        self.settle_reboots(devices)  # records of the other qube's devices stay as they are
        return now, None

    def pending_reboots(self) -> list[Pending]:
        """Installs that wait for a reboot, and devices whose daemon says one is needed."""
        devices = self.devices()
        pending = self.settle_reboots(devices)
        known = {(p.qube, p.device_id) for p in pending}
        now = datetime.now(UTC).isoformat(timespec="seconds")
        return pending + [
            Pending(qd.qube, qd.device.device_id, qd.device.name, "", now)
            for qd in devices
            if qd.device.needs_reboot and qd.key not in known
        ]


def expected_release(release: Release) -> ExpectedRelease:
    return ExpectedRelease(
        release.component_id, release.version, tuple(g.lower() for g in release.guids)
    )
