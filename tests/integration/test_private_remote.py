"""A private remote on the sandbox: an organisation's own metadata, signed by its own key
(a signer certificate of its own), pinned for that remote alone. Its key is refused for
`lvfs`, and the sandbox LVFS's key is refused for it: a key trusted for one remote is
never accepted for another, whatever trust store both chain to."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from broker.sandbox import daemons, lvfs
from broker.sandbox.cli import DEFAULT_CABS, base_url
from broker.sandbox.launcher import FWUPD_QUBES, Launcher, Sandbox
from broker.sandbox.pki import certificate_sha256, create_pki, make_signer
from broker.sandbox.processes import ProcessTable
from tests.adversarial.hostile import Signer, publish_real, restore_mirror, trusted_signer
from tests.sandbox_helpers import manager, qube_paths, sandbox_cli

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


@pytest.fixture
def corp(refreshed: Sandbox) -> Iterator[tuple[Sandbox, Signer, Signer]]:
    """Remote `corp`, served beside the sandbox LVFS at /corp/, pinned to its own signer
    (under the sandbox CA, so every trust store chains it: only the pin tells them
    apart), in dom0's config and as a remote of both daemons; all undone after."""
    sandbox = refreshed
    pki = create_pki(sandbox.pki_dir)
    corp_key = Signer(*make_signer(pki, sandbox.pki_dir / "corp", "Corp firmware"))
    lvfs_key = trusted_signer(sandbox)
    conf = qube_paths(sandbox, "dom0").config_file
    original = conf.read_bytes()
    conf.write_text(original.decode() + (
        "\n[remote corp]\n"
        f"metadata_url = {base_url(sandbox)}/corp/{META}\n"
        f"firmware_base_uri = {base_url(sandbox)}/corp\n"
        "allow_plain_http = yes\n"
        f"metadata_signers = {certificate_sha256(corp_key.pem)}\n"
    ))  # fmt: skip
    remote_files = [sandbox.root(q) / "etc/fwupd/remotes.d/corp.conf" for q in FWUPD_QUBES]
    for path in remote_files:
        path.write_text("[fwupd Remote]\nEnabled=true\nTitle=Corp firmware\n"
                        f"MetadataURI=https://firmware.corp.example/{META}\n"
                        "ApprovalRequired=false\n")  # fmt: skip
    _restart_daemons(sandbox)
    try:
        yield sandbox, corp_key, lvfs_key
    finally:
        conf.write_bytes(original)
        for path in remote_files:
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
