"""broker.receive: dom0's qubes.FwupdReceiveUpdates, driven in-process with an injected
ServiceContext (the adversarial suite drives the same service through the sandbox's qrexec).

dom0 is a temporary root: its metadata and firmware trust stores hold the sandbox CA made at
run time (tests/unit/conftest.py); metadata and cabs are signed here with its signer, and
the frame is what an UpdateVM would push, read from a file standing for qrexec's stdin."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cabarchive
import pytest

from broker import receive as receive_module
from broker.cabinet import ExpectedRelease
from broker.config import ROOT_ENV, Config, Limits, Paths, Remote
from broker.errors import (
    BrokerError,
    LimitExceeded,
    RollbackError,
    TransferError,
    VerificationError,
)
from broker.jcat import BlobKind, build_jcat
from broker.metadata import INDEX_NAME, MetadataStore
from broker.receive import main, receive
from broker.sandbox.lvfs import own_jcat
from broker.sandbox.pki import SandboxPki, certificate_sha256, sign_gpg, sign_pkcs7
from broker.service import ServiceContext
from broker.session import ExpectedFile, Outcome, Session, Sessions
from broker.transfer import FRAME_VERSION

UPDATEVM = "sys-firewall"
REMOTE_ID = "test"
METADATA = "firmware.xml"
JCAT = "firmware.xml.jcat"
COMPONENT = "org.qubes-os.test.device.firmware"
GUID = "6f2b0a1c-1b8e-5a4e-9d7e-2a9e4e2b4c11"
RELEASE = ExpectedRelease(COMPONENT, "2.0.1", (GUID,))
FIRMWARE = b"receive test firmware\n" * 100
CAB_NAME = "0123-Test-Device-2.0.1.cab"
MiB = 1024 * 1024


# --------------------------------------------------------------------------- dom0 at run time
@dataclass
class Dom0:
    paths: Paths
    config: Config
    pki: SandboxPki
    work: Path

    @property
    def sessions(self) -> Sessions:
        return Sessions(self.paths.sessions_dir)

    @property
    def remote(self) -> Remote:
        return self.config.remote(REMOTE_ID)

    def log(self) -> list[str]:
        """The log's lines without their timestamps."""
        if not self.paths.log_file.exists():
            return []
        return [line.split(" ", 1)[1] for line in self.paths.log_file.read_text().splitlines()]

    def sign(self, name: str, data: bytes) -> str:
        path = self.work / f"{name}.{hashlib.sha256(data).hexdigest()[:12]}"
        path.write_bytes(data)
        return sign_pkcs7(self.pki.signer_pem, self.pki.signer_key, path)

    def metadata(self, xml: bytes) -> tuple[bytes, bytes]:
        path = self.work / f"metadata.{hashlib.sha256(xml).hexdigest()[:12]}"
        path.write_bytes(xml)
        return xml, own_jcat(self.pki.signer_pem, self.pki.signer_key, path, METADATA)


@pytest.fixture(scope="module")
def signer_id(sandbox_pki: SandboxPki) -> str:
    return certificate_sha256(sandbox_pki.signer_pem)


@pytest.fixture
def dom0(
    tmp_path: Path, sandbox_pki: SandboxPki, signer_id: str, monkeypatch: pytest.MonkeyPatch
) -> Dom0:
    paths = Paths(tmp_path / "root")
    for store in (*paths.pki_metadata_dirs, *paths.pki_firmware_dirs):
        store.mkdir(parents=True)
        shutil.copy(sandbox_pki.ca_pem, store / "sandbox-ca.pem")
    remote = Remote(
        REMOTE_ID,
        f"https://example.invalid/{METADATA}",
        metadata_signers=frozenset({signer_id}),
    )
    config = Config(updatevm=UPDATEVM, remotes=(remote,))
    work = tmp_path / "work"
    work.mkdir()
    return Dom0(paths, config, sandbox_pki, work)


def catalog(*, odd: int = 0, sha256: str = "a" * 64) -> bytes:
    """A catalog of one good release and ``odd`` releases dom0 will never offer."""
    releases = [
        f'<release version="2.0.1"><location>https://example.invalid/{CAB_NAME}</location>'
        f'<checksum type="sha256" target="container">{sha256}</checksum>'
        '<size type="download">1234</size></release>'
    ] + [f'<release version="1.{n}"></release>' for n in range(odd)]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<components origin="lvfs" version="0.9">'
        f'<component type="firmware"><id>{COMPONENT}</id><name>Test</name>'
        f'<provides><firmware type="flashed">{GUID}</firmware></provides>'
        f"<releases>{''.join(releases)}</releases></component></components>\n"
    ).encode()


