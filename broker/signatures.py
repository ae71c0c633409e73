"""Checksums and signatures of a file against fwupd's trust store, as dom0 re-checks them.

The bytes judged are always the caller's open file descriptor; a jcat item only supplies
the blobs. Signatures are checked by ``openssl`` (PKCS#7) and ``gpg`` (via python-gnupg);
this module only frames their input, bounds them, and decides from what they report.

Two small parsers live here, and neither decides validity:

* a DER walk over the CMS that openssl has re-encoded, to read the ``signingTime`` of the
  *signed* attributes. ``openssl cms -print`` text cannot be trusted for that: it prints
  attacker-chosen strings (unsigned attributes, attribute certificates) raw, newlines
  included, so a forged "signingTime" line can be injected into it.
* an OpenPGP armor and packet-header walk that lets only signature packets reach gpg, so a
  600-byte "signature" cannot be a compressed packet that makes gpg check (and report on)
  a thousand signatures.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import os
import re
import selectors
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import gnupg

from broker.errors import VerificationError
from broker.jcat import BlobKind, JcatBlob, JcatItem
from broker.sanitize import printable

_CHUNK = 1024 * 1024
_TIMEOUT_S = 30.0
_MAX_TOOL_OUTPUT = 1024 * 1024
# LVFS blobs are ~2.3 KB (PKCS#7 with its signer certificate) and ~0.5 KB (GPG)
_MAX_PKCS7_CHARS = 256 * 1024
_MAX_GPG_CHARS = 64 * 1024
_MAX_GPG_SIGNATURES = 8
# each blob costs tool runs, and a 4 MiB jcat could carry thousands; LVFS sends one per kind
_MAX_SIGNATURE_BLOBS = 8
_MAX_TRUST_FILE_BYTES = 1024 * 1024
# the tools must not pick up trust or config from the caller's environment
# (SSL_CERT_DIR, SSL_CERT_FILE, OPENSSL_CONF, GNUPGHOME)
_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}

_CHECKSUM_KINDS = {BlobKind.SHA256: "sha256", BlobKind.SHA1: "sha1", BlobKind.SHA512: "sha512"}
_SIGNATURE_KINDS = {BlobKind.PKCS7: "pkcs7", BlobKind.GPG: "gpg"}


@dataclass(frozen=True)
class TrustStore:
    ca_files: tuple[Path, ...]
    gpg_key_files: tuple[Path, ...]

    @classmethod
    def from_dirs(cls, dirs: Iterable[Path], only: Iterable[str] | None = None) -> TrustStore:
        """Every ``*.pem`` and ``GPG-KEY-*`` in ``dirs``, as fwupd reads them, or only those
        named in ``only``; a missing directory or name contributes nothing."""
        names = None if only is None else frozenset(only)
        cas: list[Path] = []
        keys: list[Path] = []
        for d in dirs:
            if not d.is_dir():
                continue
            cas.extend(p for p in sorted(d.glob("*.pem"))
                       if p.is_file() and (names is None or p.name in names))  # fmt: skip
            keys.extend(p for p in sorted(d.glob("GPG-KEY-*"))
                        if p.is_file() and (names is None or p.name in names))  # fmt: skip
        return cls(ca_files=tuple(cas), gpg_key_files=tuple(keys))


@dataclass(frozen=True)
class TrustPolicy:
    require_sha256: bool = True
    accepted: frozenset[str] = frozenset({"pkcs7", "gpg"})
    # who may have signed, for this purpose: PKCS#7 signer certificate SHA-256
    # fingerprints or subjects (RFC 2253), GPG primary key fingerprints. None: anyone
    # the trust store anchors. A chain to a trusted CA says nothing about purpose.
    signers: frozenset[str] | None = None


@dataclass(frozen=True)
class Signature:
    kind: str
    signer: str
    signed_at: datetime | None
    # the blob as dom0 re-encoded what it verified (one PKCS7 PEM block of openssl's DER,
    # or one PGP armor of the packets gpg checked): all that may travel on to a fwupd
    canonical: str = ""
    # who signed, as TrustPolicy.signers names them: the signer certificate's SHA-256
    # fingerprint and RFC 2253 subject, or the GPG primary key's fingerprint
    identities: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Verified:
    sha256: str
    size: int
    signatures: tuple[Signature, ...]
    unverifiable: tuple[str, ...]
    # the signature blobs that verified: what a canonical jcat may carry on to fwupd
    verified_blobs: tuple[JcatBlob, ...] = ()

    @property
    def signed_at(self) -> datetime | None:
        times = [s.signed_at for s in self.signatures if s.signed_at is not None]
        return max(times) if times else None


# --- bounded subprocesses -------------------------------------------------------------


@dataclass(frozen=True)
class _Ran:
    returncode: int
    stdout: bytes
    stderr: bytes


def _run(
    argv: Sequence[str],
    *,
    pass_fds: Sequence[int] = (),
    limit: int = _MAX_TOOL_OUTPUT,
    timeout: float = _TIMEOUT_S,
) -> _Ran:
    """Run a tool with a deadline and a cap on what it may write (capture_output has neither)."""
    tool = argv[0]
    deadline = time.monotonic() + timeout
    with subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=tuple(pass_fds),
        env=_ENV,
    ) as proc:
        if proc.stdout is None or proc.stderr is None:
            raise RuntimeError("Popen gave no pipes")
        bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        with selectors.DefaultSelector() as sel:
            for pipe_fd in bufs:
                sel.register(pipe_fd, selectors.EVENT_READ)
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    proc.kill()
                    raise VerificationError(f"{tool} did not finish within {timeout:.0f} s")
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    buf = bufs[key.fd]
                    if len(buf) + len(chunk) > limit:
                        proc.kill()
                        raise VerificationError(f"{tool} wrote more than {limit} bytes")
                    buf += chunk
        try:
            returncode = proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise VerificationError(f"{tool} did not finish within {timeout:.0f} s") from None
        return _Ran(
            returncode, bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()])
        )


# --- checksums ------------------------------------------------------------------------


def _digests(fd: int, names: Iterable[str]) -> tuple[dict[str, str], int]:
    # pread: the caller's offset is not ours to move, and a second reader cannot race us on it
    hashes = {n: hashlib.new(n) for n in names}
    offset = 0
    while True:
        chunk = os.pread(fd, _CHUNK, offset)
        if not chunk:
            break
        for h in hashes.values():
            h.update(chunk)
        offset += len(chunk)
    return {n: h.hexdigest() for n, h in hashes.items()}, offset


def sha256_fd(fd: int) -> tuple[str, int]:
    """Hex sha256 and size of the whole file behind ``fd``, whatever its offset."""
    digests, size = _digests(fd, ("sha256",))
    return digests["sha256"], size


# --- PKCS#7 ---------------------------------------------------------------------------

_CERT_BLOCK = re.compile(
    rb"-----BEGIN (?:X509 |TRUSTED )?CERTIFICATE-----.*?"
    rb"-----END (?:X509 |TRUSTED )?CERTIFICATE-----",
    re.DOTALL,
)


@dataclass(frozen=True)
class _CaStatus:
    usable: bool
    problem: str | None


@functools.lru_cache(maxsize=64)
def _ca_status_cached(path: str, _identity: tuple[int, ...]) -> _CaStatus:
    # openssl 3.0 accepts a certificate whose key it cannot decode (ML-DSA) into a CA file
    # without complaint and then simply never chains to it; ask about each key up front so
    # that such a CA is reported as unverifiable instead of looking like "not this CA"
    with open(path, "rb") as f:
        data = f.read(_MAX_TRUST_FILE_BYTES + 1)
    if len(data) > _MAX_TRUST_FILE_BYTES:
        return _CaStatus(False, "larger than any CA file should be")
    blocks = _CERT_BLOCK.findall(data)
    if not blocks:
        return _CaStatus(False, "holds no PEM certificate")
    bad = 0
    with tempfile.TemporaryDirectory(prefix="qfw-vca-") as tmp:
        for i, block in enumerate(blocks):
            cert = Path(tmp, f"{i}.pem")
            cert.write_bytes(block + b"\n")
            if _run(["openssl", "x509", "-in", str(cert), "-noout", "-pubkey"]).returncode:
                bad += 1
    if bad == len(blocks):
        return _CaStatus(False, "this openssl cannot load it")
    if bad:
        return _CaStatus(True, f"this openssl cannot load {bad} of its {len(blocks)} certificates")
    return _CaStatus(True, None)


def _ca_status(path: Path) -> _CaStatus:
    try:
        st = path.stat()
    except OSError as e:
        return _CaStatus(False, f"cannot be read ({e.strerror})")
    return _ca_status_cached(str(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


def _ca_problems(trust: TrustStore) -> list[str]:
    return [f"{p.name}: {s.problem}" for p in trust.ca_files if (s := _ca_status(p)).problem]


_SIG_ALGS = "2.16.840.1.101.3.4.3"  # NIST CSOR sigAlgs arc
_PQ_NAMES = (
    # pure ML-DSA, FIPS 204 (RFC 9881 for X.509, RFC 9882 for CMS)
    (17, "ML-DSA-44"),
    (18, "ML-DSA-65"),
    (19, "ML-DSA-87"),
    # pure SLH-DSA, FIPS 205 (RFC 9909 for X.509, RFC 9814 for CMS)
    (20, "SLH-DSA-SHA2-128s"),
    (21, "SLH-DSA-SHA2-128f"),
    (22, "SLH-DSA-SHA2-192s"),
    (23, "SLH-DSA-SHA2-192f"),
    (24, "SLH-DSA-SHA2-256s"),
    (25, "SLH-DSA-SHA2-256f"),
    (26, "SLH-DSA-SHAKE-128s"),
    (27, "SLH-DSA-SHAKE-128f"),
    (28, "SLH-DSA-SHAKE-192s"),
    (29, "SLH-DSA-SHAKE-192f"),
    (30, "SLH-DSA-SHAKE-256s"),
    (31, "SLH-DSA-SHAKE-256f"),
    # pre-hash HashML-DSA and HashSLH-DSA (NIST CSOR)
    (32, "HashML-DSA-44 with SHA-512"),
    (33, "HashML-DSA-65 with SHA-512"),
    (34, "HashML-DSA-87 with SHA-512"),
    (35, "HashSLH-DSA-SHA2-128s with SHA-256"),
    (36, "HashSLH-DSA-SHA2-128f with SHA-256"),
    (37, "HashSLH-DSA-SHA2-192s with SHA-512"),
    (38, "HashSLH-DSA-SHA2-192f with SHA-512"),
    (39, "HashSLH-DSA-SHA2-256s with SHA-512"),
    (40, "HashSLH-DSA-SHA2-256f with SHA-512"),
    (41, "HashSLH-DSA-SHAKE-128s with SHAKE128"),
    (42, "HashSLH-DSA-SHAKE-128f with SHAKE128"),
    (43, "HashSLH-DSA-SHAKE-192s with SHAKE256"),
    (44, "HashSLH-DSA-SHAKE-192f with SHAKE256"),
    (45, "HashSLH-DSA-SHAKE-256s with SHAKE256"),
    (46, "HashSLH-DSA-SHAKE-256f with SHAKE256"),
)
PQ_SIGNATURE_ALGORITHMS: Mapping[str, str] = MappingProxyType(
    {f"{_SIG_ALGS}.{arc}": name for arc, name in _PQ_NAMES}
)
"""Dotted OID -> name of the post-quantum signature algorithms (RFC 9882 ML-DSA in CMS,
RFC 9814 SLH-DSA): this openssl (3.0) cannot check them, so a SignerInfo that names one
is skipped by that name and reported, never tried and failed."""


def _der_oid(dotted: str) -> bytes:
    """The content octets of an OBJECT IDENTIFIER (X.690 8.19)."""
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        out += bytes(reversed(chunk))
    return bytes(out)


_PQ_BY_DER = {_der_oid(oid): name for oid, name in PQ_SIGNATURE_ALGORITHMS.items()}


class Unverifiable(VerificationError):
    """A signature this machine cannot check (post-quantum): skipped by name, reported,
    never counted, and never mistaken for a failure."""


_OID_SIGNED_DATA = bytes.fromhex("2a864886f70d010702")
_OID_SIGNING_TIME = bytes.fromhex("2a864886f70d010905")
# openssl 3.0 still verifies SHA-1 CMS signatures; the digest binds the file, so only SHA-2
_STRONG_DIGESTS = {bytes.fromhex(f"60864801650304020{n}") for n in (1, 2, 3)}
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18
_SEQUENCE, _SET, _OID, _CONTEXT_0 = 0x30, 0x31, 0x06, 0xA0


class _DerError(Exception):
    pass


def _der_children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(tag, content start, content end) of each element in der[start:end]; definite
    lengths and one-byte tags only, which is all that the path to signingTime holds."""
    out = []
    pos = start
    while pos < end:
        if end - pos < 2:
            raise _DerError("truncated element")
        tag, first = der[pos], der[pos + 1]
        pos += 2
        if tag & 0x1F == 0x1F:
            raise _DerError("multi-byte tag")
        if first < 0x80:
            length = first
        else:
            n = first & 0x7F
            if n == 0 or n > 4 or end - pos < n:
                raise _DerError("bad length")
            length = int.from_bytes(der[pos : pos + n], "big")
            pos += n
        if length > end - pos:
            raise _DerError("element overruns its parent")
        out.append((tag, pos, pos + length))
        pos += length
    return out


