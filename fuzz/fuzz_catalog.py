"""Fuzz target: the LVFS catalog as dom0 reads it, broker.metadata.open_catalog (capped
decompression of .xml, .gz, .zst or .xz, as the remote's file name says) and
parse_catalog; then the catalog index dom0 writes beside it must read back the same.

The first byte: its bit 3 drops the remote's FirmwareBaseURI; its low 3 bits pick the file:
0-3 the rest is firmware.xml; 4, 5, 6 the rest is XML that is compressed here (gzip, zstd,
xz) into firmware.xml.gz, .zst or .xz (random changes to compressed bytes mostly break
their checksums, and the XML would hardly be reached); 7 the rest is a compressed file as
served, named by bits 4-5 (.gz, .zst, .xz), for the decompressors and their caps.
"""

from __future__ import annotations

import gzip
import lzma
import os

import harness
import zstandard

with harness.instrumented():
    from broker.config import Limits, Remote
    from broker.metadata import (
        Catalog,
        catalog_index,
        open_catalog,
        parse_catalog,
        read_catalog_index,
    )

LIMITS = Limits()
COMPRESSED = ("firmware.xml.gz", "firmware.xml.zst", "firmware.xml.xz")
COMPRESS = (
    lambda b: gzip.compress(b, compresslevel=1, mtime=0),
    lambda b: zstandard.ZstdCompressor(level=1).compress(b),
    lambda b: lzma.compress(b, preset=0),
)
FD = os.memfd_create("fuzz-catalog")


def remote(name: str, base: bool) -> Remote:
    return Remote(
        "lvfs",
        f"https://cdn.fwupd.org/downloads/{name}",
        "https://fwupd.org/downloads" if base else None,
    )


def one(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    kind = mode & 7
    if kind < 4:
        name = "firmware.xml"
    elif kind < 7:
        name, body = COMPRESSED[kind - 4], COMPRESS[kind - 4](body)
    else:
        name = COMPRESSED[(mode >> 4) % 3]
    rem = remote(name, not mode & 0x08)
    os.ftruncate(FD, 0)
    os.pwrite(FD, body, 0)
    with open_catalog(FD, rem.metadata_name, LIMITS) as stream:
        catalog = parse_catalog(stream, rem, LIMITS)
    sha, again = read_catalog_index(catalog_index(catalog, "0" * 64), rem)
    if sha != "0" * 64 or again != Catalog(rem.id, catalog.releases, catalog.skipped):
        raise AssertionError("the catalog index does not read back as the catalog")


if __name__ == "__main__":
    harness.main(one)
