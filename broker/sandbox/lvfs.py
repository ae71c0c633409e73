"""The sandbox's LVFS: signed AppStream metadata and .cab archives in a directory that
:mod:`broker.sandbox.mirror` serves over HTTP.

The catalog is built from the cabs themselves, as the LVFS builds it from uploads:
each cab's metainfo, plus the container checksums, sizes and location that only the
publisher knows. The sandbox is the trusted side here, so cabs are read whole with
cabarchive; the bounded, streaming reader belongs to the qubes that receive them.
"""

from __future__ import annotations

import calendar
import gzip
import hashlib
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import zstandard
from cabarchive import CabArchive
from lxml import etree

from broker.jcat import BlobKind, build_jcat, parse_jcat
from broker.sandbox.lvfs_catalog import generate
from broker.sandbox.pki import SandboxPki, sign_gpg, sign_pkcs7
from broker.sandbox.pq import create_pq_pki, sign_pkcs7_pq
from broker.transfer import fsync_dir

# gzip for remotes whose id lacks "lvfs", zstd for the others: fwupd rewrites the
# MetadataURI of an "lvfs" remote to .xml.zst and silently ignores gzip pushed to it
METADATA_NAMES = ("firmware.xml.gz", "firmware.xml.zst")

# trusted input, but nothing in a metainfo needs a DTD, entities or the network
_PARSER = etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
    remove_blank_text=True,
)  # fmt: skip

# where the LVFS's catalog says its cabs are; clients rebuild the URL from their remote's
# FirmwareBaseURI and the basename (the sandbox's remote points at its mirror)
LOCATION_BASE = "https://fwupd.org/downloads"
# the generation the sandbox's jcat items are named after, as the LVFS names them
# (firmware-07078-stable.xml.gz), with the served file as an alias
GENERATION = "firmware-{:05d}-stable"

# coarse kernel clocks (file mtimes, openssl's time()) may lag time.time() by a tick
_CLOCK_MARGIN = 0.05


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Orders "1.2.10" after "1.2.9"; numeric parts sort before textual ones."""
    parts = [p for p in re.split(r"[.\-+~_]", version) if p]
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def _release_timestamp(release: etree._Element, cab: Path) -> int:
    # derived, not "now", so that the same cabs always give the same catalog bytes
    stamp = release.get("timestamp")
    if stamp is not None and stamp.isdigit():
        return int(stamp)
    date = release.get("date")
    if date:
        try:
            return calendar.timegm(time.strptime(date[:10], "%Y-%m-%d"))
        except ValueError:
            pass
    return int(cab.stat().st_mtime)


def _components_of(cab: Path, location_base: str) -> list[etree._Element]:
    """Each metainfo component of one cab, reduced to the release this cab ships and
    annotated as the LVFS annotates it."""
    data = cab.read_bytes()
    archive = CabArchive()
    archive.parse(data)
    members = {name: len(f.buf or b"") for name, f in archive.items()}
    metainfos = sorted(n for n in members if n.lower().endswith(".metainfo.xml"))
    if not metainfos:
        raise ValueError(f"{cab.name} holds no *.metainfo.xml")
    location = f"{location_base.rstrip('/')}/{urllib.parse.quote(cab.name)}"
    components = []
    for name in metainfos:
        component = etree.fromstring(archive[name].buf, _PARSER)
        if component.tag != "component" or not component.findtext("id"):
            raise ValueError(f"{cab.name}:{name} is not a <component> with an <id>")
        releases = component.find("releases")
        release = releases.find("release") if releases is not None else None
        if releases is None or release is None:
            raise ValueError(f"{cab.name}:{name} has no <release>")
        # a metainfo may list older releases as history: the cab ships only the first
        for other in releases.findall("release")[1:]:
            releases.remove(other)
        # whatever a metainfo claims about the container is the publisher's to state
        for child in list(release):
            if child.tag in ("size", "location") or (
                child.tag == "checksum" and child.get("target") == "container"
            ):
                release.remove(child)
        # sha1 is what older fwupd and the LVFS still list; it is not what fwupd trusts
        sha1 = hashlib.sha1(data, usedforsecurity=False)
        for kind, digest in (("sha1", sha1), ("sha256", hashlib.sha256(data))):
            checksum = etree.SubElement(
                release, "checksum", type=kind, filename=cab.name, target="container"
            )
            checksum.text = digest.hexdigest()
        etree.SubElement(release, "size", type="download").text = str(len(data))
        payloads = [
            c.get("filename") for c in release.findall("checksum") if c.get("target") == "content"
        ]
        payload = next((p for p in payloads if p in members), None)
        if payload is not None:
            etree.SubElement(release, "size", type="installed").text = str(members[payload])
        etree.SubElement(release, "location").text = location
        release.set("timestamp", str(_release_timestamp(release, cab)))
        components.append(component)
    return components


def _newest_first(component: etree._Element) -> tuple[tuple[tuple[int, int | str], ...], int]:
    release = component.find("releases/release")
    if release is None:
        return (), 0
    return _version_key(release.get("version", "")), int(release.get("timestamp", "0"))


def cab_components(lvfs_dir: Path, location_base: str = LOCATION_BASE) -> list[etree._Element]:
    """One component per component id of the *.cab in ``lvfs_dir``, sorted by id: the
    newest release's metainfo describes the device, older cabs add releases only."""
    by_id: dict[str, list[etree._Element]] = {}
    for cab in sorted(lvfs_dir.glob("*.cab")):
        if not cab.is_file():
            continue
        for component in _components_of(cab, location_base):
            by_id.setdefault(component.findtext("id") or "", []).append(component)
    merged_components = []
    for cid in sorted(by_id):
        ordered = sorted(by_id[cid], key=_newest_first, reverse=True)
        merged = ordered[0]
        releases = merged.find("releases")
        for older in ordered[1:]:
            if releases is not None:
                releases.extend(older.findall("releases/release"))
        merged_components.append(merged)
    return merged_components