def _only(children: list[tuple[int, int, int]], tag: int) -> tuple[int, int]:
    if len(children) != 1 or children[0][0] != tag:
        raise _DerError(f"expected a single element of tag {tag:#x}")
    return children[0][1], children[0][2]


def _parse_time(tag: int, raw: bytes) -> datetime:
    text = raw.decode("ascii", "replace")
    if tag == _UTC_TIME and re.fullmatch(r"\d{12}Z", text):
        yy = int(text[:2])
        # RFC 5280: UTCTime years 50-99 are 19xx
        text = ("19" if yy >= 50 else "20") + text
    elif not (tag == _GENERALIZED_TIME and re.fullmatch(r"\d{14}Z", text)):
        raise _DerError("signingTime is neither UTCTime nor GeneralizedTime in UTC")
    try:
        return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
    except ValueError as e:
        raise _DerError("signingTime is not a date") from e


@dataclass(frozen=True)
class _SignerInfos:
    times: list[datetime]
    digests: set[bytes]
    post_quantum: list[str]  # names of the PQ signature algorithms the signers used


def _signer_infos(der: bytes) -> _SignerInfos:
    """The signingTime of each SignerInfo's *signed* attributes (RFC 5652 5.3), the
    digest algorithms the signers used, and which of them sign post-quantum."""
    content_info = _der_children(der, *_only(_der_children(der, 0, len(der)), _SEQUENCE))
    if (
        len(content_info) != 2
        or content_info[0][0] != _OID
        or der[content_info[0][1] : content_info[0][2]] != _OID_SIGNED_DATA
        or content_info[1][0] != _CONTEXT_0
    ):
        raise _DerError("not a CMS SignedData")
    signed_data = _der_children(der, *_only(_der_children(der, *content_info[1][1:]), _SEQUENCE))
    if not signed_data or signed_data[-1][0] != _SET:
        raise _DerError("SignedData does not end with its SignerInfos")
    times: list[datetime] = []
    digests: set[bytes] = set()
    post_quantum: list[str] = []
    for tag, start, end in _der_children(der, *signed_data[-1][1:]):
        if tag != _SEQUENCE:
            raise _DerError("SignerInfo is not a SEQUENCE")
        # version, sid, digestAlgorithm, then [0] signedAttrs when present; a sid by key
        # identifier is [0] too, but primitive (0x80), so 0xA0 here is always signedAttrs
        fields = _der_children(der, start, end)
        if len(fields) < 3 or fields[2][0] != _SEQUENCE:
            raise _DerError("SignerInfo lacks its digestAlgorithm")
        algorithm = _der_children(der, *fields[2][1:])
        if not algorithm or algorithm[0][0] != _OID:
            raise _DerError("malformed digestAlgorithm")
        digests.add(der[algorithm[0][1] : algorithm[0][2]])
        # signatureAlgorithm follows digestAlgorithm, after the [0] signedAttrs if present
        has_attrs = len(fields) > 3 and fields[3][0] == _CONTEXT_0
        sig_at = 4 if has_attrs else 3
        if len(fields) <= sig_at or fields[sig_at][0] != _SEQUENCE:
            raise _DerError("SignerInfo lacks its signatureAlgorithm")
        sig_algorithm = _der_children(der, *fields[sig_at][1:])
        if not sig_algorithm or sig_algorithm[0][0] != _OID:
            raise _DerError("malformed signatureAlgorithm")
        pq = _PQ_BY_DER.get(der[sig_algorithm[0][1] : sig_algorithm[0][2]])
        if pq:
            post_quantum.append(pq)
        if not has_attrs:
            continue
        found = []
        for attr_tag, a_start, a_end in _der_children(der, *fields[3][1:]):
            attr = _der_children(der, a_start, a_end)
            if attr_tag != _SEQUENCE or len(attr) != 2 or attr[0][0] != _OID:
                raise _DerError("malformed signed attribute")
            if der[attr[0][1] : attr[0][2]] == _OID_SIGNING_TIME:
                if attr[1][0] != _SET:
                    raise _DerError("signingTime has no value set")
                values = _der_children(der, attr[1][1], attr[1][2])
                if len(values) != 1:
                    raise _DerError("signingTime does not hold exactly one value")
                v_tag, v_start, v_end = values[0]
                found.append(_parse_time(v_tag, der[v_start:v_end]))
        if len(found) > 1:
            raise _DerError("a signer has more than one signingTime")
        times.extend(found)
    return _SignerInfos(times, digests, post_quantum)


