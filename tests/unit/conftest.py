"""Keys made at run time for the unit tests: the sandbox PKI and GPG keys that must be refused."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gnupg
import pytest

from broker.sandbox.pki import SandboxPki, create_pki, make_ca, stop_gpg_agent

# what the refused GPG keys sign (their secret keys cannot sign once expired or revoked)
KEY_TEST_CONTENT = b"firmware signed by a key the trust store must refuse\n"

FWUPD_PKI = Path("/etc/pki/fwupd")
PQ_CA = FWUPD_PKI / "LVFS-CA-2025PQ.pem"


@pytest.fixture(scope="session")
def sandbox_pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPki:
    return create_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def trust_dir(sandbox_pki: SandboxPki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trust store directory as fwupd lays one out: only the CA and the public key (the
    PKI directory itself also holds signer.pem, which must never be a trust anchor)."""
    d = tmp_path_factory.mktemp("trust")
    shutil.copy(sandbox_pki.ca_pem, d / "sandbox-ca.pem")
    shutil.copy(sandbox_pki.gpg_public_key, d / sandbox_pki.gpg_public_key.name)
    return d


@pytest.fixture(scope="session")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(ca.pem, signer.pem, signer.key) of a CA that no trust store here holds."""
    d = tmp_path_factory.mktemp("other-ca")
    signer_pem, signer_key = make_ca(d, "Other")
    return d / "ca.pem", signer_pem, signer_key


@dataclass(frozen=True)
class RefusedKey:
    public_key: Path
    fingerprint: str
    signature: str  # detached, armored, over KEY_TEST_CONTENT


def _make_key(out: Path, label: str, *, expired: bool = False, revoked: bool = False) -> RefusedKey:
    # short homedir: gpg-agent's socket path has a length limit
    home = tempfile.mkdtemp(prefix="qfw-tk-")
    try:
        # an expired key: made and used ten days ago, valid for one
        options = ["--faked-system-time", str(int(time.time()) - 10 * 86400)] if expired else []
        gpg = gnupg.GPG(gnupghome=home, options=options)
        key = gpg.gen_key(
            gpg.gen_key_input(
                key_type="EDDSA", key_curve="ed25519", name_real=f"qubes-fwupd test {label}",
                name_email=f"{label}@example.invalid", no_protection=True,
                expire_date="1d" if expired else 0,
            )
        )  # fmt: skip
        if not key.fingerprint:
            raise RuntimeError(f"gpg key generation failed: {key.stderr}")
        fingerprint = str(key.fingerprint)
        sig = gpg.sign(KEY_TEST_CONTENT, keyid=fingerprint, detach=True, binary=False)
        if not sig.data:
            raise RuntimeError(f"gpg signing failed: {sig.stderr}")
        if revoked:
            # gpg writes a revocation certificate at key generation, its armor line masked
            # with ":" so that it is not imported by accident
            rev = (Path(home) / "openpgp-revocs.d" / f"{fingerprint}.rev").read_text()
            gpg.import_keys(rev.replace(":-----BEGIN", "-----BEGIN"))
        public_key = out / f"GPG-KEY-{label}"
        public_key.write_text(gpg.export_keys(fingerprint))
        return RefusedKey(public_key, fingerprint, sig.data.decode("ascii"))
    finally:
        stop_gpg_agent(Path(home))
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def refused_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RefusedKey]]:
    out = tmp_path_factory.mktemp("refused-keys")
    yield {
        "outsider": _make_key(out, "outsider"),
        "expired": _make_key(out, "expired", expired=True),
        "revoked": _make_key(out, "revoked", revoked=True),
    }