def catalog_xml(lvfs_dir: Path, location_base: str = LOCATION_BASE, generated: int = 0) -> bytes:
    """The unsigned AppStream catalog for every *.cab in ``lvfs_dir``; with ``generated``,
    those components follow an LVFS-scale catalog of that many generated ones
    (broker.sandbox.lvfs_catalog, seed 0: the same bytes every time)."""
    components = cab_components(lvfs_dir, location_base)
    if generated:
        return generate(generated, extra_components=components).xml
    root = etree.Element("components", origin="lvfs", version="0.9")
    root.extend(components)
    return bytes(etree.tostring(root, encoding="UTF-8", xml_declaration=True, pretty_print=True))


def _jcat_for(pki: SandboxPki, content: Path, item_id: str, aliases: Sequence[str] = ()) -> bytes:
    """One item, as the LVFS signs: sha256 and sha512, PKCS#7 and GPG. fwupd wants exactly
    one item, a sha256 or sha512 (sha1 does not count) and a signature."""
    data = content.read_bytes()
    return build_jcat(
        {
            item_id: [
                (BlobKind.SHA256, hashlib.sha256(data).hexdigest()),
                (BlobKind.SHA512, hashlib.sha512(data).hexdigest()),
                (BlobKind.PKCS7, sign_pkcs7(pki.signer_pem, pki.signer_key, content)),
                # the 2025PQ CA's ML-DSA-87 signature, which no openssl 3.0 can check
                (BlobKind.PKCS7, sign_pkcs7_pq(create_pq_pki(pki.pq_dir), content)),
                (BlobKind.GPG, sign_gpg(pki, content)),
            ]
        },
        {item_id: list(aliases)} if aliases else None,
    )


def own_jcat(signer_pem: Path, signer_key: Path, content: Path, item_id: str) -> bytes:
    """An organisation's jcat for its own remote: sha256, sha512 and one PKCS#7 by its own
    signing certificate (the one its remote's metadata_signers pins)."""
    data = content.read_bytes()
    return build_jcat({item_id: [
        (BlobKind.SHA256, hashlib.sha256(data).hexdigest()),
        (BlobKind.SHA512, hashlib.sha512(data).hexdigest()),
        (BlobKind.PKCS7, sign_pkcs7(signer_pem, signer_key, content)),
    ]})  # fmt: skip


def publish_own(
    out_dir: Path, cabs: Sequence[Path], signer_pem: Path, signer_key: Path, location_base: str
) -> list[Path]:
    """What an organisation serves for a remote of its own: ``cabs`` copied into
    ``out_dir``, the catalog of every cab there (each location ``location_base``/NAME)
    and its .jcat signed by the organisation's own certificate, one item named after
    each file. Serve ``out_dir`` from any HTTP server or CDN. Returns the paths written."""
    return _publish(out_dir, cabs, location_base.rstrip("/"), 0,
                    lambda tmp, name: own_jcat(signer_pem, signer_key, tmp, name))  # fmt: skip


