"""broker.routing: each device once, owned by the daemon whose fwupd updates it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from broker.fwupd import Device
from broker.routing import DOM0, USB_PLUGINS, QubeDevice, is_usb, route

USBVM = "sys-usb"


def dev(
    n: int, vendor_ids: tuple[str, ...] = ("PCI:0x8086",), plugin: str = "uefi_capsule"
) -> Device:
    return Device(
        device_id=f"{n:040x}",
        name=f"device {n}",
        version="1.0",
        guids=(),
        vendor="Vendor",
        vendor_ids=vendor_ids,
        plugin=plugin,
        protocols=(),
        flags=2,
    )


INTERNAL = dev(1)
WEBCAM = dev(2, ("USB:0x046D",), "uvc")
DONGLE = dev(3, (), "logitech_hidpp")
ONLY_DOM0 = dev(4)
ONLY_USBVM = dev(5, ("USB:0x1234",), "dfu")


def _table(routed: list[QubeDevice]) -> list[tuple[str, str]]:
    return sorted((q.qube, q.device.name) for q in routed)


@pytest.mark.parametrize(
    ("dom0", "usbvm_devices", "usbvm", "expected"),
    [
        # only dom0 reports it -> dom0
        ([ONLY_DOM0], [], USBVM, [(DOM0, "device 4")]),
        # a USB device that only dom0 reports stays dom0's (it reports it, it updates it)
        ([WEBCAM], [], USBVM, [(DOM0, "device 2")]),
        # only the USB qube reports it -> the USB qube
        ([], [ONLY_USBVM], USBVM, [(USBVM, "device 5")]),
        ([], [INTERNAL], USBVM, [(USBVM, "device 1")]),
        # both report it, USB vendor id -> USB qube only
        ([WEBCAM], [WEBCAM], USBVM, [(USBVM, "device 2")]),
        # both report it, USB by plugin -> USB qube only
        ([DONGLE], [DONGLE], USBVM, [(USBVM, "device 3")]),
        # both report it, not USB -> dom0 only
        ([INTERNAL], [INTERNAL], USBVM, [(DOM0, "device 1")]),
        # no USB qube: everything is dom0's, whatever a USB qube list says
        ([INTERNAL, WEBCAM], [WEBCAM, ONLY_USBVM], None, [(DOM0, "device 1"), (DOM0, "device 2")]),
        ([], [ONLY_USBVM], None, []),
        # a mix
        (
            [INTERNAL, WEBCAM, ONLY_DOM0],
            [WEBCAM, INTERNAL, ONLY_USBVM],
            USBVM,
            [(DOM0, "device 1"), (DOM0, "device 4"), (USBVM, "device 2"), (USBVM, "device 5")],
        ),
    ],
)
def test_route_table(
    dom0: list[Device],
    usbvm_devices: list[Device],
    usbvm: str | None,
    expected: list[tuple[str, str]],
) -> None:
    routed = route(dom0, usbvm_devices, usbvm)
    assert _table(routed) == sorted(expected)
    # each device once: no key twice, no DeviceId under two qubes
    ids = [q.device.device_id for q in routed]
    assert len(ids) == len(set(ids))


def test_route_keeps_the_reporting_daemons_own_record() -> None:
    usb_copy = replace(WEBCAM, version="2.0")
    (routed,) = route([WEBCAM], [usb_copy], USBVM)
    assert routed.qube == USBVM
    assert routed.device is usb_copy
    assert routed.key == (USBVM, WEBCAM.device_id)


def test_route_lists_a_device_once_when_the_copies_disagree_usb_in_usbvm() -> None:
    internal_claimed = replace(INTERNAL, vendor_ids=("USB:0x046D",))
    routed = route([INTERNAL], [internal_claimed], USBVM)
    assert len(routed) == 1


def test_route_lists_a_device_once_when_the_copies_disagree_usb_in_dom0() -> None:
    stripped = replace(WEBCAM, vendor_ids=(), plugin="uvc")
    routed = route([WEBCAM], [stripped], USBVM)
    assert len(routed) == 1


@pytest.mark.parametrize(
    ("vendor_ids", "plugin", "expected"),
    [
        (("USB:0x046D",), "uvc", True),
        (("usb:0x046d",), "", True),
        (("PCI:0x8086", "USB:0x1234"), "", True),
        (("PCI:0x8086",), "uefi_capsule", False),
        ((), "", False),
        (("XUSB:0x1",), "", False),
        (("PCI:USB:0x1",), "", False),
        ((), "dfu", True),
        ((), "logitech_hidpp", True),
        ((), "DFU", False),  # plugin names are exact
        ((), "usb", False),
    ],
)
def test_is_usb(vendor_ids: tuple[str, ...], plugin: str, expected: bool) -> None:
    assert is_usb(dev(9, vendor_ids, plugin)) is expected


@pytest.mark.parametrize("plugin", sorted(USB_PLUGINS))
def test_every_usb_plugin_counts_as_usb(plugin: str) -> None:
    assert is_usb(dev(9, (), plugin))
