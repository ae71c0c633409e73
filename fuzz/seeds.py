"""Real-shaped seed inputs per target, made at run time (nothing generated is committed).

fwupd-tests' fakedevice cabs (/usr/share/installed-tests/fwupd, from tools/system-deps.sh)
and their jcat and metainfo members; catalogs from the sandbox LVFS's generators; frames
as tests/adversarial/hostile.py builds them; sys-usb replies as tests/unit builds them;
the packaged config. Where fwupd-tests is absent, cabs are built with cabarchive.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

FWUPD_TESTS = Path("/usr/share/installed-tests/fwupd")
ROOT = Path(__file__).resolve().parent.parent
NONCE = "0123456789abcdef0123456789abcdef"
GUID = "b585990a-003e-5270-89d5-3705a17f9a43"
ID_1, ID_2 = "0123456789abcdef0123456789abcdef01234567", "f" * 40


# --------------------------------------------------------------------------- cabs
def _cab_members(cab: bytes) -> dict[str, bytes]:
    import cabarchive

    archive = cabarchive.CabArchive()
    archive.parse(cab)
    return {name: bytes(f.buf or b"") for name, f in archive.items()}


def _build_cab(members: dict[str, bytes], compress: bool) -> bytes:
    import cabarchive

    archive = cabarchive.CabArchive()
    for name, data in members.items():
        archive[name] = cabarchive.CabFile(data)
    return bytes(archive.save(compress=compress))


def _metainfo(version: str = "1.2.4", payload: str = "fakedevice124.bin") -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<component type="firmware">
  <id>org.fwupd.fakedevice.firmware</id>
  <name>FakeDevice</name>
  <provides><firmware type="flashed">{GUID}</firmware></provides>
  <releases>
    <release version="{version}" urgency="medium">
      <checksum type="sha256" filename="{payload}" target="content">{"0" * 64}</checksum>
      <artifacts><artifact type="binary"><filename>{payload}</filename>
        <checksum type="sha1">{"1" * 40}</checksum></artifact></artifacts>
    </release>
  </releases>
</component>
""".encode()


def fake_cabs() -> dict[str, bytes]:
    """The fakedevice cabs, as fwupd-tests ships them, or as cabarchive builds them."""
    cabs = {
        name: (FWUPD_TESTS / name).read_bytes()
        for name in ("fakedevice124.cab", "fakedevice123.cab")
        if (FWUPD_TESTS / name).is_file()
    }
    if not cabs:
        from broker.jcat import BlobKind, build_jcat

        members = {"fakedevice124.bin": b"0123456789", "fakedevice124.metainfo.xml": _metainfo()}
        members["fakedevice124.jcat"] = build_jcat(
            {name: [(BlobKind.SHA256, "0" * 64)] for name in members}
        )
        cabs["built.cab"] = _build_cab(members, compress=False)
    return cabs


def _signed_as_fake(members: dict[str, bytes]) -> dict[str, bytes]:
    """The members with a jcat whose sha256 blobs match them (fuzz_cab takes signatures as
    good), so that a seed gets past verification to the checks after it."""
    import hashlib

    from broker.jcat import BlobKind, build_jcat

    items = {
        name: [(BlobKind.SHA256, hashlib.sha256(data).hexdigest()), (BlobKind.PKCS7, "x")]
        for name, data in members.items()
        if not name.endswith(".jcat")
    }
    jcat_name = next((n for n in members if n.endswith(".jcat")), "firmware.jcat")
    return {**{n: d for n, d in members.items() if n != jcat_name}, jcat_name: build_jcat(items)}


def _without_checksums(cab: bytes) -> bytes:
    """The cab with every CFDATA checksum 0 ("none", as the format allows): a change to a
    member's bytes then reaches the member's parser instead of the block checksum."""
    from broker.cabinet import _read_tables, _scan_blocks
    from broker.config import Limits

    out = bytearray(cab)
    fd = os.memfd_create("seed-cab")
    try:
        os.write(fd, cab)
        folders, _, reserve, pos = _read_tables(fd, len(cab), Limits())
        for folder in folders:
            table = _scan_blocks(fd, folder, pos, reserve, len(cab))
            at = folder.data_start
            for comp in table.comp:
                out[at : at + 4] = b"\0\0\0\0"
                at += 8 + reserve + comp
            pos = table.end
    finally:
        os.close(fd)
    return bytes(out)


