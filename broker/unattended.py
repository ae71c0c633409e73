"""What may be installed with no person there: `/etc/qubes-fwupd/unattended.conf`.

The default, with no file or an empty one, is to install nothing (refresh and report only).
An admin opens it qube by qube, and may narrow it by device (id or GUID), fwupd protocol
or plugin, vendor id, the release's minimum urgency, and whether an update that completes
only at a reboot (a UEFI capsule, say) may be staged. A candidate must pass every list
that is set; `update --unattended` installs those and names the rest with the reason.
"""

from __future__ import annotations

import configparser
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import ConfigError
from broker.fwupd_json import DEVICE_FLAGS, flag_names
from broker.metadata import Release
from broker.routing import QubeDevice

URGENCIES = ("low", "medium", "high", "critical")  # the LVFS's, in order
_KEYS = frozenset({"qubes", "devices", "protocols", "plugins", "vendors", "min_urgency",
                   "allow_needs_reboot"})  # fmt: skip


@dataclass(frozen=True)
class UnattendedPolicy:
    qubes: frozenset[str] = frozenset()  # empty: nothing is installed unattended
    devices: frozenset[str] = frozenset()  # device ids or GUIDs, lower case
    protocols: frozenset[str] = frozenset()
    plugins: frozenset[str] = frozenset()
    vendors: frozenset[str] = frozenset()  # as fwupd's VendorIds: USB:0x046D
    min_urgency: str = ""  # "": any, including none given
    allow_needs_reboot: bool = False
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def summary(self) -> str:
        """What it allows, in one line (check-unattended, status)."""
        if not self.qubes:
            return "nothing: refresh and report only"
        parts = [f"qubes {' '.join(sorted(self.qubes))}"]
        for name in ("devices", "protocols", "plugins", "vendors"):
            if words := getattr(self, name):
                parts.append(f"{name} {' '.join(sorted(words))}")
        if self.min_urgency:
            parts.append(f"urgency {self.min_urgency} or more")
        parts.append("reboot-staged updates " + ("too" if self.allow_needs_reboot else "not"))
        return "; ".join(parts)

    def refusal(self, qd: QubeDevice, release: Release) -> str | None:
        """Why this install needs a person, or None when the policy allows it."""
        d = qd.device
        if qd.qube not in self.qubes:
            return f"unattended installs are not allowed for {qd.qube}'s devices"
        ids = {d.device_id.lower(), *(g.lower() for g in d.guids)}
        if self.devices and not ids & self.devices:
            return "the device is not among unattended.conf's devices"
        if self.protocols and not set(d.protocols) & self.protocols:
            return "its protocol is not among unattended.conf's protocols"
        if self.plugins and d.plugin not in self.plugins:
            return "its plugin is not among unattended.conf's plugins"
        if self.vendors and not {v.upper() for v in d.vendor_ids} & self.vendors:
            return "its vendor is not among unattended.conf's vendors"
        if self.min_urgency:
            urgency = release.urgency.lower()
            rank = URGENCIES.index(urgency) if urgency in URGENCIES else -1
            if rank < URGENCIES.index(self.min_urgency):
                return f"urgency {urgency or 'unset'} is below {self.min_urgency}"
        needs_reboot = "needs-reboot" in flag_names(d.flags, DEVICE_FLAGS)
        if needs_reboot and not self.allow_needs_reboot:
            return "it completes only at a reboot (allow_needs_reboot = no)"
        return None

    @classmethod
    def load(cls, path: Path) -> UnattendedPolicy:
        if not path.exists():
            return cls()
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not KEY = VALUE lines ({type(e).__name__})") from e
        if not parser.has_section("unattended"):
            return cls()
        sec = parser["unattended"]
        warnings = tuple(f"{path}: unknown key {k!r} in [unattended] (ignored)"
                         for k in sec if k not in _KEYS)  # fmt: skip

        def words(key: str) -> frozenset[str]:
            return frozenset(sec.get(key, "").replace(",", " ").split())

        urgency = sec.get("min_urgency", "").strip().lower()
        if urgency and urgency not in URGENCIES:
            raise ConfigError(f"{path}: min_urgency must be one of {', '.join(URGENCIES)}")
        reboot = sec.get("allow_needs_reboot", "no").strip().lower()
        if reboot not in ("yes", "no"):
            raise ConfigError(f"{path}: allow_needs_reboot must be yes or no")
        return cls(
            qubes=words("qubes"),
            devices=frozenset(w.lower() for w in words("devices")),
            protocols=words("protocols"),
            plugins=words("plugins"),
            vendors=frozenset(w.upper() for w in words("vendors")),
            min_urgency=urgency,
            allow_needs_reboot=reboot == "yes",
            warnings=warnings,
        )
