"""broker.signatures: what dom0 accepts as signed, on real LVFS material and the sandbox PKI."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import cabarchive
import pytest

from broker import signatures
from broker.config import LVFS_METADATA_SIGNERS, Limits
from broker.errors import FormatError, VerificationError
from broker.jcat import BlobKind, Jcat, JcatBlob, JcatItem, build_jcat, parse_jcat
from broker.sandbox.pki import SandboxPki, certificate_sha256, make_signer, sign_gpg, sign_pkcs7
from broker.signatures import (
    Signature,
    TrustPolicy,
    TrustStore,
    Verified,
    sha256_fd,
    verify_file,
    verify_gpg,
    verify_pkcs7,
)

from .conftest import FWUPD_PKI, KEY_TEST_CONTENT, PQ_CA, RefusedKey

LIMITS = Limits()
INSTALLED_TESTS = Path("/usr/share/installed-tests/fwupd")
LVFS_GPG_PREFIX = "3FC6B804"
PQ_UNLOADABLE = "LVFS-CA-2025PQ.pem: this openssl cannot load it"

CONTENT = b"sandbox firmware payload\n" * 64
OTHER = b"other firmware, not the one that was signed\n" * 64

OpenFd = Callable[[bytes], int]


def _parse(data: bytes) -> Jcat:
    return parse_jcat(data, LIMITS.jcat_max_bytes, LIMITS.jcat_json_max_bytes)


def _item(*blobs: tuple[int, str]) -> JcatItem:
    return JcatItem("firmware.bin", tuple(JcatBlob(kind, data) for kind, data in blobs))


def _sha256(data: bytes) -> tuple[int, str]:
    return BlobKind.SHA256, hashlib.sha256(data).hexdigest()


@pytest.fixture
def open_fd(tmp_path: Path) -> Iterator[OpenFd]:
    """A read-only descriptor on a file holding the bytes, its offset left somewhere
    in the middle as a caller might leave it."""
    fds: list[int] = []

    def _open(content: bytes) -> int:
        path = tmp_path / f"file{len(fds)}"
        path.write_bytes(content)
        fd = os.open(path, os.O_RDONLY)
        fds.append(fd)
        os.lseek(fd, len(content) // 2, os.SEEK_SET)
        return fd

    yield _open
    for fd in fds:
        os.close(fd)


@dataclass(frozen=True)
class Signed:
    pkcs7: str
    gpg: str
    pkcs7_other: str  # over OTHER
    gpg_other: str
    pkcs7_foreign: str  # over CONTENT, by the CA that no trust store holds
    pkcs7_no_attrs: str  # over CONTENT, without signed attributes (so no signingTime)
    signed_after: datetime


@pytest.fixture(scope="session")
def signed(
    sandbox_pki: SandboxPki,
    other_ca: tuple[Path, Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Signed:
    d = tmp_path_factory.mktemp("signed")
    content, other = d / "content", d / "other"
    content.write_bytes(CONTENT)
    other.write_bytes(OTHER)
    start = datetime.now(UTC).replace(microsecond=0)
    der = subprocess.run(
        ["openssl", "cms", "-sign", "-binary", "-noattr", "-md", "sha256", "-in", str(content),
         "-signer", str(sandbox_pki.signer_pem), "-inkey", str(sandbox_pki.signer_key),
         "-outform", "DER"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    return Signed(
        pkcs7=sign_pkcs7(sandbox_pki.signer_pem, sandbox_pki.signer_key, content),
        gpg=sign_gpg(sandbox_pki, content),
        pkcs7_other=sign_pkcs7(sandbox_pki.signer_pem, sandbox_pki.signer_key, other),
        gpg_other=sign_gpg(sandbox_pki, other),
        pkcs7_foreign=sign_pkcs7(other_ca[1], other_ca[2], content),
        pkcs7_no_attrs=_pkcs7_pem(der),
        signed_after=start,
    )


@pytest.fixture(scope="session")
def trust(trust_dir: Path) -> TrustStore:
    return TrustStore.from_dirs([trust_dir])


def _pkcs7_pem(der: bytes) -> str:
    return "-----BEGIN PKCS7-----\n" + base64.encodebytes(der).decode() + "-----END PKCS7-----\n"


def _refused(fd: int, item: JcatItem, trust: TrustStore, policy: TrustPolicy | None = None) -> str:
    with pytest.raises(VerificationError) as e:
        verify_file(fd, item, trust, policy or TrustPolicy(), name="firmware.bin")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("firmware.bin: ")
    return message


# --- real LVFS material (fwupd-tests) -------------------------------------------------


def _cab_members(cab: str) -> dict[str, bytes]:
    path = INSTALLED_TESTS / cab
    if not path.exists() or not (FWUPD_PKI / "LVFS-CA.pem").exists():
        pytest.skip(f"{path} or {FWUPD_PKI}/LVFS-CA.pem missing (Debian package fwupd-tests)")
    archive = cabarchive.CabArchive()
    archive.parse(path.read_bytes())
    return {name: bytes(archive[name].buf) for name in archive}


@pytest.mark.parametrize("device", ["fakedevice123", "fakedevice124"])
def test_real_lvfs_cab_verifies(device: str, open_fd: OpenFd) -> None:
    members = _cab_members(f"{device}.cab")
    raw_jcat = members[f"{device}.jcat"]
    assert raw_jcat.endswith(b"IHATECDN")  # the LVFS trailer parse_jcat must tolerate
    jcat = _parse(raw_jcat)
    firmware = members[f"{device}.bin"]

    verified = verify_file(
        open_fd(firmware),
        jcat.item_for(f"{device}.bin"),
        TrustStore.from_dirs([FWUPD_PKI]),
        name=f"{device}.bin",
    )

    assert verified.sha256 == hashlib.sha256(firmware).hexdigest()
    assert verified.size == len(firmware)
    by_kind = {s.kind: s for s in verified.signatures}
    assert set(by_kind) == {"pkcs7", "gpg"}
    assert by_kind["pkcs7"].signer.startswith("LVFS-CA.pem")
    assert "Richard Hughes" in by_kind["pkcs7"].signer
    assert by_kind["gpg"].signer.startswith(LVFS_GPG_PREFIX)
    for sig in verified.signatures:
        assert sig.signed_at is not None
        assert sig.signed_at.tzinfo is not None
        assert sig.signed_at.astimezone(UTC).date() == date(2024, 1, 21)
    assert verified.signed_at == max(s.signed_at for s in verified.signatures if s.signed_at)
    assert PQ_UNLOADABLE in verified.unverifiable


def test_real_lvfs_metainfo_item_verifies_too(open_fd: OpenFd) -> None:
    members = _cab_members("fakedevice124.cab")
    jcat = _parse(members["fakedevice124.jcat"])
    name = "fakedevice124.metainfo.xml"
    verified = verify_file(
        open_fd(members[name]), jcat.item_for(name), TrustStore.from_dirs([FWUPD_PKI]), name=name
    )
    assert {s.kind for s in verified.signatures} == {"pkcs7", "gpg"}


def test_real_lvfs_tampered_firmware_with_recomputed_checksums_is_refused(
    open_fd: OpenFd,
) -> None:
    members = _cab_members("fakedevice124.cab")
    item = _parse(members["fakedevice124.jcat"]).item_for("fakedevice124.bin")
    tampered = b"X" + members["fakedevice124.bin"][1:]
    # an attacker can always recompute the checksums; only the signatures hold
    kept = [b for b in item.blobs if b.kind not in (BlobKind.SHA256, BlobKind.SHA1)]
    forged = JcatItem(item.id, (*kept, JcatBlob(*_sha256(tampered))))
    message = _refused(open_fd(tampered), forged, TrustStore.from_dirs([FWUPD_PKI]))
    assert "pkcs7: signature does not match the file" in message
    assert "gpg: signature does not match the file" in message


def test_real_lvfs_both_pki_dirs_report_the_pq_ca_once(open_fd: OpenFd) -> None:
    members = _cab_members("fakedevice124.cab")
    item = _parse(members["fakedevice124.jcat"]).item_for("fakedevice124.bin")
    trust = TrustStore.from_dirs([FWUPD_PKI, Path("/etc/pki/fwupd-metadata")])
    verified = verify_file(open_fd(members["fakedevice124.bin"]), item, trust)
    assert verified.unverifiable.count(PQ_UNLOADABLE) == 1


def test_pq_ca_only_trust_store_refuses_and_names_the_unloadable_ca(
    tmp_path: Path, open_fd: OpenFd
) -> None:
    members = _cab_members("fakedevice124.cab")
    if not PQ_CA.exists():
        pytest.skip(f"{PQ_CA} missing")
    pq_only = tmp_path / "pq-only"
    pq_only.mkdir()
    shutil.copy(PQ_CA, pq_only)
    item = _parse(members["fakedevice124.jcat"]).item_for("fakedevice124.bin")

    message = _refused(open_fd(members["fakedevice124.bin"]), item, TrustStore.from_dirs([pq_only]))

    assert "no trusted signature" in message
    assert PQ_UNLOADABLE in message
    assert "pkcs7: no CA in the trust store that this openssl can load" in message
    assert "gpg: key not in the trust store" in message


def test_pq_ca_beside_a_trusted_ca_is_unverifiable_not_fatal(
    trust_dir: Path, signed: Signed, tmp_path: Path, open_fd: OpenFd
) -> None:
    if not PQ_CA.exists():
        pytest.skip(f"{PQ_CA} missing")
    both = tmp_path / "both"
    shutil.copytree(trust_dir, both)
    shutil.copy(PQ_CA, both)
    item = _item(_sha256(CONTENT), (BlobKind.PKCS7, signed.pkcs7))
    verified = verify_file(open_fd(CONTENT), item, TrustStore.from_dirs([both]))
    assert [s.signer.split(" ")[0] for s in verified.signatures] == ["sandbox-ca.pem"]
    assert verified.unverifiable == (PQ_UNLOADABLE,)


# --- a signature counts only for its purpose and signer ---------------------------------


def test_the_real_lvfs_payload_signatures_are_not_lvfs_metadata_signatures(
    open_fd: OpenFd,
) -> None:
    """fwupd-tests' fakedevice124.bin carries genuine LVFS signatures (PKCS#7 by the 2018
    LVFS instance certificate, GPG by 3FC6B804): both chain to what the trust store holds,
    neither is the signer the lvfs remote names for its metadata."""
    members = _cab_members("fakedevice124.cab")
    item = _parse(members["fakedevice124.jcat"]).item_for("fakedevice124.bin")
    fd = open_fd(members["fakedevice124.bin"])
    trust = TrustStore.from_dirs([FWUPD_PKI, Path("/etc/pki/fwupd-metadata")])
    assert verify_file(fd, item, trust).signatures  # anchored, for any purpose
    metadata = TrustPolicy(signers=LVFS_METADATA_SIGNERS)
    message = _refused(fd, item, trust, metadata)
    assert "pkcs7: signed by LVFS-CA.pem (CN=Richard Hughes), not a signer named for this" in (
        message
    )
    assert f"gpg: signed by {LVFS_GPG_PREFIX}" in message


@pytest.fixture(scope="session")
def second_signer(
    sandbox_pki: SandboxPki, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """Another code-signing certificate under the same sandbox CA (a firmware signer)."""
    return make_signer(sandbox_pki, tmp_path_factory.mktemp("second"), "Sandbox firmware signer")


def test_only_the_named_signer_counts_however_its_certificate_chains(
    sandbox_pki: SandboxPki,
    second_signer: tuple[Path, Path],
    trust: TrustStore,
    open_fd: OpenFd,
    tmp_path: Path,
) -> None:
    content = tmp_path / "content"
    content.write_bytes(CONTENT)
    by_other = sign_pkcs7(*second_signer, content)
    item = _item(_sha256(CONTENT), (BlobKind.PKCS7, by_other))
    pinned = TrustPolicy(signers=frozenset({certificate_sha256(sandbox_pki.signer_pem)}))
    assert verify_file(open_fd(CONTENT), item, trust).signatures  # chains: any purpose
    assert "signed by sandbox-ca.pem (CN=Sandbox firmware signer,O=qubes-fwupd sandbox), " in (
        _refused(open_fd(CONTENT), item, trust, pinned)
    )
    # the same signer named by its fingerprint or by its subject counts
    for name in (
        certificate_sha256(second_signer[0]),
        "CN=Sandbox firmware signer,O=qubes-fwupd sandbox",
    ):
        policy = TrustPolicy(signers=frozenset({name}))
        assert [s.kind for s in verify_file(open_fd(CONTENT), item, trust, policy).signatures] == [
            "pkcs7"
        ]


def test_a_gpg_signature_counts_only_by_a_named_key(
    sandbox_pki: SandboxPki, signed: Signed, trust: TrustStore, open_fd: OpenFd
) -> None:
    item = _item(_sha256(CONTENT), (BlobKind.GPG, signed.gpg))
    named = TrustPolicy(signers=frozenset({sandbox_pki.gpg_fingerprint.upper()}))
    assert verify_file(open_fd(CONTENT), item, trust, named).signatures
    other = TrustPolicy(signers=frozenset({"0" * 40}))
    assert "gpg: signed by " in _refused(open_fd(CONTENT), item, trust, other)


# --- post-quantum signatures: skipped by name ------------------------------------------


@pytest.fixture(scope="session")
def pq_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(the PQ CA, an ML-DSA-87 PKCS#7 over CONTENT, one over OTHER), made at run time as
    the LVFS's second signature is (broker.sandbox.pq)."""
    pq = pytest.importorskip("broker.sandbox.pq")
    try:
        pki = pq.create_pq_pki(tmp_path_factory.mktemp("pq"))
    except Exception as e:  # an older cryptography: no ML-DSA certificates
        pytest.skip(f"cannot make ML-DSA-87 certificates here: {e}")
    d = tmp_path_factory.mktemp("pq-content")
    (d / "content").write_bytes(CONTENT)
    (d / "other").write_bytes(OTHER)
    return pki.ca_pem, pq.sign_pkcs7_pq(pki, d / "content"), pq.sign_pkcs7_pq(pki, d / "other")


