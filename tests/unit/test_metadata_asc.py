"""Legacy remotes: metadata with a detached .asc GPG signature instead of a jcat."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.config import Config, Limits, Paths, Remote
from broker.errors import ConfigError, FormatError, LimitExceeded, VerificationError
from broker.jcat import BlobKind, build_jcat, parse_jcat
from broker.metadata import MetadataStore, verify_metadata, verify_metadata_files
from broker.sandbox.pki import SandboxPki, sign_gpg
from broker.signatures import TrustPolicy, TrustStore
from broker.transfer import UntrustedFiles

ASC = Remote("legacy", "https://mirror.example/firmware.xml.gz", None, "asc")
JCAT_REMOTE = Remote("mirror", "https://mirror.example/firmware.xml.zst")


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


def _signed(sandbox_pki: SandboxPki, tmp_path: Path) -> tuple[Path, bytes]:
    data = tmp_path / "firmware.xml.gz"
    data.write_bytes(b"catalog bytes")
    return data, sign_gpg(sandbox_pki, data).encode()


def test_only_the_signers_a_remote_names_count_for_its_metadata(
    sandbox_pki: SandboxPki, trust_dir: Path, tmp_path: Path
) -> None:
    """A key the trust store holds is not enough: it must be one the remote names, and a
    policy's own signers (a caller's) give way to the remote's."""
    data, asc = _signed(sandbox_pki, tmp_path)
    trust = TrustStore.from_dirs([trust_dir])
    ours = sandbox_pki.gpg_fingerprint.upper()
    named = dataclasses.replace(ASC, metadata_signers=frozenset({ours}))
    anyone_but = TrustPolicy(signers=frozenset({"0" * 40}))
    assert verify_metadata(_fd(data), asc, named, trust, Limits(), anyone_but).signatures
    other = dataclasses.replace(ASC, metadata_signers=frozenset({"0" * 40}))
    with pytest.raises(VerificationError, match="not a signer named for this purpose"):
        verify_metadata(_fd(data), asc, other, trust, Limits(), TrustPolicy())