def _signer_identity(signer_pem: Path) -> tuple[str, str]:
    """(RFC 2253 subject, SHA-256 fingerprint as upper-case hex) of the certificate that
    openssl says signed; RFC 2253 escapes controls and non-ASCII, so it is one plain line."""
    ran = _run(
        ["openssl", "x509", "-in", str(signer_pem), "-noout", "-subject", "-nameopt", "RFC2253",
         "-fingerprint", "-sha256"]
    )  # fmt: skip
    subject = fingerprint = ""
    for line in ran.stdout.decode("ascii", "replace").splitlines():
        if line.startswith("subject="):
            subject = line.removeprefix("subject=").strip()
        elif line.lower().startswith("sha256 fingerprint="):
            fingerprint = line.partition("=")[2].replace(":", "").strip().upper()
    if ran.returncode or not fingerprint:
        raise VerificationError("openssl could not describe the signer certificate")
    return subject, fingerprint


_PEM_BLOCK = re.compile(
    r"-----BEGIN (PKCS7|CMS)-----\r?\n([A-Za-z0-9+/=\r\n]*)-----END \1-----", re.ASCII
)


def _pem_block_der(text: str) -> bytes:
    """The DER of the one PKCS7 (or CMS) PEM block that is the whole blob, whitespace
    around it aside; anything else (a second block, headers, text) is refused."""
    match = _PEM_BLOCK.fullmatch(text.strip())
    if match is None:
        raise VerificationError("not exactly one PEM block labelled PKCS7 (or CMS)")
    try:
        return base64.b64decode("".join(match[2].split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise VerificationError("PEM block is not valid base64") from e


def _armor(label: str, der: bytes) -> str:
    body = base64.encodebytes(der).decode("ascii")  # 76-column lines, as openssl reads
    return f"-----BEGIN {label}-----\n{body}-----END {label}-----\n"


def verify_pkcs7(fd: int, pem: str, trust: TrustStore) -> Signature:
    """A detached PKCS#7 over the file behind ``fd`` that chains to one CA file of ``trust``.

    Each CA file is tried alone, so the one that anchored the signature is known."""
    if len(pem) > _MAX_PKCS7_CHARS:
        raise VerificationError(f"signature is larger than {_MAX_PKCS7_CHARS} characters")
    statuses = [(p, _ca_status(p)) for p in trust.ca_files]
    cas = [p for p, s in statuses if s.usable]
    skipped = [f"{p.name}: {s.problem}" for p, s in statuses if not s.usable]
    if not cas:
        why = f" ({'; '.join(skipped)})" if skipped else ""
        raise VerificationError(f"no CA in the trust store that this openssl can load{why}")
    os.lseek(fd, 0, os.SEEK_SET)
    # fds 0-2 of the child are its stdio; lift the content fd above them
    child_fd = fd if fd >= 3 else fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    try:
        with tempfile.TemporaryDirectory(prefix="qfw-vp7-") as tmp:
            sig_in, sig_der, signer_pem = (
                Path(tmp, n) for n in ("sig.in.der", "sig.der", "signer.pem")
            )
            # one block, decoded here: openssl and libjcat pick different blocks out of
            # a text holding several, so nothing but the one block may be there
            sig_in.write_bytes(_pem_block_der(pem))
            # verify what is walked: openssl's own DER re-encoding of what it parsed
            ran = _run(
                ["openssl", "cms", "-cmsout", "-inform", "DER", "-in", str(sig_in),
                 "-outform", "DER", "-out", str(sig_der)]
            )  # fmt: skip
            if ran.returncode:
                raise VerificationError("not a PKCS#7 signature openssl can read")
            try:
                infos = _signer_infos(sig_der.read_bytes())
            except _DerError as e:
                raise VerificationError(f"cannot read its signer information: {e}") from e
            if infos.post_quantum:
                # decided by name before openssl is asked: it would only report a chain
                # failure, indistinguishable from a signature by an untrusted key
                raise Unverifiable(
                    f"{', '.join(dict.fromkeys(infos.post_quantum))} (post-quantum): "
                    "this openssl cannot check it"
                )
            times, digests = infos.times, infos.digests
            if not digests <= _STRONG_DIGESTS:
                raise VerificationError("signed with a weak digest (not SHA-256/384/512)")
            failure = "not signed by a trusted CA"
            for ca in cas:
                ran = _run(
                    ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(sig_der),
                     "-content", f"/dev/fd/{child_fd}", "-CAfile", str(ca),
                     # without these, openssl also trusts every CA in the system's TLS store
                     "-no-CApath", "-no-CAstore",
                     "-purpose", "any", "-signer", str(signer_pem), "-out", "/dev/null"],
                    pass_fds=(child_fd,),
                )  # fmt: skip
                if ran.returncode == 0:
                    subject, fingerprint = _signer_identity(signer_pem)
                    return Signature(
                        "pkcs7",
                        f"{ca.name} ({subject})" if subject else ca.name,
                        max(times) if times else None,
                        _armor("PKCS7", sig_der.read_bytes()),
                        frozenset({subject, fingerprint} - {""}),
                    )
                if b"certificate verify error" not in ran.stderr:
                    # the chain to this CA held, so no other CA will make the content match
                    failure = (
                        "signature does not match the file"
                        if b"content verify error" in ran.stderr
                        else "signature is invalid"
                    )
                    break
            if skipped and failure == "not signed by a trusted CA":
                failure += f" (not checked against {'; '.join(skipped)})"
            raise VerificationError(failure)
    finally:
        if child_fd != fd:
            os.close(child_fd)


# --- GPG ------------------------------------------------------------------------------

_ARMOR = re.compile(
    r"-----BEGIN PGP SIGNATURE-----\r?\n(.*?)-----END PGP SIGNATURE-----", re.DOTALL
)
_PGP_SIGNATURE_PACKET = 2


def _dearmor_signature(armored: str) -> bytes:
    """The binary packets of one armored PGP signature; gpg is given these, not the text,
    so that it sees exactly what was checked here. The armor must be the whole blob."""
    match = _ARMOR.fullmatch(armored.strip())
    if match is None or armored.count("-----BEGIN PGP") != 1:
        raise VerificationError("not one armored PGP signature")
    lines = [line.strip() for line in match[1].splitlines()]
    if "" not in lines:
        raise VerificationError("PGP armor lacks the blank line after its headers")
    body = lines[lines.index("") + 1 :]
    if body and body[-1].startswith("="):
        body = body[:-1]  # the CRC-24 line: the signature itself is what authenticates
    try:
        data = base64.b64decode("".join(body), validate=True)
    except (binascii.Error, ValueError) as e:
        raise VerificationError("PGP armor is not valid base64") from e
    _check_signature_packets(data)
    return data


def _crc24(data: bytes) -> int:
    """The armor checksum of RFC 4880 6.1 (framing, not a signature)."""
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def _armor_signature(packets: bytes) -> str:
    """dom0's own armor around the packets gpg verified (RFC 4880 6.2)."""
    body = base64.b64encode(packets).decode("ascii")
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    crc = base64.b64encode(_crc24(packets).to_bytes(3, "big")).decode("ascii")
    return f"-----BEGIN PGP SIGNATURE-----\n\n{lines}\n={crc}\n-----END PGP SIGNATURE-----\n"


def _check_signature_packets(data: bytes) -> None:
    """Only signature packets, few of them (RFC 4880 4.2 framing)."""
    pos = count = 0
    while pos < len(data):
        header = data[pos]
        if not header & 0x80:
            raise VerificationError("not an OpenPGP packet")
        if header & 0x40:
            tag = header & 0x3F
            if pos + 1 >= len(data):
                raise VerificationError("truncated OpenPGP packet")
            first = data[pos + 1]
            if first < 192:
                length, pos = first, pos + 2
            elif first < 224:
                if pos + 2 >= len(data):
                    raise VerificationError("truncated OpenPGP packet")
                length, pos = ((first - 192) << 8) + data[pos + 2] + 192, pos + 3
            elif first == 255:
                if pos + 6 > len(data):
                    raise VerificationError("truncated OpenPGP packet")
                length, pos = int.from_bytes(data[pos + 2 : pos + 6], "big"), pos + 6
            else:
                raise VerificationError("OpenPGP partial body length in a signature")
        else:
            tag, length_type = (header >> 2) & 0x0F, header & 0x03
            if length_type == 3:
                raise VerificationError("OpenPGP packet of indeterminate length")
            n = 1 << length_type
            if pos + 1 + n > len(data):
                raise VerificationError("truncated OpenPGP packet")
            length, pos = int.from_bytes(data[pos + 1 : pos + 1 + n], "big"), pos + 1 + n
        if tag != _PGP_SIGNATURE_PACKET:
            raise VerificationError(f"holds an OpenPGP packet of type {tag}, not a signature")
        if pos + length > len(data):
            raise VerificationError("truncated OpenPGP packet")
        pos += length
        count += 1
    if not count:
        raise VerificationError("empty PGP signature")
    if count > _MAX_GPG_SIGNATURES:
        raise VerificationError(f"more than {_MAX_GPG_SIGNATURES} PGP signatures")


class _BoundedGPG(gnupg.GPG):  # type: ignore[misc]  # python-gnupg ships no type hints
    """python-gnupg with a deadline on every gpg it starts (it has none of its own), each
    started with our environment: python-gnupg sets one only from 0.5.1, and Debian 12's
    0.4.9 would pass the caller's on."""

    def __init__(self, home: str) -> None:
        self._timers: list[threading.Timer] = []
        self.timed_out = False
        super().__init__(
            gnupghome=home,
            # --no-autostart: verifying and importing public keys needs no agent or
            # dirmngr; --log-file: stderr then carries nothing but status lines
            options=["--no-autostart", "--no-auto-key-retrieve", "--log-file", "/dev/null"],
        )

    def _open_subprocess(self, args: list[str], passphrase: bool = False) -> Any:
        proc = subprocess.Popen(
            self.make_args(args, passphrase),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(_ENV),
        )  # fmt: skip
        timer = threading.Timer(_TIMEOUT_S, self._expire, (proc,))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)
        return proc

    def _expire(self, proc: subprocess.Popen[bytes]) -> None:
        self.timed_out = True
        proc.kill()

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()