def _next_generation(lvfs_dir: Path) -> int:
    """One more than the generation the served jcat names (1 for a new mirror)."""
    served = lvfs_dir / f"{METADATA_NAMES[0]}.jcat"
    if not served.exists():
        return 1
    jcat = parse_jcat(served.read_bytes(), 1 << 20, 4 << 20)
    numbers = [int(m[1]) for i in jcat.items if (m := re.fullmatch(r"firmware-(\d+)-.*", i.id))]
    return max(numbers, default=0) + 1


def sign_file(pki: SandboxPki, path: Path) -> bytes:
    """The .jcat bytes for ``path``, its one item named after the file."""
    return _jcat_for(pki, path, path.name)


@contextmanager
def _temp_beside(final: Path) -> Iterator[tuple[IO[bytes], Path]]:
    """A temp file in the destination's directory (so os.replace is atomic), removed
    unless the caller renamed it."""
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes 0600; what the LVFS publishes is public, and the mirror may
            # run as another user than the publisher
            os.fchmod(f.fileno(), 0o644)
            yield f, tmp
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(final: Path, data: bytes) -> None:
    with _temp_beside(final) as (f, tmp):
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        os.replace(tmp, final)


def _copy_atomic(src: Path, final: Path) -> None:
    with _temp_beside(final) as (f, tmp), src.open("rb") as s:
        shutil.copyfileobj(s, f)
        f.flush()
        os.fsync(f.fileno())
        os.replace(tmp, final)


def _wait_past_previous_signing(lvfs_dir: Path) -> None:
    """fwupd drops metadata whose PKCS#7 signingTime (1 s resolution) is not strictly
    newer than the one it holds; a jcat is written after its signature is made, so its
    mtime bounds the previous signing time."""
    stamps = [p.stat().st_mtime for p in lvfs_dir.glob("firmware.xml.*.jcat") if p.is_file()]
    if not stamps:
        return
    not_before = int(max(stamps)) + 1 + _CLOCK_MARGIN
    delay = not_before - time.time()
    if delay > 0:
        time.sleep(delay)


def _compress(name: str, xml: bytes) -> bytes:
    if name.endswith(".gz"):
        return gzip.compress(xml, compresslevel=9, mtime=0)
    if name.endswith(".zst"):
        # 19 takes 9 s on an LVFS-scale catalog, 9 takes 0.2 s and is 20% larger
        return bytes(zstandard.ZstdCompressor(level=9).compress(xml))
    raise ValueError(f"no compression known for {name}")


def publish(
    lvfs_dir: Path,
    cabs: Sequence[Path],
    pki: SandboxPki,
    location_base: str = LOCATION_BASE,
    generated: int = 0,
) -> list[Path]:
    """Add ``cabs`` to ``lvfs_dir`` and re-sign the catalog of every cab there (after
    ``generated`` LVFS-shaped components, see :func:`catalog_xml`), as the LVFS signs.

    Returns the paths written: the copied cabs, then each metadata file and its jcat."""
    lvfs_dir.mkdir(parents=True, exist_ok=True)
    generation = GENERATION.format(_next_generation(lvfs_dir))
    # the LVFS names the item after the generation, the served name is an alias
    return _publish(lvfs_dir, cabs, location_base, generated, lambda tmp, name: _jcat_for(
        pki, tmp, generation + name.removeprefix("firmware"), [name]))  # fmt: skip


def _publish(
    out_dir: Path,
    cabs: Sequence[Path],
    location_base: str,
    generated: int,
    sign: Callable[[Path, str], bytes],
) -> list[Path]:
    """``cabs`` into ``out_dir``, then each metadata file of the catalog of every cab
    there, with the jcat ``sign(file, served name)`` makes for it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for cab in cabs:
        if not cab.name.endswith(".cab"):
            raise ValueError(f"{cab} is not named *.cab; the catalog would not list it")
        dest = out_dir / cab.name
        if not (dest.exists() and dest.samefile(cab)):
            _copy_atomic(cab, dest)
        written.append(dest)
    xml = catalog_xml(out_dir, location_base, generated)
    _wait_past_previous_signing(out_dir)
    for name in METADATA_NAMES:
        final, jcat = out_dir / name, out_dir / f"{name}.jcat"
        # sign the temp file and rename both at the end: a reader meets a mismatched
        # pair only in the instant between the two renames, not for the whole signing
        with _temp_beside(final) as (f, tmp):
            f.write(_compress(name, xml))
            f.flush()
            os.fsync(f.fileno())
            signature = sign(tmp, name)
            os.replace(tmp, final)
        _write_atomic(jcat, signature)
        written += [final, jcat]
    fsync_dir(out_dir)
    return written