def test_an_asc_of_exactly_the_cap_is_checked_not_refused_for_its_size(
    trust_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "d"
    data.write_bytes(b"x")
    with pytest.raises(VerificationError) as e:
        verify_metadata(
            _fd(data), b"x" * 65536, ASC, TrustStore.from_dirs([trust_dir]), Limits(),
            TrustPolicy(),
        )  # fmt: skip
    assert not isinstance(e.value, LimitExceeded)
    assert "not one armored PGP signature" in str(e.value)


def test_verify_metadata_files_reads_the_qubes_own_store_and_config(
    sandbox_pki: SandboxPki, trust_dir: Path, tmp_path: Path
) -> None:
    """Its own metadata trust store (pki/fwupd-metadata under its root), its config's
    policy, the signature from offset 0 of its fd and under the jcat cap."""
    data, asc = _signed(sandbox_pki, tmp_path)
    paths = Paths(tmp_path / "root")
    sig = tmp_path / "firmware.xml.gz.asc"
    sig.write_bytes(asc)
    data_fd, sig_fd = _fd(data), _fd(sig)
    os.lseek(sig_fd, 10, os.SEEK_SET)
    try:
        with pytest.raises(VerificationError, match="it holds no GPG key"):
            verify_metadata_files(data_fd, sig_fd, ASC, paths, Config())
        shutil.copytree(trust_dir, paths.pki_metadata_dirs[0])
        verified = verify_metadata_files(data_fd, sig_fd, ASC, paths, Config())
        assert [s.kind for s in verified.signatures] == ["gpg"]
        gpg_refused = Config(trust=TrustPolicy(accepted=frozenset({"pkcs7"})))
        with pytest.raises(VerificationError, match="signature_kinds excludes gpg"):
            verify_metadata_files(data_fd, sig_fd, ASC, paths, gpg_refused)
        # read up to the cap and one byte (the cap then refuses a jcat): here, the
        # armor's last newline may go, not one byte more
        for cap, whole in ((len(asc) - 2, True), (len(asc) - 3, False)):
            config = Config(limits=Limits(jcat_max_bytes=cap))
            if whole:
                assert verify_metadata_files(data_fd, sig_fd, ASC, paths, config).signatures
                continue
            with pytest.raises(VerificationError, match="not one armored PGP signature"):
                verify_metadata_files(data_fd, sig_fd, ASC, paths, config)
    finally:
        os.close(data_fd)
        os.close(sig_fd)
    # a jcat remote: the jcat under the config's caps
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    jcat = tmp_path / "firmware.xml.zst.jcat"
    jcat.write_bytes(build_jcat({"firmware.xml.zst": [(BlobKind.SHA256, sha),
                                                      (BlobKind.GPG, asc.decode())]}))  # fmt: skip
    data_fd, jcat_fd = _fd(data), _fd(jcat)
    try:
        verified = verify_metadata_files(data_fd, jcat_fd, JCAT_REMOTE, paths, Config())
        assert verified.sha256 == sha
        tiny = Config(limits=Limits(jcat_json_max_bytes=10))
        with pytest.raises(LimitExceeded):
            verify_metadata_files(data_fd, jcat_fd, JCAT_REMOTE, paths, tiny)
    finally:
        os.close(data_fd)
        os.close(jcat_fd)



def test_jcat_metadata_is_checked_by_the_item_for_its_file_and_named(
    sandbox_pki: SandboxPki, trust_dir: Path, tmp_path: Path
) -> None:
    """The jcat path: the item for the file dom0 stores (not another item of the jcat),
    its checksum and signature; a refusal names the file, as does an asc remote's."""
    data = tmp_path / "firmware.xml.zst"
    data.write_bytes(b"catalog bytes")
    sha = hashlib.sha256(b"catalog bytes").hexdigest()
    gpg = sign_gpg(sandbox_pki, data)
    trust = TrustStore.from_dirs([trust_dir])
    jcat = build_jcat({
        "other.xml.zst": [(BlobKind.SHA256, "0" * 64)],
        "firmware.xml.zst": [(BlobKind.SHA256, sha), (BlobKind.GPG, gpg)],
    })  # fmt: skip
    fd = _fd(data)
    try:
        verified = verify_metadata(fd, jcat, JCAT_REMOTE, trust, Limits(), TrustPolicy())
        assert (verified.sha256, [s.kind for s in verified.signatures]) == (sha, ["gpg"])
        foreign = dataclasses.replace(JCAT_REMOTE, metadata_signers=frozenset({"0" * 40}))
        with pytest.raises(VerificationError, match="not a signer named for this purpose"):
            verify_metadata(fd, jcat, foreign, trust, Limits(), TrustPolicy())
        wrong = build_jcat({"firmware.xml.zst": [(BlobKind.SHA256, "0" * 64)]})
        with pytest.raises(VerificationError) as e:
            verify_metadata(fd, wrong, JCAT_REMOTE, trust, Limits(), TrustPolicy())
        assert str(e.value) == "firmware.xml.zst: sha256 checksum does not match the file"
        with pytest.raises(LimitExceeded):
            verify_metadata(fd, jcat, JCAT_REMOTE, trust, Limits(jcat_max_bytes=10), TrustPolicy())
        with pytest.raises(LimitExceeded):
            verify_metadata(
                fd, jcat, JCAT_REMOTE, trust, Limits(jcat_json_max_bytes=10), TrustPolicy()
            )
    finally:
        os.close(fd)
    other = tmp_path / "other"
    other.write_bytes(b"not what was signed")
    with pytest.raises(VerificationError) as e:
        verify_metadata(_fd(other), gpg.encode(), ASC, trust, Limits(), TrustPolicy())
    assert str(e.value).startswith("firmware.xml.gz: no trusted signature (gpg: ")