def _stop_gpg_agent(home: str) -> None:
    # --no-autostart should mean none ever ran; this is the belt to those braces
    with contextlib.suppress(VerificationError):
        _run(["gpgconf", "--homedir", home, "--kill", "all"], timeout=10)


_GPG_REFUSALS = {
    "BADSIG": "signature does not match the file",
    "EXPSIG": "signature has expired",
    "EXPKEYSIG": "signing key has expired",
    "REVKEYSIG": "signing key was revoked",
    "NO_PUBKEY": "key not in the trust store",
    "NODATA": "not a PGP signature",
    "UNEXPECTED": "not a detached PGP signature",
    "FAILURE": "gpg failed",
    "ERROR": "gpg reported an error",
}
_GPG_ERRSIG_NO_KEY = "9"
# signature class 00: a binary document; 01 (text) would let line endings change
_GPG_BINARY_SIG_CLASS = "00"
# OpenPGP hash algorithms 1-3: MD5, SHA-1, RIPEMD-160
_GPG_WEAK_HASHES = {"1", "2", "3"}


def _gpg_time(field: str) -> datetime:
    if field.isdigit():
        return datetime.fromtimestamp(int(field), UTC)
    return datetime.strptime(field, "%Y%m%dT%H%M%S").replace(tzinfo=UTC)