def _with_pq_ca(trust_dir: Path, pq_ca: Path, tmp_path: Path) -> TrustStore:
    both = tmp_path / "with-pq"
    shutil.copytree(trust_dir, both)
    shutil.copy(pq_ca, both / "sandbox-2025PQ.pem")
    return TrustStore.from_dirs([both])


@pytest.mark.parametrize("order", ["classic first", "pq first"])
def test_lvfs_style_item_verifies_by_its_classic_signature_and_names_the_pq_one(
    trust_dir: Path,
    signed: Signed,
    pq_signed: tuple[Path, str, str],
    tmp_path: Path,
    open_fd: OpenFd,
    order: str,
) -> None:
    """The LVFS's item: sha256, sha512, a classic and an ML-DSA-87 PKCS#7, GPG. The PQ one
    is named and skipped, and never dropped into the failures: the classic ones count."""
    pq_ca, pq_blob, _ = pq_signed
    pkcs7 = [(BlobKind.PKCS7, signed.pkcs7), (BlobKind.PKCS7, pq_blob)]
    item = _item(
        _sha256(CONTENT),
        (BlobKind.SHA512, hashlib.sha512(CONTENT).hexdigest()),
        *(pkcs7 if order == "classic first" else pkcs7[::-1]),
        (BlobKind.GPG, signed.gpg),
    )
    verified = verify_file(open_fd(CONTENT), item, _with_pq_ca(trust_dir, pq_ca, tmp_path))
    assert sorted(s.kind for s in verified.signatures) == ["gpg", "pkcs7"]
    assert [b.data for b in verified.verified_blobs if b.kind == BlobKind.PKCS7] == [signed.pkcs7]
    assert "pkcs7: ML-DSA-87 (post-quantum): this openssl cannot check it" in (
        verified.unverifiable
    )


