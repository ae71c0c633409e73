"""broker.jcat: bounded framing of untrusted jcat bytes."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.config import Limits
from broker.errors import BrokerError, FormatError, LimitExceeded
from broker.jcat import BlobKind, Jcat, JcatBlob, build_jcat, parse_jcat
from tests.properties import assert_user_message

LIMITS = Limits()
REAL_JCAT = Path("/usr/share/installed-tests/fwupd/fakedevice124.jcat")
FAKEDEVICE124_SHA256 = "77f3e17bad9d510786133804fc1e050488f628257ce00c7e23938f7b31c4cac2"


def _parse(data: bytes, max_bytes: int | None = None, max_json: int | None = None) -> Jcat:
    return parse_jcat(
        data,
        LIMITS.jcat_max_bytes if max_bytes is None else max_bytes,
        LIMITS.jcat_json_max_bytes if max_json is None else max_json,
    )


def _gz(doc: Any) -> bytes:
    return gzip.compress(json.dumps(doc).encode(), mtime=0)


def test_real_lvfs_jcat_with_its_trailer() -> None:
    if not REAL_JCAT.exists():
        pytest.skip(f"{REAL_JCAT} missing (Debian package fwupd-tests)")
    data = REAL_JCAT.read_bytes()
    assert data.endswith(b"IHATECDN")
    with pytest.raises(gzip.BadGzipFile):
        gzip.decompress(data)  # why parse_jcat does not simply gunzip

    jcat = _parse(data)

    assert [i.id for i in jcat.items] == ["fakedevice124.bin", "fakedevice124.metainfo.xml"]
    item = jcat.item_for("fakedevice124.bin")
    assert sorted(b.kind for b in item.blobs) == [
        BlobKind.SHA256, BlobKind.GPG, BlobKind.PKCS7, BlobKind.SHA1,
    ]  # fmt: skip
    assert item.of_kind(BlobKind.SHA256)[0].data == FAKEDEVICE124_SHA256
    assert item.of_kind(BlobKind.PKCS7)[0].data.startswith("-----BEGIN PKCS7-----")
    assert all(b.timestamp == 1705829736 for b in item.of_kind(BlobKind.SHA256))


def test_trailer_of_64_bytes_is_tolerated_and_65_refused() -> None:
    data = build_jcat({"a": [(BlobKind.SHA256, "00")]})
    assert _parse(data + b"x" * 64).items[0].id == "a"
    with pytest.raises(FormatError, match="65 bytes after the gzip stream"):
        _parse(data + b"x" * 65)


@pytest.mark.parametrize("cut", [1, 8, 20])
def test_truncated_gzip_is_refused(cut: int) -> None:
    data = build_jcat({"a": [(BlobKind.SHA256, "0" * 64)]})
    with pytest.raises(FormatError, match=r"truncated|not valid gzip"):
        _parse(data[:-cut])


def test_not_gzip_is_refused() -> None:
    with pytest.raises(FormatError, match="not valid gzip"):
        _parse(b'{"Items": []}')


def test_gzip_bomb_hits_the_decompression_cap() -> None:
    bomb = gzip.compress(b" " * (8 * 1024 * 1024) + b"{}", mtime=0)
    assert len(bomb) < 64 * 1024
    with pytest.raises(LimitExceeded, match="decompresses to more than 4194304 bytes"):
        _parse(bomb)
    assert _parse(bomb, max_json=9 * 1024 * 1024).items == ()  # the cap, not the content


def test_oversized_input_is_refused_before_decompressing() -> None:
    with pytest.raises(LimitExceeded, match="more than 100"):
        _parse(b"\x1f\x8b" + b"\0" * 200, max_bytes=100)


def test_decompressed_size_at_the_cap_is_accepted() -> None:
    raw = json.dumps({"Items": []}).encode()
    data = gzip.compress(raw, mtime=0)
    assert _parse(data, max_json=len(raw)).items == ()
    with pytest.raises(LimitExceeded):
        _parse(data, max_json=len(raw) - 1)


@pytest.mark.parametrize(
    ("raw", "cause"),
    [
        (b"\xff\xfe not utf-8", "valid JSON"),
        (b"{", "valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "valid JSON"),
        (b'{"Items": [{"Id": "a", "Blobs": [{"Kind": 1' + b"0" * 5000 + b"}]}]}", "valid JSON"),
        (b"[]", "object with an Items list"),
        (b'{"Items": {}}', "object with an Items list"),
        (b'{"JcatVersionMajor": 1, "Items": []}', "version 1"),
        (b'{"Items": ["a"]}', "item is not an object"),
        (b'{"Items": [{"Blobs": []}]}', "lacks an Id"),
        (b'{"Items": [{"Id": 7, "Blobs": []}]}', "lacks an Id"),
        (b'{"Items": [{"Id": "a", "Blobs": {}}]}', "Blobs list"),
        (b'{"Items": [{"Id": "a", "Blobs": [1]}]}', "blob is not an object"),
        (b'{"Items": [{"Id": "a", "Blobs": [{"Data": "x"}]}]}', "malformed Kind"),
        (b'{"Items": [{"Id": "a", "Blobs": [{"Kind": true}]}]}', "malformed Kind"),
        (b'{"Items": [{"Id": "a", "Blobs": [{"Kind": "1"}]}]}', "malformed Kind"),
        (b'{"Items": [{"Id": "a", "Blobs": [{"Kind": 1.0}]}]}', "malformed Kind"),
        (b'{"Items": [{"Id": "a", "Blobs": [{"Kind": 1, "Data": 5}]}]}', "Data"),
        (b'{"Items": [{"Id": "a", "Blobs": [{"Kind": 1, "Timestamp": "now"}]}]}', "Timestamp"),
    ],
)
def test_malformed_json_shapes_are_refused(raw: bytes, cause: str) -> None:
    with pytest.raises(FormatError, match=cause):
        _parse(gzip.compress(raw, mtime=0))


def test_unknown_kinds_are_kept_to_be_ignored() -> None:
    jcat = _parse(_gz({"Items": [{"Id": "a", "Blobs": [{"Kind": 99, "Data": "x"}]}]}))
    assert jcat.items[0].blobs == (JcatBlob(kind=99, data="x", timestamp=0),)
    assert jcat.items[0].of_kind(BlobKind.SHA256) == ()


def test_build_jcat_round_trip() -> None:
    items = {
        "firmware.xml.zst": [(BlobKind.SHA256, "ab" * 32), (BlobKind.PKCS7, "pem\n")],
        "other.bin": [(BlobKind.GPG, "armored")],
    }
    jcat = _parse(build_jcat(items))
    assert {i.id: [(b.kind, b.data) for b in i.blobs] for i in jcat.items} == items
    assert all(b.timestamp > 0 for i in jcat.items for b in i.blobs)
    assert jcat.item_for("other.bin").blobs[0].kind == BlobKind.GPG


def test_item_for_picks_by_name_or_the_only_item() -> None:
    two = _parse(build_jcat({"a": [], "b": []}))
    assert two.item_for("b").id == "b"
    with pytest.raises(FormatError, match="2 items and none for c"):
        two.item_for("c")
    assert _parse(build_jcat({"renamed-by-mirror": []})).item_for("c").id == "renamed-by-mirror"


def test_item_for_looks_up_an_lvfs_generation_item_by_its_alias() -> None:
    """Since 2024 the LVFS names its item after the generation and aliases the served
    names; the id wins over an alias, as in libjcat's jcat_file_get_item_by_id."""
    served = ["firmware.xml.gz", "firmware.xml.zst", "firmware.xml.xz"]
    jcat = _parse(
        build_jcat(
            {"firmware-07078-stable.xml.gz": [], "firmware.xml.xz": [], "other": []},
            {"firmware-07078-stable.xml.gz": served},
        )
    )
    assert jcat.items[0].alias_ids == tuple(served)
    assert jcat.item_for("firmware.xml.zst").id == "firmware-07078-stable.xml.gz"
    assert jcat.item_for("firmware-07078-stable.xml.gz").id == "firmware-07078-stable.xml.gz"
    assert jcat.item_for("firmware.xml.xz").id == "firmware.xml.xz"  # the id, not the alias
    with pytest.raises(FormatError, match=r"3 items and none for firmware\.xml$"):
        jcat.item_for("firmware.xml")


