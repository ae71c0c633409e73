"""broker.sandbox.pq: the sandbox's ML-DSA-87 CA and its detached PKCS#7 blobs are real,
valid post-quantum signatures laid out as RFC 5652 / RFC 9882 have them."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

cryptography = pytest.importorskip("cryptography", minversion="49")
cms = pytest.importorskip("asn1crypto.cms")
asn1_core = pytest.importorskip("asn1crypto.core")

from cryptography import x509  # noqa: E402
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.mldsa import (  # noqa: E402
    MLDSA87PrivateKey,
    MLDSA87PublicKey,
)
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402

from broker.sandbox.pq import (  # noqa: E402
    ID_ML_DSA_87,
    PQ_ALGORITHM_OIDS,
    PqPki,
    create_pq_pki,
    sign_pkcs7_pq,
    signed_attrs_to_sign,
)

try:
    MLDSA87PrivateKey.generate()
except UnsupportedAlgorithm:
    pytest.skip("this cryptography backend has no ML-DSA-87", allow_module_level=True)

from .conftest import PQ_CA  # noqa: E402

CONTENT = b"<components origin='lvfs'/>\n" * 100
SIGNING_TIME = datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC)
SHA512 = "2.16.840.1.101.3.4.2.3"
SHAKE256 = "2.16.840.1.101.3.4.2.12"


@pytest.fixture(scope="module")
def pq_pki(tmp_path_factory: pytest.TempPathFactory) -> PqPki:
    return create_pq_pki(tmp_path_factory.mktemp("pq-pki"))


@pytest.fixture
def content(tmp_path: Path) -> Path:
    path = tmp_path / "firmware.xml.zst"
    path.write_bytes(CONTENT)
    return path


def _der(pem: str) -> bytes:
    lines = pem.strip().splitlines()
    assert lines[0] == "-----BEGIN PKCS7-----"
    assert lines[-1] == "-----END PKCS7-----"
    return base64.b64decode("".join(lines[1:-1]), validate=True)


def _signer_info(pem: str) -> Any:
    info = cms.ContentInfo.load(_der(pem))
    assert info["content_type"].native == "signed_data"
    signer_infos = info["content"]["signer_infos"]
    assert len(signer_infos) == 1
    return signer_infos[0]


def _attr(signer_info: Any, name: str) -> Any:
    values = [a["values"] for a in signer_info["signed_attrs"] if a["type"].native == name]
    assert len(values) == 1 and len(values[0]) == 1, name
    return values[0][0]


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_create_pq_pki_is_idempotent_per_dir(tmp_path: Path) -> None:
    pki = create_pq_pki(tmp_path / "pki")
    files = (pki.ca_pem, pki.ca_key, pki.signer_pem, pki.signer_key)
    before = {f: f.read_bytes() for f in files}
    again = create_pq_pki(tmp_path / "pki")
    assert again == pki
    assert {f: f.read_bytes() for f in files} == before
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in (pki.ca_key, pki.signer_key))
    other = create_pq_pki(tmp_path / "other")
    assert other.ca_pem.read_bytes() != pki.ca_pem.read_bytes()


def test_hierarchy_is_ml_dsa_87_like_lvfs_2025pq(pq_pki: PqPki) -> None:
    ca, signer = _cert(pq_pki.ca_pem), _cert(pq_pki.signer_pem)
    for cert in (ca, signer):
        assert cert.signature_algorithm_oid.dotted_string == ID_ML_DSA_87
        assert isinstance(cert.public_key(), MLDSA87PublicKey)
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert basic.critical and basic.value.ca
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert signer.issuer == ca.subject
    assert not signer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    signer_usage = signer.extensions.get_extension_for_class(x509.KeyUsage).value
    assert signer_usage.digital_signature and not signer_usage.key_cert_sign
    eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CODE_SIGNING in eku


def test_chain_ca_to_signer_verifies(pq_pki: PqPki, tmp_path: Path) -> None:
    ca, signer = _cert(pq_pki.ca_pem), _cert(pq_pki.signer_pem)
    ca.verify_directly_issued_by(ca)
    signer.verify_directly_issued_by(ca)
    # a CA of the same name but another key did not issue it
    impostor = _cert(create_pq_pki(tmp_path / "impostor").ca_pem)
    assert impostor.subject == ca.subject
    with pytest.raises(InvalidSignature):
        signer.verify_directly_issued_by(impostor)


def test_blob_is_detached_signed_data_by_the_signer(pq_pki: PqPki, content: Path) -> None:
    pem = sign_pkcs7_pq(pq_pki, content, SIGNING_TIME)
    signed_data = cms.ContentInfo.load(_der(pem))["content"]
    assert signed_data["encap_content_info"]["content_type"].native == "data"
    assert signed_data["encap_content_info"]["content"].native is None  # detached
    signer = _cert(pq_pki.signer_pem)
    from cryptography.hazmat.primitives.serialization import Encoding

    assert [c.chosen.dump() for c in signed_data["certificates"]] == [
        signer.public_bytes(Encoding.DER)
    ]
    sid = signed_data["signer_infos"][0]["sid"]
    assert sid.name == "issuer_and_serial_number"
    assert sid.chosen["serial_number"].native == signer.serial_number
    assert sid.chosen["issuer"].dump() == signer.issuer.public_bytes()


def test_algorithm_identifiers_have_absent_parameters(pq_pki: PqPki, content: Path) -> None:
    signed_data = cms.ContentInfo.load(_der(sign_pkcs7_pq(pq_pki, content)))["content"]
    signer_info = signed_data["signer_infos"][0]
    algorithm = signer_info["signature_algorithm"]
    assert algorithm["algorithm"].dotted == ID_ML_DSA_87
    assert PQ_ALGORITHM_OIDS[algorithm["algorithm"].dotted] == "ML-DSA-87"
    for digest in (signer_info["digest_algorithm"], signed_data["digest_algorithms"][0]):
        assert digest["algorithm"].dotted == SHA512
    for identifier in (algorithm, signer_info["digest_algorithm"]):
        oid = asn1_core.ObjectIdentifier(identifier["algorithm"].dotted).dump()
        assert identifier.dump() == bytes([0x30, len(oid)]) + oid  # absent, not NULL


def test_signature_verifies_over_the_signed_attributes(pq_pki: PqPki, content: Path) -> None:
    signer_info = _signer_info(sign_pkcs7_pq(pq_pki, content, SIGNING_TIME))
    public_key = _cert(pq_pki.signer_pem).public_key()
    assert isinstance(public_key, MLDSA87PublicKey)
    signed = signer_info["signed_attrs"].dump()
    assert signed[0] == 0xA0  # [0] IMPLICIT inside SignerInfo
    to_sign = signed_attrs_to_sign(signed)
    assert to_sign[0] == 0x31 and to_sign[1:] == signed[1:]
    signature = signer_info["signature"].native
    public_key.verify(signature, to_sign)
    with pytest.raises(InvalidSignature):
        public_key.verify(signature, signed)  # RFC 5652 5.4: not over the [0] tagging
    tampered = bytearray(to_sign)
    tampered[-1] ^= 1
    with pytest.raises(InvalidSignature):
        public_key.verify(signature, bytes(tampered))


def test_message_digest_matches_the_file(pq_pki: PqPki, content: Path) -> None:
    signer_info = _signer_info(sign_pkcs7_pq(pq_pki, content))
    assert _attr(signer_info, "message_digest").native == hashlib.sha512(CONTENT).digest()
    assert _attr(signer_info, "content_type").native == "data"


def test_shake256_digest_is_512_bits(pq_pki: PqPki, content: Path) -> None:
    signer_info = _signer_info(sign_pkcs7_pq(pq_pki, content, digest="shake256"))
    assert signer_info["digest_algorithm"]["algorithm"].dotted == SHAKE256
    digest = _attr(signer_info, "message_digest").native
    assert digest == hashlib.shake_256(CONTENT).digest(64)
    public_key = _cert(pq_pki.signer_pem).public_key()
    assert isinstance(public_key, MLDSA87PublicKey)
    public_key.verify(
        signer_info["signature"].native, signed_attrs_to_sign(signer_info["signed_attrs"].dump())
    )


def test_signing_time_is_the_one_asked_for_as_utctime(pq_pki: PqPki, content: Path) -> None:
    signing_time = _attr(_signer_info(sign_pkcs7_pq(pq_pki, content, SIGNING_TIME)), "signing_time")
    assert signing_time.name == "utc_time"
    assert signing_time.native == SIGNING_TIME


def test_signing_time_defaults_to_now(pq_pki: PqPki, content: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    signing_time = _attr(_signer_info(sign_pkcs7_pq(pq_pki, content)), "signing_time").native
    assert before <= signing_time <= datetime.now(UTC)


def test_signing_time_outside_utctime_is_refused(pq_pki: PqPki, content: Path) -> None:
    with pytest.raises(ValueError, match="UTCTime"):
        sign_pkcs7_pq(pq_pki, content, datetime(2050, 1, 1, tzinfo=UTC))


def test_pq_algorithm_oids_name_the_nist_arcs() -> None:
    assert PQ_ALGORITHM_OIDS["2.16.840.1.101.3.4.3.17"] == "ML-DSA-44"
    assert PQ_ALGORITHM_OIDS["2.16.840.1.101.3.4.3.18"] == "ML-DSA-65"
    assert PQ_ALGORITHM_OIDS[ID_ML_DSA_87] == "ML-DSA-87"
    assert PQ_ALGORITHM_OIDS["2.16.840.1.101.3.4.3.20"] == "SLH-DSA-SHA2-128s"
    assert PQ_ALGORITHM_OIDS["2.16.840.1.101.3.4.3.31"] == "SLH-DSA-SHAKE-256f"
    assert PQ_ALGORITHM_OIDS["2.16.840.1.101.3.4.3.34"] == "HashML-DSA-87 with SHA-512"
    assert len(PQ_ALGORITHM_OIDS) == 30
    assert "1.2.840.113549.1.1.11" not in PQ_ALGORITHM_OIDS  # sha256WithRSAEncryption
    with pytest.raises(TypeError):
        PQ_ALGORITHM_OIDS["1.2.3"] = "x"  # type: ignore[index]


def test_real_lvfs_2025pq_ca_is_named_by_pq_algorithm_oids() -> None:
    if not PQ_CA.exists():
        pytest.skip(f"{PQ_CA} missing")
    assert PQ_ALGORITHM_OIDS[_cert(PQ_CA).signature_algorithm_oid.dotted_string] == "ML-DSA-87"


def test_openssl_parses_and_reencodes_the_blob_unchanged(pq_pki: PqPki, content: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    pem = sign_pkcs7_pq(pq_pki, content, SIGNING_TIME)
    out = subprocess.run(
        ["openssl", "cms", "-cmsout", "-inform", "PEM", "-outform", "DER"],
        input=pem.encode(), capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert out == _der(pem)
