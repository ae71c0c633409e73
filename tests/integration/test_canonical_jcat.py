"""What fwupd parses is what dom0 verified: the jcat dom0 stores and hands to both daemons
holds, per signature that verified, dom0's own re-encoding of it and nothing else."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from broker.config import Config
from broker.jcat import BlobKind, Jcat, parse_jcat
from broker.metadata import MetadataStore
from broker.sandbox.launcher import Sandbox
from tests.sandbox_helpers import manager, qube_paths

pytestmark = pytest.mark.sandbox


def _jcat(path: Path) -> Jcat:
    return parse_jcat(path.read_bytes(), 1 << 20, 4 << 20)


def _der(pem: str, tmp: Path) -> bytes:
    """openssl's own DER re-encoding of a PEM PKCS#7."""
    src = tmp / "sig.pem"
    src.write_text(pem)
    return subprocess.run(
        ["openssl", "cms", "-cmsout", "-inform", "PEM", "-in", str(src), "-outform", "DER"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip


def test_the_jcat_fwupd_gets_holds_one_pkcs7_block_of_dom0s_re_encoding(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    paths = qube_paths(sandbox, "dom0")
    remote = Config.load(paths).remotes[0]
    current = MetadataStore(paths).current(remote)
    assert current is not None
    data, ours = current
    (item,) = _jcat(ours).items
    assert item.id == remote.metadata_name
    (pkcs7,) = item.of_kind(BlobKind.PKCS7)  # the ML-DSA-87 one was skipped, not passed on
    assert pkcs7.data.count("-----BEGIN") == 1
    assert pkcs7.data.startswith("-----BEGIN PKCS7-----\n")
    # byte-identical to openssl's re-encoding of the mirror's classic signature
    served = _jcat(sandbox.lvfs_dir / f"{remote.metadata_name}.jcat")
    classic = served.item_for(remote.metadata_name).of_kind(BlobKind.PKCS7)[0].data
    body = "".join(pkcs7.data.splitlines()[1:-1])
    assert base64.b64decode(body) == _der(classic, tmp_path)
    (gpg,) = item.of_kind(BlobKind.GPG)
    assert gpg.data.count("-----BEGIN PGP SIGNATURE-----") == 1
    # and that very file is what each daemon holds for its remote
    for qube in ("dom0", "sys-usb"):
        held = sandbox.root(qube) / "var/lib/fwupd/metadata/lvfs" / ours.name
        assert held.read_bytes() == ours.read_bytes(), qube
        assert (held.parent / data.name).read_bytes() == data.read_bytes(), qube
