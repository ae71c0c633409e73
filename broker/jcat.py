"""JCat: the signature container of fwupd and the LVFS (gzip'd JSON).

Parsing is bounded framing only: a capped gunzip (real LVFS files carry 8 bytes,
``IHATECDN``, after the gzip stream) and a capped JSON decode into typed records.
A jcat decides nothing by itself: :mod:`broker.signatures` checks its blobs against
the bytes that are about to be used.
"""

from __future__ import annotations

import gzip
import json
import time
import zlib
from dataclasses import dataclass
from enum import IntEnum

from broker.errors import FormatError, LimitExceeded
from broker.transfer import is_file_name

# trailing bytes after the gzip stream that we tolerate (and ignore)
_MAX_TRAILER = 64


class BlobKind(IntEnum):
    """libjcat's JcatBlobKind values that matter here; others are ignored."""

    SHA256 = 1
    GPG = 2
    PKCS7 = 3
    SHA1 = 4
    SHA512 = 10


@dataclass(frozen=True)
class JcatBlob:
    kind: int  # a BlobKind value, or an unknown kind kept only to be ignored
    data: str
    timestamp: int = 0


@dataclass(frozen=True)
class JcatItem:
    id: str
    blobs: tuple[JcatBlob, ...]
    # the LVFS names its item after the generation (firmware-07078-stable.xml.gz) and lists
    # the served names (firmware.xml.zst, ...) here
    alias_ids: tuple[str, ...] = ()

    def of_kind(self, kind: BlobKind) -> tuple[JcatBlob, ...]:
        return tuple(b for b in self.blobs if b.kind == kind)


@dataclass(frozen=True)
class Jcat:
    items: tuple[JcatItem, ...]

    def item_for(self, name: str) -> JcatItem:
        """The item that speaks for the file we call ``name``, looked up as libjcat does
        (jcat_file_get_item_by_id): an item with that id, else one with that alias; two
        candidates at either step are refused, never chosen between.

        The name is ours (the file we are about to store), never taken from the jcat. A
        jcat with a single item that names neither still speaks for the file (fwupd takes
        the default item; mirrors rename files): its checksum and signature must still
        bind our bytes."""
        for what, found in (
            ("items with the id", [i for i in self.items if i.id == name]),
            ("items with the alias", [i for i in self.items if name in i.alias_ids]),
        ):
            if len(found) > 1:
                raise FormatError(f"jcat has {len(found)} {what} {name}")
            if found:
                return found[0]
        if len(self.items) == 1:
            return self.items[0]
        if not self.items:
            raise FormatError("jcat holds no items")
        raise FormatError(f"jcat has {len(self.items)} items and none for {name}")


def _gunzip_capped(data: bytes, max_out: int) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, max_out + 1)
    except zlib.error as e:
        raise FormatError(f"jcat is not valid gzip: {e}") from e
    if len(out) > max_out or d.unconsumed_tail:
        raise LimitExceeded(f"jcat decompresses to more than {max_out} bytes")
    if not d.eof:
        raise FormatError("jcat gzip stream is truncated")
    if len(d.unused_data) > _MAX_TRAILER:
        raise FormatError(f"jcat has {len(d.unused_data)} bytes after the gzip stream")
    return out


def parse_jcat(data: bytes, max_bytes: int, max_json_bytes: int) -> Jcat:
    """Typed records from untrusted jcat bytes; raises FormatError/LimitExceeded only."""
    if len(data) > max_bytes:
        raise LimitExceeded(f"jcat is {len(data)} bytes, more than {max_bytes}")
    raw = _gunzip_capped(data, max_json_bytes)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError("jcat does not hold valid JSON") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("Items", []), list):
        raise FormatError("jcat JSON is not an object with an Items list")
    if doc.get("JcatVersionMajor", 0) != 0:
        raise FormatError(f"jcat version {doc.get('JcatVersionMajor')!r} is not supported")
    items = []
    for untrusted_item in doc.get("Items", []):
        if not isinstance(untrusted_item, dict):
            raise FormatError("jcat item is not an object")
        item_id = untrusted_item.get("Id")
        blobs_raw = untrusted_item.get("Blobs", [])
        if not isinstance(item_id, str) or not isinstance(blobs_raw, list):
            raise FormatError("jcat item lacks an Id string or a Blobs list")
        aliases = untrusted_item.get("AliasIds", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise FormatError("jcat item has an AliasIds that is not a list of strings")
        # well-formed as a whole, items dom0 does not use included: ids and aliases name
        # files, and a control or escape byte in one is no file's name
        if not all(is_file_name(name) for name in (item_id, *aliases)):
            raise FormatError("jcat item id or alias is not a plain file name")
        blobs = []
        for untrusted_blob in blobs_raw:
            if not isinstance(untrusted_blob, dict):
                raise FormatError("jcat blob is not an object")
            kind = untrusted_blob.get("Kind")
            blob_data = untrusted_blob.get("Data", "")
            stamp = untrusted_blob.get("Timestamp", 0)
            if (
                not isinstance(kind, int)
                or isinstance(kind, bool)
                or not isinstance(blob_data, str)
                or not isinstance(stamp, int)
            ):
                raise FormatError("jcat blob has a malformed Kind, Data or Timestamp")
            blobs.append(JcatBlob(kind=kind, data=blob_data, timestamp=stamp))
        items.append(JcatItem(id=item_id, blobs=tuple(blobs), alias_ids=tuple(aliases)))
    return Jcat(items=tuple(items))


def build_jcat(
    items: dict[str, list[tuple[BlobKind, str]]],
    aliases: dict[str, list[str]] | None = None,
) -> bytes:
    """Serialise a jcat (dom0's own for fwupd, the sandbox's LVFS, tests that forge them)."""
    now = int(time.time())
    doc = {
        "JcatVersionMajor": 0,
        "JcatVersionMinor": 1,
        "Items": [
            {
                "Id": item_id,
                **({"AliasIds": aliases[item_id]} if aliases and item_id in aliases else {}),
                "Blobs": [
                    {"Kind": int(kind), "Flags": 1, "Timestamp": now, "Data": data}
                    for kind, data in blobs
                ],
            }
            for item_id, blobs in items.items()
        ],
    }
    return gzip.compress(json.dumps(doc).encode("utf-8"), mtime=0)