def cab_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, cab in fake_cabs().items():
        out[name] = cab
        members = _cab_members(cab)
        out[f"mszip-{name}"] = _build_cab(members, compress=True)
        out[f"fake-signed-{name}"] = _build_cab(_signed_as_fake(members), compress=False)
        # over one 32 KiB CFDATA block: the window carried from block to block
        big = {**members, "fakedevice124.bin": bytes(range(256)) * 160}
        out[f"multiblock-{name}"] = _build_cab(_signed_as_fake(big), compress=True)
        out[f"empty-member-{name}"] = _build_cab({**members, "empty.txt": b""}, compress=False)
    return {**out, **{f"nocsum-{k}": _without_checksums(v) for k, v in out.items()}}


# --------------------------------------------------------------------------- jcat, metainfo
def jcat_seeds() -> dict[str, bytes]:
    from broker.jcat import BlobKind, build_jcat

    out = {}
    for name, cab in fake_cabs().items():
        for member, data in _cab_members(cab).items():
            if member.endswith(".jcat"):
                out[f"{name}-{member}"] = data
                out[f"{name}-{member}-IHATECDN"] = data + b"IHATECDN"
    built = build_jcat(
        {
            "firmware-07078-stable.xml.gz": [(BlobKind.SHA256, "0" * 64), (BlobKind.PKCS7, "x")],
            "other.bin": [(BlobKind.SHA1, "1" * 40), (BlobKind.GPG, "y")],
        },
        aliases={"firmware-07078-stable.xml.gz": ["firmware.xml.zst", "firmware.xml.gz"]},
    )
    out["built"] = built
    out["json-edge"] = gzip.compress(
        b'{"JcatVersionMajor":0,"Items":[{"Id":"a","AliasIds":[],"Blobs":'
        b'[{"Kind":1,"Data":"","Timestamp":1e400},{"Kind":true}]}]}',
        mtime=0,
    )
    # fuzz_jcat's first byte: even, the jcat as served; odd, JSON that it gzips
    return {
        **{f"{k}.jcat": b"\x00" + v for k, v in out.items()},
        **{
            f"{k}.json": b"\x01" + zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(v)
            for k, v in out.items()
            if not k.endswith("IHATECDN")
        },
    }


def metainfo_seeds() -> dict[str, bytes]:
    out = {
        "built": _metainfo(),
        "hex-version": _metainfo("0x00010004"),
        "path-payload": _metainfo(payload="dir/fw.bin"),
        "bom": b"\xef\xbb\xbf" + _metainfo(),
    }
    if (FWUPD_TESTS / "fakedevice124.metainfo.xml").is_file():
        out["fakedevice124"] = (FWUPD_TESTS / "fakedevice124.metainfo.xml").read_bytes()
    for name, cab in fake_cabs().items():
        for member, data in _cab_members(cab).items():
            if member.endswith(".metainfo.xml"):
                out[f"{name}-{member}"] = data
    return out


# --------------------------------------------------------------------------- catalog
def catalog_seeds() -> dict[str, bytes]:
    import zstandard

    from broker.sandbox.lvfs import catalog_xml
    from broker.sandbox.lvfs_catalog import generate

    xmls: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="qfw-fuzz-lvfs-") as tmp:
        for name, cab in fake_cabs().items():
            (Path(tmp) / name).write_bytes(cab)
        xmls["sandbox-lvfs"] = catalog_xml(Path(tmp))
    # every release shape of the LVFS stand-in (ipfs, sha1 only, artifacts, ...)
    xmls["generated-12"] = generate(12, seed=1).xml
    xmls["generated-3"] = generate(3, seed=2).xml
    # the first byte as fuzz_catalog reads it: 0 XML, 8 XML for a remote without a
    # FirmwareBaseURI, 4-6 XML it compresses, 0x07/0x17/0x27 a served .gz/.zst/.xz
    out = {}
    for name, xml in xmls.items():
        out[f"{name}.xml"] = b"\x00" + xml
        out[f"{name}-nobase.xml"] = b"\x08" + xml
    small = xmls["generated-3"]
    for mode, suffix in ((4, "gz"), (5, "zst"), (6, "xz")):
        out[f"generated-3-to.xml.{suffix}"] = bytes([mode]) + small
    out["generated-3.xml.gz"] = b"\x07" + gzip.compress(small, mtime=0)
    out["generated-3.xml.zst"] = b"\x17" + zstandard.ZstdCompressor().compress(small)
    out["generated-3.xml.xz"] = b"\x27" + lzma.compress(small)
    return out


# --------------------------------------------------------------------------- transfer
def frame(entries: list[tuple[str, Any]] | None = None, nonce: Any = NONCE, **extra: Any) -> bytes:
    """A header line as tests/adversarial/hostile.py frame() writes it."""
    doc: dict[str, Any] = {"version": 1}
    if nonce is not None:
        doc["nonce"] = nonce
    if entries is not None:
        doc["files"] = [{"name": n, "size": s} for n, s in entries]
    doc.update(extra)
    return json.dumps(doc).encode() + b"\n"


