"""Which releases a device may take, and which may cross into dom0.

Two decisions, made by two parties, and an update needs both (shared/ARCHITECTURE.md):
- the fwupd that owns the device decides what the device may take: the component's
  ``<requires>`` (fwupd version, vendor ids, other firmware, hardware ids), its
  ``LVFS::VersionFormat``, device flags and protocols. dom0 never re-implements that: it
  asks the owner (GetUpgrades and friends) after loading dom0's verified metadata into it;
- dom0 decides what may cross: an offer is kept only if dom0's own verified catalog holds
  a release with one of the offer's container sha256s, for one of the device's GUIDs, of
  the same component and version. Location, size and sha256 then come from dom0's
  catalog, never from the daemon's reply; sys-usb is semi-trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from broker import versions
from broker.errors import VerificationError
from broker.fwupd import OfferedRelease
from broker.metadata import Catalog, Release
from broker.routing import QubeDevice
from broker.sanitize import printable


class OfferRefused(VerificationError):
    """A daemon offered a release that dom0's verified catalog does not bind."""


@dataclass(frozen=True)
class Refusal:
    """One offer that will not be downloaded, with the line the user reads."""

    device: QubeDevice
    offer: OfferedRelease
    reason: str

    def __str__(self) -> str:
        d = self.device.device
        return (
            f"{self.device.qube}: {printable(d.name, 80)} ({d.device_id[:12]}): offered "
            f"{printable(self.offer.appstream_id, 128)} {printable(self.offer.version, 64)}, "
            f"refused: {self.reason}"
        )


def match_offer(catalogs: Sequence[Catalog], qd: QubeDevice, offer: OfferedRelease) -> Release:
    """dom0's release for an offer, or OfferRefused naming why not."""
    catalog = next((c for c in catalogs if c.remote_id == offer.remote_id), None)
    if catalog is None:
        raise OfferRefused(
            f"remote {printable(offer.remote_id, 64)!r} has no metadata dom0 verified"
        )
    if not offer.sha256s:
        raise OfferRefused("it names no sha256 checksum")
    found = [r for sha in offer.sha256s for r in catalog.find(sha, qd.device.guids)]
    if not found:
        sha = offer.sha256s[0]
        elsewhere = sha in catalog.by_sha256
        raise OfferRefused(
            f"dom0's verified catalog holds sha256 {sha[:16]}… for other devices only"
            if elsewhere
            else f"dom0's verified catalog holds no release with sha256 {sha[:16]}…"
        )
    same = [r for r in found if (r.component_id, r.version) == (offer.appstream_id, offer.version)]
    if not same:
        r = found[0]
        raise OfferRefused(
            f"dom0's verified catalog names that cab {printable(r.component_id, 128)} "
            f"{printable(r.version, 64)}"
        )
    return same[0]


@dataclass(frozen=True)
class Decided:
    """Per device, the releases that may cross, newest first by fwupd's version rules, and
    the offers refused."""

    releases: dict[tuple[str, str], list[Release]]
    refused: list[Refusal]
    # (device key, release sha256) -> the offer that release answers: for --json only
    offers: dict[tuple[tuple[str, str], str], OfferedRelease]


def decide(
    catalogs: Sequence[Catalog],
    devices: Sequence[QubeDevice],
    offers: dict[tuple[str, str], list[OfferedRelease]],
) -> Decided:
    """Hold every device's offers against dom0's catalogs."""
    releases: dict[tuple[str, str], list[Release]] = {}
    refused: list[Refusal] = []
    answered: dict[tuple[tuple[str, str], str], OfferedRelease] = {}
    for qd in devices:
        kept: dict[Release, OfferedRelease] = {}
        # a daemon that repeats an offer gets it judged once
        for offer in dict.fromkeys(offers.get(qd.key, [])):
            try:
                kept.setdefault(match_offer(catalogs, qd, offer), offer)
            except OfferRefused as e:
                refused.append(Refusal(qd, offer, str(e)))
        if kept:
            # fwupd sends them newest first; dom0 does not take a (semi-trusted) daemon's
            # word for the order: fwupd's version rules, stable for equal versions
            releases[qd.key] = sorted(kept, key=_newest, reverse=True)
            answered.update({(qd.key, r.sha256): offer for r, offer in kept.items()})
    return Decided(releases, refused, answered)


def _newest(release: Release) -> Any:
    return versions.sort_key(versions.version_format(release.version_format))(release.version)
