"""Which daemon owns which device (shared/ARCHITECTURE.md, "Routing by device type").

Devices are keyed by (qube, DeviceId): two daemons report the same DeviceId for the same
kind of device. A device belongs to the daemon that reports it; when both report it (no
USB isolation, or the sandbox's fake webcam in both daemons), USB devices go to the USB
qube and the rest to dom0. Without a USB qube everything is dom0's.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.fwupd import Device

DOM0 = "dom0"
# fwupd plugins that only ever drive USB-attached devices (vendor ids say USB: too)
USB_PLUGINS = frozenset(
    {
        "colorhug",
        "dfu",
        "ebitdo",
        "logitech_hidpp",
        "nitrokey",
        "steelseries",
        "synaptics_cxaudio",
        "wacom_usb",
    }
)


@dataclass(frozen=True)
class QubeDevice:
    qube: str
    device: Device

    @property
    def key(self) -> tuple[str, str]:
        return (self.qube, self.device.device_id)


def is_usb(device: Device) -> bool:
    return any(v.upper().startswith("USB:") for v in device.vendor_ids) or (
        device.plugin in USB_PLUGINS
    )


def route(
    dom0_devices: list[Device], usbvm_devices: list[Device], usbvm: str | None
) -> list[QubeDevice]:
    """The merged view: each device once, tagged with the qube whose fwupd updates it."""
    if usbvm is None:
        return [QubeDevice(DOM0, d) for d in dom0_devices]
    # one decision per DeviceId, made on dom0's copy: sys-usb's copy is hostile input and
    # must not be able to make a device appear twice or vanish by describing it otherwise
    usb_in_dom0 = {d.device_id: is_usb(d) for d in dom0_devices}
    merged: list[QubeDevice] = []
    in_usbvm = {d.device_id for d in usbvm_devices}
    for d in dom0_devices:
        if d.device_id in in_usbvm and usb_in_dom0[d.device_id]:
            continue  # reported by both: a USB device belongs to the USB qube
        merged.append(QubeDevice(DOM0, d))
    for d in usbvm_devices:
        if d.device_id in usb_in_dom0 and not usb_in_dom0[d.device_id]:
            continue  # reported by both, not USB by dom0's account: dom0's
        merged.append(QubeDevice(usbvm, d))
    return merged
