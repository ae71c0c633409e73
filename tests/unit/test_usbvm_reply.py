"""broker.usbvm.parse_devices_reply: sys-usb's device list is hostile JSON to dom0."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.config import Limits
from broker.errors import BrokerError, FormatError, LimitExceeded
from broker.fwupd import Device, OfferedRelease
from broker.usbvm import parse_devices_reply, parse_offers_reply, parse_results_reply
from tests.properties import assert_user_message, expect_only_our_errors

LIMITS = Limits()
GOOD = Device(
    device_id="0123456789abcdef0123456789abcdef01234567",
    name="Unifying Receiver",
    version="RQR12.11_B0032",
    guids=("9d131a0c-a606-580f-8eda-80587250b8d6", "279ed287-3607-549e-bacc-f873bb9838c4"),
    vendor="Logitech, Inc.",
    vendor_ids=("USB:0x046D",),
    plugin="logitech_hidpp",
    protocols=("com.logitech.unifying", "com.logitech.unifyingsigned"),
    flags=2 | (1 << 8),
)
MINIMAL = Device("f" * 40, "", "1", (), "", (), "", (), 0)


def _reply(*devices: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"devices": list(devices), **extra}).encode()


def _with(**fields: Any) -> bytes:
    d = GOOD.to_json()
    for k, v in fields.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    return _reply(d)


_DROP = object()


def _no_control_or_format(text: str) -> bool:
    return all(unicodedata.category(c) not in ("Cc", "Cf") for c in text)


# --------------------------------------------------------------------------- accepted
def test_valid_reply_round_trips() -> None:
    assert parse_devices_reply(_reply(GOOD.to_json(), MINIMAL.to_json()), LIMITS) == [
        GOOD,
        MINIMAL,
    ]


def test_empty_device_list() -> None:
    assert parse_devices_reply(b'{"devices": []}', LIMITS) == []


def test_optional_fields_default_and_unknown_keys_are_ignored() -> None:
    raw = {"DeviceId": "a" * 40, "Version": "2.0", "Evil": {"nested": [1, 2]}}
    (d,) = parse_devices_reply(_reply(raw, extra="ignored"), LIMITS)
    assert d == Device("a" * 40, "", "2.0", (), "", (), "", (), 0)


def test_largest_flags_accepted() -> None:
    (d,) = parse_devices_reply(_with(Flags=2**64 - 1), LIMITS)
    assert d.flags == 2**64 - 1


# --------------------------------------------------------------------------- refused
@pytest.mark.parametrize("reply", [b"", b"not json", b"\xff\xfe", b'{"devices": [', b"{'a': 1}"])
def test_not_json_is_refused(reply: bytes) -> None:
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_devices_reply(reply, LIMITS)


@pytest.mark.parametrize(
    "doc",
    [[], "devices", 1, None, {}, {"devices": {}}, {"devices": "a"}, {"devices": None}],
)
def test_not_an_object_with_a_devices_list_is_refused(doc: object) -> None:
    with pytest.raises(FormatError, match="not an object with a devices list"):
        parse_devices_reply(json.dumps(doc).encode(), LIMITS)


def test_too_many_devices_is_refused() -> None:
    limits = Limits(max_devices=2)
    distinct = [{**GOOD.to_json(), "DeviceId": f"{i:040x}"} for i in range(3)]
    assert len(parse_devices_reply(_reply(*distinct[:2]), limits)) == 2
    with pytest.raises(LimitExceeded, match="more than 2 devices"):
        parse_devices_reply(_reply(*distinct), limits)


@pytest.mark.parametrize("device", [None, 1, "dev", [GOOD.to_json()]])
def test_a_device_that_is_not_an_object_is_refused(device: object) -> None:
    with pytest.raises(FormatError, match="a device is not an object"):
        parse_devices_reply(json.dumps({"devices": [device]}).encode(), LIMITS)


@pytest.mark.parametrize(
    "value",
    [
        "0" * 39,
        "0" * 41,
        "A" * 40,
        "g" * 40,
        "../" + "0" * 37,
        " " + "0" * 39,
        "",
        None,
        40,
        _DROP,
        pytest.param(
            "0" * 40 + "\n",
            marks=(),
        ),
    ],
)
def test_bad_device_id_is_refused(value: object) -> None:
    with pytest.raises(FormatError, match="malformed DeviceId"):
        parse_devices_reply(_with(DeviceId=value), LIMITS)


@pytest.mark.parametrize(
    "value",
    [
        "1 2",
        "1.0 beta",
        "1.0\x1b[2J",
        "\x1b]0;pwned\x07",
        "1.0\x00",
        "1.0\u202e",
        "",
        "v" * 65,
        "1/2",
        None,
        1.0,
        _DROP,
        pytest.param(
            "1.0\n",
            marks=(),
        ),
    ],
)
def test_bad_version_is_refused(value: object) -> None:
    with pytest.raises(FormatError, match="malformed Version"):
        parse_devices_reply(_with(Version=value), LIMITS)


@pytest.mark.parametrize(
    "value",
    [
        ["not-a-guid"],
        ["9D131A0C-A606-580F-8EDA-80587250B8D6"],
        ["9d131a0ca606580f8eda80587250b8d6"],
        ["{9d131a0c-a606-580f-8eda-80587250b8d6}"],
        [None],
        [1],
        pytest.param(
            ["9d131a0c-a606-580f-8eda-80587250b8d6\n"],
            marks=(),
        ),
    ],
)
def test_bad_guid_is_refused(value: object) -> None:
    with pytest.raises(FormatError, match="malformed Guid"):
        parse_devices_reply(_with(Guid=value), LIMITS)


@pytest.mark.parametrize("value", ["9d131a0c-a606-580f-8eda-80587250b8d6", {}, None, 1])
def test_guid_that_is_not_a_list_is_refused(value: object) -> None:
    with pytest.raises(FormatError, match="Guid is not a short list"):
        parse_devices_reply(_with(Guid=value), LIMITS)


def test_guid_list_too_long_is_refused() -> None:
    guid = "9d131a0c-a606-580f-8eda-80587250b8d6"
    assert len(parse_devices_reply(_with(Guid=[guid] * 64), LIMITS)[0].guids) == 64
    with pytest.raises(FormatError, match="Guid is not a short list"):
        parse_devices_reply(_with(Guid=[guid] * 65), LIMITS)


@pytest.mark.parametrize("value", [-1, True, False, 2**64, 1.0, 2.5, "2", None, [2]])
def test_bad_flags_are_refused(value: object) -> None:
    with pytest.raises(FormatError, match="Flags is not a 64-bit unsigned integer"):
        parse_devices_reply(_with(Flags=value), LIMITS)


@pytest.mark.parametrize("field", ["Name", "Vendor"])
def test_overlong_or_non_string_name_is_refused(field: str) -> None:
    assert (
        len(getattr(parse_devices_reply(_with(**{field: "n" * 256}), LIMITS)[0], field.lower()))
        == 256
    )
    for value in ("n" * 257, 5, None, ["n"]):
        with pytest.raises(FormatError, match=f"{field} is not a string of at most 256 chars"):
            parse_devices_reply(_with(**{field: value}), LIMITS)


@pytest.mark.parametrize(
    "value",
    [
        "foo/bar",
        "../uefi",
        "dfu bar",
        "dfu\x1b",
        "p" * 129,
        5,
        None,
        pytest.param(
            "dfu\n",
            marks=(),
        ),
    ],
)
def test_bad_plugin_is_refused(value: object) -> None:
    with pytest.raises(FormatError, match="malformed Plugin"):
        parse_devices_reply(_with(Plugin=value), LIMITS)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("VendorId", "USB:0x046D,PCI/0x1", "malformed VendorId"),
        ("VendorId", "USB:0x046D\n", "malformed VendorId"),
        ("VendorId", "x" * 513, "VendorId is not a string"),
        ("VendorId", ["USB:0x046D"], "VendorId is not a string"),
        ("Protocol", "a b", "malformed Protocol"),
        ("Protocol", "com.x\x1b[2J", "malformed Protocol"),
        ("Protocol", 1, "Protocol is not a string"),
    ],
)
def test_bad_vendor_id_or_protocol_is_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_devices_reply(_with(**{field: value}), LIMITS)


@pytest.mark.parametrize(
    "name",
    [
        "\x1b]0;pwned\x07",
        "\x1b[2J",
        "Evil \u202egnp.exe",
        "a\x9b31mred",
        "zero\u200bwidth\u200djoin\ufeff",
        "nul\x00del\x7f",
        "line\u2028sep\nnew\rret\ttab",
        "\u2066isolate\u2069",
    ],
)
def test_escape_sequences_in_names_come_out_printable(name: str) -> None:
    (d,) = parse_devices_reply(_with(Name=name, Vendor=name), LIMITS)
    for text in (d.name, d.vendor):
        assert _no_control_or_format(text), repr(text)
        assert len(text) == len(name)  # replaced one for one, not dropped
        assert "?" in text
    assert parse_devices_reply(_with(Name="Caf\u00e9 \u65e5\u672c"), LIMITS)[0].name == (
        "Caf\u00e9 \u65e5\u672c"
    )


def test_reply_over_the_cap_is_refused_before_parsing() -> None:
    limits = Limits(reply_max_bytes=100)
    ok = _reply(MINIMAL.to_json())
    assert len(ok) <= 200
    # over the cap and not even JSON: the size is refused first
    with pytest.raises(LimitExceeded, match="sys-usb reply is too large"):
        parse_devices_reply(b"x" * 101, limits)
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_devices_reply(b"x" * 100, limits)
    big_valid = _reply(*[MINIMAL.to_json()] * 1000)
    with pytest.raises(LimitExceeded, match="too large"):
        parse_devices_reply(big_valid, Limits(reply_max_bytes=len(big_valid) - 1))


@pytest.mark.parametrize(
    "reply",
    [
        b"[" * 200_000 + b"]" * 200_000,
        b'{"devices": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        b'{"devices": [{"Guid": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}]}",
    ],
)
def test_deeply_nested_json_is_a_format_error(reply: bytes) -> None:
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_devices_reply(reply, LIMITS)


# --------------------------------------------------------------------------- properties
@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=1024))
def test_arbitrary_bytes_only_raise_broker_errors(reply: bytes) -> None:
    with expect_only_our_errors():
        parse_devices_reply(reply, LIMITS)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=5,
)
_FIELDS = ["DeviceId", "Name", "Version", "Guid", "Vendor", "VendorId", "Plugin", "Protocol"]


def _field_values(name: str) -> st.SearchStrategy[Any]:
    good = GOOD.to_json()[name]
    return st.one_of(st.just(good), st.text(max_size=60), _json)


_device = st.fixed_dictionaries(
    {},
    optional={
        **{f: _field_values(f) for f in _FIELDS},
        "Flags": st.one_of(st.integers(min_value=-(2**65), max_value=2**65), _json),
    },
)


@settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.one_of(_json, st.fixed_dictionaries({"devices": st.lists(_device, max_size=3)})))
def test_structured_replies_only_raise_broker_errors(doc: object) -> None:
    try:
        devices = parse_devices_reply(json.dumps(doc).encode(), LIMITS)
    except BrokerError as e:
        assert_user_message(e)
        return
    for d in devices:
        assert isinstance(d.flags, int) and 0 <= d.flags < 2**64
        for text in (d.name, d.vendor, *d.vendor_ids, *d.protocols):
            assert _no_control_or_format(text), repr(text)


def test_a_device_id_listed_twice_is_refused() -> None:
    """Two copies of one device would be shown (and routed) as two devices."""
    one = Device("a" * 40, "cam", "1.0", (), "", ("USB:0x1",), "test", (), 2).to_json()
    other = {**one, "Version": "0.0.1"}
    with pytest.raises(FormatError, match=f"lists DeviceId {'a' * 40} twice"):
        parse_devices_reply(json.dumps({"devices": [one, other]}).encode(), Limits())


# --------------------------------------------------------------------------- exact refusals
def assert_refused(reply: bytes, message: str, error: type[BrokerError] = FormatError) -> None:
    """The whole message, not a part of it: what dom0 logs and shows about sys-usb."""
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        parse_devices_reply(reply, LIMITS)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"[]", "sys-usb reply is not an object with a devices list"),
        (_reply(None), "sys-usb reply: a device is not an object"),
        (_with(Guid="x"), "sys-usb reply: Guid is not a short list"),
        (_with(Flags=-1), "sys-usb reply: Flags is not a 64-bit unsigned integer"),
        (_with(Raw=[1]), "sys-usb reply: Raw is not an object"),
        (b"{", "sys-usb reply is not valid JSON"),
    ],
)
def test_device_reply_refusals_say_exactly_what(reply: bytes, message: str) -> None:
    assert_refused(reply, message)


def test_reply_over_the_cap_says_exactly_what() -> None:
    with pytest.raises(LimitExceeded, match=r"^sys-usb reply is too large$"):
        parse_devices_reply(b"{}" + b" " * 10, Limits(reply_max_bytes=11))


def test_several_vendor_ids_and_protocols_round_trip() -> None:
    (d,) = parse_devices_reply(
        _with(VendorId="USB:0x046D,PCI:0x8086", Protocol="a.b,c.d,e"), LIMITS
    )
    assert d.vendor_ids == ("USB:0x046D", "PCI:0x8086")
    assert d.protocols == ("a.b", "c.d", "e")


@pytest.mark.parametrize("field", ["VendorId", "Protocol"])
def test_vendor_id_and_protocol_are_capped_at_512_chars(field: str) -> None:
    at_cap = ",".join(["a" * 128] * 3 + ["b" * 125])  # tokens within their own cap
    assert len(at_cap) == 512
    parse_devices_reply(_with(**{field: at_cap}), LIMITS)
    assert_refused(
        _with(**{field: at_cap + "c"}),
        f"sys-usb reply: {field} is not a string of at most 512 chars",
    )


def test_raw_is_kept_beside_the_checked_fields_only_for_rendering() -> None:
    raw = {"Created": 1700000000, "Summary": "anything", "Name": "not what was checked"}
    (d,) = parse_devices_reply(_with(Raw=raw), LIMITS)
    assert d.raw == raw
    assert d.name == GOOD.name  # decisions read the checked fields, never Raw
    (d,) = parse_devices_reply(_reply(MINIMAL.to_json()), LIMITS)
    assert d.raw == {}


# --------------------------------------------------------------------------- offers
DEV_A, DEV_B, DEV_C = "a" * 40, "b" * 40, "c" * 40
SHA256 = "ab" * 32
SHA1 = "cd" * 20
SHA512 = "ef" * 64


def _release(**fields: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "AppstreamId": "com.example.Device.firmware",
        "Version": "1.2.3",
        "Checksum": [SHA1, SHA256],
        "RemoteId": "lvfs",
    }
    for k, v in fields.items():
        if v is _DROP:
            r.pop(k)
        else:
            r[k] = v
    return r


def _offers(offers: object, asked: list[str] | None = None, limits: Limits = LIMITS) -> Any:
    reply = json.dumps({"offers": offers}).encode()
    return parse_offers_reply(reply, [DEV_A] if asked is None else asked, limits)


def _offers_refused(
    offers: object, message: str, error: type[BrokerError] = FormatError, **kw: Any
) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        _offers(offers, **kw)


def test_offers_per_device_asked() -> None:
    raw = {"Description": "<p>x</p>", "Urgency": 3}
    got = _offers(
        {
            DEV_A: {"releases": [_release(Raw=raw), _release(Version="1.2.4", Checksum=[])]},
            DEV_B: {"error": "No upgrades for \x1b[2Jdevice"},
        },
        asked=[DEV_A, DEV_B, DEV_C],
    )
    assert got == {
        DEV_A: [
            OfferedRelease("com.example.Device.firmware", "1.2.3", (SHA1, SHA256), "lvfs"),
            OfferedRelease("com.example.Device.firmware", "1.2.4", (), "lvfs"),
        ],
        DEV_B: "No upgrades for ?[2Jdevice",
        DEV_C: "sys-usb did not answer for this device",
    }
    releases = got[DEV_A]
    assert releases[0].raw == raw and releases[1].raw == {}
    assert list(got) == [DEV_A, DEV_B, DEV_C]


def test_offers_accept_every_checksum_kind_up_to_eight() -> None:
    sums = [SHA1, SHA256, SHA512] + [f"{n:064x}" for n in range(5)]
    (release,) = _offers({DEV_A: {"releases": [_release(Checksum=sums)]}})[DEV_A]
    assert release.checksums == tuple(sums)
    _offers_refused(
        {DEV_A: {"releases": [_release(Checksum=[*sums, SHA1])]}},
        "sys-usb reply: Checksum is not a short list",
    )


def test_offers_at_the_release_cap_are_accepted_and_over_it_refused() -> None:
    limits = Limits(max_offered_releases=2)
    assert len(_offers({DEV_A: {"releases": [_release()] * 2}}, limits=limits)[DEV_A]) == 2
    _offers_refused(
        {DEV_A: {"releases": [_release()] * 3}},
        "sys-usb offers more than 2 releases for a device",
        LimitExceeded,
        limits=limits,
    )


def test_offer_error_is_capped_at_300_chars() -> None:
    assert _offers({DEV_A: {"error": "e" * 300}})[DEV_A] == "e" * 300
    _offers_refused(
        {DEV_A: {"error": "e" * 301}}, "sys-usb reply: error is not a string of at most 300 chars"
    )
    _offers_refused(
        {DEV_A: {"error": 1}}, "sys-usb reply: error is not a string of at most 300 chars"
    )


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "sys-usb reply is not an object with an offers object"),
        ({}, "sys-usb reply is not an object with an offers object"),
        ({"offers": [DEV_A]}, "sys-usb reply is not an object with an offers object"),
        ({"offers": {DEV_B: {"error": "x"}}},
         "sys-usb reply names a device dom0 did not ask about"),
        ({"offers": {DEV_A: []}}, "sys-usb reply: an offer entry is not {releases} or {error}"),
        ({"offers": {DEV_A: {}}}, "sys-usb reply: an offer entry is not {releases} or {error}"),
        (
            {"offers": {DEV_A: {"error": "x", "releases": []}}},
            "sys-usb reply: an offer entry is not {releases} or {error}",
        ),
        ({"offers": {DEV_A: {"other": []}}}, "sys-usb reply: releases is not a list"),
        ({"offers": {DEV_A: {"releases": {}}}}, "sys-usb reply: releases is not a list"),
        ({"offers": {DEV_A: {"releases": [None]}}}, "sys-usb reply: a release is not an object"),
        ({"offers": {DEV_A: {"releases": [_release(Checksum=_DROP)]}}},
         "sys-usb reply: Checksum is not a short list"),
        ({"offers": {DEV_A: {"releases": [_release(Checksum=SHA256)]}}},
         "sys-usb reply: Checksum is not a short list"),
        ({"offers": {DEV_A: {"releases": [_release(Raw="x")]}}},
         "sys-usb reply: Raw is not an object"),
    ],
)  # fmt: skip
def test_offers_refusals_say_exactly_what(doc: object, message: str) -> None:
    with pytest.raises(FormatError, match=f"^{re.escape(message)}$"):
        parse_offers_reply(json.dumps(doc).encode(), [DEV_A], LIMITS)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("AppstreamId", ".com.example"),
        ("AppstreamId", "a" * 256),
        ("AppstreamId", "com example"),
        ("AppstreamId", None),
        ("Version", "1.2\n"),
        ("Version", "1" * 65),
        ("Version", ""),
        ("Version", 1),
        ("Checksum", [SHA256.upper()]),
        ("Checksum", [SHA256[:-1]]),
        ("Checksum", ["0" * 96]),
        ("Checksum", [1]),
        ("RemoteId", "LVFS"),
        ("RemoteId", "-lvfs"),
        ("RemoteId", "l" * 65),
        ("RemoteId", _DROP),
    ],
)
def test_offered_release_fields_are_checked(field: str, value: object) -> None:
    with pytest.raises(FormatError, match=rf"^sys-usb reply: malformed {field}$"):
        _offers({DEV_A: {"releases": [_release(**{field: value})]}})


@pytest.mark.parametrize(
    ("field", "value"),
    [("AppstreamId", "a" * 255), ("Version", "1" * 64), ("RemoteId", "l" * 64),
     ("RemoteId", "0.x_y-z"), ("Version", "1.2+3~rc-A_b")],
)  # fmt: skip
def test_offered_release_fields_at_their_limits_are_accepted(field: str, value: str) -> None:
    (release,) = _offers({DEV_A: {"releases": [_release(**{field: value})]}})[DEV_A]
    assert value in (release.appstream_id, release.version, release.remote_id)


def test_offers_reply_over_the_cap_is_refused() -> None:
    with pytest.raises(LimitExceeded, match=r"^sys-usb reply is too large$"):
        parse_offers_reply(b'{"offers": {}}', [], Limits(reply_max_bytes=13))
    assert parse_offers_reply(b'{"offers": {}}', [], Limits(reply_max_bytes=14)) == {}


# --------------------------------------------------------------------------- results
def _results(doc: object, device_id: str = DEV_A) -> Any:
    return parse_results_reply(json.dumps(doc).encode(), device_id, LIMITS)


def test_results_about_the_device_asked() -> None:
    result = {"DeviceId": DEV_A, "UpdateState": 3, "UpdateError": "\x1b[2J"}
    assert _results({"result": result}) == result
    assert _results({"result": None}) is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "sys-usb reply is not an object with a result"),
        ({}, "sys-usb reply is not an object with a result"),
        ({"result": None, "more": 1}, "sys-usb reply is not an object with a result"),
        ({"result": [DEV_A]}, "sys-usb reply: result is not an object"),
        ({"result": "x"}, "sys-usb reply: result is not an object"),
        ({"result": {"DeviceId": DEV_B}}, "sys-usb reply: the result is about another device"),
        ({"result": {}}, "sys-usb reply: the result is about another device"),
    ],
)
def test_results_refusals_say_exactly_what(doc: object, message: str) -> None:
    with pytest.raises(FormatError, match=f"^{re.escape(message)}$"):
        _results(doc)


def test_results_reply_over_the_cap_is_refused() -> None:
    reply = b'{"result": null}'
    with pytest.raises(LimitExceeded, match=r"^sys-usb reply is too large$"):
        parse_results_reply(reply, DEV_A, Limits(reply_max_bytes=len(reply) - 1))
    with pytest.raises(FormatError, match=r"^sys-usb reply is not valid JSON$"):
        parse_results_reply(b"\xff", DEV_A, LIMITS)


def test_a_device_without_an_answer_does_not_hide_the_next() -> None:
    got = _offers({DEV_B: {"releases": []}}, asked=[DEV_A, DEV_B])
    assert got == {DEV_A: "sys-usb did not answer for this device", DEV_B: []}
