"""A private remote on the sandbox: an organisation's own metadata, signed by its own key
(a signer certificate of its own), pinned for that remote alone. Its key is refused for
`lvfs`, and the sandbox LVFS's key is refused for it: a key trusted for one remote is
never accepted for another, whatever trust store both chain to."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from broker.cabinet import ExpectedRelease
from broker.sandbox import daemons, lvfs
from broker.sandbox.cli import DEFAULT_CABS, base_url
from broker.sandbox.launcher import FWUPD_QUBES, QUBES, Launcher, Sandbox
from broker.sandbox.pki import certificate_sha256, make_ca
from broker.sandbox.processes import ProcessTable
from tests.adversarial.hostile import (
    FAKE_ID,
    Signer,
    cab_session_push,
    metainfo,
    publish_real,
    restore_mirror,
    signed_cab,
    trusted_signer,
)
from tests.sandbox_helpers import WEBCAM_GUID, manager, qube_paths, sandbox_cli

pytestmark = pytest.mark.sandbox

META = "firmware.xml.zst"


def _sign_into(directory: Path, xml: bytes, key: Signer) -> str:
    """firmware.xml.zst and its .jcat (sha256, sha512, PKCS#7 by ``key``) in ``directory``,
    as the LVFS publishes them; the metadata's sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    lvfs._wait_past_previous_signing(directory)
    data = zstandard.ZstdCompressor(level=3).compress(xml)
    with tempfile.TemporaryDirectory() as tmp:
        content = Path(tmp) / META
        content.write_bytes(data)
        jcat = lvfs.own_jcat(key.pem, key.key, content, META)
    lvfs._write_atomic(directory / META, data)
    lvfs._write_atomic(directory / f"{META}.jcat", jcat)
    return hashlib.sha256(data).hexdigest()


def _restart_daemons(sandbox: Sandbox) -> None:
    # fwupd reads remotes.d at start only
    for qube in FWUPD_QUBES:
        daemons.restart_fwupd(sandbox, Launcher(sandbox), ProcessTable(sandbox.pids_file), qube)


CORP_CA = "corp-firmware-CA.pem"


def _corp_conf(sandbox: Sandbox, corp_key: Signer, anchors: str) -> str:
    return ("\n[remote corp]\n"
            f"metadata_url = {base_url(sandbox)}/corp/{META}\n"
            f"firmware_base_uri = {base_url(sandbox)}/corp\n"
            "allow_plain_http = yes\n"
            f"metadata_signers = {certificate_sha256(corp_key.pem)}\n"
            f"payload_anchors = {anchors}\n")  # fmt: skip


@pytest.fixture
def corp(refreshed: Sandbox) -> Iterator[tuple[Sandbox, Signer, Signer]]:
    """Remote `corp`, served beside the sandbox LVFS at /corp/: its own CA and its own
    signer, pinned for its metadata; its firmware signed under its CA only. Its CA is in every
    qube's trust stores, as an organisation puts it there for fwupd; in dom0's config
    and as a remote of both daemons; all undone after."""
    sandbox = refreshed
    corp_key = Signer(*make_ca(sandbox.pki_dir / "corp", "Corp firmware"))
    lvfs_key = trusted_signer(sandbox)
    conf = qube_paths(sandbox, "dom0").config_file
    original = conf.read_bytes()
    conf.write_text(original.decode() + _corp_conf(sandbox, corp_key, CORP_CA))
    remote_files = [sandbox.root(q) / "etc/fwupd/remotes.d/corp.conf" for q in FWUPD_QUBES]
    for path in remote_files:
        path.write_text("[fwupd Remote]\nEnabled=true\nTitle=Corp firmware\n"
                        f"MetadataURI=https://firmware.corp.example/{META}\n"
                        "ApprovalRequired=false\n")  # fmt: skip
    # every qube that checks a signature: the UpdateVM's first check needs it too
    anchors = [d / CORP_CA for q in QUBES
               for d in (*qube_paths(sandbox, q).pki_firmware_dirs,
                         *qube_paths(sandbox, q).pki_metadata_dirs)]  # fmt: skip
    for path in anchors:
        shutil.copyfile(sandbox.pki_dir / "corp/ca.pem", path)
    _restart_daemons(sandbox)
    try:
        yield sandbox, corp_key, lvfs_key
    finally:
        conf.write_bytes(original)
        for path in remote_files + anchors:
            path.unlink()
        _restart_daemons(sandbox)
        # dom0 and the daemons hold what the mirror serves, signed as served (a re-signed
        # copy of bytes dom0 holds would be "already current", its old jcat kept)
        restore_mirror(sandbox)


def _accepted(sandbox: Sandbox) -> dict[str, str]:
    state = json.loads(qube_paths(sandbox, "dom0").metadata_state_file.read_text())
    return {remote: doc["sha256"] for remote, doc in state.items()}


def test_a_private_remote_takes_its_own_key_and_only_its_own(
    corp: tuple[Sandbox, Signer, Signer],
) -> None:
    sandbox, corp_key, lvfs_key = corp
    catalog = lvfs.catalog_xml(sandbox.lvfs_dir)

    # its own key: accepted, and handed to both daemons. Published as an organisation
    # publishes its own remote: qubes-fwupd-sandbox publish --out, with its own cert
    corp_dir = sandbox.lvfs_dir / "corp"
    r = sandbox_cli("publish", "--out", str(corp_dir), "--signer-cert", str(corp_key.pem),
                    "--signer-key", str(corp_key.key), "--location-base",
                    "https://firmware.corp.example/", *map(str, DEFAULT_CABS))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"published {corp_dir / META}.jcat" in r.stdout
    sha = hashlib.sha256((corp_dir / META).read_bytes()).hexdigest()
    r = manager(sandbox, "refresh")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _accepted(sandbox)["corp"] == sha
    assert "corp: dom0 fwupd loaded the metadata" in r.stdout
    assert "corp: sys-usb fwupd loaded the metadata" in r.stdout

    # the corp key signing the LVFS's metadata: refused for lvfs, nothing stored
    before = _accepted(sandbox)
    _sign_into(sandbox.lvfs_dir, catalog + b"<!-- forged lvfs -->\n", corp_key)
    r = manager(sandbox, "refresh")
    assert r.returncode == 1, r.stdout + r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("qubes-fwupdmgr: dom0 refused what sys-firewall sent: "), line
    assert "signer" in line, line
    assert _accepted(sandbox) == before

    # the LVFS's key signing the corp remote's: refused for corp
    publish_real(sandbox)
    _sign_into(sandbox.lvfs_dir / "corp", catalog + b"<!-- corp 2 -->\n", lvfs_key)
    r = manager(sandbox, "refresh")
    assert r.returncode == 1, r.stdout + r.stderr
    (line,) = [ln for ln in r.stderr.strip().splitlines() if "corp" in ln or "refused" in ln]
    assert "signer" in line, r.stderr
    assert _accepted(sandbox)["corp"] == before["corp"]
    assert _accepted(sandbox)["lvfs"] == before["lvfs"]  # the real catalog again: current


def _cabs(sandbox: Sandbox) -> set[str]:
    return {p.name for p in qube_paths(sandbox, "dom0").cabs_dir.iterdir()}


def test_a_private_remotes_firmware_is_signed_under_its_own_anchors_only(
    corp: tuple[Sandbox, Signer, Signer], tmp_path: Path
) -> None:
    """Payload trust per remote: fwupd pools every CA in /etc/pki/fwupd for every remote;
    dom0 takes a payload only under the anchors its remote names."""
    sandbox, corp_key, lvfs_key = corp
    before = _cabs(sandbox)
    corp_cab = signed_cab(tmp_path, metainfo(), corp_key)
    release = ExpectedRelease(FAKE_ID, "9.9.1", (WEBCAM_GUID,))

    # the corp CA's firmware for lvfs: refused, nothing stored
    r, outcome = cab_session_push(sandbox, corp_cab, release, remote="lvfs")
    assert outcome is not None and not outcome.ok, (r, outcome)
    assert "no trusted signature" in outcome.message, outcome.message
    assert _cabs(sandbox) == before

    # the sandbox LVFS's firmware for corp: refused
    lvfs_cab = signed_cab(tmp_path, metainfo(), lvfs_key)
    r, outcome = cab_session_push(sandbox, lvfs_cab, release, remote="corp")
    assert outcome is not None and not outcome.ok, (r, outcome)
    assert "no trusted signature" in outcome.message, outcome.message
    # the real LVFS's (fwupd-tests' cab, signed by the LVFS's keys) for corp: refused
    real = DEFAULT_CABS[-1].read_bytes()
    real_release = ExpectedRelease(FAKE_ID, "1.2.4", (WEBCAM_GUID,))
    assert DEFAULT_CABS[-1].name == "fakedevice124.cab"
    r, outcome = cab_session_push(sandbox, real, real_release, remote="corp")
    assert outcome is not None and not outcome.ok, (r, outcome)
    assert _cabs(sandbox) == before

    # the corp CA's firmware for corp: accepted and stored
    r, outcome = cab_session_push(sandbox, corp_cab, release, remote="corp")
    assert outcome is not None and outcome.ok, (r, outcome)
    stored = _cabs(sandbox) - before
    assert stored == {f"{hashlib.sha256(corp_cab).hexdigest()}.cab"}

    # the LVFS's keys for corp only where corp says so (a mirror of LVFS firmware)
    conf = qube_paths(sandbox, "dom0").config_file
    text = conf.read_text()
    conf.write_text(text.replace(f"payload_anchors = {CORP_CA}\n",
                                 f"payload_anchors = {CORP_CA} lvfs\n"))  # fmt: skip
    r, outcome = cab_session_push(sandbox, real, real_release, remote="corp")
    assert outcome is not None and outcome.ok, (r, outcome)
    stored = _cabs(sandbox) - before
    for name in stored:
        (qube_paths(sandbox, "dom0").cabs_dir / name).unlink()