def test_a_pq_signature_alone_never_counts(
    trust_dir: Path, pq_signed: tuple[Path, str, str], tmp_path: Path, open_fd: OpenFd
) -> None:
    pq_ca, pq_blob, _ = pq_signed
    item = _item(_sha256(CONTENT), (BlobKind.PKCS7, pq_blob))
    message = _refused(open_fd(CONTENT), item, _with_pq_ca(trust_dir, pq_ca, tmp_path))
    assert message == (
        "firmware.bin: no trusted signature "
        "(pkcs7: ML-DSA-87 (post-quantum): this openssl cannot check it (skipped))"
    )


def test_a_pq_signature_is_skipped_by_name_before_openssl_verifies(
    trust: TrustStore,
    pq_signed: tuple[Path, str, str],
    monkeypatch: pytest.MonkeyPatch,
    open_fd: OpenFd,
) -> None:
    """Skipped because of what it is, not because a check failed: openssl cms -verify is
    never run on it (it would print a chain failure, like an untrusted signer's)."""
    _, pq_blob, _ = pq_signed
    ran: list[list[str]] = []
    real_run = signatures._run

    def spy(argv: list[str], **kw: object) -> object:
        ran.append(list(argv))
        return real_run(argv, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(signatures, "_run", spy)
    with pytest.raises(signatures.Unverifiable, match="ML-DSA-87"):
        verify_pkcs7(open_fd(CONTENT), pq_blob, trust)
    assert not [a for a in ran if "-verify" in a]


def test_a_pq_signature_over_other_bytes_is_still_only_unverifiable(
    trust: TrustStore, signed: Signed, pq_signed: tuple[Path, str, str], open_fd: OpenFd
) -> None:
    """It cannot be checked either way: it neither helps nor sinks a file that a classic
    signature binds."""
    _, _, pq_other = pq_signed
    item = _item(_sha256(CONTENT), (BlobKind.PKCS7, pq_other), (BlobKind.PKCS7, signed.pkcs7))
    verified = verify_file(open_fd(CONTENT), item, trust)
    assert [s.kind for s in verified.signatures] == ["pkcs7"]


# --- sandbox PKI: what verifies -------------------------------------------------------


def test_sha256_pkcs7_and_gpg_verify(
    sandbox_pki: SandboxPki, trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    item = _item(
        _sha256(CONTENT),
        (BlobKind.SHA1, hashlib.sha1(CONTENT).hexdigest()),  # noqa: S324  # as LVFS ships it
        (BlobKind.SHA512, hashlib.sha512(CONTENT).hexdigest()),
        (BlobKind.PKCS7, signed.pkcs7),
        (BlobKind.GPG, signed.gpg),
    )
    fd = open_fd(CONTENT)

    verified = verify_file(fd, item, trust)

    assert verified.sha256 == hashlib.sha256(CONTENT).hexdigest()
    assert verified.size == len(CONTENT)
    by_kind = {s.kind: s for s in verified.signatures}
    assert by_kind["pkcs7"].signer == (
        "sandbox-ca.pem (CN=Sandbox LVFS signer,O=qubes-fwupd sandbox)"
    )
    assert "CN=Sandbox LVFS signer,O=qubes-fwupd sandbox" in by_kind["pkcs7"].identities
    assert by_kind["gpg"].signer == sandbox_pki.gpg_fingerprint
    for sig in verified.signatures:
        assert sig.signed_at is not None
        assert signed.signed_after - timedelta(seconds=2) <= sig.signed_at <= datetime.now(UTC)
    assert verified.unverifiable == ()
    assert os.lseek(fd, 0, os.SEEK_CUR) == 0


def test_the_anchoring_ca_file_is_the_one_named(
    trust_dir: Path, other_ca: tuple[Path, Path, Path], signed: Signed, tmp_path: Path,
    open_fd: OpenFd,
) -> None:  # fmt: skip
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(other_ca[0], store / "a-other-ca.pem")  # tried first, must not be credited
    shutil.copy(trust_dir / "sandbox-ca.pem", store / "z-sandbox-ca.pem")
    item = _item(_sha256(CONTENT), (BlobKind.PKCS7, signed.pkcs7))
    verified = verify_file(open_fd(CONTENT), item, TrustStore.from_dirs([store]))
    assert verified.signatures[0].signer.startswith("z-sandbox-ca.pem ")


def test_pkcs7_without_signed_attributes_has_no_signing_time(
    trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    sig = verify_pkcs7(open_fd(CONTENT), signed.pkcs7_no_attrs, trust)
    assert sig.kind == "pkcs7"
    assert sig.signed_at is None


def test_policy_without_sha256_accepts_a_signature_alone(
    trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    item = _item((BlobKind.PKCS7, signed.pkcs7))
    verified = verify_file(open_fd(CONTENT), item, trust, TrustPolicy(require_sha256=False))
    assert [s.kind for s in verified.signatures] == ["pkcs7"]


def test_one_trusted_signature_is_enough(
    trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    item = _item(
        _sha256(CONTENT), (BlobKind.PKCS7, signed.pkcs7_foreign), (BlobKind.GPG, signed.gpg)
    )
    verified = verify_file(open_fd(CONTENT), item, trust)
    assert [s.kind for s in verified.signatures] == ["gpg"]


def test_policy_ignores_kinds_it_does_not_accept(
    trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    item = _item(_sha256(CONTENT), (BlobKind.PKCS7, signed.pkcs7), (BlobKind.GPG, signed.gpg))
    verified = verify_file(open_fd(CONTENT), item, trust, TrustPolicy(accepted=frozenset({"gpg"})))
    assert [s.kind for s in verified.signatures] == ["gpg"]

    gpg_only = _item(_sha256(CONTENT), (BlobKind.GPG, signed.gpg))
    message = _refused(
        open_fd(CONTENT), gpg_only, trust, TrustPolicy(accepted=frozenset({"pkcs7"}))
    )
    assert "no signature of an accepted kind (pkcs7)" in message


def test_text_forged_in_an_unsigned_attribute_does_not_move_the_signing_time(
    trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    # unsignedAttrs lie outside the signature: anyone relaying the blob can add one, and
    # openssl cms -print writes a UTF8String value raw, so this one prints as a second
    # signedAttrs/signingTime block. The time must come from the signed attributes only.
    fake = (
        b"\n        signedAttrs:\n            object: signingTime (1.2.840.113549.1.9.5)\n"
        b"            set:\n              UTCTIME:Dec 31 23:59:59 2049 GMT\n"
    )
    private_oid = bytes.fromhex("2b0601040182c34f01")  # 1.3.6.1.4.1.41423.1
    forged = _pkcs7_pem(_with_unsigned_attribute(_pem_body(signed.pkcs7), private_oid, fake))
    assert forged != signed.pkcs7

    sig = verify_pkcs7(open_fd(CONTENT), forged, trust)

    assert sig.signed_at is not None
    assert sig.signed_at.year < 2049
    assert sig.signed_at == verify_pkcs7(open_fd(CONTENT), signed.pkcs7, trust).signed_at


# --- sandbox PKI: what is refused, and why --------------------------------------------


def test_tampered_content_is_refused(trust: TrustStore, signed: Signed, open_fd: OpenFd) -> None:
    tampered = CONTENT[:-1] + b"!"
    item = _item(_sha256(tampered), (BlobKind.PKCS7, signed.pkcs7), (BlobKind.GPG, signed.gpg))
    message = _refused(open_fd(tampered), item, trust)
    assert "no trusted signature" in message
    assert "pkcs7: signature does not match the file" in message
    assert "gpg: signature does not match the file" in message


def test_signer_from_a_ca_not_in_the_store_is_refused(
    trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    item = _item(_sha256(CONTENT), (BlobKind.PKCS7, signed.pkcs7_foreign))
    message = _refused(open_fd(CONTENT), item, trust)
    assert "pkcs7: not signed by a trusted CA" in message


def test_the_system_tls_store_is_not_a_trust_anchor(
    other_ca: tuple[Path, Path, Path], trust: TrustStore, signed: Signed, tmp_path: Path,
    open_fd: OpenFd, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # openssl cms -verify adds the default CA path and store unless told not to; point
    # both at the foreign CA, as a system store holding it would
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(other_ca[0], certs / "other.pem")
    subprocess.run(["openssl", "rehash", str(certs)], check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_DIR", str(certs))
    monkeypatch.setenv("SSL_CERT_FILE", str(other_ca[0]))
    with pytest.raises(VerificationError, match="not signed by a trusted CA"):
        verify_pkcs7(open_fd(CONTENT), signed.pkcs7_foreign, trust)


def test_pkcs7_over_other_bytes_is_refused(
    trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    item = _item(_sha256(CONTENT), (BlobKind.PKCS7, signed.pkcs7_other))
    message = _refused(open_fd(CONTENT), item, trust)
    assert "pkcs7: signature does not match the file" in message


def test_pkcs7_with_embedded_other_content_is_refused(
    sandbox_pki: SandboxPki, trust: TrustStore, tmp_path: Path, open_fd: OpenFd
) -> None:
    # a non-detached signature carries its own bytes; ours are what must match
    other = tmp_path / "other"
    other.write_bytes(OTHER)
    der = subprocess.run(
        ["openssl", "cms", "-sign", "-binary", "-nodetach", "-md", "sha256", "-in", str(other),
         "-signer", str(sandbox_pki.signer_pem), "-inkey", str(sandbox_pki.signer_key),
         "-outform", "DER"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    with pytest.raises(VerificationError, match="does not match the file"):
        verify_pkcs7(open_fd(CONTENT), _pkcs7_pem(der), trust)


def test_gpg_over_other_bytes_is_refused(
    trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    with pytest.raises(VerificationError, match="signature does not match the file"):
        verify_gpg(open_fd(CONTENT), signed.gpg_other, trust)


def test_sha256_only_is_refused(trust: TrustStore, open_fd: OpenFd) -> None:
    message = _refused(open_fd(CONTENT), _item(_sha256(CONTENT)), trust)
    assert message == "firmware.bin: no signature"


def test_pkcs7_only_without_sha256_is_refused(
    trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    message = _refused(open_fd(CONTENT), _item((BlobKind.PKCS7, signed.pkcs7)), trust)
    assert message == "firmware.bin: no sha256 checksum"


def test_sha1_does_not_stand_in_for_sha256(
    trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    item = _item(
        (BlobKind.SHA1, hashlib.sha1(CONTENT).hexdigest()),  # noqa: S324  # as LVFS ships it
        (BlobKind.PKCS7, signed.pkcs7),
    )
    message = _refused(open_fd(CONTENT), item, trust)
    assert message == "firmware.bin: no sha256 checksum"


@pytest.mark.parametrize(
    ("kind", "algo"),
    [(BlobKind.SHA256, "sha256"), (BlobKind.SHA1, "sha1"), (BlobKind.SHA512, "sha512")],
)
def test_a_wrong_checksum_is_refused(
    kind: BlobKind, algo: str, trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    wrong = hashlib.new(algo, OTHER).hexdigest()
    blobs = [(kind, wrong)] if kind == BlobKind.SHA256 else [_sha256(CONTENT), (kind, wrong)]
    item = _item(*blobs, (BlobKind.PKCS7, signed.pkcs7), (BlobKind.GPG, signed.gpg))
    message = _refused(open_fd(CONTENT), item, trust)
    assert message == f"firmware.bin: {algo} checksum does not match the file"


def test_gpg_by_a_key_not_in_the_store_is_refused(
    trust: TrustStore, refused_keys: dict[str, RefusedKey], open_fd: OpenFd
) -> None:
    item = _item(_sha256(KEY_TEST_CONTENT), (BlobKind.GPG, refused_keys["outsider"].signature))
    message = _refused(open_fd(KEY_TEST_CONTENT), item, trust)
    assert "gpg: key not in the trust store" in message


def test_gpg_by_an_outsider_verifies_once_its_key_is_trusted(
    refused_keys: dict[str, RefusedKey], open_fd: OpenFd
) -> None:
    # the control for the test above: the signature itself is sound
    key = refused_keys["outsider"]
    sig = verify_gpg(open_fd(KEY_TEST_CONTENT), key.signature, TrustStore((), (key.public_key,)))
    assert sig.signer == key.fingerprint


@pytest.mark.parametrize(
    ("label", "cause"),
    [("expired", "signing key has expired"), ("revoked", "signing key was revoked")],
)
def test_gpg_by_an_expired_or_revoked_trusted_key_is_refused(
    label: str, cause: str, refused_keys: dict[str, RefusedKey], open_fd: OpenFd
) -> None:
    key = refused_keys[label]
    item = _item(_sha256(KEY_TEST_CONTENT), (BlobKind.GPG, key.signature))
    message = _refused(open_fd(KEY_TEST_CONTENT), item, TrustStore((), (key.public_key,)))
    assert f"gpg: {cause}" in message


def _gpg_sign(pki: SandboxPki, home: Path, content: bytes, *options: str) -> str:
    shutil.copytree(pki.gpg_home, home)
    try:
        return subprocess.run(
            ["gpg", "--homedir", str(home), "--batch", "--armor", *options,
             "-u", pki.gpg_fingerprint],
            input=content, check=True, capture_output=True,
        ).stdout.decode()  # fmt: skip
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)


def test_gpg_inline_signed_message_is_not_a_detached_signature(
    sandbox_pki: SandboxPki, trust: TrustStore, tmp_path: Path, open_fd: OpenFd
) -> None:
    out = _gpg_sign(sandbox_pki, tmp_path / "g", OTHER, "--compress-algo", "none", "--sign")
    # one-pass signature, literal data (OTHER), signature: a good signature, of other bytes
    armored = out.replace("PGP MESSAGE", "PGP SIGNATURE")
    with pytest.raises(VerificationError, match="type 4, not a signature"):
        verify_gpg(open_fd(CONTENT), armored, trust)
    with pytest.raises(VerificationError, match="not one armored PGP signature"):
        verify_gpg(open_fd(CONTENT), out, trust)


@pytest.mark.parametrize(
    ("options", "cause"),
    [
        (("--digest-algo", "SHA1"), "weak hash"),
        (("--textmode",), "signature class 01 is not a binary signature"),
    ],
)
def test_gpg_weak_hash_or_text_mode_is_refused(
    options: tuple[str, ...], cause: str, sandbox_pki: SandboxPki, trust: TrustStore,
    tmp_path: Path, open_fd: OpenFd,
) -> None:  # fmt: skip
    armored = _gpg_sign(sandbox_pki, tmp_path / "g", CONTENT, *options, "--detach-sign")
    with pytest.raises(VerificationError, match=cause):
        verify_gpg(open_fd(CONTENT), armored, trust)
    # the control: the same key and content, default options, verify
    good = _gpg_sign(sandbox_pki, tmp_path / "h", CONTENT, "--detach-sign")
    assert verify_gpg(open_fd(CONTENT), good, trust).kind == "gpg"


def test_pkcs7_with_a_sha1_digest_is_refused(
    sandbox_pki: SandboxPki, trust: TrustStore, tmp_path: Path, open_fd: OpenFd
) -> None:
    content = tmp_path / "content"
    content.write_bytes(CONTENT)
    der = subprocess.run(
        ["openssl", "cms", "-sign", "-binary", "-md", "sha1", "-in", str(content),
         "-signer", str(sandbox_pki.signer_pem), "-inkey", str(sandbox_pki.signer_key),
         "-outform", "DER"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    with pytest.raises(VerificationError, match="weak digest"):
        verify_pkcs7(open_fd(CONTENT), _pkcs7_pem(der), trust)


def test_gpg_signature_compressed_into_many_is_refused_before_gpg(
    trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    # 1000 copies of a good signature deflate to a few hundred bytes; gpg would check and
    # report every one of them
    packets = signatures._dearmor_signature(signed.gpg)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = b"\x01" + squeeze.compress(packets * 1000) + squeeze.flush()
    compressed = bytes([0xC0 | 8, 0xFF]) + len(body).to_bytes(4, "big") + body
    armored = (
        "-----BEGIN PGP SIGNATURE-----\n\n"
        + base64.encodebytes(compressed).decode()
        + "-----END PGP SIGNATURE-----\n"
    )
    with pytest.raises(VerificationError, match="type 8, not a signature"):
        verify_gpg(open_fd(CONTENT), armored, trust)
    with pytest.raises(VerificationError, match="more than 8 PGP signatures"):
        many = base64.encodebytes(packets * 9).decode()
        verify_gpg(
            open_fd(CONTENT),
            f"-----BEGIN PGP SIGNATURE-----\n\n{many}-----END PGP SIGNATURE-----\n",
            trust,
        )


def _relabel(pem: str, label: str) -> str:
    return pem.replace("PKCS7-----", f"{label}-----")


@pytest.mark.parametrize(
    "shape",
    ["cms-then-pkcs7", "pkcs7-then-cms", "two-pkcs7", "text-before", "text-after", "header"],
)
def test_a_pkcs7_blob_is_one_pem_block_and_nothing_else(
    shape: str, trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    """openssl reads the first block labelled CMS or PKCS7, libjcat (in fwupd) the first
    labelled PKCS7: a genuine signature relabelled CMS before an attacker's PKCS7 block
    verifies in openssl while fwupd's parser gets the attacker's. Only one block passes."""
    genuine, evil = signed.pkcs7, signed.pkcs7_foreign
    blob = {
        "cms-then-pkcs7": _relabel(genuine, "CMS") + evil,
        "pkcs7-then-cms": genuine + _relabel(evil, "CMS"),
        "two-pkcs7": genuine + genuine,
        "text-before": "Signed by the LVFS\n" + genuine,
        "text-after": genuine + "trailing words\n",
        "header": genuine.replace("-----\n", "-----\nProc-Type: 4,ENCRYPTED\n", 1),
    }[shape]
    item = _item(_sha256(CONTENT), (BlobKind.PKCS7, blob))
    message = _refused(open_fd(CONTENT), item, trust)
    assert "not exactly one PEM block labelled PKCS7 (or CMS)" in message


def test_fwupd_gets_dom0s_re_encoding_of_the_verified_signatures(
    trust: TrustStore, signed: Signed, open_fd: OpenFd, tmp_path: Path
) -> None:
    """The blobs that travel on are dom0's: one PKCS7 block holding openssl's DER
    re-encoding (a CMS-labelled, 64-column input comes out as libjcat reads it), and a
    PGP armor dom0 wrote around the packets gpg checked, which verifies again."""
    sent = _relabel(signed.pkcs7, "CMS").replace("\n", "\r\n")
    sent_gpg = signed.gpg.replace("-----\n", "-----\nComment: sent by a mirror\n", 1)
    item = _item(_sha256(CONTENT), (BlobKind.PKCS7, sent), (BlobKind.GPG, sent_gpg))
    verified = verify_file(open_fd(CONTENT), item, trust)
    pkcs7, gpg = (b.data for b in verified.verified_blobs)
    assert pkcs7.startswith("-----BEGIN PKCS7-----\n") and pkcs7.count("-----BEGIN") == 1
    der = base64.b64decode("".join(pkcs7.splitlines()[1:-1]))
    (tmp_path / "sig.pem").write_text(signed.pkcs7)
    reencoded = subprocess.run(
        ["openssl", "cms", "-cmsout", "-inform", "PEM", "-in", str(tmp_path / "sig.pem"),
         "-outform", "DER"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert der == reencoded
    # the mirror's header is gone: dom0's armor is byte for byte what gpg itself writes
    assert gpg == signed.gpg
    again = verify_file(open_fd(CONTENT), _item(_sha256(CONTENT), (BlobKind.GPG, gpg)), trust)
    assert [s.kind for s in again.signatures] == ["gpg"]


@pytest.mark.parametrize(
    "armored",
    [
        "Hash: SHA256\n{sig}",
        "{sig}{sig}",
        "{sig}-----BEGIN PGP SIGNATURE-----\n",
        "{sig}trailing\n",
    ],
)
def test_a_gpg_blob_is_one_armor_and_nothing_else(
    armored: str, trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    item = _item(_sha256(CONTENT), (BlobKind.GPG, armored.format(sig=signed.gpg)))
    assert "gpg: not one armored PGP signature" in _refused(open_fd(CONTENT), item, trust)


def test_armor_checksum_is_rfc4880s_crc24() -> None:
    # RFC 4880 6.1's CRC-24 of "123456789" (the usual check value)
    assert signatures._crc24(b"123456789") == 0x21CF02


@pytest.mark.parametrize(
    ("blob", "cause"),
    [
        ("not a signature", r"not exactly one PEM block labelled PKCS7 \(or CMS\)"),
        ("-----BEGIN PKCS7-----\nAAAA\n-----END PKCS7-----\n", "openssl can read"),
        ("x" * 300_000, "larger than"),
    ],
)
def test_garbage_pkcs7_is_refused(
    blob: str, cause: str, trust: TrustStore, open_fd: OpenFd
) -> None:
    with pytest.raises(VerificationError, match=cause):
        verify_pkcs7(open_fd(CONTENT), blob, trust)


@pytest.mark.parametrize(
    ("blob", "cause"),
    [
        ("not a signature", "not one armored PGP signature"),
        ("-----BEGIN PGP SIGNATURE-----\n\n!!!!\n-----END PGP SIGNATURE-----\n", "base64"),
        ("-----BEGIN PGP SIGNATURE-----\n\n\n-----END PGP SIGNATURE-----\n", "empty"),
        ("-----BEGIN PGP SIGNATURE-----\n\nwgA=\n-----END PGP SIGNATURE-----\n", "gpg"),
        ("x" * 70_000, "larger than"),
    ],
)
def test_garbage_gpg_is_refused(blob: str, cause: str, trust: TrustStore, open_fd: OpenFd) -> None:
    with pytest.raises(VerificationError, match=cause):
        verify_gpg(open_fd(CONTENT), blob, trust)


def test_too_many_signature_blobs_are_refused_unchecked(
    trust: TrustStore, signed: Signed, open_fd: OpenFd, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args: object) -> Signature:
        raise AssertionError("a signature was checked")

    monkeypatch.setattr(signatures, "verify_pkcs7", must_not_run)
    item = _item(_sha256(CONTENT), *[(BlobKind.PKCS7, signed.pkcs7)] * 9)
    message = _refused(open_fd(CONTENT), item, trust)
    assert message == "firmware.bin: more than 8 signatures"


def test_jcat_without_items_names_no_item() -> None:
    jcat = _parse(build_jcat({}))
    with pytest.raises(FormatError, match="no items"):
        jcat.item_for("firmware.bin")


def test_only_an_unknown_blob_kind_is_refused(trust: TrustStore, open_fd: OpenFd) -> None:
    unknown = 99
    assert unknown not in set(BlobKind)
    message = _refused(open_fd(CONTENT), _item((unknown, "whatever")), trust)
    assert message == "firmware.bin: no sha256 checksum"
    message = _refused(open_fd(CONTENT), _item(_sha256(CONTENT), (unknown, "x")), trust)
    assert message == "firmware.bin: no signature"


def test_empty_trust_store_refuses_both_kinds(signed: Signed, open_fd: OpenFd) -> None:
    item = _item(_sha256(CONTENT), (BlobKind.PKCS7, signed.pkcs7), (BlobKind.GPG, signed.gpg))
    message = _refused(open_fd(CONTENT), item, TrustStore((), ()))
    assert "pkcs7: no CA in the trust store" in message
    assert "gpg: key not in the trust store" in message


def test_a_file_that_changes_during_verification_is_refused(
    trust: TrustStore, signed: Signed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "growing"
    path.write_bytes(CONTENT)
    real = signatures.verify_pkcs7

    def append_then_verify(fd: int, pem: str, store: TrustStore) -> Signature:
        with path.open("ab") as f:
            f.write(b"appended by someone else")
        return real(fd, pem, store)

    monkeypatch.setattr(signatures, "verify_pkcs7", append_then_verify)
    item = _item(_sha256(CONTENT), (BlobKind.PKCS7, signed.pkcs7))
    fd = os.open(path, os.O_RDONLY)
    try:
        message = _refused(fd, item, trust)
    finally:
        os.close(fd)
    assert message == "firmware.bin: changed while it was being verified"


def test_no_gpg_agent_or_homedir_is_left_behind(
    trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    item = _item(_sha256(CONTENT), (BlobKind.GPG, signed.gpg))
    verify_file(open_fd(CONTENT), item, trust)
    ours = subprocess.run(["pgrep", "-af", "qfw-vgpg-"], capture_output=True, text=True).stdout
    assert ours == ""


# --- pieces ---------------------------------------------------------------------------


def test_sha256_fd_streams_the_whole_file_and_keeps_the_offset(open_fd: OpenFd) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one chunk, not a multiple of it
    fd = open_fd(data)
    offset = os.lseek(fd, 0, os.SEEK_CUR)
    assert sha256_fd(fd) == (hashlib.sha256(data).hexdigest(), len(data))
    assert os.lseek(fd, 0, os.SEEK_CUR) == offset


def test_trust_store_from_dirs(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for p in (a / "z.pem", a / "b.pem", b / "c.pem", a / "GPG-KEY-x", b / "GPG-KEY-y"):
        p.write_text("x")
    (a / "README").write_text("x")
    (a / "d.pem").mkdir()
    store = TrustStore.from_dirs([a, tmp_path / "missing", b])
    assert store.ca_files == (a / "b.pem", a / "z.pem", b / "c.pem")
    assert store.gpg_key_files == (a / "GPG-KEY-x", b / "GPG-KEY-y")
    assert TrustStore.from_dirs([tmp_path / "missing"]) == TrustStore((), ())


def test_verified_signed_at_is_the_newest() -> None:
    old, new = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC)
    sigs = (Signature("pkcs7", "a", old), Signature("gpg", "b", new), Signature("x", "c", None))
    assert Verified("0" * 64, 1, sigs, ()).signed_at == new
    assert Verified("0" * 64, 1, (Signature("pkcs7", "a", None),), ()).signed_at is None


def test_tools_are_bounded_in_output_and_time() -> None:
    with pytest.raises(VerificationError, match="wrote more than 1000 bytes"):
        signatures._run(["yes"], limit=1000)
    with pytest.raises(VerificationError, match="did not finish within"):
        signatures._run(["sleep", "5"], timeout=0.3)


PRIMARY, SUBKEY = "A" * 40, "B" * 40


def _validsig(fpr: str = PRIMARY, primary: str = PRIMARY, sig_class: str = "00") -> list[str]:
    return ["VALIDSIG", fpr, "2024-01-21", "1705829736", "0", "4", "0", "1", "8", sig_class,
            primary]  # fmt: skip


GOOD_RUN = [["NEWSIG"], ["GOODSIG", "KEYID", "uid"], _validsig()]


@pytest.mark.parametrize(
    ("statuses", "returncode", "cause"),
    [
        ([["NEWSIG"], ["GOODSIG", "K", "u"], _validsig("D" * 40, "C" * 40)], 0, "not in the trust"),
        ([["NEWSIG"], ["BADSIG", "K", "u"]], 1, "does not match the file"),
        ([["NEWSIG"], ["ERRSIG", "K", "1", "8", "00", "1705829736", "9", "F"]], 2, "not in the"),
        ([["NEWSIG"], ["ERRSIG", "K", "1", "8", "00", "1705829736", "4", "F"]], 2, "could not"),
        ([["NEWSIG"], ["EXPKEYSIG", "K", "u"], _validsig()], 0, "has expired"),
        ([["NEWSIG"], ["REVKEYSIG", "K", "u"], _validsig()], 0, "was revoked"),
        ([*GOOD_RUN, ["NEWSIG"]], 0, "did not report a good signature"),
        (GOOD_RUN, 1, "did not report a good signature"),
        ([], 0, "did not report a good signature"),
        ([["NEWSIG"], ["GOODSIG", "K", "u"], _validsig()[:10]], 0, "without its primary key"),
    ],
)
def test_gpg_decision_refusals(statuses: list[list[str]], returncode: int, cause: str) -> None:
    with pytest.raises(VerificationError, match=cause):
        signatures._gpg_decision(statuses, returncode, {PRIMARY})


def test_gpg_decision_accepts_a_subkey_of_a_trusted_primary() -> None:
    statuses = [["NEWSIG"], ["GOODSIG", "K", "u"], _validsig(SUBKEY, PRIMARY)]
    sig = signatures._gpg_decision(statuses, 0, {PRIMARY})
    assert sig == Signature(
        "gpg",
        PRIMARY,
        datetime(2024, 1, 21, 9, 35, 36, tzinfo=UTC),
        identities=frozenset({PRIMARY}),
    )


# --- a small DER editor, for the unsigned-attribute test ------------------------------


def _pem_body(pem: str) -> bytes:
    lines = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    return base64.b64decode("".join(lines))


def _tlvs(der: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(der):
        tag, first = der[pos], der[pos + 1]
        pos += 2
        if first & 0x80:
            n = first & 0x7F
            length = int.from_bytes(der[pos : pos + n], "big")
            pos += n
        else:
            length = first
        out.append((tag, der[pos : pos + length]))
        pos += length
    return out


def _enc(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _enc_all(tlvs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(_enc(tag, content) for tag, content in tlvs)


def _with_unsigned_attribute(der: bytes, oid: bytes, text: bytes) -> bytes:
    """Append unsignedAttrs [1] { oid: UTF8String text } to the first SignerInfo."""
    [(_, content_info)] = _tlvs(der)
    content_type, (_, wrapped) = _tlvs(content_info)
    [(_, signed_data)] = _tlvs(wrapped)
    sd = _tlvs(signed_data)
    signer_infos = _tlvs(sd[-1][1])
    first = _tlvs(signer_infos[0][1])
    first.append((0xA1, _enc(0x30, _enc(0x06, oid) + _enc(0x31, _enc(0x0C, text)))))
    signer_infos[0] = (0x30, _enc_all(first))
    sd[-1] = (0x31, _enc_all(signer_infos))
    return _enc(0x30, _enc(*content_type) + _enc(0xA0, _enc(0x30, _enc_all(sd))))


# --- what the mutation run (make mutation) found untested --------------------------------


def _cms(pki: SandboxPki, content: bytes, signers: list[tuple[str, datetime | None]]) -> str:
    """A detached PKCS#7 by the sandbox signer with one SignerInfo per (digest, signing
    time): no signed attributes at all when the time is None; a GeneralizedTime from 2050
    on (RFC 5652 11.3). Laid out with asn1crypto, signed for real (openssl verifies it)."""
    from asn1crypto import algos, cms  # type: ignore[import-untyped]
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.hazmat.primitives.serialization import Encoding

    from broker.sandbox.pq import signed_attrs_to_sign

    DER = Encoding.DER

    key = serialization.load_pem_private_key(pki.signer_key.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    cert = x509.load_pem_x509_certificate(pki.signer_pem.read_bytes())
    sid = cms.SignerIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber(
        {"issuer": cms.Name.load(cert.issuer.public_bytes()), "serial_number": cert.serial_number}
    )})  # fmt: skip
    infos, digests = [], {}
    for digest, when in signers:
        algorithm = algos.DigestAlgorithm({"algorithm": digest})
        digests[digest] = algorithm
        hash_algorithm = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}[digest]  # noqa: S303
        rsa_pkcs1 = algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"})
        info = {"version": "v1", "sid": sid, "digest_algorithm": algorithm,
                "signature_algorithm": rsa_pkcs1}  # fmt: skip
        to_sign = content
        if when is not None:
            time = {"generalized_time": when} if when.year >= 2050 else {"utc_time": when}
            attrs = cms.CMSAttributes([
                cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
                cms.CMSAttribute({"type": "signing_time", "values": [cms.Time(time)]}),
                cms.CMSAttribute({"type": "message_digest",
                                  "values": [hashlib.new(digest, content).digest()]}),
            ])  # fmt: skip
            info["signed_attrs"] = attrs
            to_sign = signed_attrs_to_sign(attrs.dump())
        info["signature"] = key.sign(to_sign, padding.PKCS1v15(), hash_algorithm)
        infos.append(cms.SignerInfo(info))
    signed_data = cms.SignedData({
        "version": "v1", "digest_algorithms": list(digests.values()),
        "encap_content_info": {"content_type": "data"},
        "certificates": [cms.CertificateChoices.load(cert.public_bytes(DER))],
        "signer_infos": infos,
    })  # fmt: skip
    content_info = cms.ContentInfo({"content_type": "signed_data", "content": signed_data})
    return _pkcs7_pem(content_info.dump())


WHEN = datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC)


def test_every_signer_is_read_not_only_the_first(
    sandbox_pki: SandboxPki, trust: TrustStore, open_fd: OpenFd
) -> None:
    """A first SignerInfo without signed attributes does not end the walk: the second's
    signing time is read, and its SHA-1 refused."""
    both = _cms(sandbox_pki, CONTENT, [("sha256", None), ("sha256", WHEN)])
    assert verify_pkcs7(open_fd(CONTENT), both, trust).signed_at == WHEN
    weak_second = _cms(sandbox_pki, CONTENT, [("sha256", None), ("sha1", WHEN)])
    with pytest.raises(VerificationError, match="weak digest"):
        verify_pkcs7(open_fd(CONTENT), weak_second, trust)


def test_a_signing_time_from_2050_on_is_a_generalized_time(
    sandbox_pki: SandboxPki, trust: TrustStore, open_fd: OpenFd
) -> None:
    when = datetime(2051, 12, 31, 23, 59, 58, tzinfo=UTC)
    pem = _cms(sandbox_pki, CONTENT, [("sha256", when)])
    assert b"\x18\x0f20511231235958Z" in _pem_body(pem)  # GeneralizedTime, 15 bytes
    assert verify_pkcs7(open_fd(CONTENT), pem, trust).signed_at == when


@pytest.mark.parametrize(
    ("tag", "raw", "when"),
    [
        (0x17, b"491231235959Z", datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)),
        (0x17, b"500101000000Z", datetime(1950, 1, 1, tzinfo=UTC)),
        (0x18, b"20510102030405Z", datetime(2051, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ],
)
def test_signing_times_are_read_as_rfc_5280_has_them(tag: int, raw: bytes, when: datetime) -> None:
    assert signatures._parse_time(tag, raw) == when


NOT_A_TIME = "signingTime is neither UTCTime nor GeneralizedTime in UTC"


@pytest.mark.parametrize(
    ("tag", "raw", "message"),
    [
        (0x17, b"20510102030405Z", NOT_A_TIME),  # a GeneralizedTime's text in a UTCTime
        (0x18, b"510102030405Z", NOT_A_TIME),  # and the other way round
        (0x18, b"20510102030405+0100", NOT_A_TIME),  # not UTC
        (0x17, b"\xff" * 12 + b"Z", NOT_A_TIME),  # not ASCII: refused, not a crash
        (0x04, b"491231235959Z", NOT_A_TIME),  # not a time
        (0x17, b"491231235960Z", "signingTime is not a date"),  # no 60th second
    ],
)
def test_other_signing_times_are_refused(tag: int, raw: bytes, message: str) -> None:
    with pytest.raises(signatures._DerError) as e:
        signatures._parse_time(tag, raw)
    assert str(e.value) == message


def test_gpg_iso_signature_times_are_utc() -> None:
    """gpg writes a signature time as seconds or, in some versions, ISO 8601."""
    assert signatures._gpg_time("20240102T030405") == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert signatures._gpg_time("1705829736") == datetime(2024, 1, 21, 9, 35, 36, tzinfo=UTC)


def test_pq_algorithm_identifiers_are_der_encoded() -> None:
    """The OIDs a SignerInfo is matched against, as X.690 8.19 encodes them."""
    assert signatures._der_oid("2.16.840.1.101.3.4.3.19") == bytes.fromhex("608648016503040313")
    assert signatures._der_oid("1.2.840.113549.1.7.2") == signatures._OID_SIGNED_DATA
    assert signatures._der_oid("1.2.16384") == bytes([0x2A, 0x81, 0x80, 0x00])
    assert signatures._der_oid("1.2.127.128") == bytes([0x2A, 0x7F, 0x81, 0x00])
    assert signatures._PQ_BY_DER[bytes.fromhex("608648016503040313")] == "ML-DSA-87"


def test_the_signer_is_described_from_openssls_words(monkeypatch: pytest.MonkeyPatch) -> None:
    """Subject and fingerprint as openssl prints them; a line it may not print is left
    empty, a byte that is not ASCII is replaced, and no fingerprint is a refusal."""
    out = [b"sha256 Fingerprint=AB:cd:01\n"]
    monkeypatch.setattr(signatures, "_run", lambda argv: signatures._Ran(0, out[0], b""))
    assert signatures._signer_identity(Path("x")) == ("", "ABCD01")
    out[0] = b"subject=CN=caf\xc3\xa9\nSHA256 Fingerprint=00:FF\n"
    assert signatures._signer_identity(Path("x")) == ("CN=caf\ufffd\ufffd", "00FF")
    out[0] = b"subject=CN=x\n"
    with pytest.raises(VerificationError) as e:
        signatures._signer_identity(Path("x"))
    assert str(e.value) == "openssl could not describe the signer certificate"


def test_trust_store_from_dirs_only_the_named_files(tmp_path: Path) -> None:
    for name in ("a.pem", "b.pem", "GPG-KEY-a", "GPG-KEY-b"):
        (tmp_path / name).write_text("x")
    (tmp_path / "GPG-KEY-dir").mkdir()
    store = TrustStore.from_dirs([tmp_path], only=["b.pem", "GPG-KEY-a", "GPG-KEY-dir"])
    assert store == TrustStore((tmp_path / "b.pem",), (tmp_path / "GPG-KEY-a",))
    assert TrustStore.from_dirs([tmp_path], only=[]) == TrustStore((), ())
    assert TrustStore.from_dirs([tmp_path]).gpg_key_files == (
        tmp_path / "GPG-KEY-a", tmp_path / "GPG-KEY-b",
    )  # fmt: skip


def _fake_tool(directory: Path, name: str, script: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / name).write_text("#!/bin/sh\n" + script)
    (directory / name).chmod(0o755)


def test_the_callers_environment_does_not_pick_the_tools(
    trust: TrustStore, signed: Signed, open_fd: OpenFd, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """openssl and gpg run with dom0's own PATH, not the caller's (nor its GNUPGHOME)."""
    fake, marker = tmp_path / "bin", tmp_path / "ran"
    for tool in ("openssl", "gpg"):
        _fake_tool(fake, tool, f"touch {marker}\nexit 0\n")
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setenv("GNUPGHOME", str(tmp_path / "caller-gnupg"))
    item = _item(_sha256(CONTENT), (BlobKind.PKCS7, signed.pkcs7), (BlobKind.GPG, signed.gpg))
    verified = verify_file(open_fd(CONTENT), item, trust)
    assert [s.kind for s in verified.signatures] == ["pkcs7", "gpg"]
    assert not marker.exists() and not (tmp_path / "caller-gnupg").exists()


def test_a_gpg_that_hangs_is_killed_at_the_deadline(
    trust: TrustStore, signed: Signed, open_fd: OpenFd, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    fake = tmp_path / "bin"
    hang = 'case "$*" in *--verify*) exec sleep 30;; esac\nexec /usr/bin/gpg "$@"\n'
    _fake_tool(fake, "gpg", hang)
    monkeypatch.setitem(signatures._ENV, "PATH", f"{fake}:/usr/bin:/bin")
    monkeypatch.setattr(signatures, "_TIMEOUT_S", 1.0)
    start = time.monotonic()
    with pytest.raises(VerificationError) as e:
        verify_gpg(open_fd(CONTENT), signed.gpg, trust)
    assert str(e.value) == "gpg did not finish within 1 s"
    assert time.monotonic() - start < 10


def test_a_refusal_names_the_file_and_leaves_the_offset_at_0(
    trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    fd = open_fd(CONTENT)
    with pytest.raises(VerificationError) as e:
        verify_file(fd, _item((BlobKind.PKCS7, signed.pkcs7)), trust)
    assert str(e.value) == "file: no sha256 checksum"
    assert os.lseek(fd, 0, os.SEEK_CUR) == 0


def test_eight_signatures_are_each_checked_and_no_kind_accepted_says_none(
    trust: TrustStore, open_fd: OpenFd
) -> None:
    eight = _item(_sha256(CONTENT), *[(BlobKind.PKCS7, f"not a signature {i}") for i in range(8)])
    message = _refused(open_fd(CONTENT), eight, trust)
    assert message.startswith("firmware.bin: no trusted signature (pkcs7: not exactly one PEM")
    nothing = TrustPolicy(accepted=frozenset())
    assert _refused(open_fd(CONTENT), eight, trust, nothing) == (
        "firmware.bin: no signature of an accepted kind (none)"
    )


def test_gpg_keeps_to_its_private_home_whatever_gnupghome_says(
    trust: TrustStore, signed: Signed, open_fd: OpenFd, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The keyring is a fresh one per check (--homedir), never one the environment names."""
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setitem(signatures._ENV, "GNUPGHOME", str(elsewhere))
    assert verify_gpg(open_fd(CONTENT), signed.gpg, trust).kind == "gpg"
    assert not elsewhere.exists()


def test_a_refusal_lists_each_cause_and_cuts_a_long_signer(
    trust: TrustStore, signed: Signed, open_fd: OpenFd, monkeypatch: pytest.MonkeyPatch
) -> None:
    both_bad = _item(_sha256(CONTENT), (BlobKind.PKCS7, "x"), (BlobKind.GPG, "y"))
    assert _refused(open_fd(CONTENT), both_bad, trust) == (
        "firmware.bin: no trusted signature (pkcs7: not exactly one PEM block labelled PKCS7 "
        "(or CMS); gpg: not one armored PGP signature)"
    )
    long_signer = Signature("pkcs7", "S" * 200, None, "pem", frozenset({"someone"}))
    monkeypatch.setattr(signatures, "verify_pkcs7", lambda fd, pem, trust: long_signer)
    named = TrustPolicy(signers=frozenset({"someone else"}))
    message = _refused(open_fd(CONTENT), _item(_sha256(CONTENT), (BlobKind.PKCS7, "x")), trust,
                       named)  # fmt: skip
    assert f"pkcs7: signed by {'S' * 119}…, not a signer named for this purpose" in message


def test_a_verified_blob_keeps_its_timestamp(
    trust: TrustStore, signed: Signed, open_fd: OpenFd
) -> None:
    item = JcatItem("firmware.bin", (JcatBlob(BlobKind.SHA256, hashlib.sha256(CONTENT).hexdigest()),
                                     JcatBlob(BlobKind.GPG, signed.gpg, 1705829736)))  # fmt: skip
    (blob,) = verify_file(open_fd(CONTENT), item, trust).verified_blobs
    assert (blob.kind, blob.timestamp) == (BlobKind.GPG, 1705829736)
