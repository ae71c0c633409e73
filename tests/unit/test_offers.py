"""broker.offers: what a daemon offers, held against dom0's verified catalog; and dom0's
validation of sys-usb's offers reply (broker.usbvm.parse_offers_reply)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.config import Limits
from broker.errors import FormatError, LimitExceeded
from broker.fwupd import Device, OfferedRelease, release_from_dbus
from broker.metadata import Catalog, Release
from broker.offers import OfferRefused, decide, match_offer
from broker.routing import QubeDevice
from broker.usbvm import parse_offers_reply

GUID_A = "2082b5e0-7a64-478a-b1b2-e3404fab6dad"
GUID_B = "12345678-1234-5678-1234-567812345678"
SHA_1, SHA_2, SHA_3 = "a" * 64, "b" * 64, "c" * 64
ID_1, ID_2 = "1" * 40, "2" * 40


def release(
    version: str, sha256: str, guids: tuple[str, ...] = (GUID_A,), cid: str = "c.a"
) -> Release:
    return Release(
        remote_id="lvfs", component_id=cid, name="A", summary="", version=version,
        guids=guids, url=f"https://fwupd.org/downloads/{version}.cab",
        filename=f"{version}.cab", sha256=sha256, size=10, urgency="high", description="",
    )  # fmt: skip


CATALOG = Catalog(
    "lvfs",
    (
        release("1.0", SHA_1),
        release("2.0", SHA_2),
        release("9.0", SHA_3, guids=(GUID_B,), cid="c.b"),
    ),
)


def qd(device_id: str = ID_1, guids: tuple[str, ...] = (GUID_A.upper(),)) -> QubeDevice:
    device = Device(device_id, "Dev", "0.9", guids, "V", ("USB:0x1",), "test", (), 2 | 32)
    return QubeDevice("sys-usb", device)


def offer(version: str, *checksums: str, cid: str = "c.a", remote: str = "lvfs") -> OfferedRelease:
    return OfferedRelease(cid, version, checksums, remote)


def test_an_offer_is_dom0s_release_found_by_sha256_guid_component_and_version() -> None:
    found = match_offer([CATALOG], qd(), offer("2.0", "d" * 40, SHA_2))
    assert found is CATALOG.releases[1]


@pytest.mark.parametrize(
    ("made", "cause"),
    [
        (offer("2.0", "d" * 40), "it names no sha256 checksum"),
        (offer("2.0", "e" * 64), "holds no release with sha256 eeeeeeeeeeeeeeee"),
        (offer("9.0", SHA_3, cid="c.b"), "holds sha256 cccccccccccccccc… for other devices only"),
        (offer("1.0", SHA_2), "names that cab c.a 2.0"),
        (offer("2.0", SHA_2, cid="c.other"), "names that cab c.a 2.0"),
        (offer("2.0", SHA_2, remote="vendor"), "remote 'vendor' has no metadata dom0 verified"),
    ],
)
def test_offers_dom0s_catalog_does_not_bind_are_refused(made: OfferedRelease, cause: str) -> None:
    with pytest.raises(OfferRefused, match=cause):
        match_offer([CATALOG], qd(), made)


def test_decide_keeps_the_owners_order_and_lists_each_refusal() -> None:
    a, b = qd(ID_1), qd(ID_2, (GUID_B,))
    decided = decide(
        [CATALOG],
        [a, b],
        {
            a.key: [offer("2.0", SHA_2), offer("7.7", "f" * 64), offer("1.0", SHA_1)],
            b.key: [offer("1.0", SHA_1)],
        },
    )
    assert [r.version for r in decided.releases[a.key]] == ["2.0", "1.0"]
    assert b.key not in decided.releases
    assert [(r.device.key, r.offer.version) for r in decided.refused] == [
        (a.key, "7.7"),
        (b.key, "1.0"),
    ]
    text = str(decided.refused[0])
    assert text.startswith(f"sys-usb: Dev ({ID_1[:12]}): offered c.a 7.7, refused: ")


def test_release_from_dbus_splits_fwupds_comma_joined_checksums() -> None:
    raw = {"AppstreamId": "c.a", "Version": "2.0", "RemoteId": "lvfs",
           "Checksum": f"{'D' * 40},{SHA_2.upper()}", "Urgency": 2}  # fmt: skip
    assert release_from_dbus(raw) == offer("2.0", "d" * 40, SHA_2)
    assert release_from_dbus(raw).sha256s == (SHA_2,)


# --------------------------------------------------------------------------- sys-usb's reply
LIMITS = Limits()


def reply(offers: Any) -> bytes:
    return json.dumps({"offers": offers}).encode()


def good(version: str = "2.0") -> dict[str, Any]:
    return {"AppstreamId": "c.a", "Version": version, "RemoteId": "lvfs",
            "Checksum": ["d" * 40, SHA_2]}  # fmt: skip


def test_offers_reply_per_asked_device() -> None:
    parsed = parse_offers_reply(
        reply({ID_1: {"releases": [good()]}, ID_2: {"error": "no \x1b[2J releases"}}),
        [ID_1, ID_2, "3" * 40],
        LIMITS,
    )
    assert parsed[ID_1] == [offer("2.0", "d" * 40, SHA_2)]
    assert parsed[ID_2] == "no ?[2J releases"
    assert parsed["3" * 40] == "sys-usb did not answer for this device"


@pytest.mark.parametrize(
    ("raw", "error", "cause"),
    [
        (b"\xff", FormatError, "not valid JSON"),
        (b"[]", FormatError, "not an object with an offers object"),
        (reply({"9" * 40: {"releases": []}}), FormatError, "did not ask about"),
        (reply({ID_1: {"releases": {}}}), FormatError, "releases is not a list"),
        (reply({ID_1: []}), FormatError, "not {releases} or {error}"),
        (reply({ID_1: {"releases": [], "error": "x"}}), FormatError, "not {releases} or {error}"),
        (reply({ID_1: {"releases": ["x"]}}), FormatError, "a release is not an object"),
        (reply({ID_1: {"releases": [{**good(), "Checksum": "d" * 64}]}}), FormatError,
         "Checksum is not a short list"),
        (reply({ID_1: {"releases": [{**good(), "Checksum": ["D" * 64]}]}}), FormatError,
         "malformed Checksum"),
        (reply({ID_1: {"releases": [{**good(), "Checksum": ["d" * 63]}]}}), FormatError,
         "malformed Checksum"),
        (reply({ID_1: {"releases": [{**good(), "Checksum": [SHA_2] * 9}]}}), FormatError,
         "Checksum is not a short list"),
        (reply({ID_1: {"releases": [good("1.0\n")]}}), FormatError, "malformed Version"),
        (reply({ID_1: {"releases": [{**good(), "AppstreamId": "../x"}]}}), FormatError,
         "malformed AppstreamId"),
        (reply({ID_1: {"releases": [{**good(), "RemoteId": "LVFS"}]}}), FormatError,
         "malformed RemoteId"),
        (reply({ID_1: {"releases": [good()] * 1025}}), LimitExceeded, "more than 1024 releases"),
        (b" " * (LIMITS.reply_max_bytes + 1), LimitExceeded, "too large"),
    ],
)  # fmt: skip
def test_hostile_offers_replies_are_refused(raw: bytes, error: type[Exception], cause: str) -> None:
    with pytest.raises(error, match=cause):
        parse_offers_reply(raw, [ID_1], LIMITS)


def test_decide_orders_by_fwupds_rules_and_judges_a_repeated_offer_once() -> None:
    """A (semi-trusted) daemon's order is not taken: newest first by fwupd's version rules
    (1.10 after 1.9), and an offer repeated a thousand times is one decision."""
    catalog = Catalog(
        "lvfs", (release("1.9", SHA_1), release("1.10", SHA_2), release("1.2", SHA_3))
    )
    a = qd()
    forged = offer("6.6", "e" * 64)
    decided = decide(
        [catalog],
        [a],
        {a.key: [offer("1.2", SHA_3), offer("1.9", SHA_1), *[forged] * 1000, offer("1.10", SHA_2)]},
    )
    assert [r.version for r in decided.releases[a.key]] == ["1.10", "1.9", "1.2"]
    assert [r.offer for r in decided.refused] == [forged]
