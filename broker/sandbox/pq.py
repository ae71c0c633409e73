"""A post-quantum (ML-DSA-87) CA + signer and detached PKCS#7 signatures under it, made at
run time: stands in for the LVFS's second metadata signature (CA "LVFS CA 2025PQ").

The real LVFS signs each jcat item twice, once under its RSA CA and once under the ML-DSA-87
one. dom0's openssl (3.0) cannot check ML-DSA, so the sandbox makes such blobs to show that
dom0 names and skips them rather than failing on them.

``cryptography`` makes the keys, the certificates and the ML-DSA signature itself; its PKCS7
builder takes only RSA and EC keys, so the CMS SignedData around that signature is laid out
with ``asn1crypto`` (structure only). Both are test/sandbox dependencies, not runtime ones:
only the sandbox and the tests import this module.

Layout, per RFC 5652 and RFC 9882 (ML-DSA in CMS): digestAlgorithm SHA-512 (the algorithm
RFC 9882 says every implementation MUST support; GnuTLS, which libjcat signs with, picks
SHAKE256 instead, and ``digest="shake256"`` gives that, 512 bits of output as RFC 9882 has
it); signedAttrs contentType, signingTime (UTCTime) and messageDigest; signatureAlgorithm
id-ml-dsa-87 with absent parameters; pure ML-DSA (empty context) over the DER of the signed
attributes as a SET OF; sid issuerAndSerialNumber; certificates the signer's only.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from broker.sandbox.pki import CaFiles
from broker.signatures import PQ_SIGNATURE_ALGORITHMS

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA87PrivateKey

ID_ML_DSA_87 = "2.16.840.1.101.3.4.3.19"

# the verifier's table: what dom0 names and skips (shared, so the two cannot drift)
PQ_ALGORITHM_OIDS: Mapping[str, str] = PQ_SIGNATURE_ALGORITHMS

Digest = Literal["sha512", "shake256"]
_DIGEST_OIDS: Mapping[str, str] = MappingProxyType(
    {
        "sha256": "2.16.840.1.101.3.4.2.1",
        "sha512": "2.16.840.1.101.3.4.2.3",
        "shake256": "2.16.840.1.101.3.4.2.12",
    }
)


@dataclass(frozen=True)
class PqPki(CaFiles):
    """The ML-DSA-87 CA and signer (the same file layout as the classic sandbox PKI)."""


def _write_key(path: Path, key: MLDSA87PrivateKey) -> None:
    from cryptography.hazmat.primitives import serialization

    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def create_pq_pki(dir: Path, name: str = "Sandbox LVFS 2025PQ") -> PqPki:
    """Make, once per ``dir``, an ML-DSA-87 self-signed CA with the extensions of the LVFS
    2025PQ CA (basicConstraints CA pathlen 1 and keyUsage keyCertSign+cRLSign, both
    critical; extendedKeyUsage codeSigning) and an ML-DSA-87 code-signing certificate under
    it. Later calls load nothing and return the same paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA87PrivateKey
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    pki = PqPki(dir)
    if pki.signer_pem.exists():
        return pki
    dir.mkdir(parents=True, exist_ok=True)

    def subject(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qubes-fwupd sandbox"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )

    def key_usage(*, digital_signature: bool, cert_sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=digital_signature, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
            decipher_only=False,
        )  # fmt: skip

    now = datetime.now(UTC).replace(microsecond=0)
    code_signing = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING])

    ca_key = MLDSA87PrivateKey.generate()
    ca_name = subject(f"{name} CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(key_usage(digital_signature=False, cert_sign=True), critical=True)
        .add_extension(code_signing, critical=False)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, None)
    )

    signer_key = MLDSA87PrivateKey.generate()
    signer = (
        x509.CertificateBuilder()
        .subject_name(subject(f"{name} signer"))
        .issuer_name(ca_name)
        .public_key(signer_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True, cert_sign=False), critical=True)
        .add_extension(code_signing, critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(signer_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, None)
    )

    _write_key(pki.ca_key, ca_key)
    pki.ca_pem.write_bytes(_cert_pem(ca))
    _write_key(pki.signer_key, signer_key)
    # written last: its presence marks a complete PKI
    pki.signer_pem.write_bytes(_cert_pem(signer))
    return pki


