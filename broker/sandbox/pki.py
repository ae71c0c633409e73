"""The sandbox's signing keys, made at run time: an X.509 CA + signer (PKCS#7) and a GPG key.

Stands in for the LVFS's own keys; installed beside the real LVFS CA in each qube's trust
store. Nothing here is committed: every run makes its own.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gnupg

GPG_UID = "qubes-fwupd sandbox LVFS <sandbox-lvfs@example.invalid>"


@dataclass(frozen=True)
class CaFiles:
    """A CA and a signer under it, as files in one directory (made by make_ca, or by
    broker.sandbox.pq for the post-quantum one)."""

    dir: Path

    @property
    def ca_pem(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def signer_pem(self) -> Path:
        return self.dir / "signer.pem"

    @property
    def signer_key(self) -> Path:
        return self.dir / "signer.key"


@dataclass(frozen=True)
class SandboxPki(CaFiles):
    """The sandbox LVFS's keys: the classic CA and signer, GPG, and the PQ ones beside."""

    @property
    def pq_dir(self) -> Path:
        """The post-quantum (ML-DSA-87) CA and signer: broker.sandbox.pq."""
        return self.dir / "pq"

    @property
    def gpg_home(self) -> Path:
        return self.dir / "gnupg"

    @property
    def gpg_public_key(self) -> Path:
        """Armored public key, named as fwupd names the keys in /etc/pki/fwupd*."""
        return self.dir / "GPG-KEY-qubes-fwupd-sandbox"

    @property
    def gpg_fingerprint(self) -> str:
        return (self.dir / "gpg-fingerprint").read_text().strip()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(dir: Path, name: str) -> tuple[Path, Path]:
    """A CA with keyUsage keyCertSign (fwupd refuses every PKCS#7 check when one CA in its
    store lacks keyUsage) and a code-signing certificate under it."""
    dir.mkdir(parents=True, exist_ok=True)
    ca_pem, ca_key = dir / "ca.pem", dir / "ca.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:3072", "-nodes", "-days", "3650",
        "-keyout", str(ca_key), "-out", str(ca_pem),
        "-subj", f"/O=qubes-fwupd sandbox/CN={name} CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    ca_key.chmod(0o600)
    return make_signer(CaFiles(dir), dir, f"{name} signer")


def make_signer(ca: CaFiles, dir: Path, name: str) -> tuple[Path, Path]:
    """A code-signing certificate under ``ca`` (another signer the same CA anchors, as the
    LVFS CA anchors both its service certificate and older instance certificates)."""
    dir.mkdir(parents=True, exist_ok=True)
    signer_pem, signer_key = dir / "signer.pem", dir / "signer.key"
    csr, ext = dir / "signer.csr", dir / "signer.ext"
    _openssl(
        "req", "-newkey", "rsa:3072", "-nodes", "-keyout", str(signer_key), "-out", str(csr),
        "-subj", f"/O=qubes-fwupd sandbox/CN={name}",
    )  # fmt: skip
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=codeSigning\nsubjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.ca_pem), "-CAkey", str(ca.ca_key),
        "-CAcreateserial", "-days", "825", "-extfile", str(ext), "-out", str(signer_pem),
    )  # fmt: skip
    csr.unlink()
    signer_key.chmod(0o600)
    return signer_pem, signer_key


def certificate_sha256(pem: Path) -> str:
    """A certificate's SHA-256 fingerprint as upper-case hex, as metadata_signers takes it."""
    out = subprocess.run(
        ["openssl", "x509", "-in", str(pem), "-noout", "-fingerprint", "-sha256"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return out.partition("=")[2].replace(":", "").strip().upper()


def stop_gpg_agent(home: Path) -> None:
    """gpg may leave a gpg-agent behind for a homedir; stop it with the homedir."""
    if home.exists():
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "all"], check=False, capture_output=True
        )


def create_pki(dir: Path) -> SandboxPki:
    """Make the PKI in ``dir`` once; later calls load it."""
    pki = SandboxPki(dir)
    if (dir / "gpg-fingerprint").exists():
        return pki
    make_ca(dir, "Sandbox LVFS")
    # gpg's socket paths must stay short: make the key in a short temp home, then move it
    with tempfile.TemporaryDirectory(prefix="qfw-gpg-") as tmp:
        gpg = gnupg.GPG(gnupghome=tmp)
        key = gpg.gen_key(
            gpg.gen_key_input(
                key_type="RSA", key_length=3072, name_real="qubes-fwupd sandbox LVFS",
                name_email="sandbox-lvfs@example.invalid", no_protection=True, expire_date=0,
            )
        )  # fmt: skip
        if not key.fingerprint:
            raise RuntimeError(f"gpg key generation failed: {key.stderr}")
        pki.gpg_public_key.write_text(gpg.export_keys(key.fingerprint))
        stop_gpg_agent(Path(tmp))
        shutil.copytree(tmp, pki.gpg_home, ignore=shutil.ignore_patterns("S.*"))
    pki.gpg_home.chmod(0o700)
    (dir / "gpg-fingerprint").write_text(str(key.fingerprint) + "\n")
    return pki


def sign_pkcs7(signer_pem: Path, signer_key: Path, content: Path) -> str:
    """Detached PKCS#7 over ``content`` with a signingTime, as PEM with the PKCS7 header
    that libjcat expects (openssl cms writes "CMS")."""
    der = subprocess.run(
        ["openssl", "cms", "-sign", "-binary", "-md", "sha256", "-in", str(content),
         "-signer", str(signer_pem), "-inkey", str(signer_key), "-outform", "DER"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    return "-----BEGIN PKCS7-----\n" + base64.encodebytes(der).decode() + "-----END PKCS7-----\n"


def sign_gpg(pki: SandboxPki, content: Path) -> str:
    """Detached, armored GPG signature over ``content``."""
    with tempfile.TemporaryDirectory(prefix="qfw-gpg-") as tmp:
        shutil.copytree(pki.gpg_home, tmp, dirs_exist_ok=True)
        os.chmod(tmp, 0o700)
        gpg = gnupg.GPG(gnupghome=tmp)
        try:
            with content.open("rb") as f:
                sig = gpg.sign_file(f, keyid=pki.gpg_fingerprint, detach=True, binary=False)
        finally:
            stop_gpg_agent(Path(tmp))
    if not sig.data:
        raise RuntimeError(f"gpg signing failed: {sig.stderr}")
    return str(sig.data.decode("ascii"))