def metainfo(version: str = "2.0.1") -> bytes:
    digest = hashlib.sha256(FIRMWARE).hexdigest()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<component type="firmware">\n'
        f"  <id>{COMPONENT}</id>\n  <name>Test</name>\n"
        f'  <provides><firmware type="flashed">{GUID}</firmware></provides>\n'
        f'  <releases><release version="{version}" date="2025-01-01">\n'
        f'    <checksum type="sha256" filename="firmware.bin" target="content">{digest}'
        "</checksum>\n  </release></releases>\n</component>\n"
    ).encode()


def signed_cab(dom0: Dom0, meta: bytes | None = None) -> bytes:
    meta = metainfo() if meta is None else meta
    jcat = build_jcat(
        {
            name: [
                (BlobKind.SHA256, hashlib.sha256(content).hexdigest()),
                (BlobKind.PKCS7, dom0.sign(name, content)),
            ]
            for name, content in (("firmware.metainfo.xml", meta), ("firmware.bin", FIRMWARE))
        }
    )
    archive = cabarchive.CabArchive()
    for name, content in (
        ("firmware.bin", FIRMWARE),
        ("firmware.jcat", jcat),
        ("firmware.metainfo.xml", meta),
    ):
        archive[name] = cabarchive.CabFile(content)
    return bytes(archive.save(compress=True))


@pytest.fixture(scope="module")
def cab_cache() -> dict[str, bytes]:
    return {}


@pytest.fixture
def cab(dom0: Dom0, cab_cache: dict[str, bytes]) -> bytes:
    """One signed cab per module (signing is the slow part)."""
    if "cab" not in cab_cache:
        cab_cache["cab"] = signed_cab(dom0)
    return cab_cache["cab"]


# --------------------------------------------------------------------------- pushing
def frame(files: list[tuple[str, bytes]], header: dict[str, Any] | None = None) -> bytes:
    entries = [{"name": name, "size": len(data)} for name, data in files]
    doc = {"version": FRAME_VERSION, "files": entries, **(header or {})}
    return json.dumps(doc).encode() + b"\n" + b"".join(data for _, data in files)


@dataclass
class Pushed:
    status: int | None
    error: BrokerError | None
    unread: bytes  # what the service left in its stdin


def push(dom0: Dom0, stream: bytes, caller: str = UPDATEVM, config: Config | None = None) -> Pushed:
    stdin = dom0.work / "stdin"
    stdin.write_bytes(stream)
    fd = os.open(stdin, os.O_RDONLY)
    try:
        ctx = ServiceContext(caller, "", dom0.paths, config or dom0.config, stdin_fd=fd)
        try:
            status, error = receive(ctx), None
        except BrokerError as e:
            status, error = None, e
        unread = os.read(fd, len(stream) + 1)
    finally:
        os.close(fd)
    return Pushed(status, error, unread)


def open_metadata(dom0: Dom0, force: bool = False, updatevm: str = "") -> Session:
    files = (ExpectedFile(METADATA, 16 * MiB), ExpectedFile(JCAT, MiB))
    return dom0.sessions.open("metadata", REMOTE_ID, files, 60, force=force, updatevm=updatevm)


def open_cab(dom0: Dom0, data: bytes, release: ExpectedRelease | None = RELEASE) -> Session:
    sha = hashlib.sha256(data).hexdigest()
    files = (ExpectedFile(CAB_NAME, 256 * MiB, sha, len(data)),)
    return dom0.sessions.open("cab", REMOTE_ID, files, 60, release=release)


def outcome(dom0: Dom0, session: Session) -> Outcome | None:
    return dom0.sessions.outcome(session.nonce)


def assert_refused(pushed: Pushed, error: type[BrokerError], message: str) -> None:
    """Refused with exactly this one line."""
    assert pushed.status is None, "accepted"
    assert isinstance(pushed.error, error), repr(pushed.error)
    assert re.fullmatch(message, str(pushed.error)), str(pushed.error)


def assert_nothing_left(dom0: Dom0) -> None:
    untrusted = dom0.paths.untrusted_dir
    assert not untrusted.exists() or list(untrusted.iterdir()) == []
    cabs = dom0.paths.cabs_dir
    assert not cabs.exists() or list(cabs.iterdir()) == []


