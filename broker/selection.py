"""Which devices a command acts on: a device named on the command line (an id, an
unambiguous prefix of one, or a GUID, in any case, optionally ``QUBE:`` in front), and
fwupdmgr's ``--filter`` over device flags. Pure functions over the routed device list.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.errors import BrokerError, ConfigError, NotFound
from broker.fwupd_json import DEVICE_FLAGS
from broker.routing import QubeDevice
from broker.sanitize import printable

_FLAG_BITS = {name: bit for bit, name in DEVICE_FLAGS.items()}


@dataclass(frozen=True)
class DeviceFilter:
    """fwupdmgr's --filter: flag names that must be set, and (``~name``) that must not."""

    include: int = 0
    exclude: int = 0

    @classmethod
    def parse(cls, text: str | None) -> DeviceFilter:
        include = exclude = 0
        for item in (text or "").split(","):
            name = item.strip()
            if not name:
                continue
            negate = name.startswith("~")
            bit = _FLAG_BITS.get(name.removeprefix("~"))
            if bit is None:
                raise ConfigError(f"--filter: unknown device flag {printable(name, 40)!r}")
            if negate:
                exclude |= bit
            else:
                include |= bit
        return cls(include, exclude)

    def keeps(self, qd: QubeDevice) -> bool:
        flags = qd.device.flags
        return flags & self.include == self.include and not flags & self.exclude

    def apply(self, devices: list[QubeDevice]) -> list[QubeDevice]:
        return [qd for qd in devices if self.keeps(qd)]


def matches(qd: QubeDevice, selector: str) -> bool:
    s = selector.lower()
    d = qd.device
    return bool(s) and (d.device_id.startswith(s) or s in (g.lower() for g in d.guids))


def _scope(devices: list[QubeDevice], selector: str) -> tuple[list[QubeDevice], str]:
    """``QUBE:ID`` limits the search to that qube's devices (a GUID has no colon)."""
    qube, sep, rest = selector.partition(":")
    if sep and qube in {qd.qube for qd in devices}:
        return [qd for qd in devices if qd.qube == qube], rest
    return devices, selector


def select_all(devices: list[QubeDevice], selector: str) -> list[QubeDevice]:
    """Every device a selector names (one GUID may name several); NotFound when none."""
    scoped, rest = _scope(devices, selector)
    found = [qd for qd in scoped if matches(qd, rest)]
    if not found:
        raise NotFound(f"no device matches {printable(selector, 80)!r} (see get-devices)")
    return found


def select_one(devices: list[QubeDevice], selector: str) -> QubeDevice:
    """The one device a selector names; more than one is an error saying how to narrow."""
    found = select_all(devices, selector)
    if len(found) > 1:
        raise BrokerError(
            f"{printable(selector, 80)!r} matches {len(found)} devices: give more of the id, "
            "or QUBE:ID"
        )
    return found[0]