@pytest.mark.parametrize(
    ("items", "what"),
    [
        ([{"Id": "f.zst", "Blobs": []}, {"Id": "f.zst", "Blobs": []}], "2 items with the id f.zst"),
        (
            [{"Id": "g1", "AliasIds": ["f.zst"]}, {"Id": "g2", "AliasIds": ["f.zst"]}],
            "2 items with the alias f.zst",
        ),
    ],
)
def test_item_for_refuses_two_candidates(items: list[dict[str, Any]], what: str) -> None:
    with pytest.raises(FormatError, match=what):
        _parse(_gz({"Items": items})).item_for("f.zst")


@pytest.mark.parametrize("aliases", ["f.zst", [1], [None], {"a": 1}])
def test_malformed_alias_ids_are_refused(aliases: object) -> None:
    with pytest.raises(FormatError, match="AliasIds"):
        _parse(_gz({"Items": [{"Id": "g", "AliasIds": aliases, "Blobs": []}]}))


# --- whatever the bytes, only BrokerError -----------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)
_blob = st.dictionaries(
    st.sampled_from(["Kind", "Data", "Timestamp", "Flags", "x"]), _json, max_size=5
)
_item = st.dictionaries(
    st.sampled_from(["Id", "Blobs", "x"]),
    st.one_of(_json, st.lists(_blob | _json, max_size=4)),
    max_size=3,
)
_doc = st.one_of(
    _json,
    st.dictionaries(
        st.sampled_from(["Items", "JcatVersionMajor", "JcatVersionMinor"]),
        st.one_of(_json, st.lists(_item | _json, max_size=4)),
        max_size=3,
    ),
)