@pytest.fixture
def metadata_push(dom0: Dom0) -> Iterator[tuple[bytes, bytes]]:
    yield dom0.metadata(catalog())


# --------------------------------------------------------------------------- metadata
def test_signed_metadata_is_stored_and_the_verdict_written(
    dom0: Dom0, metadata_push: tuple[bytes, bytes]
) -> None:
    xml, jcat = metadata_push
    session = open_metadata(dom0)
    pushed = push(dom0, frame([(METADATA, xml), (JCAT, jcat)], {"nonce": session.nonce}))
    assert (pushed.status, pushed.error) == (0, None)
    result = outcome(dom0, session)
    assert result is not None and result.ok and not result.nothing_new
    assert re.fullmatch(
        rf"metadata for {REMOTE_ID} accepted: signed \d{{4}}-\d\d-\d\d \d\d:\d\d \(pkcs7\), "
        r"1 releases",
        result.message,
    ), result.message
    assert result.stored == (str(dom0.paths.metadata_dir / REMOTE_ID),)
    assert (dom0.paths.metadata_dir / REMOTE_ID / METADATA).read_bytes() == xml
    accepted = MetadataStore(dom0.paths).accepted(REMOTE_ID)
    assert accepted is not None and accepted["sha256"] == hashlib.sha256(xml).hexdigest()
    assert "previous_signed_at" not in accepted  # the first metadata has no baseline
    assert dom0.log() == [f"receive metadata: {result.message}"]
    assert_nothing_left(dom0)