def _gpg_decision(statuses: list[list[str]], returncode: int, trusted: set[str]) -> Signature:
    for words in statuses:
        if words[0] == "ERRSIG":
            no_key = len(words) > 6 and words[6] == _GPG_ERRSIG_NO_KEY
            raise VerificationError(
                "key not in the trust store" if no_key else "gpg could not check it"
            )
        if words[0] in _GPG_REFUSALS:
            raise VerificationError(_GPG_REFUSALS[words[0]])
    count = {k: sum(1 for w in statuses if w[0] == k) for k in ("NEWSIG", "GOODSIG", "VALIDSIG")}
    if returncode or not count["NEWSIG"] or len(set(count.values())) != 1:
        raise VerificationError("gpg did not report a good signature")
    signers, times = [], []
    for words in statuses:
        if words[0] != "VALIDSIG":
            continue
        if len(words) < 11:
            raise VerificationError("gpg reported a signature without its primary key")
        fingerprint, primary, sig_class = words[1].upper(), words[10].upper(), words[9]
        if primary not in trusted and fingerprint not in trusted:
            raise VerificationError("key not in the trust store")
        if sig_class != _GPG_BINARY_SIG_CLASS:
            raise VerificationError(f"signature class {sig_class} is not a binary signature")
        if words[8] in _GPG_WEAK_HASHES:
            raise VerificationError("signed with a weak hash (MD5, SHA-1 or RIPEMD-160)")
        try:
            times.append(_gpg_time(words[3]))
        except (ValueError, OverflowError, OSError) as e:
            raise VerificationError("gpg reported an unreadable signature time") from e
        signers.append(primary)
    return Signature("gpg", signers[0], max(times), identities=frozenset(signers))


