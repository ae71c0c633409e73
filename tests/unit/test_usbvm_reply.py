"""broker.usbvm.parse_devices_reply: sys-usb's device list is hostile JSON to dom0."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.config import Limits
from broker.errors import BrokerError, FormatError, LimitExceeded
from broker.fwupd import Device
from broker.usbvm import parse_devices_reply
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
