"""The sandbox LVFS (broker.sandbox.lvfs) and its CDN (broker.sandbox.mirror)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import gnupg
import pytest
import requests
import zstandard
from lxml import etree

from broker.jcat import BlobKind, Jcat, parse_jcat
from broker.sandbox import lvfs
from broker.sandbox.mirror import wait_for_port
from broker.sandbox.pki import SandboxPki, create_pki, stop_gpg_agent

TESTS_DIR = Path("/usr/share/installed-tests/fwupd")
CAB123 = TESTS_DIR / "fakedevice123.cab"
CAB124 = TESTS_DIR / "fakedevice124.cab"
COMPONENT_ID = "org.fwupd.fakedevice.firmware"
GUID = "b585990a-003e-5270-89d5-3705a17f9a43"
BASE_URL = "http://127.0.0.1:8080/lvfs"
REPO = Path(__file__).resolve().parents[2]

needs_cabs = pytest.mark.skipif(
    not (CAB123.is_file() and CAB124.is_file()),
    reason="fwupd-tests cabs missing (Debian package fwupd-tests)",
)
needs_tools = pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("gpg")), reason="needs openssl and gpg"
)
pytestmark = [needs_cabs, needs_tools]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPki:
    return create_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, pki: SandboxPki) -> Path:
    lvfs_dir = tmp_path_factory.mktemp("lvfs")
    lvfs.publish(lvfs_dir, [CAB123, CAB124], pki, BASE_URL)
    return lvfs_dir


def _catalog(path: Path) -> etree._Element:
    data = path.read_bytes()
    xml = gzip.decompress(data) if path.suffix == ".gz" else zstandard.decompress(data)
    return etree.fromstring(xml, etree.XMLParser(resolve_entities=False, no_network=True))


def _releases(path: Path) -> list[etree._Element]:
    return _catalog(path).findall("component/releases/release")


def _jcat(path: Path) -> Jcat:
    return parse_jcat(path.read_bytes(), max_bytes=1 << 20, max_json_bytes=1 << 20)


def _blob(jcat: Jcat, kind: BlobKind) -> str:
    """The item's one blob of this kind; for PKCS#7 the classic one (the second is the
    ML-DSA-87 signature, checked in test_jcat_carries_a_post_quantum_signature_too)."""
    (item,) = jcat.items
    blobs = item.of_kind(kind)
    if kind == BlobKind.PKCS7:
        assert len(blobs) == 2
        return blobs[0].data
    (blob,) = blobs
    return blob.data


def _pkcs7_verifies(pki: SandboxPki, sig: str, content: Path) -> bool:
    with tempfile.NamedTemporaryFile("w", suffix=".p7") as f:
        f.write(sig)
        f.flush()
        result = subprocess.run(
            ["openssl", "cms", "-verify", "-binary", "-inform", "PEM", "-in", f.name,
             "-content", str(content), "-CAfile", str(pki.ca_pem), "-no-CApath",
             "-no-CAstore", "-purpose", "any",
             "-out", "/dev/null"],
            capture_output=True, check=False,
        )  # fmt: skip
    return result.returncode == 0


def _signing_time(sig: str) -> datetime:
    with tempfile.NamedTemporaryFile("w", suffix=".p7") as f:
        f.write(sig)
        f.flush()
        printed = subprocess.run(
            ["openssl", "cms", "-cmsout", "-print", "-noout", "-inform", "PEM", "-in", f.name],
            capture_output=True, check=True, text=True,
        ).stdout  # fmt: skip
    match = re.search(r"signingTime.*?UTCTIME:(\w+ +\d+ [\d:]+ \d+) GMT", printed, re.S)
    assert match, printed
    return datetime.strptime(match.group(1), "%b %d %H:%M:%S %Y").replace(tzinfo=UTC)


@pytest.fixture
def gpg_verifier(pki: SandboxPki) -> Iterator[gnupg.GPG]:
    # a short homedir: gpg-agent's socket path has a length limit
    with tempfile.TemporaryDirectory(prefix="qfw-t-") as home:
        gpg = gnupg.GPG(gnupghome=home)
        imported = gpg.import_keys(pki.gpg_public_key.read_text())
        assert imported.fingerprints == [pki.gpg_fingerprint]
        try:
            yield gpg
        finally:
            stop_gpg_agent(Path(home))


def _gpg_verifies(gpg: gnupg.GPG, sig: str, content: Path) -> str | None:
    """The fingerprint of a valid signature, else None."""
    with tempfile.NamedTemporaryFile("w", suffix=".asc") as f:
        f.write(sig)
        f.flush()
        verified = gpg.verify_data(f.name, content.read_bytes())
    return str(verified.fingerprint) if verified.valid else None


# ---------------------------------------------------------------- catalog


def test_catalog_merges_both_cabs_into_one_component(published: Path) -> None:
    root = _catalog(published / "firmware.xml.zst")
    assert root.tag == "components"
    assert (root.get("origin"), root.get("version")) == ("lvfs", "0.9")
    (component,) = root.findall("component")
    assert component.findtext("id") == COMPONENT_ID
    assert [f.text for f in component.findall("provides/firmware")] == [GUID]
    assert [r.get("version") for r in component.findall("releases/release")] == ["1.2.4", "1.2.3"]


@pytest.mark.parametrize("version,cab", [("1.2.4", CAB124), ("1.2.3", CAB123)])
def test_release_describes_its_container(published: Path, version: str, cab: Path) -> None:
    (release,) = [
        r for r in _releases(published / "firmware.xml.gz") if r.get("version") == version
    ]
    data = cab.read_bytes()
    container = {
        c.get("type"): c.text
        for c in release.findall("checksum")
        if c.get("target") == "container" and c.get("filename") == cab.name
    }
    assert container == {
        "sha1": hashlib.sha1(data).hexdigest(),  # noqa: S324 (what the catalog lists)
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert release.findtext("size[@type='download']") == str(len(data))
    # the payload is fakedevice12N.bin, 10 bytes
    assert release.findtext("size[@type='installed']") == "10"
    assert release.findtext("location") == f"{BASE_URL}/{cab.name}"
    assert int(release.get("timestamp", "")) > 0
    content = [c for c in release.findall("checksum") if c.get("target") == "content"]
    assert {c.get("filename") for c in content} == {cab.stem + ".bin"}
    assert {c.get("type") for c in content} == {"sha1", "sha256"}
    # the published copy is what the location and checksums speak for
    assert (published / cab.name).read_bytes() == data


def test_gz_and_zst_hold_the_same_catalog(published: Path) -> None:
    gz = gzip.decompress((published / "firmware.xml.gz").read_bytes())
    zst = zstandard.decompress((published / "firmware.xml.zst").read_bytes())
    assert gz == zst == lvfs.catalog_xml(published, BASE_URL)


def test_publish_leaves_no_temp_files(published: Path) -> None:
    names = {p.name for p in published.iterdir()}
    expected = {CAB123.name, CAB124.name}
    expected |= {n for m in lvfs.METADATA_NAMES for n in (m, m + ".jcat")}
    assert names == expected


# ---------------------------------------------------------------- jcat


@pytest.mark.parametrize("name", lvfs.METADATA_NAMES)
def test_jcat_has_one_item_that_binds_the_file(
    published: Path, pki: SandboxPki, gpg_verifier: gnupg.GPG, name: str
) -> None:
    content = published / name
    jcat = _jcat(published / f"{name}.jcat")
    # as the LVFS: the item is named after the generation, the served name is an alias
    (item,) = jcat.items
    assert item.id == "firmware-00001-stable" + name.removeprefix("firmware")
    assert item.alias_ids == (name,)
    assert jcat.item_for(name) is item
    assert _blob(jcat, BlobKind.SHA256) == hashlib.sha256(content.read_bytes()).hexdigest()
    assert _blob(jcat, BlobKind.SHA512) == hashlib.sha512(content.read_bytes()).hexdigest()
    assert _pkcs7_verifies(pki, _blob(jcat, BlobKind.PKCS7), content)
    assert _gpg_verifies(gpg_verifier, _blob(jcat, BlobKind.GPG), content) == pki.gpg_fingerprint


@pytest.mark.parametrize("name", lvfs.METADATA_NAMES)
def test_jcat_carries_a_post_quantum_signature_too(
    published: Path, pki: SandboxPki, name: str
) -> None:
    """As the LVFS signs since 2025: a second PKCS#7, ML-DSA-87 under the 2025PQ CA, which
    cryptography can check over the signed attributes (openssl 3.0 cannot)."""
    pq = pytest.importorskip("broker.sandbox.pq")
    (item,) = _jcat(published / f"{name}.jcat").items
    _classic, post_quantum = item.of_kind(BlobKind.PKCS7)
    assert post_quantum.data.startswith("-----BEGIN PKCS7-----")
    der = base64.b64decode("".join(post_quantum.data.splitlines()[1:-1]))
    assert bytes.fromhex("0609608648016503040313") in der  # id-ml-dsa-87
    assert pq.create_pq_pki(pki.pq_dir).ca_pem.exists()


def test_signatures_reject_other_bytes(
    published: Path, pki: SandboxPki, gpg_verifier: gnupg.GPG, tmp_path: Path
) -> None:
    # the checks above would be worthless if they passed for any content
    jcat = _jcat(published / "firmware.xml.zst.jcat")
    other = tmp_path / "firmware.xml.zst"
    other.write_bytes((published / "firmware.xml.gz").read_bytes())
    assert not _pkcs7_verifies(pki, _blob(jcat, BlobKind.PKCS7), other)
    assert _gpg_verifies(gpg_verifier, _blob(jcat, BlobKind.GPG), other) is None


def test_sign_file_signs_forged_bytes(pki: SandboxPki, tmp_path: Path) -> None:
    forged = tmp_path / "firmware.xml.zst"
    forged.write_bytes(zstandard.compress(b"<components/>"))
    jcat = parse_jcat(lvfs.sign_file(pki, forged), max_bytes=1 << 20, max_json_bytes=1 << 20)
    assert [item.id for item in jcat.items] == ["firmware.xml.zst"]
    assert _blob(jcat, BlobKind.SHA256) == hashlib.sha256(forged.read_bytes()).hexdigest()
    assert _pkcs7_verifies(pki, _blob(jcat, BlobKind.PKCS7), forged)


def test_pkcs7_blob_is_pem_with_pkcs7_header(published: Path) -> None:
    # libjcat looks for this header; openssl cms would write "CMS"
    sig = _blob(_jcat(published / "firmware.xml.zst.jcat"), BlobKind.PKCS7)
    assert sig.startswith("-----BEGIN PKCS7-----\n")
    body = sig.removeprefix("-----BEGIN PKCS7-----\n").removesuffix("-----END PKCS7-----\n")
    assert base64.b64decode(body)


# ---------------------------------------------------------------- publishing again


def test_publish_again_adds_cabs_and_signs_strictly_later(pki: SandboxPki, tmp_path: Path) -> None:
    first = lvfs.publish(tmp_path, [CAB123], pki, BASE_URL)
    assert first == [
        tmp_path / CAB123.name,
        *(tmp_path / n for m in lvfs.METADATA_NAMES for n in (m, m + ".jcat")),
    ]
    before = {
        m: _signing_time(_blob(_jcat(tmp_path / f"{m}.jcat"), BlobKind.PKCS7))
        for m in lvfs.METADATA_NAMES
    }
    assert [r.get("version") for r in _releases(tmp_path / "firmware.xml.zst")] == ["1.2.3"]

    lvfs.publish(tmp_path, [CAB124], pki, BASE_URL)
    for m in lvfs.METADATA_NAMES:
        jcat = _jcat(tmp_path / f"{m}.jcat")
        assert jcat.items[0].id.startswith("firmware-00002-stable.")  # the next generation
        # fwupd: "signing timestamp was not newer" unless strictly later, 1 s resolution
        assert _signing_time(_blob(jcat, BlobKind.PKCS7)) > before[m]
        assert _pkcs7_verifies(pki, _blob(jcat, BlobKind.PKCS7), tmp_path / m)
    releases = _releases(tmp_path / "firmware.xml.zst")
    assert [r.get("version") for r in releases] == ["1.2.4", "1.2.3"]


def test_publish_replaces_a_same_named_cab(pki: SandboxPki, tmp_path: Path) -> None:
    lvfs.publish(tmp_path / "lvfs", [CAB123], pki, BASE_URL)
    # another cab under the old name: the catalog must describe the new bytes
    renamed = tmp_path / CAB123.name
    shutil.copyfile(CAB124, renamed)
    lvfs.publish(tmp_path / "lvfs", [renamed], pki, BASE_URL)
    (release,) = _releases(tmp_path / "lvfs" / "firmware.xml.gz")
    assert release.get("version") == "1.2.4"
    sha256 = release.findtext("checksum[@type='sha256'][@target='container']")
    assert sha256 == hashlib.sha256(CAB124.read_bytes()).hexdigest()
    assert release.findtext("location") == f"{BASE_URL}/{CAB123.name}"


def test_publish_refuses_a_cab_without_metainfo(pki: SandboxPki, tmp_path: Path) -> None:
    from cabarchive import CabArchive, CabFile

    archive = CabArchive()
    archive["firmware.bin"] = CabFile(b"\x00" * 16)
    cab = tmp_path / "nometainfo.cab"
    cab.write_bytes(archive.save())
    with pytest.raises(ValueError, match="metainfo"):
        lvfs.publish(tmp_path / "lvfs", [cab], pki, BASE_URL)


# ---------------------------------------------------------------- mirror


@pytest.fixture
def mirror(published: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.sandbox.mirror", "--root", str(published),
         "--port-file", str(port_file)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        port = wait_for_port(port_file, timeout=10, proc=proc)
        yield proc, f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


def _raw_status(hostport: str, path: str) -> int:
    """Status for a request path sent verbatim (requests would normalise dot segments)."""
    conn = http.client.HTTPConnection(hostport, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_mirror_serves_published_files(
    mirror: tuple[subprocess.Popen[bytes], str], published: Path
) -> None:
    _, hostport = mirror
    expected = (published / "firmware.xml.zst").read_bytes()
    got = requests.get(f"http://{hostport}/firmware.xml.zst", timeout=5)
    assert got.status_code == 200
    assert got.content == expected
    assert got.headers["Content-Length"] == str(len(expected))
    head = requests.head(f"http://{hostport}/{CAB124.name}", timeout=5)
    assert head.status_code == 200
    assert head.headers["Content-Length"] == str(CAB124.stat().st_size)
    assert head.content == b""


def test_mirror_refuses_paths_outside_its_root(
    mirror: tuple[subprocess.Popen[bytes], str], published: Path
) -> None:
    _, hostport = mirror
    assert _raw_status(hostport, "/../../etc/passwd") == 404
    assert _raw_status(hostport, "/%2e%2e/%2e%2e/etc/passwd") == 404
    assert _raw_status(hostport, "/" + "/".join([".."] * 8) + "/etc/passwd") == 404
    assert requests.get(f"http://{hostport}/../../etc/passwd", timeout=5).status_code == 404
    assert _raw_status(hostport, "/") == 404
    assert _raw_status(hostport, "/no-such-file") == 404


def test_mirror_refuses_symlinks_leaving_its_root(
    mirror: tuple[subprocess.Popen[bytes], str], published: Path, tmp_path: Path
) -> None:
    _, hostport = mirror
    outside = tmp_path / "secret"
    outside.write_text("not for the mirror")
    links = [published / "escape.cab", published / "escape-dir"]
    links[0].symlink_to(outside)
    links[1].symlink_to(tmp_path, target_is_directory=True)
    try:
        assert _raw_status(hostport, "/escape.cab") == 404
        assert _raw_status(hostport, "/escape-dir/secret") == 404
        # a link that stays inside the root is just another name for a published file
        links.append(published / "latest.cab")
        links[2].symlink_to(CAB124.name)
        assert _raw_status(hostport, "/latest.cab") == 200
    finally:
        for link in links:
            link.unlink()


def test_mirror_logs_each_request_and_stops_on_sigterm(
    mirror: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    proc, hostport = mirror
    assert _raw_status(hostport, "/firmware.xml.gz") == 200
    assert _raw_status(hostport, "/missing") == 404
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert proc.stderr is not None
    log = proc.stderr.read().decode()
    requests_logged = [line for line in log.splitlines() if '"GET ' in line]
    assert len(requests_logged) == 2
    assert " 200 " in requests_logged[0] and " 404 " in requests_logged[1]
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
    # its port file goes with it, so the next waiter cannot pick up a dead port
    assert not (tmp_path / "port").exists()


def test_wait_for_port_gives_up(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        wait_for_port(tmp_path / "never", timeout=0.2)
    assert time.monotonic() - started < 2
