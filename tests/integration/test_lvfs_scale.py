"""An LVFS-scale catalog, as the LVFS serves it today, through the whole refresh path.

The sandbox LVFS publishes 4,400 generated components (about 21 MB of XML, in the real
catalog's shapes: both location forms, ipfs, 187-200 character names, <requires> of each
kind, every version format) after the real cabs' components, signed with an LVFS-style
jcat (generation item with aliases, sha256 + sha512, classic and ML-DSA-87 PKCS#7, GPG).
Refresh must accept it, both real fwupd daemons must load it, and dom0's catalog must hold
every release with an https location and a container sha256, and skip the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from broker.config import Config
from broker.metadata import MetadataStore
from broker.sandbox import lvfs
from broker.sandbox.launcher import Sandbox
from broker.sandbox.lvfs_catalog import GeneratedCatalog, generate
from tests.adversarial.hostile import restore_mirror
from tests.sandbox_helpers import (
    WEBCAM_ID,
    manager,
    qube_paths,
    sandbox_cli,
    webcam_version,
)

pytestmark = pytest.mark.sandbox

COMPONENTS = 4400


@pytest.fixture(scope="module")
def published(sandbox: Sandbox) -> Iterator[GeneratedCatalog]:
    r = sandbox_cli("publish", "--dir", str(sandbox.dir), "--generated", str(COMPONENTS))
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        # the same bytes the sandbox published: generation is deterministic
        yield generate(COMPONENTS, extra_components=lvfs.cab_components(sandbox.lvfs_dir))
    finally:
        restore_mirror(sandbox)


def test_refresh_accepts_an_lvfs_scale_catalog_and_both_daemons_load_it(
    sandbox: Sandbox, published: GeneratedCatalog
) -> None:
    served = (sandbox.lvfs_dir / "firmware.xml.zst").read_bytes()
    assert len(published.xml) > 17_000_000
    r = manager(sandbox, "refresh", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    accepted = published.accepted()
    skipped = len(published.releases) - len(accepted)
    m = re.search(
        r"metadata for lvfs accepted: .* \((gpg, pkcs7)\), (\d+) releases \((\d+) skipped\)",
        r.stdout,
    )
    assert m, r.stdout
    # the real cabs' webcam releases (1.2.3, 1.2.4) come on top of the generated ones
    assert (int(m[2]), int(m[3])) == (len(accepted) + 2, skipped)
    assert "lvfs: dom0 fwupd loaded the metadata" in r.stdout
    assert "lvfs: sys-usb fwupd loaded the metadata" in r.stdout
    # each daemon holds exactly the bytes the mirror served and dom0 verified
    for qube in ("dom0", "sys-usb"):
        held = sandbox.root(qube) / "var/lib/fwupd/metadata/lvfs/firmware.xml.zst"
        assert held.read_bytes() == served, qube

    paths = qube_paths(sandbox, "dom0")
    config = Config.load(paths)
    (remote,) = config.remotes
    catalog = MetadataStore(paths).catalog(remote, config.limits)
    assert catalog is not None
    by_sha = {r.sha256: r for r in catalog.releases}
    # every release with an https location and a container sha256, and nothing else
    assert {g.sha256 for g in accepted} <= set(by_sha)
    assert len(catalog.releases) == len(accepted) + 2
    assert len(catalog.skipped) == skipped
    for g in accepted:
        held_release = by_sha[g.sha256]
        assert (held_release.filename, held_release.size) == (g.filename, g.size)
        assert held_release.url == f"{remote.firmware_base_uri}/{g.filename}"
        # release notes as the admin reads them at the prompt: <p> and <li> as lines
        assert held_release.description == g.description, g.component_id
    assert max(len(r.filename) for r in catalog.releases) == 200
    # the skipped ones are named in dom0's log, each with its reason
    log = paths.log_file.read_text()
    for reason in ("no https location (only ipfs)", "sha1 only", "container sha256 given 2"):
        assert reason in log, reason


def test_get_updates_on_an_lvfs_scale_catalog_still_offers_only_what_fwupd_offers(
    sandbox: Sandbox, published: GeneratedCatalog
) -> None:
    """No generated component is for the webcam; the device's own daemon decides."""
    r = manager(sandbox, "get-updates", "--json", timeout=300)
    assert r.returncode in (0, 2), r.stdout + r.stderr
    assert r.stderr == ""


def test_a_plan_is_bound_to_the_lvfs_scale_metadata_and_installs(
    sandbox: Sandbox, published: GeneratedCatalog
) -> None:
    """The plan's binding read from an LVFS-shaped catalog of today's size (dom0's index
    of it, not the small sandbox catalog): the metadata dom0 accepted, the webcam's cab."""
    r = manager(sandbox, "install", "-y", f"sys-usb:{WEBCAM_ID}", "1.2.3", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    r = manager(sandbox, "get-updates", "--json", f"sys-usb:{WEBCAM_ID}", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (entry,) = json.loads(r.stdout)["Plan"]
    accepted = MetadataStore(qube_paths(sandbox, "dom0")).accepted("lvfs")
    assert accepted is not None
    assert (entry["MetadataSha256"], entry["MetadataSigned"]) == (
        accepted["sha256"], accepted["signed_at"],
    )  # fmt: skip
    assert (entry["VersionOld"], entry["Version"]) == ("1.2.3", "1.2.4")
    plan = qube_paths(sandbox, "dom0").root / "plan-lvfs-scale.json"
    plan.write_text(r.stdout)
    try:
        r = manager(sandbox, "update", "--plan", str(plan), timeout=300)
    finally:
        plan.unlink()
    assert r.returncode == 0, r.stdout + r.stderr
    assert webcam_version(sandbox, "sys-usb") == "1.2.4"