def check_parses_or_refuses(data: bytes) -> None:
    try:
        result = _parse(data, max_bytes=64 * 1024, max_json=256 * 1024)
    except BrokerError as e:
        assert_user_message(e)
        return
    assert isinstance(result, Jcat)
    for item in result.items:
        assert isinstance(item.id, str)
        for blob in item.blobs:
            assert isinstance(blob.kind, int) and not isinstance(blob.kind, bool)
            assert isinstance(blob.data, str)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_raise_broker_errors(data: bytes) -> None:
    check_parses_or_refuses(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.binary(max_size=80))
def test_arbitrary_gzipped_bytes_only_raise_broker_errors(payload: bytes, tail: bytes) -> None:
    check_parses_or_refuses(gzip.compress(payload, mtime=0) + tail)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_doc)
def test_arbitrary_json_documents_only_raise_broker_errors(doc: Any) -> None:
    check_parses_or_refuses(gzip.compress(json.dumps(doc).encode(), mtime=0))


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,29}", fullmatch=True),
        st.lists(st.tuples(st.sampled_from(list(BlobKind)), st.text(max_size=50)), max_size=4),
        max_size=4,
    )
)
def test_build_then_parse_is_identity(items: dict[str, list[tuple[BlobKind, str]]]) -> None:
    jcat = _parse(build_jcat(items))
    assert {i.id: [(b.kind, b.data) for b in i.blobs] for i in jcat.items} == items


@pytest.mark.parametrize(
    "item",
    [
        {"Id": "\x1b]0;pwned\x07.bin", "Blobs": []},
        {"Id": "../firmware.xml.zst", "Blobs": []},
        {"Id": "", "Blobs": []},
        {"Id": "ok.bin", "AliasIds": ["ok.zst", "a\nb"], "Blobs": []},
    ],
)
def test_a_jcat_is_well_formed_as_a_whole(item: dict[str, Any]) -> None:
    """An item dom0 would never use still makes the jcat malformed: ids name files."""
    items = [{"Id": "firmware.xml.zst", "Blobs": []}, item]
    with pytest.raises(FormatError, match="jcat item id or alias is not a plain file name"):
        _parse(_gz({"Items": items}))


