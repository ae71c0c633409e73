"""Legacy remotes: metadata with a detached .asc GPG signature instead of a jcat."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.config import Limits, Paths, Remote
from broker.errors import ConfigError, FormatError, LimitExceeded, VerificationError
from broker.jcat import BlobKind, parse_jcat
from broker.metadata import MetadataStore, verify_metadata
from broker.sandbox.pki import SandboxPki, sign_gpg
from broker.signatures import TrustPolicy, TrustStore
from broker.transfer import UntrustedFiles

ASC = Remote("legacy", "https://mirror.example/firmware.xml.gz", None, "asc")


def _fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY)


def test_asc_remote_names_its_signature_file() -> None:
    assert ASC.signature_name == "firmware.xml.gz.asc"
    assert ASC.jcat_name == "firmware.xml.gz.jcat"  # what dom0 stores is always a jcat


def test_asc_signature_verifies_and_dom0_stores_its_own_jcat(
    sandbox_pki: SandboxPki, trust_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "firmware.xml.gz"
    data.write_bytes(b"catalog bytes")
    asc = sign_gpg(sandbox_pki, data).encode()
    fd = _fd(data)
    verified = verify_metadata(
        fd, asc, ASC, TrustStore.from_dirs([trust_dir]), Limits(), TrustPolicy()
    )
    os.close(fd)
    assert [s.kind for s in verified.signatures] == ["gpg"]
    assert verified.signed_at is not None and verified.signed_at <= datetime.now(UTC)

    paths = Paths(tmp_path / "root")
    store = MetadataStore(paths)
    with UntrustedFiles(paths.untrusted_dir, "n") as u, store.locked():
        fd = u.create(ASC.metadata_name)
        os.write(fd, data.read_bytes())
        store.store(ASC, (fd, u.paths[ASC.metadata_name]), verified)
    current = store.current(ASC)
    assert current is not None
    jcat = parse_jcat(current[1].read_bytes(), 1 << 20, 1 << 20)
    kinds = [b.kind for b in jcat.items[0].blobs]
    assert kinds == [int(BlobKind.SHA256), int(BlobKind.GPG)]  # fwupd needs the sha256


def test_asc_over_other_bytes_is_refused(
    sandbox_pki: SandboxPki, trust_dir: Path, tmp_path: Path
) -> None:
    signed, served = tmp_path / "a", tmp_path / "b"
    signed.write_bytes(b"what was signed")
    served.write_bytes(b"what was served")
    asc = sign_gpg(sandbox_pki, signed).encode()
    with pytest.raises(VerificationError, match="no trusted signature"):
        verify_metadata(
            _fd(served), asc, ASC, TrustStore.from_dirs([trust_dir]), Limits(), TrustPolicy()
        )


def test_asc_refused_when_gpg_is_not_an_accepted_kind(trust_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.write_bytes(b"x")
    with pytest.raises(VerificationError, match="signature_kinds excludes gpg"):
        verify_metadata(
            _fd(data),
            b"-----BEGIN PGP SIGNATURE-----",
            ASC,
            TrustStore.from_dirs([trust_dir]),
            Limits(),
            TrustPolicy(accepted=frozenset({"pkcs7"})),
        )


@pytest.mark.parametrize(
    ("blob", "error"), [(b"x" * 70_000, LimitExceeded), (b"\xff\xfe", FormatError)]
)
def test_asc_that_is_huge_or_not_ascii_is_refused(
    trust_dir: Path, tmp_path: Path, blob: bytes, error: type[Exception]
) -> None:
    data = tmp_path / "d"
    data.write_bytes(b"x")
    with pytest.raises(error) as e:
        verify_metadata(
            _fd(data), blob, ASC, TrustStore.from_dirs([trust_dir]), Limits(), TrustPolicy()
        )
    assert "firmware.xml.gz.asc" in str(e.value)


def test_config_reads_the_signature_format(tmp_path: Path) -> None:
    from broker.config import Config

    paths = Paths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    paths.config_file.write_text(
        "[remote legacy]\nmetadata_url = https://m.example/firmware.xml.gz\nsignature = asc\n"
        f"metadata_signers = {'A' * 40}\npayload_anchors = lvfs\n"
    )
    assert Config.load(paths).remote("legacy").signature == "asc"
    paths.config_file.write_text(
        "[remote legacy]\nmetadata_url = https://m.example/firmware.xml.gz\nsignature = md5\n"
        f"metadata_signers = {'A' * 40}\npayload_anchors = lvfs\n"
    )
    with pytest.raises(ConfigError, match="signature must be jcat or asc"):
        Config.load(paths)