def transfer_seeds() -> dict[str, bytes]:
    metadata = frame([("firmware.xml.zst", 5), ("firmware.xml.zst.jcat", 3)]) + b"hello" + b"abc"
    cab = frame([("fw-1.2.4.cab", 40)]) + bytes(range(40))
    out = {}
    for name, stream in {
        "metadata": metadata,
        "cab": cab,
        "empty-files": frame([]),
        "offers": frame([], device_ids=[ID_1]),
        "missing-bytes": frame([("a.cab", 100)]) + b"x" * 10,
        "extra-bytes": frame([("a.cab", 1)]) + b"xy",
    }.items():
        out[f"{name}-whole"] = b"\x00\x00" + stream
        out[f"{name}-short"] = b"\x01\x00" + stream  # 16-byte reads
        out[f"{name}-short4k"] = b"\x01\xff" + stream
    return out


# --------------------------------------------------------------------------- sys-usb
def _device() -> dict[str, Any]:
    return {
        "DeviceId": ID_1,
        "Name": "Unifying Receiver",
        "Version": "RQR12.11_B0032",
        "Guid": ["9d131a0c-a606-580f-8eda-80587250b8d6", "2082b5e0-7a64-478a-b1b2-e3404fab6dad"],
        "Vendor": "Logitech, Inc.",
        "VendorId": "USB:0x046D",
        "Plugin": "logitech_hidpp",
        "Protocol": "com.logitech.unifying,com.logitech.unifyingsigned",
        "Flags": 2 | (1 << 8),
        "Raw": {
            "DeviceId": ID_1, "Name": "Unifying Receiver", "Flags": 258, "Created": 1700000000,
            "Icon": ["input-mouse"], "BatteryLevel": 80, "VersionFormat": 3,
            "Release": [{"Version": "1.0", "Metadata": {"k": "v"}}],
        },
    }  # fmt: skip


def _offered(version: str, sha256: str) -> dict[str, Any]:
    return {
        "AppstreamId": "com.example.firmware", "Version": version, "RemoteId": "lvfs",
        "Checksum": ["d" * 40, sha256],
        "Raw": {"AppstreamId": "com.example.firmware", "Version": version, "Size": 10,
                "Checksum": f"{'d' * 40},{sha256}", "Uri": "https://fwupd.org/downloads/x.cab",
                "Metadata": {"LVFS::VersionFormat": "triplet", "Size": "9"},
                "Reports": [{"DistroId": "debian", "Flags": 1, "Metadata": {"a": "b"}}],
                "TrustFlags": 1 << 40, "Urgency": 3},
    }  # fmt: skip


def usbvm_seeds() -> dict[str, bytes]:
    def dumps(doc: Any) -> bytes:
        return json.dumps(doc).encode()

    minimal = {"DeviceId": ID_2, "Version": "1"}
    many = {f"LVFS::Key{i}": str(i) for i in range(40)}
    offers = {
        ID_1: {"releases": [_offered("2.0", "b" * 64), _offered("1.0", "a" * 64),
                            _offered("9.9", "c" * 64)]},
        ID_2: {"error": "no \x1b[2J releases"},
    }  # fmt: skip
    return {
        "devices": b"\x00" + dumps({"devices": [_device(), minimal]}),
        "devices-empty": b"\x00" + dumps({"devices": []}),
        "offers": b"\x01" + dumps({"offers": offers}),
        "results": b"\x02" + dumps({"result": {**_device()["Raw"], "UpdateState": 4}}),
        "results-none": b"\x02" + dumps({"result": None}),
        # past a GHashTable's first resize (8 buckets): the order fwupd prints Metadata in
        "results-metadata": b"\x02"
        + dumps(
            {
                "result": {
                    "DeviceId": ID_1,
                    "Release": [
                        {
                            "Version": "2",
                            "Metadata": many,
                            "Reports": [{"VendorId": 4, "Metadata": many}],
                        }
                    ],
                }
            }
        ),
    }


