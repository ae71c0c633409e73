"""broker.fwupd_json against fwupd 2.0.20 itself.

Three witnesses, strongest last:
* fwupd's rules written down as examples (no daemon, no library);
* libfwupd.so.3 in this process through ctypes (skipped without it): its enum tables, its
  GHashTable order, and ``fwupd_codec_from_variant`` + ``fwupd_codec_to_json_string`` on
  generated a{sv}s, which is exactly what fwupdmgr runs on what it gets from the daemon;
* a real fwupd daemon on a private bus (the shared recipe), asked over D-Bus with
  dbus-next and through ``fwupdmgr --json`` (root only; skipped otherwise).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker.fwupd_json import (
    DEVICE_FLAGS,
    DEVICE_PROBLEMS,
    ERROR_INVALID_ARGS,
    ERROR_LAST,
    ERRORS,
    RELEASE_FLAGS,
    REPORT_FLAGS,
    REQUEST_FLAGS,
    STATUSES,
    UPDATE_STATES,
    URGENCIES,
    VERSION_FORMATS,
    _ghash_order,
    device_id_is_valid,
    device_json,
    error_json,
    error_json_from_dbus,
    flag_names,
    flags_value,
    release_json,
    report_json,
    urgency_name,
)
from tests.sandbox_helpers import manager, sandbox_cli, sandbox_prerequisites, short_tmpdir, up

WEBCAM_ID = "08d460be0f1f9f128413f816022a6439e0078018"
WEBCAM_GUID = "b585990a-003e-5270-89d5-3705a17f9a43"

# GetDevices of the recipe's fwupd 2.0.20 (test plugin), unwrapped, in the daemon's order.
# "Created" is when the daemon made the device; the daemon test checks the rest is current.
WEBCAM_DBUS: dict[str, Any] = {
    "DeviceId": WEBCAM_ID,
    "Guid": [WEBCAM_GUID],
    "Icon": ["camera-web"],
    "Name": "Integrated Webcam™",
    "Vendor": "ACME Corp.",
    "VendorId": "USB:0x046D",
    "Flags": 4785074704744482,
    "RequestFlags": 1,
    "Created": 1796235728,
    "Summary": "Fake webcam",
    "Plugin": "test",
    "Protocol": "com.acme.test",
    "Version": "1.2.2",
    "VersionLowest": "1.2.0",
    "VersionBootloader": "0.1.2",
    "VersionFormat": 4,
}
# ... and that device in fwupdmgr --json get-devices, less its "Releases"
WEBCAM_JSON: dict[str, Any] = {
    "Name": "Integrated Webcam™",
    "DeviceId": WEBCAM_ID,
    "Guid": [WEBCAM_GUID],
    "Summary": "Fake webcam",
    "Plugin": "test",
    "Protocols": ["com.acme.test"],
    "Flags": [
        "updatable",
        "supported",
        "can-verify",
        "can-verify-image",
        "unsigned-payload",
        "can-emulation-tag",
    ],
    "RequestFlags": ["allow-generic-message"],
    "Vendor": "ACME Corp.",
    "VendorIds": ["USB:0x046D"],
    "Version": "1.2.2",
    "VersionLowest": "1.2.0",
    "VersionBootloader": "0.1.2",
    "VersionFormat": "triplet",
    "Icons": ["camera-web"],
    "Created": 1796235728,
}
SHA1_124 = "69867ab1b6bfe3efaba41c2cd7a9b140ef58fb3d"
SHA256_124 = "0672c1c9f991c2174caf75456cd00901072a42db027db2a1da8fa6f8fcd4f1a9"
# GetUpgrades/GetReleases: the 1.2.4 release of the recipe's metadata
RELEASE_124_DBUS: dict[str, Any] = {
    "RemoteId": "lvfs",
    "AppstreamId": "org.fwupd.fakedevice.firmware",
    "Filename": "fakedevice124.cab",
    "Protocol": "com.acme.test",
    "License": "GPL-2.0+",
    "Name": "FakeDevice",
    "Size": 10,
    "Created": 1796235728,
    "Summary": "Firmware for the ACME Corp Integrated Webcam",
    "Description": (
        "<p>Fixes another bug with the flux capacitor to prevent time going backwards.</p>"
    ),
    "Categories": ["X-Device"],
    "Checksum": f"{SHA1_124},{SHA256_124}",
    "Locations": ["file:///usr/share/installed-tests/fwupd/fakedevice124.cab"],
    "Homepage": "http://www.acme.com/",
    "SourceUrl": "https://github.com/fwupd/fwupd/tree/main/data/installed-tests",
    "Version": "1.2.4",
    "Vendor": "LVFS",
    "TrustFlags": 6,
    "Urgency": 2,
}
RELEASE_124_JSON: dict[str, Any] = {
    "AppstreamId": "org.fwupd.fakedevice.firmware",
    "RemoteId": "lvfs",
    "Name": "FakeDevice",
    "Summary": "Firmware for the ACME Corp Integrated Webcam",
    "Description": RELEASE_124_DBUS["Description"],
    "Version": "1.2.4",
    "Filename": "fakedevice124.cab",
    "Protocol": "com.acme.test",
    "Categories": ["X-Device"],
    "Checksum": [SHA1_124, SHA256_124],
    "License": "GPL-2.0+",
    "Size": 10,
    "Created": 1796235728,
    "Locations": ["file:///usr/share/installed-tests/fwupd/fakedevice124.cab"],
    "Homepage": "http://www.acme.com/",
    "SourceUrl": "https://github.com/fwupd/fwupd/tree/main/data/installed-tests",
    "Vendor": "LVFS",
    "Flags": ["trusted-metadata", "is-upgrade"],
}


def assert_same(mine: Any, theirs: Any) -> None:
    """Equal key for key, type for type (1 is not 1.0 nor True) and in the same order."""
    assert mine == theirs
    assert json.dumps(mine, ensure_ascii=False) == json.dumps(theirs, ensure_ascii=False)


# ------------------------------------------------------------------ tables

FLAG_TABLES = {
    "device": DEVICE_FLAGS,
    "problem": DEVICE_PROBLEMS,
    "request": REQUEST_FLAGS,
    "release": RELEASE_FLAGS,
    "report": REPORT_FLAGS,
}


@pytest.mark.parametrize("table", FLAG_TABLES.values(), ids=FLAG_TABLES.keys())
def test_flag_tables_round_trip(table: Mapping[int, str]) -> None:
    assert len(set(table.values())) == len(table)
    everything = 0
    for bit, name in table.items():
        assert bit > 0 and bit & (bit - 1) == 0 and bit < 1 << 64
        assert flag_names(bit, table) == [name]
        assert flags_value([name], table) == bit
        everything |= bit
    names = flag_names(everything, table)
    assert names == [table[b] for b in sorted(table)]  # lowest bit first
    assert flags_value(names, {**table}) == everything
    assert flags_value(["no-such-flag"], table) == 0


def test_unknown_bits_are_null_in_their_place() -> None:
    # fwupd's *_flag_to_string gives NULL for a bit it has no name for; json-glib prints null
    assert flag_names(1 | 2 | 4, DEVICE_FLAGS) == ["internal", "updatable", None]
    assert flag_names(1 << 63 | 1 << 5, DEVICE_FLAGS) == ["supported", None]
    assert device_json({"Flags": 1 << 2})["Flags"] == [None]
    assert release_json({"TrustFlags": 1 << 9 | 1})["Flags"] == ["trusted-payload", None]
    assert flag_names(0, DEVICE_FLAGS) == []
    assert "Flags" not in device_json({"Flags": 0})
    for bad in (-1, 1 << 64, True, 1.0, "3", None):
        assert flag_names(bad, DEVICE_FLAGS) == []  # type: ignore[arg-type]


def test_the_webcam_flags() -> None:
    assert flag_names(WEBCAM_DBUS["Flags"], DEVICE_FLAGS) == WEBCAM_JSON["Flags"]
    assert flags_value(WEBCAM_JSON["Flags"], DEVICE_FLAGS) == WEBCAM_DBUS["Flags"]


# ------------------------------------------------------------------ libfwupd through ctypes


class LibFwupd:
    """The installed libfwupd.so.3 and GLib, called directly: fwupdmgr's own code path
    from a GVariant a{sv} to its JSON, minus the D-Bus transport."""

    def __init__(self) -> None:
        self.fw = ctypes.CDLL("libfwupd.so.3")
        self.glib = ctypes.CDLL("libglib-2.0.so.0")
        self.gobject = ctypes.CDLL("libgobject-2.0.so.0")
        vp, cp, u64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64
        g, f = self.glib, self.fw
        g.g_variant_parse.restype = vp
        g.g_variant_parse.argtypes = [vp, cp, vp, vp, vp]
        g.g_variant_unref.argtypes = [vp]
        g.g_free.argtypes = [vp]
        g.g_strdup.restype = vp
        g.g_strdup.argtypes = [cp]
        g.g_hash_table_new.restype = vp
        g.g_hash_table_new.argtypes = [vp, vp]
        g.g_hash_table_insert.argtypes = [vp, vp, vp]
        g.g_hash_table_get_keys.restype = vp
        g.g_hash_table_get_keys.argtypes = [vp]
        g.g_hash_table_unref.argtypes = [vp]
        g.g_list_free.argtypes = [vp]
        g.g_quark_to_string.restype = cp
        g.g_quark_to_string.argtypes = [ctypes.c_uint32]
        self.gobject.g_object_unref.argtypes = [vp]
        for name in ("fwupd_device_new", "fwupd_release_new", "fwupd_report_new"):
            getattr(f, name).restype = vp
        f.fwupd_codec_from_variant.argtypes = [vp, vp, vp]
        f.fwupd_codec_to_json_string.restype = vp
        f.fwupd_codec_to_json_string.argtypes = [vp, ctypes.c_int, vp]
        for name in (
            "fwupd_device_flag_to_string",
            "fwupd_device_problem_to_string",
            "fwupd_request_flag_to_string",
            "fwupd_release_flag_to_string",
            "fwupd_report_flag_to_string",
        ):
            getattr(f, name).restype = cp
            getattr(f, name).argtypes = [u64]
        for name in (
            "fwupd_release_urgency_to_string",
            "fwupd_version_format_to_string",
            "fwupd_update_state_to_string",
            "fwupd_status_to_string",
            "fwupd_error_to_string",
        ):
            getattr(f, name).restype = cp
            getattr(f, name).argtypes = [ctypes.c_uint32]
        f.fwupd_error_from_string.restype = ctypes.c_int
        f.fwupd_error_from_string.argtypes = [cp]
        f.fwupd_error_quark.restype = ctypes.c_uint32

    def name(self, function: str, value: int) -> str | None:
        out = getattr(self.fw, function)(value)
        return None if out is None else out.decode()

    def to_json(self, kind: str, gvariant_text: str, flags: int = 1) -> list[Any]:
        """fwupd_codec_from_variant then fwupd_codec_to_json_string, as ordered pairs."""
        value = self.glib.g_variant_parse(None, gvariant_text.encode(), None, None, None)
        assert value, gvariant_text
        obj = getattr(self.fw, f"fwupd_{kind}_new")()
        try:
            assert self.fw.fwupd_codec_from_variant(obj, value, None)
            text = self.fw.fwupd_codec_to_json_string(obj, flags, None)
            assert text
            try:
                data = ctypes.string_at(text).decode()
            finally:
                self.glib.g_free(text)
        finally:
            self.gobject.g_object_unref(obj)
            self.glib.g_variant_unref(value)
        return json.loads(data, object_pairs_hook=lambda kv: [list(p) for p in kv])  # type: ignore[no-any-return]

    def ghash_keys(self, keys: list[str]) -> list[str]:
        class GList(ctypes.Structure):
            pass

        GList._fields_ = [
            ("data", ctypes.c_void_p),
            ("next", ctypes.POINTER(GList)),
            ("prev", ctypes.POINTER(GList)),
        ]
        g = self.glib
        table = g.g_hash_table_new(
            ctypes.cast(g.g_str_hash, ctypes.c_void_p), ctypes.cast(g.g_str_equal, ctypes.c_void_p)
        )
        for key in keys:  # leaks a few bytes per key: no destroy notifiers, fine in a test
            g.g_hash_table_insert(table, g.g_strdup(key.encode()), g.g_strdup(b"v"))
        head = g.g_hash_table_get_keys(table)
        out, node = [], ctypes.cast(head, ctypes.POINTER(GList))
        while node:
            out.append(ctypes.string_at(node.contents.data).decode())
            node = node.contents.next
        g.g_list_free(head)
        g.g_hash_table_unref(table)
        return out


@pytest.fixture(scope="module")
def lib() -> LibFwupd:
    try:
        return LibFwupd()
    except (OSError, AttributeError) as e:
        pytest.skip(f"no usable libfwupd.so.3: {e}")


FLAG_FUNCTIONS = {
    "fwupd_device_flag_to_string": DEVICE_FLAGS,
    "fwupd_device_problem_to_string": DEVICE_PROBLEMS,
    "fwupd_request_flag_to_string": REQUEST_FLAGS,
    "fwupd_release_flag_to_string": RELEASE_FLAGS,
    "fwupd_report_flag_to_string": REPORT_FLAGS,
}
ENUM_FUNCTIONS = {
    "fwupd_release_urgency_to_string": URGENCIES,
    "fwupd_version_format_to_string": VERSION_FORMATS,
    "fwupd_update_state_to_string": UPDATE_STATES,
    "fwupd_status_to_string": STATUSES,
}


def test_tables_are_libfwupds(lib: LibFwupd) -> None:
    for function, table in FLAG_FUNCTIONS.items():
        theirs = {1 << b: lib.name(function, 1 << b) for b in range(64)}
        assert {k: v for k, v in theirs.items() if v is not None} == dict(table), function
    for function, table in ENUM_FUNCTIONS.items():
        theirs = {v: lib.name(function, v) for v in range(1, 256)}
        assert {k: v for k, v in theirs.items() if v is not None} == dict(table), function
    errors = {c: lib.name("fwupd_error_to_string", c) for c in range(256)}
    assert {c: n for c, n in errors.items() if n} == {
        c: f"org.freedesktop.fwupd.{n}" for c, n in ERRORS.items()
    }
    assert lib.fw.fwupd_error_from_string(b"org.freedesktop.fwupd.Bogus") == ERROR_LAST
    domain = lib.glib.g_quark_to_string(lib.fw.fwupd_error_quark()).decode()
    assert error_json_from_dbus("x", "m")["Error"]["Domain"] == domain


@settings(max_examples=400, deadline=None)
@given(
    keys=st.lists(
        st.text(alphabet="abcXYZ019_:-.é™😀", max_size=7),
        max_size=300,
    ),
    repeats=st.integers(0, 3),
)
@example(keys=[f"key{i}" for i in range(2000)], repeats=0)  # many resizes
def test_hash_table_order_is_glibs(lib: LibFwupd, keys: list[str], repeats: int) -> None:
    keys = keys + keys[:repeats]  # a repeated key keeps its first place
    assert _ghash_order(keys) == lib.ghash_keys(keys)


# ---- generated a{sv}s, rendered in GVariant text format for g_variant_parse


def gv_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def gv(value: Any, sig: str) -> str:
    if sig == "s":
        return gv_str(value)
    if sig in ("t", "u"):
        return f"{'uint64' if sig == 't' else 'uint32'} {value}"
    if sig == "as":
        return "@as [" + ", ".join(gv_str(s) for s in value) + "]"
    if sig == "a{ss}":
        return "@a{ss} {" + ", ".join(f"{gv_str(k)}: {gv_str(v)}" for k, v in value.items()) + "}"
    if sig in ("aa{sv}:release", "aa{sv}:report"):
        sigs = RELEASE_SIGS if sig.endswith("release") else REPORT_SIGS
        return "@aa{sv} [" + ", ".join(asv(d, sigs) for d in value) + "]"
    raise AssertionError(sig)


def asv(d: Mapping[str, Any], sigs: Mapping[str, str]) -> str:
    return "@a{sv} {" + ", ".join(f"{gv_str(k)}: <{gv(v, sigs[k])}>" for k, v in d.items()) + "}"


REPORT_SIGS = {
    **dict.fromkeys(
        (
            "DistroId",
            "DistroVariant",
            "DistroVersion",
            "Vendor",
            "DeviceName",
            "VersionOld",
            "RemoteId",
        ),
        "s",
    ),
    "VendorId": "u",
    "Created": "t",
    "Flags": "t",
    "Metadata": "a{ss}",
}
RELEASE_SIGS = {
    **dict.fromkeys(
        (
            "RemoteId",
            "AppstreamId",
            "ReleaseId",
            "DetachCaption",
            "DetachImage",
            "Filename",
            "Protocol",
            "License",
            "Name",
            "NameVariantSuffix",
            "Summary",
            "Branch",
            "Description",
            "Homepage",
            "DetailsUrl",
            "SourceUrl",
            "SbomUrl",
            "Version",
            "Vendor",
            "UpdateMessage",
            "UpdateImage",
            "Checksum",
            "Uri",
        ),
        "s",
    ),
    **dict.fromkeys(("Size", "Created", "TrustFlags"), "t"),
    **dict.fromkeys(("Urgency", "InstallDuration"), "u"),
    **dict.fromkeys(("Categories", "Issues", "Tags", "Locations"), "as"),
    "Metadata": "a{ss}",
    "Reports": "aa{sv}:report",
}
DEVICE_SIGS = {
    **dict.fromkeys(
        (
            "DeviceId",
            "ParentDeviceId",
            "CompositeId",
            "Name",
            "Vendor",
            "VendorId",
            "Serial",
            "Summary",
            "Branch",
            "Checksum",
            "Plugin",
            "Protocol",
            "Version",
            "VersionLowest",
            "VersionBootloader",
            "UpdateError",
        ),
        "s",
    ),
    **dict.fromkeys(
        (
            "Flags",
            "Problems",
            "RequestFlags",
            "Created",
            "Modified",
            "VersionBuildDate",
            "VersionRaw",
            "VersionLowestRaw",
            "VersionBootloaderRaw",
        ),
        "t",
    ),
    **dict.fromkeys(
        (
            "FlashesLeft",
            "BatteryLevel",
            "BatteryThreshold",
            "InstallDuration",
            "UpdateState",
            "Status",
            "Percentage",
            "VersionFormat",
        ),
        "u",
    ),
    **dict.fromkeys(("Guid", "InstanceIds", "Icon", "Issues"), "as"),
    "Release": "aa{sv}:release",
}

# short strings from a small alphabet, so that duplicates, separators and empties happen
text = st.text(alphabet="ab,|'\\ é™Z", max_size=5)
hexid = st.text(alphabet="0123456789abcdef", min_size=40, max_size=40)
device_id = st.one_of(hexid, st.text(alphabet="0123456789abcdefABCDEF", max_size=41), text)
member_names = st.sampled_from(["Version", "Flags", "Name", "Reports", "zz", "LVFS::X", ""])


def uint(bits: int) -> st.SearchStrategy[int]:
    top = (1 << bits) - 1
    return st.one_of(st.sampled_from([0, 1, 2, 101, top, 1 << (bits - 1)]), st.integers(0, top))


def value_for(sig: str, key: str) -> st.SearchStrategy[Any]:
    if key in ("DeviceId", "ParentDeviceId", "CompositeId"):
        return device_id
    if sig == "s":
        return text
    if sig == "t":
        return uint(64)
    if sig == "u":
        return uint(32)
    if sig == "as":
        return st.lists(text, max_size=4)
    if sig == "a{ss}":
        return st.dictionaries(st.one_of(member_names, text), text, max_size=12)
    if sig == "aa{sv}:release":
        return st.lists(asv_strategy(RELEASE_SIGS), max_size=2)
    if sig == "aa{sv}:report":
        return st.lists(asv_strategy(REPORT_SIGS), max_size=2)
    raise AssertionError(sig)


def asv_strategy(sigs: Mapping[str, str]) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        keys = draw(st.lists(st.sampled_from(sorted(sigs)), unique=True))
        keys = draw(st.permutations(keys))
        return {k: draw(value_for(sigs[k], k)) for k in keys}

    return build()


def pairs(obj: Any) -> Any:
    """Our output in the shape json.loads(object_pairs_hook=list) gives: order visible."""
    if isinstance(obj, dict):
        return [[k, pairs(v)] for k, v in obj.items()]
    if isinstance(obj, list):
        return [pairs(v) for v in obj]
    return obj


ORACLE = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@ORACLE
@given(raw=asv_strategy(DEVICE_SIGS), trusted=st.booleans())
def test_device_json_is_libfwupds(lib: LibFwupd, raw: dict[str, Any], trusted: bool) -> None:
    theirs = lib.to_json("device", asv(raw, DEVICE_SIGS), flags=int(trusted))
    assert pairs(device_json(raw, trusted=trusted)) == theirs


@ORACLE
@given(raw=asv_strategy(RELEASE_SIGS))
def test_release_json_is_libfwupds(lib: LibFwupd, raw: dict[str, Any]) -> None:
    theirs = lib.to_json("release", asv(raw, RELEASE_SIGS))
    assert pairs(release_json(raw)) == theirs


@ORACLE
@given(raw=asv_strategy(REPORT_SIGS))
def test_report_json_is_libfwupds(lib: LibFwupd, raw: dict[str, Any]) -> None:
    theirs = lib.to_json("report", asv(raw, REPORT_SIGS))
    assert pairs(report_json(raw)) == theirs


def test_the_webcam_through_libfwupd(lib: LibFwupd) -> None:
    theirs = lib.to_json("device", asv(WEBCAM_DBUS, DEVICE_SIGS))
    assert pairs(device_json(WEBCAM_DBUS)) == theirs
    theirs = lib.to_json("release", asv(RELEASE_124_DBUS, RELEASE_SIGS))
    assert pairs(release_json(RELEASE_124_DBUS)) == theirs


# ------------------------------------------------------------------ rules, by example


def test_the_webcam() -> None:
    assert_same(device_json(WEBCAM_DBUS), WEBCAM_JSON)
    assert_same(release_json(RELEASE_124_DBUS), RELEASE_124_JSON)
    with_releases = device_json(WEBCAM_DBUS, releases=[RELEASE_124_DBUS], qube="sys-usb")
    assert_same(with_releases, {**WEBCAM_JSON, "Releases": [RELEASE_124_JSON], "Qube": "sys-usb"})


def test_device_rules() -> None:
    out = device_json(
        {
            "VendorId": "USB:0x1|PCI:0x2|USB:0x1||",
            "Protocol": "",
            "Checksum": "aa,bb,aa",
            "Guid": ["g", "g", "h"],
            "DeviceId": "A" * 40,  # uppercase: not a device ID for fwupd
            "ParentDeviceId": "0" * 40,
            "CompositeId": "0" * 39,
            "Created": (1 << 64) - 1,  # printed as a gint64
            "BatteryLevel": 101,  # FWUPD_BATTERY_LEVEL_INVALID: not printed
            "BatteryThreshold": 0,  # printed, 0 is a level
            "VersionFormat": 99,  # no name: not printed
            "UpdateState": 3,
            "Status": 0,
            "Serial": "S1",
            "InstanceIds": ["USB\\VID_1"],
        }
    )
    assert out == {
        "ParentDeviceId": "0" * 40,
        "InstanceIds": ["USB\\VID_1"],
        "Guid": ["g", "h"],
        "Serial": "S1",
        "Checksums": ["aa", "bb"],
        "VendorIds": ["USB:0x1", "PCI:0x2", ""],
        "BatteryThreshold": 0,
        "Created": -1,
        "UpdateState": 3,
    }
    assert list(out) == [
        "ParentDeviceId",
        "InstanceIds",
        "Guid",
        "Serial",
        "Checksums",
        "VendorIds",
        "BatteryThreshold",
        "Created",
        "UpdateState",
    ]
    untrusted = device_json({"Serial": "S1", "InstanceIds": ["x"], "Name": "n"}, trusted=False)
    assert untrusted == {"Name": "n"}
    assert device_id_is_valid(WEBCAM_ID)
    assert not device_id_is_valid(WEBCAM_ID.upper())
    assert not device_id_is_valid(WEBCAM_ID + "0")


def test_device_releases_come_from_the_caller_after_any_nested_ones() -> None:
    nested = {**WEBCAM_DBUS, "Release": [{"Version": "0.9"}]}
    out = device_json(nested, releases=[{"Version": "1.0"}, {"Version": "1.0"}])
    assert out["Releases"] == [{"Version": "0.9"}, {"Version": "1.0"}, {"Version": "1.0"}]
    assert list(out)[-1] == "Releases"
    assert "Releases" not in device_json(WEBCAM_DBUS, releases=[])


def test_release_rules() -> None:
    raw = {
        "Uri": "https://b/x.cab",
        "Locations": ["https://a/x.cab", "https://b/x.cab"],
        "Checksum": "",
        "Flags": 1,  # not a release key on D-Bus: fwupd reads "TrustFlags" only
        "Urgency": 3,  # read by fwupd, never printed by fwupdmgr 2.0.20
        "Version": "1.0",
        "Metadata": {"b": "1", "a": "2", "zz": "3", "Version": "evil"},
        "Reports": [{"DistroId": "debian", "VendorId": 0, "Flags": 2, "Created": 5}],
    }
    out = release_json(raw)
    assert out == {
        "Version": "evil",  # a metadata key replaces the member, in its place
        "Locations": ["https://b/x.cab", "https://a/x.cab"],
        "zz": "3",
        "a": "2",
        "b": "1",
        "Reports": [{"DistroId": "debian", "Flags": ["is-upgrade"]}],
    }
    assert list(out) == ["Version", "Locations", "zz", "a", "b", "Reports"]  # GLib's order
    assert urgency_name(raw) == "high"
    assert urgency_name({"Urgency": 0}) is None
    assert urgency_name({}) is None


def test_error_json() -> None:
    assert error_json("FwupdError", 8, "failed to find x") == {
        "Error": {"Domain": "FwupdError", "Code": 8, "Message": "failed to find x"}
    }
    fwupd = "org.freedesktop.fwupd."
    assert error_json_from_dbus(fwupd + "NothingToDo", "m")["Error"]["Code"] == 9
    assert error_json_from_dbus(fwupd + "NotReachable", "m")["Error"]["Code"] == 21
    assert error_json_from_dbus(fwupd + "Bogus", "m")["Error"]["Code"] == ERROR_LAST
    assert error_json_from_dbus("org.freedesktop.fwupdfoo", "m")["Error"]["Code"] == ERROR_LAST
    service_unknown = "org.freedesktop.DBus.Error.ServiceUnknown"
    assert error_json_from_dbus(service_unknown, "m")["Error"]["Code"] == 10
    assert error_json_from_dbus("org.freedesktop.DBus.Error.NoReply", "m") == error_json(
        "FwupdError", 0, "m"
    )
    assert ERROR_INVALID_ARGS == ERROR_LAST + 1


# ------------------------------------------------------------------ hostile input

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(1 << 70), max_value=1 << 70),
        st.floats(allow_nan=True),
        st.text(max_size=8),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
ALL_KEYS = sorted({*DEVICE_SIGS, *RELEASE_SIGS, *REPORT_SIGS, "Releases", "Qube"})
hostile = st.dictionaries(st.one_of(st.sampled_from(ALL_KEYS), st.text(max_size=6)), json_values)


class FakeVariant:
    def __init__(self, signature: str, value: Any) -> None:
        self.signature, self.value = signature, value


def check_shape(out: Any) -> None:
    assert isinstance(out, dict)
    json.dumps(out, allow_nan=False)  # only JSON types, no NaN from the input
    for key, value in out.items():
        assert isinstance(key, str)
        if key == "Flags" or key in ("RequestFlags", "Problems"):
            assert isinstance(value, list | str)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                check_shape(item)
        else:
            assert isinstance(value, str | int | list) and not isinstance(value, bool)


CONVERTERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "device": device_json,
    "release": release_json,
    "report": report_json,
}


@settings(max_examples=400, deadline=None)
@given(raw=hostile, kind=st.sampled_from(sorted(CONVERTERS)))
def test_hostile_input_never_raises(raw: dict[str, Any], kind: str) -> None:
    check_shape(CONVERTERS[kind](raw))


@pytest.mark.parametrize("kind", sorted(CONVERTERS))
def test_hostile_shapes(kind: str) -> None:
    convert = CONVERTERS[kind]

    class Exploding(Mapping[str, Any]):
        def __getitem__(self, key: str) -> Any:
            raise KeyError(key)

        def __iter__(self) -> Iterator[str]:
            raise RuntimeError("no")

        def __len__(self) -> int:
            return 1

    shapes: list[Any] = [None, [], "DeviceId", 5, Exploding(), {1: "x", None: 2}]
    for raw in shapes:
        assert convert(raw) == {}
    weird = {
        "Name": 5,
        "Version": None,
        "Guid": "not-a-list",
        "Flags": -1,
        "Created": True,
        "Size": 1.5,
        "TrustFlags": "6",
        "Categories": ["ok", 3, None, ["x"]],
        "Metadata": ["not", "a", "dict"],
        "Release": {"Version": "not a list"},
        "Reports": [None, 3, {"DistroId": 7, "VendorId": -4}],
    }
    check_shape(convert(weird))


def test_hostile_values_are_skipped_not_guessed() -> None:
    out = device_json(
        {
            "Name": 5,
            "Flags": -1,
            "Created": True,
            "BatteryLevel": 1 << 32,
            "Guid": ["ok", 3, None],
            "VendorId": ["USB:0x1"],
        }
    )
    assert out == {"Guid": ["ok"]}
    out = release_json({"Metadata": {"k": 5, "j": "v"}, "Reports": [None, {"DistroId": "d"}]})
    assert out == {"j": "v", "Reports": [{"DistroId": "d"}]}


def test_big_or_looping_input_stays_cheap() -> None:
    many = [f"guid-{i}" for i in range(200_000)]
    assert device_json({"Guid": many + many})["Guid"] == many
    metadata = {f"k{i}": "v" for i in range(50_000)}
    # the first 128 keys shown: more only cost dom0 (colliding ones, quadratically: see
    # tests/unit/test_fuzz_regressions.py)
    assert list(release_json({"Metadata": metadata})) == _ghash_order(list(metadata)[:128])
    loop = FakeVariant("v", None)
    loop.value = loop
    assert device_json({"Name": loop, "Guid": [loop, "g"]}) == {"Guid": ["g"]}


def test_variants_anywhere_are_unwrapped() -> None:
    wrapped = {k: FakeVariant("v", v) for k, v in WEBCAM_DBUS.items()}
    wrapped["Release"] = FakeVariant(
        "aa{sv}", [{k: FakeVariant("v", v) for k, v in RELEASE_124_DBUS.items()}]
    )
    assert_same(device_json(wrapped), {**WEBCAM_JSON, "Releases": [RELEASE_124_JSON]})


# ------------------------------------------------------------------ the real daemon

FWUPD_FLAGS = ["--json", "--no-metadata-check", "--no-remote-check"]


def _daemon_missing() -> str | None:
    reason = sandbox_prerequisites()
    if reason:
        return reason
    if shutil.which("fwupdmgr") is None:
        return "no fwupdmgr"
    return None


class Daemon:
    def __init__(self, directory: Path, bus_address: str) -> None:
        self.directory = directory
        self.bus_address = bus_address
        self.env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus_address}

    def fwupdmgr(self, *args: str, ok: bool = True) -> tuple[int, Any]:
        r = subprocess.run(
            ["fwupdmgr", *FWUPD_FLAGS, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if ok:
            assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.returncode, json.loads(r.stdout)

    def dbus(self) -> dict[str, Any]:
        """What the daemon itself answers, via dbus-next, values unwrapped one level
        (as the brief's ``{k: v.value}``; nested Variants are left to fwupd_json)."""
        return asyncio.run(_ask_daemon(self.bus_address))


async def _ask_daemon(bus_address: str) -> dict[str, Any]:
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.errors import DBusError

    def unwrap(d: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.value for k, v in d.items()}

    bus = await MessageBus(bus_address=bus_address, negotiate_unix_fd=True).connect()
    try:
        intro = await bus.introspect("org.freedesktop.fwupd", "/")
        obj = bus.get_proxy_object("org.freedesktop.fwupd", "/", intro)
        fw: Any = obj.get_interface("org.freedesktop.fwupd")
        devices = [unwrap(d) for d in await fw.call_get_devices()]
        out: dict[str, Any] = {"devices": devices, "releases": {}, "upgrades": {}}
        for d in devices:
            for key, call in (
                ("releases", fw.call_get_releases),
                ("upgrades", fw.call_get_upgrades),
            ):
                try:
                    out[key][d["DeviceId"]] = [unwrap(r) for r in await call(d["DeviceId"])]
                except DBusError as e:
                    out[key][d["DeviceId"]] = error_json_from_dbus(e.type, e.text)
        try:
            await fw.call_get_releases("0" * 40)
        except DBusError as e:
            out["missing"] = error_json_from_dbus(e.type, e.text)
        return out
    finally:
        bus.disconnect()  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    """dom0's real fwupd in a sandbox of its own, after a refresh through the project's own
    path: the webcam at 1.2.2 with the sandbox LVFS's releases loaded."""
    reason = _daemon_missing()
    if reason:
        pytest.skip(reason)
    directory = short_tmpdir("qfwj")
    try:
        sandbox = up(directory)
        r = manager(sandbox, "refresh")
        assert r.returncode == 0, r.stdout + r.stderr
        yield Daemon(directory, sandbox.bus_address("dom0"))
    finally:
        sandbox_cli("down", "--dir", str(directory))
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def answers(daemon: Daemon) -> dict[str, Any]:
    return daemon.dbus()


def by_id(devices: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["DeviceId"]: d for d in devices}


def test_daemon_sends_the_webcam_we_test_with(answers: dict[str, Any]) -> None:
    (webcam,) = answers["devices"]  # the sandbox disables every plugin but "test"
    assert isinstance(webcam["Created"], int) and webcam["Created"] > 0
    assert_same({**webcam, "Created": WEBCAM_DBUS["Created"]}, WEBCAM_DBUS)
    upgrades = answers["upgrades"][WEBCAM_ID]
    assert [r["Version"] for r in upgrades] == ["1.2.4", "1.2.3"]
    assert isinstance(upgrades[0]["Created"], int)
    # the offline tests' release has the keys and types this daemon sends
    assert {k: type(v) for k, v in upgrades[0].items()}.keys() >= {
        k for k in RELEASE_124_DBUS if k not in ("Locations", "Metadata")
    }


def test_get_devices_is_fwupdmgrs(daemon: Daemon, answers: dict[str, Any]) -> None:
    _, printed = daemon.fwupdmgr("get-devices")
    theirs = by_id(printed["Devices"])
    assert set(theirs) == set(by_id(answers["devices"]))
    for raw in answers["devices"]:
        device = theirs[raw["DeviceId"]]
        without = {k: v for k, v in device.items() if k != "Releases"}
        assert_same(device_json(raw), without)
        # fwupdmgr nests GetReleases (an error leaves the key out)
        releases = answers["releases"][raw["DeviceId"]]
        assert isinstance(releases, list) and releases
        assert_same(device_json(raw, releases=releases), device)


def test_get_updates_is_fwupdmgrs(daemon: Daemon, answers: dict[str, Any]) -> None:
    _, printed = daemon.fwupdmgr("get-updates")
    theirs = by_id(printed["Devices"])
    # fwupdmgr lists the devices with the "supported" flag whose GetUpgrades succeeded
    expected = {
        raw["DeviceId"]
        for raw in answers["devices"]
        if "supported" in device_json(raw).get("Flags", [])
        and isinstance(answers["upgrades"][raw["DeviceId"]], list)
    }
    assert set(theirs) == expected == {WEBCAM_ID}
    for device_id in expected:
        raw = by_id(answers["devices"])[device_id]
        assert_same(device_json(raw, releases=answers["upgrades"][device_id]), theirs[device_id])


def test_get_releases_is_fwupdmgrs(daemon: Daemon, answers: dict[str, Any]) -> None:
    for device_id, releases in answers["releases"].items():
        _, printed = daemon.fwupdmgr("get-releases", device_id)
        assert_same([release_json(r) for r in releases], printed["Releases"])
        assert len(printed["Releases"]) == 2


def test_errors_are_fwupdmgrs(daemon: Daemon, answers: dict[str, Any]) -> None:
    missing = "0" * 40
    rc, printed = daemon.fwupdmgr("get-releases", missing, ok=False)
    assert rc == 3  # EXIT_NOT_FOUND
    # fwupdmgr looks the device up itself first, so the message is its own ...
    assert_same(printed, error_json("FwupdError", 8, f"failed to find {missing}"))
    # ... while the daemon's NotFound maps to the same domain and code
    assert answers["missing"] == error_json("FwupdError", 8, f"device ID {missing} was not found")
    rc, printed = daemon.fwupdmgr("get-downgrades", WEBCAM_ID, ok=False)
    assert rc == 1
    assert_same(printed, error_json("FwupdError", ERROR_INVALID_ARGS, "Command not found"))
