"""Fuzz target: broker.jcat.parse_jcat, then the item lookups its callers make.

dom0 parses a jcat from the UpdateVM (the metadata's signature, broker.metadata
verify_metadata) and one from inside each cab (the payloads', broker.cabinet _inspect);
both are hostile until their blobs verified.

The first byte, when odd, has the rest gzip'd here before parse_jcat sees it: random
changes to gzip'd bytes mostly break its CRC, and the JSON inside would hardly be reached.
When even, the rest is the jcat as served (gzip framing, trailer and all).
"""

from __future__ import annotations

import contextlib
import gzip

import harness

with harness.instrumented():
    from broker.config import Limits
    from broker.errors import FormatError
    from broker.jcat import BlobKind, parse_jcat

LIMITS = Limits()
NAMES = ("firmware.xml.zst", "fakedevice124.bin", "fakedevice124.metainfo.xml")


def one(data: bytes) -> None:
    if not data:
        return
    body = gzip.compress(data[1:], compresslevel=1, mtime=0) if data[0] & 1 else data[1:]
    jcat = parse_jcat(body, LIMITS.jcat_max_bytes, LIMITS.jcat_json_max_bytes)
    for name in NAMES:
        with contextlib.suppress(FormatError):  # what item_for raises, and nothing else
            item = jcat.item_for(name)
            item.of_kind(BlobKind.SHA256)
            item.of_kind(BlobKind.PKCS7)


if __name__ == "__main__":
    harness.main(one)