def _import_keys(gpg: _BoundedGPG, trust: TrustStore) -> tuple[set[str], list[str]]:
    trusted: set[str] = set()
    problems: list[str] = []
    for path in trust.gpg_key_files:
        try:
            with open(path, "rb") as f:
                data = f.read(_MAX_TRUST_FILE_BYTES + 1)
        except OSError as e:
            problems.append(f"{path.name}: cannot be read ({e.strerror})")
            continue
        if len(data) > _MAX_TRUST_FILE_BYTES:
            problems.append(f"{path.name}: larger than any key file should be")
            continue
        result = gpg.import_keys(data)
        fingerprints = {str(fp).upper() for fp in (result.fingerprints or ()) if fp}
        if not fingerprints:
            problems.append(f"{path.name}: gpg could not import it")
        trusted |= fingerprints
    return trusted, problems


def verify_gpg(fd: int, armored: str, trust: TrustStore) -> Signature:
    """A detached GPG signature over the file behind ``fd`` by a key of ``trust``, checked
    in a private keyring that holds only the trust store's keys."""
    return _verify_gpg(fd, armored, trust, [])


def _verify_gpg(fd: int, armored: str, trust: TrustStore, problems: list[str]) -> Signature:
    if len(armored) > _MAX_GPG_CHARS:
        raise VerificationError(f"signature is larger than {_MAX_GPG_CHARS} characters")
    binary = _dearmor_signature(armored)
    os.lseek(fd, 0, os.SEEK_SET)
    with tempfile.TemporaryDirectory(prefix="qfw-vgpg-") as home:
        gpg = _BoundedGPG(home)
        try:
            trusted, key_problems = _import_keys(gpg, trust)
            problems.extend(key_problems)
            if not trusted:
                raise VerificationError("key not in the trust store (it holds no GPG key)")
            sig_path = Path(home, "signature.sig")
            sig_path.write_bytes(binary)
            # gpg re-opens our descriptor through /proc: the inode we hold, never a name
            # that someone could swap. The signature goes as a file object: python-gnupg
            # 0.4.9 (Debian 12) takes no path there
            with sig_path.open("rb") as sig:
                result = gpg.verify_file(sig, data_filename=f"/proc/{os.getpid()}/fd/{fd}")
            if gpg.timed_out:
                raise VerificationError(f"gpg did not finish within {_TIMEOUT_S:.0f} s")
        finally:
            gpg.close()
            _stop_gpg_agent(home)
    statuses = [
        words
        for line in str(result.stderr or "").splitlines()
        if line.startswith("[GNUPG:] ") and (words := line[9:].split())
    ]
    signature = _gpg_decision(statuses, int(result.returncode or 0), trusted)
    if not result.valid:
        raise VerificationError("gpg did not report a good signature")
    return dataclasses.replace(signature, canonical=_armor_signature(binary))