def signed_attrs_to_sign(signed_attrs_der: bytes) -> bytes:
    """RFC 5652 5.4: the signature covers the signed attributes DER-encoded as a SET OF
    (tag 0x31), not with the [0] IMPLICIT tag (0xA0) they carry inside SignerInfo."""
    if not signed_attrs_der or signed_attrs_der[0] not in (0x31, 0xA0):
        raise ValueError("not a DER-encoded SET OF / [0] IMPLICIT attributes")
    return b"\x31" + signed_attrs_der[1:]


def sign_pkcs7_pq(
    pki: PqPki,
    content: Path,
    signing_time: datetime | None = None,
    *,
    digest: Digest = "sha512",
) -> str:
    """Detached CMS SignedData over ``content`` by the ML-DSA-87 signer of ``pki``, as PEM
    with the PKCS7 label that libjcat reads (like pki.sign_pkcs7)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA87PrivateKey

    key = serialization.load_pem_private_key(pki.signer_key.read_bytes(), password=None)
    if not isinstance(key, MLDSA87PrivateKey):
        raise TypeError(f"{pki.signer_key}: not an ML-DSA-87 private key")
    return signed_data_pem(pki.signer_pem, content, signing_time, digest, ID_ML_DSA_87, key.sign)


def sign_pkcs7_at(signer_pem: Path, signer_key: Path, content: Path, signing_time: datetime) -> str:
    """A classic (RSA, SHA-256) detached PKCS#7 with the signingTime asked for, which
    ``openssl cms -sign`` cannot be told: a compromised signing key dating its metadata
    in the future, for the tests."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = serialization.load_pem_private_key(signer_key.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError(f"{signer_key}: not an RSA private key")
    return signed_data_pem(
        signer_pem, content, signing_time, "sha256", "1.2.840.113549.1.1.11",
        lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256()),
    )  # fmt: skip


def signed_data_pem(
    signer_pem: Path,
    content: Path,
    signing_time: datetime | None,
    digest: str,
    signature_oid: str,
    sign: Callable[[bytes], bytes],
) -> str:
    """CMS SignedData (RFC 5652) laid out with asn1crypto around a signature ``sign``
    makes over the signed attributes: contentType, signingTime, messageDigest; sid by
    issuer and serial; the signer's certificate only."""
    from asn1crypto import algos, cms  # type: ignore[import-untyped]
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    signer = x509.load_pem_x509_certificate(signer_pem.read_bytes())
    data = content.read_bytes()
    if digest == "shake256":
        message_digest = hashlib.shake_256(data).digest(64)
    else:
        message_digest = hashlib.new(digest, data).digest()
    when = (signing_time or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    if not 1950 <= when.year < 2050:
        raise ValueError(f"signingTime {when} cannot be a UTCTime")

    # parameters absent, as RFC 5754 (SHA-2) and RFC 9882 (SHAKE256) have it; asn1crypto's
    # DigestAlgorithm would write NULL for SHA-2, so it is loaded from a bare identifier
    digest_algorithm = algos.DigestAlgorithm.load(
        algos.AlgorithmIdentifier({"algorithm": _DIGEST_OIDS[digest]}).dump()
    )
    signed_attrs = cms.CMSAttributes(
        [
            cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
            cms.CMSAttribute({"type": "signing_time", "values": [cms.Time({"utc_time": when})]}),
            cms.CMSAttribute({"type": "message_digest", "values": [message_digest]}),
        ]
    )  # asn1crypto sorts a SET OF's members into DER order
    signature = sign(signed_attrs_to_sign(signed_attrs.dump()))

    # the signer's certificate goes in as its DER, untouched: asn1crypto cannot parse an
    # ML-DSA SubjectPublicKeyInfo, and does not need to
    cert_der = signer.public_bytes(serialization.Encoding.DER)
    signer_info = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                {
                    "issuer_and_serial_number": cms.IssuerAndSerialNumber(
                        {
                            "issuer": cms.Name.load(signer.issuer.public_bytes()),
                            "serial_number": signer.serial_number,
                        }
                    )
                }
            ),
            "digest_algorithm": digest_algorithm,
            "signed_attrs": signed_attrs,
            "signature_algorithm": algos.SignedDigestAlgorithm.load(
                algos.AlgorithmIdentifier({"algorithm": signature_oid}).dump()
            ),
            "signature": signature,
        }
    )
    signed_data = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [digest_algorithm],
            "encap_content_info": {"content_type": "data"},
            "certificates": [cms.CertificateChoices.load(cert_der)],
            "signer_infos": [signer_info],
        }
    )
    der = cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump()
    return "-----BEGIN PKCS7-----\n" + base64.encodebytes(der).decode() + "-----END PKCS7-----\n"
