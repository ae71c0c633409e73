"""The generated LVFS-shaped catalog: deterministic, real-sized, and its manifest agrees
with the XML as an independent reading of the dom0 rule (and as real fwupd) sees it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from broker.sandbox.lvfs_catalog import (
    ACCEPTED_SHAPES,
    LONG_NAME,
    NAME_MAX,
    SHAPES,
    GeneratedCatalog,
    GeneratedRelease,
    generate,
    release_case,
    release_xml,
)

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_VERSION = re.compile(r"^[A-Za-z0-9._+~-]{1,64}$")
_VERSION_SHAPES = {
    "pair": r"\d+\.\d+",
    "bcd": r"\d{1,2}\.\d{1,2}",
    "triplet": r"\d+\.\d+\.\d+",
    "quad": r"\d+\.\d+\.\d+\.\d+",
    "intel-me": r"\d+\.\d+\.\d+\.\d+",
    "hex": r"0x[0-9a-f]{8}",
    "number": r"\d+",
}
# fwupd 2.0.20 libfwupd/fwupd-enums.c fwupd_version_format_to_string()
_FWUPD_FORMATS = {
    "plain", "number", "pair", "triplet", "quad", "bcd", "intel-me", "intel-me2",
    "intel-csme19", "surface-legacy", "surface", "dell-bios", "hex", "dell-bios-msb",
}  # fmt: skip
_SAFE = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


@pytest.fixture(scope="module")
def full() -> GeneratedCatalog:
    return generate()


@pytest.fixture(scope="module")
def full_root(full: GeneratedCatalog) -> etree._Element:
    return etree.fromstring(full.xml, _SAFE)


@pytest.fixture(scope="module")
def small() -> GeneratedCatalog:
    return generate(50, seed=3)


# ---------------------------------------------------------------------------- a reference
def _dom0_verdict(rel: etree._Element) -> tuple[bool, str | None, str | None, int | None]:
    """The dom0 rule, read straight off the XML (written apart from the generator)."""
    art = rel.find("artifacts/artifact[@type='binary']")
    if art is not None:
        name = art.findtext("filename")
        if name is not None and not name.lower().endswith(".cab"):
            art = None
    shas = (
        [c.text or "" for c in art.iterfind("checksum[@type='sha256']")] if art is not None else []
    )
    shas += [c.text or "" for c in rel.iterfind("checksum[@type='sha256'][@target='container']")]
    if not shas or len(set(shas)) > 1:
        return False, None, None, None
    art_locations = [e.text or "" for e in art.iterfind("location")] if art is not None else []
    locations = art_locations or [e.text or "" for e in rel.iterfind("location")]
    https = [loc for loc in locations if loc.startswith("https://")]
    sizes = {e.text for e in rel.iterfind("size[@type='download']")}
    if art is not None:
        sizes |= {e.text for e in art.iterfind("size[@type='download']")}
    if not https or len(sizes) != 1:
        return False, None, None, None
    return True, shas[0], https[0].rsplit("/", 1)[-1], int(sizes.pop() or "")


def _releases(root: etree._Element) -> Iterator[tuple[str, etree._Element]]:
    for comp in root.iterfind("component"):
        for rel in comp.iterfind("releases/release"):
            yield comp.findtext("id") or "", rel


def _check_manifest_against_xml(catalog: GeneratedCatalog, root: etree._Element) -> None:
    manifest = {(r.component_id, r.version): r for r in catalog.releases}
    assert len(manifest) == len(catalog.releases), "component id + version must be unique"
    seen = 0
    for cid, rel in _releases(root):
        m = manifest[(cid, rel.get("version") or "")]
        accepted, sha256, filename, size = _dom0_verdict(rel)
        assert (accepted, sha256, filename, size) == (m.accepted, m.sha256, m.filename, m.size), m
        assert m.accepted == (m.shape in ACCEPTED_SHAPES), m
        assert rel.get("id") == str(m.release_id)
        if m.accepted:
            assert m.location is not None
            assert m.location.startswith("https://")
            assert m.location.endswith("/" + (m.filename or ""))
        seen += 1
    assert seen == len(manifest)


def _requires_kind(req: etree._Element) -> str:
    text = req.text
    if req.tag != "firmware":
        return str(req.tag)
    if text is None:
        return "firmware-version"
    if text in ("bootloader", "vendor-id"):
        return text
    return "parent-firmware" if req.get("depth") else "other-firmware"


def _recount(root: etree._Element) -> Counter[str]:
    counts: Counter[str] = Counter()
    for comp in root.iterfind("component"):
        counts["components"] += 1
        fmt = comp.findtext("custom/value[@key='LVFS::VersionFormat']") or ""
        counts[f"verfmt:{fmt}"] += 1
        reqs = comp.findall("requires/*")
        counts["requires:components"] += bool(reqs)
        for req in reqs:
            counts[f"requires:{_requires_kind(req)}"] += 1
    counts["releases"] = len(root.findall("component/releases/release"))
    for art in root.iterfind("component/releases/release/artifacts/artifact"):
        counts[f"artifacts:{art.get('type')}"] += 1
    for loc in root.iterfind(".//location"):
        counts[
            "locations:ipfs" if (loc.text or "").startswith("ipfs://") else "locations:https"
        ] += 1
    return counts


# ---------------------------------------------------------------------------- tests
def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a, b, c = generate(300, seed=11), generate(300, seed=11), generate(300, seed=12)
    assert a.xml == b.xml
    assert a.releases == b.releases
    assert a.xml != c.xml
    assert {r.sha256 for r in a.accepted()}.isdisjoint(r.sha256 for r in c.accepted())


def test_default_size_is_the_real_lvfs_size(full: GeneratedCatalog) -> None:
    assert full.stats["components"] == 4400
    assert 17_000_000 <= len(full.xml) <= 23_000_000
    per_component = full.stats["releases"] / full.stats["components"]
    assert 1.6 <= per_component <= 2.3  # "about 2"
    assert max(Counter(r.component_id for r in full.releases).values()) >= 15  # some have many


def test_parses_safely_and_has_no_doctype(
    full: GeneratedCatalog, full_root: etree._Element
) -> None:
    assert full.xml.startswith(b"<?xml version='1.0' encoding='utf-8'?>\n<components ")
    docinfo: Any = full_root.getroottree().docinfo  # lxml-stubs lack .doctype
    assert docinfo.doctype == ""
    assert b"<!DOCTYPE" not in full.xml and b"<!ENTITY" not in full.xml
    assert full_root.tag == "components"
    assert (full_root.get("origin"), full_root.get("version")) == ("lvfs", "0.9")
    ids = [c.findtext("id") or "" for c in full_root.iterfind("component")]
    assert ids == sorted(ids)  # the LVFS writes components sorted by id


def test_every_shape_in_a_small_catalog(small: GeneratedCatalog) -> None:
    assert set(Counter(r.shape for r in small.releases)) == set(SHAPES)
    for n in (11, 50, 51, 120):
        assert {r.shape for r in generate(n, seed=n).releases} == set(SHAPES), n


def test_every_shape_several_times_at_full_size(full: GeneratedCatalog) -> None:
    shapes = Counter(r.shape for r in full.releases)
    assert all(shapes[s] >= 5 for s in SHAPES), shapes
    assert shapes["both_agree"] > 0.75 * len(full.releases)


@pytest.mark.parametrize("which", ["small", "full"])
def test_manifest_agrees_with_the_xml(which: str, request: pytest.FixtureRequest) -> None:
    catalog: GeneratedCatalog = request.getfixturevalue(which)
    root = etree.fromstring(catalog.xml, _SAFE)
    _check_manifest_against_xml(catalog, root)
    recount = _recount(root)
    expected = {k: v for k, v in catalog.stats.items() if not k.startswith("shape:")}
    assert recount == Counter(expected)
    assert Counter(r.shape for r in catalog.releases) == Counter(
        {k.removeprefix("shape:"): v for k, v in catalog.stats.items() if k.startswith("shape:")}
    )


def test_full_catalog_has_every_kind_of_everything(full: GeneratedCatalog) -> None:
    stats = full.stats
    for kind in ("id", "vendor-id", "firmware-version", "bootloader", "other-firmware",
                 "parent-firmware", "hardware", "not_hardware", "client"):  # fmt: skip
        assert stats[f"requires:{kind}"] > 0, kind
    assert 0.65 <= stats["requires:components"] / stats["components"] <= 0.75  # 923 of 1,317
    assert stats["locations:ipfs"] > 0.02 * stats["releases"]
    assert stats["artifacts:source"] > 0
    formats = {k.removeprefix("verfmt:") for k in stats if k.startswith("verfmt:")}
    assert formats >= _FWUPD_FORMATS
    assert {"", "weird-format"} <= formats


def test_requires_use_the_syntax_fwupd_2_0_20_reads(full_root: etree._Element) -> None:
    for comp in full_root.iterfind("component"):
        reqs = comp.findall("requires/*")
        for req in reqs:
            assert req.tag in ("id", "firmware", "hardware", "not_hardware", "client"), req.tag
            if req.tag == "id":
                assert req.text == "org.freedesktop.fwupd"
                assert req.get("compare") == "ge"
                assert req.get("version")
            elif req.tag == "firmware" and req.text not in (None, "bootloader", "vendor-id"):
                assert all(_GUID.match(g) for g in (req.text or "").split("|"))
            elif req.tag == "firmware" and req.text == "vendor-id":
                assert req.get("compare") in ("eq", "regex")
            elif req.tag in ("hardware", "not_hardware"):
                assert all(_GUID.match(g) for g in (req.text or "").split("|"))
            elif req.tag == "client":
                assert req.text and not len(req)  # <client>feature</client>, no children
        # fwupd refuses a globbed <id> without <client>id-requirement-glob</client>
        if any("=" in (r.get("version") or "") for r in reqs if r.tag == "id"):
            assert any(r.tag == "client" and r.text == "id-requirement-glob" for r in reqs)


def test_components_and_versions_look_like_the_lvfs(full_root: etree._Element) -> None:
    for comp in full_root.iterfind("component"):
        cid = comp.findtext("id") or ""
        assert re.fullmatch(r"[a-z0-9]+\.[a-z0-9]+\.[A-Za-z0-9]+\.firmware", cid), cid
        guids = [g.text or "" for g in comp.iterfind("provides/firmware[@type='flashed']")]
        assert 1 <= len(guids) <= 4 and all(_GUID.match(g) for g in guids)
        for tag in ("name", "summary", "developer_name", "project_license", "metadata_license"):
            assert comp.findtext(tag), (cid, tag)
        assert comp.find("description/p") is not None
        assert comp.findtext("url[@type='homepage']", "").startswith("https://")
        assert comp.find("categories/category") is not None
        fmt = comp.findtext("custom/value[@key='LVFS::VersionFormat']") or ""
        versions = [r.get("version") or "" for r in comp.iterfind("releases/release")]
        assert versions and len(set(versions)) == len(versions), cid
        stamps = [int(r.get("timestamp") or 0) for r in comp.iterfind("releases/release")]
        assert stamps == sorted(stamps, reverse=True), cid  # newest first
        for v in versions:
            assert _VERSION.match(v), v
            if fmt in _VERSION_SHAPES:
                assert re.fullmatch(_VERSION_SHAPES[fmt], v), (fmt, v)


def test_file_names(full: GeneratedCatalog, full_root: etree._Element) -> None:
    names = [r.filename for r in full.accepted() if r.filename]
    assert max(len(n) for n in names) == LONG_NAME
    assert all(_NAME.match(n) for n in names)
    for r in full.releases:
        assert (r.filename is not None and len(r.filename) == LONG_NAME) == (
            r.shape == "long_name_200"
        ), r
    everywhere = [e.text or "" for e in full_root.iterfind(".//location")]
    everywhere += [e.get("filename") or "" for e in full_root.iterfind(".//checksum[@filename]")]
    everywhere += [e.text or "" for e in full_root.iterfind(".//filename")]
    basenames = [n.rsplit("/", 1)[-1] for n in everywhere if not n.startswith("ipfs://")]
    assert all(_NAME.match(n) for n in basenames)
    assert max(len(n) for n in basenames) == LONG_NAME
    assert max(len(n) for n in basenames if len(n) != LONG_NAME) <= NAME_MAX
    # <hash>-<Vendor>-<Model>-<version>.cab, sha1 (older uploads) or sha256 prefixed
    assert all(re.match(r"^([0-9a-f]{40}|[0-9a-f]{64})-[A-Za-z0-9]", n) for n in names)
    assert {len(n.split("-", 1)[0]) for n in names} == {40, 64}


def test_sha256_unique(full: GeneratedCatalog) -> None:
    accepted = [r.sha256 for r in full.accepted()]
    assert all(s is not None and re.fullmatch(r"[0-9a-f]{64}", s) for s in accepted)
    assert len(set(accepted)) == len(accepted)
    every = [s for r in full.releases for s in set(r.sha256_seen)]
    assert len(set(every)) == len(every)


@pytest.mark.parametrize("shape", SHAPES)
def test_release_case_each_shape(shape: str) -> None:
    el, m = release_case(shape, index=4)
    assert el.tag == "release"
    assert m.shape == shape
    assert _dom0_verdict(el) == (m.accepted, m.sha256, m.filename, m.size)
    assert m.accepted == (shape in ACCEPTED_SHAPES)
    assert etree.tostring(release_xml(shape, index=4)) == etree.tostring(el)
    assert etree.tostring(release_xml(shape, index=5)) != etree.tostring(el)
    if shape in ("ipfs_first", "ipfs_only"):
        first = el.findtext("artifacts/artifact[@type='binary']/location") or ""
        assert first.startswith("ipfs://Qm") and len(first) == len("ipfs://") + 46
    if shape == "source_artifact_too":
        assert el.find("artifacts/artifact[@type='source']") is not None
    if shape == "sha1_only":
        assert not el.xpath("checksum[@type='sha256'][@target='container']")
        assert not el.xpath("artifacts/artifact[@type='binary']/checksum[@type='sha256']")
    if shape == "long_name_200":
        assert len(m.filename or "") == LONG_NAME
    with pytest.raises(ValueError):
        release_case("no-such-shape")


def test_extra_components_appended_verbatim() -> None:
    extra = etree.fromstring(
        b'<component type="firmware"><id>org.example.Extra.firmware</id>'
        b"<releases><release version='1.0'/></releases></component>"
    )
    plain, with_extra = generate(20, seed=5), generate(20, seed=5, extra_components=[extra])
    assert with_extra.releases == plain.releases
    root = etree.fromstring(with_extra.xml, _SAFE)
    assert root[-1].findtext("id") == "org.example.Extra.firmware"
    assert etree.tostring(root[-1], with_tail=False) == etree.tostring(extra)
    assert len(root) == 21


def test_location_base() -> None:
    c = generate(15, seed=1, location_base="https://mirror.example.org/lvfs/")
    assert all(
        (r.location or "").startswith("https://mirror.example.org/lvfs/") for r in c.accepted()
    )
    for bad in ("http://fwupd.org/downloads", "file:///srv/lvfs", "https:///x", "https://h/?q=1"):
        with pytest.raises(ValueError):
            generate(1, location_base=bad)


# ---------------------------------------------------------------------------- real fwupd
_FWUPDTOOL = Path("/usr/bin/fwupdtool")
_FAKE_GUID = "b585990a-003e-5270-89d5-3705a17f9a43"  # the test plugin's webcam, at 1.2.2


def _fake_device_component() -> tuple[etree._Element, dict[str, GeneratedRelease]]:
    """Every shape as a release of the test plugin's fake webcam, versions 1.2.10 and up."""
    comp = etree.fromstring(
        b'<component type="firmware"><id>org.fwupd.fakedevice.firmware</id>'
        b"<name>FakeDevice</name><summary>Firmware for the fake webcam</summary>"
        b'<provides><firmware type="flashed">' + _FAKE_GUID.encode() + b"</firmware></provides>"
        b"<developer_name>LVFS</developer_name><project_license>GPL-2.0+</project_license>"
        b'<custom><value key="LVFS::VersionFormat">triplet</value>'
        b'<value key="LVFS::UpdateProtocol">com.acme.test</value></custom>'
        b"<releases/></component>"
    )
    releases = comp.find("releases")
    assert releases is not None
    by_version = {}
    for i, shape in enumerate(SHAPES):
        el, m = release_case(shape, index=i)
        version = f"1.2.{10 + i}"
        el.set("version", version)
        releases.append(el)
        by_version[version] = m
    return comp, by_version


