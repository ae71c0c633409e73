"""Fuzz target: sys-usb's JSON replies as dom0 reads them (broker.usbvm): GetDevices
(parse_devices_reply), GetUpgrades & co. (parse_offers_reply, then broker.offers.decide
against a small verified catalog) and GetResults (parse_results_reply); then what the
CLI renders from them with --json (broker.fwupd_json, which must read any shape without
raising, and broker.sanitize.printable_tree), as json.dumps would print it.

The first byte picks the reply; the rest is sys-usb's stdout.
"""

from __future__ import annotations

import json
import types
from typing import Any

import harness

with harness.instrumented():
    from broker import fwupd_json
    from broker.cli import _release_dbus
    from broker.config import Limits
    from broker.fwupd import Device
    from broker.metadata import Catalog, Release
    from broker.offers import decide
    from broker.routing import QubeDevice
    from broker.sanitize import printable_tree
    from broker.usbvm import parse_devices_reply, parse_offers_reply, parse_results_reply

# counts small enough for the fuzzer's inputs to pass them (the checks are the same); the
# reply's byte cap stays the real one, so that a regression replays as sys-usb could send it
LIMITS = Limits(max_devices=8, max_offered_releases=8)
QUBE = "sys-usb"
ID_1, ID_2 = "0123456789abcdef0123456789abcdef01234567", "f" * 40
GUID = "2082b5e0-7a64-478a-b1b2-e3404fab6dad"
SHA_1, SHA_2 = "a" * 64, "b" * 64


def _release(version: str, sha256: str) -> Release:
    return Release(
        remote_id="lvfs", component_id="com.example.firmware", name="A", summary="",
        version=version, guids=(GUID,), url=f"https://fwupd.org/downloads/{version}.cab",
        filename=f"{version}.cab", sha256=sha256, size=10, urgency="high", description="",
    )  # fmt: skip


CATALOG = Catalog("lvfs", (_release("1.0", SHA_1), _release("2.0", SHA_2)))
DEVICES = [
    QubeDevice(QUBE, Device(i, "Dev", "0.9", (GUID,), "V", ("USB:0x1",), "test", (), 2 | 32))
    for i in (ID_1, ID_2)
]


def _print(doc: Any) -> None:
    json.dumps(printable_tree(doc))


def devices(reply: bytes) -> None:
    for d in parse_devices_reply(reply, LIMITS):
        _print(fwupd_json.device_json(d.dbus_form(), qube=QUBE))
        _print(d.to_json())


def offers(reply: bytes) -> None:
    found = parse_offers_reply(reply, [ID_1, ID_2], LIMITS)
    by_key = {qd.key: v for qd in DEVICES if isinstance(v := found[qd.device.device_id], list)}
    decided = decide([CATALOG], DEVICES, by_key)
    app = types.SimpleNamespace(answered=decided.offers)
    for qd in DEVICES:
        kept = decided.releases.get(qd.key, [])
        raws = [_release_dbus(app, qd, r) for r in kept]  # type: ignore[arg-type]
        _print(fwupd_json.device_json(qd.device.dbus_form(), releases=raws, qube=QUBE))
        for offered in by_key.get(qd.key, []):
            _print(fwupd_json.release_json(offered.raw))
    for refusal in decided.refused:
        str(refusal)


def results(reply: bytes) -> None:
    raw = parse_results_reply(reply, ID_1, LIMITS)
    if raw is not None:
        _print(fwupd_json.device_json(raw, qube=QUBE))


KINDS = (devices, offers, results)


def one(data: bytes) -> None:
    if data:
        KINDS[data[0] % len(KINDS)](data[1:])


if __name__ == "__main__":
    harness.main(one)