# --------------------------------------------------------------------------- config
def config_seeds() -> dict[str, bytes]:
    separator = b"\n%%remotes.d%%\n"
    packaged = (ROOT / "packaging/qubes-fwupd.conf").read_bytes()
    # every setting shown, as an admin who uncomments them all has it (a "#" then a key,
    # a section or an indented continuation line)
    uncommented = b"\n".join(
        line[1:]
        if (line.startswith(b"#") and line[1:2] not in (b"", b" ", b"#"))
        or line.startswith(b"#    ")
        else line
        for line in packaged.splitlines()
    )
    fwupd_lvfs = Path("/etc/fwupd/remotes.d/lvfs.conf")
    remote = (
        fwupd_lvfs.read_bytes()
        if fwupd_lvfs.is_file()
        else b"[fwupd Remote]\nMetadataURI=https://cdn.fwupd.org/downloads/firmware.xml.zst\n"
        b"FirmwareBaseURI=https://fwupd.org/downloads\n"
    )
    mirror = b"""[qubes-fwupd]
updatevm = sys-whonix
usbvm =
signature_kinds = pkcs7
inhibit_files = /etc/qubes-fwupd/inhibit

[remote mirror.local]
metadata_url = http://mirror.example:8080/lvfs/firmware.xml.xz
firmware_base_uri = https://mirror.example/cabs/
allow_plain_http = yes
metadata_signers =
    sha256:0A:0B:0C:0D:0E:0F:0A:0B:0C:0D:0E:0F:0A:0B:0C:0D:0E:0F:0A:0B:0C:0D:0E:0F:0A:0B:0C:0D:0E:0F:0A:0B
    O=Example,CN=Example metadata signer
    3fc6 b804 410e d084 0d8f  2f97 48a6 d80e 4538 bac2
payload_anchors = lvfs my-ca.pem GPG-KEY-Example
payload_signers = CN=Vendor
updatevm = sys-net
heads_components = org.example.heads
"""
    vendor = b"[remote vendor]\nmetadata_signers = CN=Vendor\npayload_anchors = lvfs\n"
    return {
        "packaged": packaged,
        "uncommented": uncommented,
        "mirror": mirror,
        "builtin-with-fwupd-remote": b"" + separator + remote,
        "vendor-from-fwupd-remote": vendor + separator + remote,
    }


# --------------------------------------------------------------------------- signatures
def signature_seeds() -> dict[str, bytes]:
    """The PKCS#7 and GPG blobs of the fakedevice jcats (fuzz_signature's first byte: 0
    PEM, 1 PGP armor, 2 the DER inside the PEM)."""
    from broker.jcat import BlobKind, parse_jcat
    from broker.signatures import _pem_block_der

    out = {}
    for name, cab in fake_cabs().items():
        for member, data in _cab_members(cab).items():
            if not member.endswith(".jcat"):
                continue
            for item in parse_jcat(data, 1 << 20, 4 << 20).items[:1]:
                for blob in item.of_kind(BlobKind.PKCS7):
                    out[f"{name}.pem"] = b"\x00" + blob.data.encode()
                    out[f"{name}.der"] = b"\x02" + _pem_block_der(blob.data)
                for blob in item.of_kind(BlobKind.GPG):
                    out[f"{name}.asc"] = b"\x01" + blob.data.encode()
    return out


# --------------------------------------------------------------------------- versions
def versions_seeds() -> dict[str, bytes]:
    """Versions as fwupd's tests and the LVFS write them (fuzz_versions' first byte is the
    format, in broker.versions.VersionFormat's order: 4 triplet, 12 hex, 1 plain)."""
    return {
        "triplet": b"\x04" + b"1.2.3\n1.2.10\n1.2.3~rc1",
        "number": b"\x02" + b"65546\n0x10001\n4294967295",
        "hex": b"\x0c" + b"0x00010004\nabc\n0x1",
        "plain": b"\x01" + b"RQR12.11_B0032\nRQR12.11_B0033\n1\xc3\xa9",
        "quad": b"\x05" + b"1.2.3.4\n1.2.3\n1.2.3.4.5",
        "bcd": b"\x06" + b"1.2\n0x12\n20240121",
        "intel-me": b"\x07" + b"16.1.30.2307\n-1.2\n 1. 2",
    }


SEEDS: dict[str, Callable[[], dict[str, bytes]]] = {
    "jcat": jcat_seeds,
    "catalog": catalog_seeds,
    "metainfo": metainfo_seeds,
    "cab": cab_seeds,
    "transfer": transfer_seeds,
    "usbvm": usbvm_seeds,
    "config": config_seeds,
    "signature": signature_seeds,
    "versions": versions_seeds,
}


def write_seeds(target: str, corpus: Path) -> int:
    """The target's seeds into its corpus dir (seed-<name>); returns how many."""
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = SEEDS[target]()
    for name, data in seeds.items():
        path = corpus / f"seed-{name}"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return len(seeds)


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    for t in SEEDS:
        print(t, write_seeds(t, out / t), file=sys.stderr)