# --- the decision ---------------------------------------------------------------------


def _file_state(fd: int) -> tuple[int, int, int, int]:
    st = os.fstat(fd)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def verify_file(
    fd: int,
    item: JcatItem,
    trust: TrustStore,
    policy: TrustPolicy = TrustPolicy(),  # frozen, so one shared default is safe
    name: str = "file",
) -> Verified:
    """Every checksum of ``item`` matches the file behind ``fd``, and at least one of its
    accepted signatures verifies against ``trust``; else VerificationError, one line.
    The descriptor's offset is 0 on return, whatever it was."""
    os.lseek(fd, 0, os.SEEK_SET)
    before = _file_state(fd)
    present = {_CHECKSUM_KINDS[BlobKind(b.kind)] for b in item.blobs if b.kind in _CHECKSUM_KINDS}
    if policy.require_sha256 and "sha256" not in present:
        raise VerificationError(f"{name}: no sha256 checksum")
    digests, size = _digests(fd, sorted(present | {"sha256"}))
    for blob in item.blobs:
        if blob.kind in _CHECKSUM_KINDS:
            algo = _CHECKSUM_KINDS[BlobKind(blob.kind)]
            if blob.data.strip().lower() != digests[algo]:
                raise VerificationError(f"{name}: {algo} checksum does not match the file")

    sig_blobs = [b for b in item.blobs if b.kind in _SIGNATURE_KINDS]
    if not sig_blobs:
        raise VerificationError(f"{name}: no signature")
    checked = [b for b in sig_blobs if _SIGNATURE_KINDS[BlobKind(b.kind)] in policy.accepted]
    if not checked:
        accepted = ", ".join(sorted(policy.accepted)) or "none"
        raise VerificationError(f"{name}: no signature of an accepted kind ({accepted})")
    if len(checked) > _MAX_SIGNATURE_BLOBS:
        raise VerificationError(f"{name}: more than {_MAX_SIGNATURE_BLOBS} signatures")

    signatures: list[Signature] = []
    verified_blobs: list[JcatBlob] = []
    causes: list[str] = []
    unverifiable: list[str] = []
    for blob in checked:
        kind = _SIGNATURE_KINDS[BlobKind(blob.kind)]
        try:
            if kind == "pkcs7":
                signature = verify_pkcs7(fd, blob.data, trust)
            else:
                signature = _verify_gpg(fd, blob.data, trust, unverifiable)
            if policy.signers is not None and not signature.identities & policy.signers:
                raise VerificationError(
                    f"signed by {printable(signature.signer, 120)}, not a signer named "
                    "for this purpose"
                )
            signatures.append(signature)
            # what verified, as dom0 re-encoded it: never the text that came in
            verified_blobs.append(JcatBlob(blob.kind, signature.canonical, blob.timestamp))
        except Unverifiable as e:
            unverifiable.append(f"{kind}: {e}")
            continue
        except VerificationError as e:
            causes.append(f"{kind}: {e}")
        if kind == "pkcs7":
            unverifiable += _ca_problems(trust)
    os.lseek(fd, 0, os.SEEK_SET)
    if _file_state(fd) != before:
        raise VerificationError(f"{name}: changed while it was being verified")
    if not signatures:
        skipped = [f"{u} (skipped)" for u in unverifiable if u.startswith(("pkcs7:", "gpg:"))]
        raise VerificationError(
            f"{name}: no trusted signature ({'; '.join(dict.fromkeys(causes + skipped))})"
        )
    return Verified(
        sha256=digests["sha256"],
        size=size,
        signatures=tuple(signatures),
        unverifiable=tuple(dict.fromkeys(unverifiable)),
        verified_blobs=tuple(verified_blobs),
    )