# the refusals word for word: the one line the user reads names what was wrong
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", "jcat does not hold valid JSON"),
        (b"[]", "jcat JSON is not an object with an Items list"),
        (b'{"Items": ["a"]}', "jcat item is not an object"),
        (b'{"Items": [{"Blobs": []}]}', "jcat item lacks an Id string or a Blobs list"),
        (b'{"Items": [{"Id": "a", "AliasIds": [1]}]}',
         "jcat item has an AliasIds that is not a list of strings"),
        (b'{"Items": [{"Id": "a/b"}]}', "jcat item id or alias is not a plain file name"),
        (b'{"Items": [{"Id": "a", "Blobs": [1]}]}', "jcat blob is not an object"),
        (b'{"Items": [{"Id": "a", "Blobs": [{"Kind": "1"}]}]}',
         "jcat blob has a malformed Kind, Data or Timestamp"),
    ],
)  # fmt: skip
def test_each_refusal_says_exactly_what_is_wrong(raw: bytes, message: str) -> None:
    with pytest.raises(FormatError) as e:
        _parse(gzip.compress(raw, mtime=0))
    assert str(e.value) == message


def test_a_jcat_of_no_items_speaks_for_no_file() -> None:
    with pytest.raises(FormatError) as e:
        _parse(_gz({"Items": []})).item_for("firmware.xml.zst")
    assert str(e.value) == "jcat holds no items"


def test_a_truncated_stream_says_so() -> None:
    data = build_jcat({"a": [(BlobKind.SHA256, "0" * 64)]})
    with pytest.raises(FormatError) as e:
        _parse(data[:-8])  # the gzip trailer (crc32, size) cut off: deflate data complete
    assert str(e.value) == "jcat gzip stream is truncated"


def test_input_of_exactly_the_byte_cap_is_accepted() -> None:
    data = build_jcat({"a": [(BlobKind.SHA256, "00")]})
    assert _parse(data, max_bytes=len(data)).items[0].id == "a"


def test_a_zlib_stream_is_not_gzip() -> None:
    """libjcat writes and reads gzip only; zlib's other wrapping is refused, not sniffed."""
    raw = json.dumps({"Items": [{"Id": "a", "Blobs": []}]}).encode()
    with pytest.raises(FormatError, match="not valid gzip"):
        _parse(zlib.compress(raw))


def test_a_blob_without_data_holds_the_empty_string() -> None:
    jcat = _parse(_gz({"Items": [{"Id": "a", "Blobs": [{"Kind": BlobKind.SHA256}]}]}))
    assert jcat.items[0].blobs == (JcatBlob(kind=BlobKind.SHA256, data="", timestamp=0),)


def test_a_bomb_is_never_inflated_beyond_the_cap() -> None:
    """The cap holds while inflating (one bounded decompress call), not after: 64 MiB of
    zeros against a 1 MiB cap never allocates much more than the cap."""
    bomb = gzip.compress(bytes(64 * 1024 * 1024), compresslevel=1, mtime=0)
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceeded):
            _parse(bomb, max_json=1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


def test_build_jcat_writes_the_document_libjcat_reads() -> None:
    """dom0 hands fwupd a jcat it built: libjcat's keys and version, blobs flagged UTF-8
    (JCAT_BLOB_FLAG_IS_UTF8), and a gzip header without a time in it (reproducible)."""
    data = build_jcat({"a.bin": [(BlobKind.SHA256, "ab")]}, aliases={"a.bin": ["a.zst"]})
    assert data[:4] == b"\x1f\x8b\x08\x00" and data[4:8] == b"\0\0\0\0"  # MTIME 0
    doc = json.loads(gzip.decompress(data))
    assert doc["JcatVersionMajor"] == 0 and doc["JcatVersionMinor"] == 1
    [item] = doc["Items"]
    assert item["Id"] == "a.bin" and item["AliasIds"] == ["a.zst"]
    [blob] = item["Blobs"]
    assert set(blob) == {"Kind", "Flags", "Timestamp", "Data"}
    assert (blob["Kind"], blob["Flags"], blob["Data"]) == (BlobKind.SHA256, 1, "ab")