@pytest.mark.skipif(
    not _FWUPDTOOL.exists() or os.geteuid() != 0, reason="needs /usr/bin/fwupdtool, as root"
)
def test_real_fwupd_loads_the_catalog_and_reads_releases_as_dom0(tmp_path: Path) -> None:
    """fwupdtool (fwupd 2.0.20), offline, with the catalog as a Kind=local remote (no
    signature needed) and only the test plugin: it must load every component, and for
    each shape see the location and container sha256 the manifest names."""
    comp, by_version = _fake_device_component()
    catalog = generate(extra_components=[comp])
    (tmp_path / "firmware.xml").write_bytes(catalog.xml)
    etc = tmp_path / "etc" / "fwupd"
    (etc / "remotes.d").mkdir(parents=True)
    (tmp_path / "var").mkdir()
    (tmp_path / "run" / "lock").mkdir(parents=True)
    (etc / "fwupd.conf").write_text("[fwupd]\nTestDevices=true\n")
    (etc / "remotes.d" / "generated.conf").write_text(
        f"[fwupd Remote]\nEnabled=true\nTitle=generated\nApprovalRequired=false\n"
        f"MetadataURI=file://{tmp_path}/firmware.xml\n"
    )
    # shadows /usr/share/fwupd/remotes.d/fwupd-tests.conf (the first remote of an id wins)
    (etc / "remotes.d" / "fwupd-tests.conf").write_text(
        "[fwupd Remote]\nEnabled=false\nMetadataURI=file:///nonexistent/fwupd-tests.xml\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        # a bus that is not there: fwupdtool must not reach (and stop) a host fwupd
        "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus",
        "FWUPD_SYSCONFDIR": str(tmp_path / "etc"),
        "FWUPD_LOCALSTATEDIR": str(tmp_path / "var"),
        "FWUPD_RUNDIR": str(tmp_path / "run"),
        "FWUPD_LOCKDIR": str(tmp_path / "run" / "lock"),
        "FWUPD_MACHINE_ID": "lvfs-catalog-test",
    }
    proc = subprocess.run(
        [str(_FWUPDTOOL), "--plugins", "test", "--verbose", "--json", "get-updates"],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, stderr[-3000:]
    assert f"{catalog.stats['components'] + 1} components now in silo" in stderr
    devices = json.loads(proc.stdout)["Devices"]
    webcam = next(d for d in devices if _FAKE_GUID in d.get("Guid", []))
    offered = {r["Version"]: r for r in webcam["Releases"]}
    assert set(offered) == set(by_version)  # fwupd offers every shape; dom0 decides
    for version, m in by_version.items():
        rel = offered[version]
        checksums, locations = rel.get("Checksum", []), rel.get("Locations", [])
        https = [loc for loc in locations if loc.startswith("https://")]
        if m.accepted:
            assert m.sha256 in checksums, (m.shape, checksums)
            assert https and https[0] == m.location, (m.shape, locations)
        elif m.shape == "both_disagree":  # fwupd takes the artifact's, the legacy is unread
            assert m.sha256_seen[0] in checksums and m.sha256_seen[1] not in checksums
        elif m.shape == "ipfs_only":
            assert locations and not https
        elif m.shape == "sha1_only":
            assert checksums and all(len(c) == 40 for c in checksums)
    shutil.rmtree(tmp_path / "var", ignore_errors=True)