def test_odd_releases_are_logged_one_line_each_up_to_a_cap(
    dom0: Dom0, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(receive_module, "_MAX_SKIP_LINES", 2)
    xml, jcat = dom0.metadata(catalog(odd=3))
    session = open_metadata(dom0)
    pushed = push(dom0, frame([(METADATA, xml), (JCAT, jcat)], {"nonce": session.nonce}))
    assert pushed.status == 0
    result = outcome(dom0, session)
    assert result is not None and result.message.endswith(", 1 releases (3 skipped)")
    lines = dom0.log()
    skipped = [line for line in lines if " skipped " in line and "accepted" not in line]
    assert len(skipped) == 3
    assert skipped[0].startswith(f"metadata for {REMOTE_ID}: skipped ")
    assert "1.0" in skipped[0] and "1.1" in skipped[1]
    assert skipped[2] == f"metadata for {REMOTE_ID}: skipped 1 more releases"
    assert lines[-1] == f"receive metadata: {result.message}"


def test_exactly_the_cap_of_odd_releases_has_no_more_line(
    dom0: Dom0, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(receive_module, "_MAX_SKIP_LINES", 2)
    xml, jcat = dom0.metadata(catalog(odd=2))
    session = open_metadata(dom0)
    assert push(dom0, frame([(METADATA, xml), (JCAT, jcat)], {"nonce": session.nonce})).status == 0
    assert not any("more releases" in line for line in dom0.log())


def _accepted_before(dom0: Dom0, signed_at: datetime, sha256: str = "b" * 64) -> None:
    state = {REMOTE_ID: {"signed_at": signed_at.isoformat(), "sha256": sha256}}
    dom0.paths.metadata_state_file.parent.mkdir(parents=True, exist_ok=True)
    dom0.paths.metadata_state_file.write_text(json.dumps(state))


def test_newer_metadata_records_its_baseline(
    dom0: Dom0, metadata_push: tuple[bytes, bytes]
) -> None:
    before = datetime.now(UTC) - timedelta(days=2)
    _accepted_before(dom0, before)
    session = open_metadata(dom0)
    xml, jcat = metadata_push
    assert push(dom0, frame([(METADATA, xml), (JCAT, jcat)], {"nonce": session.nonce})).status == 0
    accepted = MetadataStore(dom0.paths).accepted(REMOTE_ID)
    assert accepted is not None and accepted["previous_signed_at"] == before.isoformat()


def test_older_metadata_is_refused_as_a_rollback(
    dom0: Dom0, metadata_push: tuple[bytes, bytes]
) -> None:
    _accepted_before(dom0, datetime.now(UTC) + timedelta(hours=1))
    session = open_metadata(dom0)
    xml, jcat = metadata_push
    pushed = push(dom0, frame([(METADATA, xml), (JCAT, jcat)], {"nonce": session.nonce}))
    assert_refused(pushed, RollbackError, r"metadata signed .* is not newer than the accepted .*")
    result = outcome(dom0, session)
    assert result == Outcome(False, str(pushed.error))
    assert not (dom0.paths.metadata_dir / REMOTE_ID).exists()
    assert_nothing_left(dom0)


def test_the_same_metadata_again_is_nothing_new(
    dom0: Dom0, metadata_push: tuple[bytes, bytes]
) -> None:
    xml, jcat = metadata_push
    _accepted_before(dom0, datetime.now(UTC) - timedelta(days=1), hashlib.sha256(xml).hexdigest())
    session = open_metadata(dom0)
    pushed = push(dom0, frame([(METADATA, xml), (JCAT, jcat)], {"nonce": session.nonce}))
    assert (pushed.status, pushed.error) == (0, None)
    assert outcome(dom0, session) == Outcome(True, "metadata is already current", nothing_new=True)
    assert dom0.log() == ["receive metadata: metadata is already current"]
    assert_nothing_left(dom0)


def test_metadata_signed_by_another_signer_is_refused_and_nothing_stored(
    dom0: Dom0, metadata_push: tuple[bytes, bytes]
) -> None:
    remote = replace(dom0.remote, metadata_signers=frozenset({"A" * 64}))
    config = replace(dom0.config, remotes=(remote,))
    session = open_metadata(dom0)
    xml, jcat = metadata_push
    pushed = push(
        dom0, frame([(METADATA, xml), (JCAT, jcat)], {"nonce": session.nonce}), config=config
    )
    assert isinstance(pushed.error, VerificationError)
    result = outcome(dom0, session)
    assert result is not None and not result.ok and result.message == str(pushed.error)
    assert (
        not dom0.paths.metadata_dir.exists() or not (dom0.paths.metadata_dir / REMOTE_ID).exists()
    )
    assert_nothing_left(dom0)


def test_a_force_session_sets_a_future_baseline_aside(
    dom0: Dom0, metadata_push: tuple[bytes, bytes]
) -> None:
    future = datetime.now(UTC) + timedelta(days=30)
    state = {REMOTE_ID: {"signed_at": future.isoformat(), "sha256": "b" * 64}}
    dom0.paths.metadata_state_file.parent.mkdir(parents=True, exist_ok=True)
    dom0.paths.metadata_state_file.write_text(json.dumps(state))
    xml, jcat = metadata_push
    plain = open_metadata(dom0)
    stream = frame([(METADATA, xml), (JCAT, jcat)], {"nonce": plain.nonce})
    assert_refused(push(dom0, stream), RollbackError, r".*see refresh --force\)")
    forced = open_metadata(dom0, force=True)
    stream = frame([(METADATA, xml), (JCAT, jcat)], {"nonce": forced.nonce})
    assert push(dom0, stream).status == 0


def test_the_future_margin_comes_from_the_config(
    dom0: Dom0, metadata_push: tuple[bytes, bytes]
) -> None:
    """Metadata signed now, accepted one signed 30 minutes ahead: with a margin of 0 hours
    the accepted one lies in the future and --force sets it aside; with 24 it does not."""
    ahead = datetime.now(UTC) + timedelta(minutes=30)
    xml, jcat = metadata_push
    for margin, ok in ((24, False), (0, True)):
        _accepted_before(dom0, ahead)
        config = replace(dom0.config, metadata_future_margin_hours=margin)
        session = open_metadata(dom0, force=True)
        stream = frame([(METADATA, xml), (JCAT, jcat)], {"nonce": session.nonce})
        assert (push(dom0, stream, config=config).status == 0) is ok


# --------------------------------------------------------------------------- cabs
def test_signed_cab_is_installed_by_its_sha256(dom0: Dom0, cab: bytes) -> None:
    session = open_cab(dom0, cab)
    pushed = push(dom0, frame([(CAB_NAME, cab)], {"nonce": session.nonce}))
    assert (pushed.status, pushed.error) == (0, None)
    sha = hashlib.sha256(cab).hexdigest()
    dest = dom0.paths.cabs_dir / f"{sha}.cab"
    assert dest.read_bytes() == cab
    message = (
        f"{CAB_NAME} accepted: sha256 verified, {COMPONENT} 2.0.1, payload firmware.bin signed"
    )
    assert outcome(dom0, session) == Outcome(True, message, (str(dest),))
    assert dom0.log() == [f"receive cab: {message}"]
    assert list(dom0.paths.untrusted_dir.iterdir()) == []


def test_cab_with_another_sha256_is_refused_before_it_is_parsed(
    dom0: Dom0, cab: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect_cab ran on bytes no verified checksum binds")

    monkeypatch.setattr(receive_module, "inspect_cab", never)
    other = cab[:-1] + bytes([cab[-1] ^ 1])
    session = open_cab(dom0, cab)
    pushed = push(dom0, frame([(CAB_NAME, other)], {"nonce": session.nonce}))
    assert_refused(
        pushed,
        VerificationError,
        rf"{re.escape(CAB_NAME)}: sha256 does not match dom0's verified metadata",
    )
    assert outcome(dom0, session) == Outcome(False, str(pushed.error))
    assert_nothing_left(dom0)


def test_cab_session_without_a_release_is_refused(dom0: Dom0, cab: bytes) -> None:
    session = open_cab(dom0, cab, release=None)
    pushed = push(dom0, frame([(CAB_NAME, cab)], {"nonce": session.nonce}))
    assert_refused(pushed, TransferError, "cab session without an expected release")
    assert_nothing_left(dom0)


def test_cab_of_another_release_is_refused(dom0: Dom0, cab: bytes) -> None:
    session = open_cab(dom0, cab, release=ExpectedRelease(COMPONENT, "2.0.2", (GUID,)))
    pushed = push(dom0, frame([(CAB_NAME, cab)], {"nonce": session.nonce}))
    assert isinstance(pushed.error, VerificationError)
    assert "2.0.2" in str(pushed.error)
    assert_nothing_left(dom0)


def test_payload_trust_is_the_remotes_own(dom0: Dom0, cab: bytes) -> None:
    """A remote whose payload_anchors name a CA that is not the signer's refuses the cab."""
    other = dom0.paths.pki_firmware_dirs[0] / "other-ca.pem"
    other.write_bytes(b"")  # present, so the config is valid, but anchors nothing
    remote = replace(dom0.remote, payload_anchors=("other-ca.pem",))
    config = replace(dom0.config, remotes=(remote,))
    session = open_cab(dom0, cab)
    pushed = push(dom0, frame([(CAB_NAME, cab)], {"nonce": session.nonce}), config=config)
    assert isinstance(pushed.error, BrokerError) and pushed.status is None
    assert_nothing_left(dom0)


def _old_cab(dom0: Dom0, n: int, size: int) -> Path:
    dom0.paths.cabs_dir.mkdir(parents=True, exist_ok=True)
    path = dom0.paths.cabs_dir / f"{n:064x}.cab"
    path.write_bytes(b"c" * size)
    os.utime(path, (n, n))
    return path


def test_cab_cache_is_pruned_to_its_cap_keeping_the_new_cab(dom0: Dom0, cab: bytes) -> None:
    old = _old_cab(dom0, 1, MiB * 3 // 5)
    newer = _old_cab(dom0, 2, MiB * 2 // 5)
    config = replace(dom0.config, cab_cache_max_mib=1)
    session = open_cab(dom0, cab)
    assert push(dom0, frame([(CAB_NAME, cab)], {"nonce": session.nonce}), config=config).status == 0
    sha = hashlib.sha256(cab).hexdigest()
    assert not old.exists() and newer.exists()
    assert (dom0.paths.cabs_dir / f"{sha}.cab").exists()
    assert dom0.log()[0] == f"cab cache over cab_cache_max_mib: removed {old.name}"


# --------------------------------------------------------------------------- who may push
def test_a_qube_that_is_not_the_updatevm_is_refused_before_a_byte_is_read(
    dom0: Dom0, metadata_push: tuple[bytes, bytes]
) -> None:
    session = open_metadata(dom0)
    xml, jcat = metadata_push
    stream = frame([(METADATA, xml), (JCAT, jcat)], {"nonce": session.nonce})
    pushed = push(dom0, stream, caller="sys-\x1b[2Jevil")
    assert_refused(
        pushed,
        TransferError,
        re.escape(f"qube sys-?[2Jevil is not the configured UpdateVM ({UPDATEVM}); refused"),
    )
    assert pushed.unread == stream
    assert (dom0.paths.sessions_dir / f"{session.nonce}.pending").exists()  # not used up


def test_the_qube_a_pending_session_asked_may_push(
    dom0: Dom0, metadata_push: tuple[bytes, bytes]
) -> None:
    session = open_metadata(dom0, updatevm="sys-whonix")
    xml, jcat = metadata_push
    stream = frame([(METADATA, xml), (JCAT, jcat)], {"nonce": session.nonce})
    assert push(dom0, stream, caller="sys-whonix").status == 0
    # and the configured UpdateVM cannot use the session another qube was asked for
    other = open_metadata(dom0, updatevm="sys-whonix")
    stream = frame([(METADATA, xml), (JCAT, jcat)], {"nonce": other.nonce})
    assert_refused(push(dom0, stream), TransferError, r"qube sys-firewall pushed for a download .*")


def test_a_header_over_the_cap_is_refused(dom0: Dom0) -> None:
    session = open_metadata(dom0)
    config = replace(dom0.config, limits=Limits(header_max_bytes=100))
    stream = frame([(METADATA, b"x")], {"nonce": session.nonce, "pad": "p" * 100})
    pushed = push(dom0, stream, config=config)
    assert_refused(pushed, LimitExceeded, "header line longer than 100 bytes")


def test_a_malformed_nonce_is_refused(dom0: Dom0) -> None:
    open_metadata(dom0)
    pushed = push(dom0, frame([], {"nonce": "../x"}))
    assert_refused(pushed, TransferError, "malformed session nonce")


def test_an_unknown_nonce_is_refused(dom0: Dom0) -> None:
    pushed = push(dom0, frame([], {"nonce": "0" * 32}))
    assert_refused(pushed, TransferError, "no pending dom0 session for this nonce")


def test_the_deadline_comes_from_the_config(dom0: Dom0, monkeypatch: pytest.MonkeyPatch) -> None:
    config = replace(dom0.config, limits=Limits(transfer_seconds=0))
    assert_refused(push(dom0, b"{}\n", config=config), TransferError, r"transfer took too long .*")


# --------------------------------------------------------------------------- what is pushed
@pytest.mark.parametrize(
    "files",
    [
        [(METADATA, b"x")],
        [(METADATA, b"x"), (JCAT, b"y"), ("extra.bin", b"z")],
        [(METADATA, b"x"), ("other.jcat", b"y")],
    ],
)
def test_files_other_than_those_asked_for_are_refused(
    dom0: Dom0, files: list[tuple[str, bytes]]
) -> None:
    session = open_metadata(dom0)
    pushed = push(dom0, frame(files, {"nonce": session.nonce}))
    assert_refused(
        pushed,
        TransferError,
        re.escape(f"pushed files do not match what dom0 asked for (expected {METADATA}, {JCAT})"),
    )
    assert outcome(dom0, session) == Outcome(False, str(pushed.error))
    assert_nothing_left(dom0)


def test_files_in_another_order_are_the_same_files(
    dom0: Dom0, metadata_push: tuple[bytes, bytes]
) -> None:
    xml, jcat = metadata_push
    session = open_metadata(dom0)
    assert push(dom0, frame([(JCAT, jcat), (METADATA, xml)], {"nonce": session.nonce})).status == 0


def test_a_file_over_its_cap_is_refused_and_at_it_accepted(dom0: Dom0, cab: bytes) -> None:
    files = (ExpectedFile(METADATA, 4), ExpectedFile(JCAT, 3))
    session = dom0.sessions.open("metadata", REMOTE_ID, files, 60)
    pushed = push(dom0, frame([(METADATA, b"1234"), (JCAT, b"1234")], {"nonce": session.nonce}))
    assert_refused(pushed, LimitExceeded, re.escape(f"{JCAT} is 4 bytes, more than the cap 3"))
    session = dom0.sessions.open("metadata", REMOTE_ID, files, 60)
    pushed = push(dom0, frame([(METADATA, b"1234"), (JCAT, b"123")], {"nonce": session.nonce}))
    assert not isinstance(pushed.error, LimitExceeded)  # on to the signature, which fails


def test_a_cab_of_another_size_is_refused_before_it_is_read(dom0: Dom0, cab: bytes) -> None:
    session = open_cab(dom0, cab)
    stream = frame([(CAB_NAME, cab + b"!")], {"nonce": session.nonce})
    pushed = push(dom0, stream)
    assert_refused(
        pushed,
        VerificationError,
        re.escape(f"{CAB_NAME} is {len(cab) + 1} bytes, verified metadata says {len(cab)}"),
    )
    assert_nothing_left(dom0)


def test_bytes_after_the_last_file_are_refused(dom0: Dom0, cab: bytes) -> None:
    session = open_cab(dom0, cab)
    pushed = push(dom0, frame([(CAB_NAME, cab)], {"nonce": session.nonce}) + b"X")
    assert_refused(pushed, TransferError, "unexpected bytes after the last file")
    assert_nothing_left(dom0)


def test_a_session_of_an_unknown_kind_is_refused(dom0: Dom0) -> None:
    session = dom0.sessions.open("firmware", REMOTE_ID, (ExpectedFile("a.bin", 10),), 60)
    pushed = push(dom0, frame([("a.bin", b"abc")], {"nonce": session.nonce}))
    assert_refused(pushed, TransferError, "unknown session kind 'firmware'")
    assert outcome(dom0, session) == Outcome(False, "unknown session kind 'firmware'")
    assert_nothing_left(dom0)


def test_the_verdict_is_made_printable(dom0: Dom0) -> None:
    session = dom0.sessions.open("cab", REMOTE_ID, (ExpectedFile("a\x1b[2J", 10),), 60)
    pushed = push(dom0, frame([("a.bin", b"abc")], {"nonce": session.nonce}))
    assert isinstance(pushed.error, TransferError)
    message = "pushed files do not match what dom0 asked for (expected a?[2J)"
    assert outcome(dom0, session) == Outcome(False, message)


# --------------------------------------------------------------------------- mutation gaps
def test_a_long_caller_name_is_cut_to_64_characters(dom0: Dom0) -> None:
    caller = "q" * 100
    pushed = push(dom0, frame([], {"nonce": "0" * 32}), caller=caller)
    shown = "q" * 63 + "…"
    assert_refused(
        pushed,
        TransferError,
        re.escape(f"qube {shown} is not the configured UpdateVM ({UPDATEVM}); refused"),
    )


def test_bytes_wait_in_the_untrusted_dir_under_the_sessions_nonce(
    dom0: Dom0, cab: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pushes never share a file: each names its files after its own session."""
    seen: list[list[str]] = []
    real = receive_module.inspect_cab

    def inspect(*args: Any, **kwargs: Any) -> Any:
        seen.append(sorted(os.listdir(dom0.paths.untrusted_dir)))
        return real(*args, **kwargs)

    monkeypatch.setattr(receive_module, "inspect_cab", inspect)
    session = open_cab(dom0, cab)
    assert push(dom0, frame([(CAB_NAME, cab)], {"nonce": session.nonce})).status == 0
    assert seen == [[f"{session.nonce}.0.UNTRUSTED"]]


def test_the_catalog_index_is_stored_beside_the_metadata(
    dom0: Dom0, metadata_push: tuple[bytes, bytes]
) -> None:
    xml, jcat = metadata_push
    session = open_metadata(dom0)
    assert push(dom0, frame([(METADATA, xml), (JCAT, jcat)], {"nonce": session.nonce})).status == 0
    index = json.loads((dom0.paths.metadata_dir / REMOTE_ID / INDEX_NAME).read_text())
    assert hashlib.sha256(xml).hexdigest() in json.dumps(index)


def test_a_long_skip_reason_is_cut_in_the_log(dom0: Dom0) -> None:
    version = "1." + "9" * 400
    xml = catalog().replace(b"</releases>", f'<release version="{version}"/></releases>'.encode())
    xml, jcat = dom0.metadata(xml)
    session = open_metadata(dom0)
    assert push(dom0, frame([(METADATA, xml), (JCAT, jcat)], {"nonce": session.nonce})).status == 0
    (line,) = [line for line in dom0.log() if line.startswith(f"metadata for {REMOTE_ID}: skip")]
    reason = line.removeprefix(f"metadata for {REMOTE_ID}: skipped ")
    assert len(reason) == 300 and reason.endswith("…")
    assert reason.startswith(f"{COMPONENT} 1.999")


def test_what_could_not_be_checked_is_logged_printable(
    dom0: Dom0, metadata_push: tuple[bytes, bytes]
) -> None:
    # a file in the trust store that holds no certificate: noted, never counted
    (dom0.paths.pki_metadata_dirs[0] / "junk\x1b[2J.pem").write_text("not a certificate\n")
    xml, jcat = metadata_push
    session = open_metadata(dom0)
    assert push(dom0, frame([(METADATA, xml), (JCAT, jcat)], {"nonce": session.nonce})).status == 0
    assert (
        f"metadata for {REMOTE_ID}: not checked: junk?[2J.pem: holds no PEM certificate"
        in dom0.log()
    )


def test_every_kind_of_signature_that_verified_is_named(
    dom0: Dom0, sandbox_pki: SandboxPki
) -> None:
    xml = catalog()
    path = dom0.work / "metadata-gpg"
    path.write_bytes(xml)
    jcat = build_jcat(
        {
            METADATA: [
                (BlobKind.SHA256, hashlib.sha256(xml).hexdigest()),
                (BlobKind.PKCS7, dom0.sign(METADATA, xml)),
                (BlobKind.GPG, sign_gpg(sandbox_pki, path)),
            ]
        }
    )
    store = dom0.paths.pki_metadata_dirs[0]
    shutil.copy(sandbox_pki.gpg_public_key, store / sandbox_pki.gpg_public_key.name)
    signers = dom0.remote.metadata_signers or frozenset()
    remote = replace(dom0.remote, metadata_signers=signers | {sandbox_pki.gpg_fingerprint})
    config = replace(dom0.config, remotes=(remote,))
    session = open_metadata(dom0)
    stream = frame([(METADATA, xml), (JCAT, jcat)], {"nonce": session.nonce})
    assert push(dom0, stream, config=config).status == 0
    result = outcome(dom0, session)
    assert result is not None and " (gpg, pkcs7), 1 releases" in result.message


def test_the_payload_signers_of_the_remote_apply_to_the_cab(dom0: Dom0, cab: bytes) -> None:
    remote = replace(dom0.remote, payload_signers=frozenset({"A" * 64}))
    config = replace(dom0.config, remotes=(remote,))
    session = open_cab(dom0, cab)
    pushed = push(dom0, frame([(CAB_NAME, cab)], {"nonce": session.nonce}), config=config)
    assert isinstance(pushed.error, VerificationError)
    assert "not a signer named for this purpose" in str(pushed.error)
    assert_nothing_left(dom0)


def test_a_new_cab_larger_than_the_cache_cap_is_kept(dom0: Dom0, cab: bytes) -> None:
    old = _old_cab(dom0, 1, 10)
    config = replace(dom0.config, cab_cache_max_mib=0)
    session = open_cab(dom0, cab)
    assert push(dom0, frame([(CAB_NAME, cab)], {"nonce": session.nonce}), config=config).status == 0
    assert not old.exists()
    assert (dom0.paths.cabs_dir / f"{hashlib.sha256(cab).hexdigest()}.cab").read_bytes() == cab


@pytest.mark.parametrize("over", [0, 1])
def test_the_cab_cache_cap_is_mib(dom0: Dom0, cab: bytes, over: int) -> None:
    old = _old_cab(dom0, 1, MiB - len(cab) + over)
    config = replace(dom0.config, cab_cache_max_mib=1)
    session = open_cab(dom0, cab)
    assert push(dom0, frame([(CAB_NAME, cab)], {"nonce": session.nonce}), config=config).status == 0
    assert old.exists() is (not over)


def test_every_payload_is_named_in_the_verdict(dom0: Dom0) -> None:
    second = b"second image\n" * 50
    artifact = (
        "<artifacts><artifact><filename>second.bin</filename>"
        f'<checksum type="sha256">{hashlib.sha256(second).hexdigest()}</checksum>'
        "</artifact></artifacts>"
    )
    meta = metainfo().replace(b"</checksum>", b"</checksum>" + artifact.encode())
    members = {"firmware.metainfo.xml": meta, "firmware.bin": FIRMWARE, "second.bin": second}
    jcat = build_jcat(
        {
            name: [
                (BlobKind.SHA256, hashlib.sha256(content).hexdigest()),
                (BlobKind.PKCS7, dom0.sign(name, content)),
            ]
            for name, content in members.items()
        }
    )
    archive = cabarchive.CabArchive()
    for name, content in {**members, "firmware.jcat": jcat}.items():
        archive[name] = cabarchive.CabFile(content)
    data = bytes(archive.save(compress=True))
    session = open_cab(dom0, data)
    assert push(dom0, frame([(CAB_NAME, data)], {"nonce": session.nonce})).status == 0
    result = outcome(dom0, session)
    assert result is not None
    assert result.message.endswith(", payload firmware.bin, second.bin signed")


def test_main_runs_the_service_as_qrexec_starts_it(
    dom0: Dom0, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ROOT_ENV, str(dom0.paths.root))
    monkeypatch.setenv("QREXEC_REMOTE_DOMAIN", "sys-evil")
    monkeypatch.delenv("QREXEC_SERVICE_ARGUMENT", raising=False)
    assert main() == 1
    err = capsys.readouterr().err
    assert err == (
        "qubes.FwupdReceiveUpdates: qube sys-evil is not the configured UpdateVM "
        "(sys-firewall); refused\n"
    )
    assert dom0.log()[-1].startswith("qubes.FwupdReceiveUpdates: refused: qube sys-evil")
