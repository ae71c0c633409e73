"""broker.selection: naming a device (id, prefix, GUID, QUBE:) and fwupdmgr's --filter."""

from __future__ import annotations

import pytest

from broker.errors import BrokerError, ConfigError, NotFound
from broker.fwupd import FLAG_INTERNAL, FLAG_NEEDS_REBOOT, FLAG_UPDATABLE, Device
from broker.routing import QubeDevice
from broker.selection import DeviceFilter, select_all, select_one

WEBCAM = "b585990a-003e-5270-89d5-3705a17f9a43"


def qd(qube: str, device_id: str, flags: int, guid: str = WEBCAM) -> QubeDevice:
    return QubeDevice(
        qube, Device(device_id, "d", "1", (guid,), "v", ("USB:0x1",), "p", (), flags)
    )


DEVICES = [
    qd("dom0", "aa" * 20, FLAG_INTERNAL | FLAG_UPDATABLE, "0000aaaa-0000-0000-0000-000000000000"),
    qd("sys-usb", "ab" * 20, FLAG_UPDATABLE),
    qd("sys-usb", "cd" * 20, FLAG_UPDATABLE | FLAG_NEEDS_REBOOT),
]


@pytest.mark.parametrize(
    ("selector", "index"),
    [("aaaa", 0), ("AAAA", 0), ("ab" * 20, 1), ("cd", 2), ("sys-usb:cd", 2),
     ("0000AAAA-0000-0000-0000-000000000000", 0)],
)  # fmt: skip
def test_a_device_is_named_by_id_prefix_or_guid_in_any_case(selector: str, index: int) -> None:
    assert select_one(DEVICES, selector) == DEVICES[index]


def test_a_guid_two_devices_share_names_both_and_one_is_ambiguous() -> None:
    assert select_all(DEVICES, WEBCAM) == DEVICES[1:]
    with pytest.raises(BrokerError, match="matches 2 devices: give more of the id, or QUBE:ID"):
        select_one(DEVICES, WEBCAM)


@pytest.mark.parametrize("selector", ["deadbeef", "", "dom0:ab", "dom0:"])
def test_nothing_named_is_not_found(selector: str) -> None:
    with pytest.raises(NotFound, match="no device matches"):
        select_one(DEVICES, selector)


@pytest.mark.parametrize(
    ("text", "kept"),
    [(None, [0, 1, 2]), ("updatable", [0, 1, 2]), ("~internal", [1, 2]),
     ("updatable,~internal,needs-reboot", [2]), ("internal , ~needs-reboot", [0])],
)  # fmt: skip
def test_filter_keeps_devices_by_flags_as_fwupdmgr(text: str | None, kept: list[int]) -> None:
    assert DeviceFilter.parse(text).apply(DEVICES) == [DEVICES[i] for i in kept]


def test_an_unknown_filter_flag_is_named() -> None:
    with pytest.raises(ConfigError, match="--filter: unknown device flag '~updateable'"):
        DeviceFilter.parse("~updateable")
