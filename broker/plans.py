"""Reviewed plans: what `get-updates --json` proposes, as a person approved it.

Each entry names one install (qube, device, from which version to which) and binds it to
what dom0 verified when the plan was made: the remote's metadata file (sha256 and signing
time) and the cab (sha256). `update --plan FILE` installs exactly those entries, and only
if every one still matches what dom0 holds and the device's owner offers now; otherwise it
refuses, with one line, before anything is installed. A plan is a filter over what dom0
would install anyway: it can narrow a run, never widen it (the cab is still fetched and
checked from scratch against the current verified catalog).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import Any, NoReturn

from broker.config import check_qube_name
from broker.errors import BrokerError, ConfigError, FormatError, LimitExceeded, NothingToDo
from broker.metadata import Catalog, Release
from broker.routing import QubeDevice
from broker.sanitize import printable

MAX_BYTES = 1 << 20  # a plan names a few devices; a get-updates --json of many fits too
MAX_ENTRIES = 256
_SHA256 = re.compile(r"[0-9a-f]{64}")
# the JSON member each field is written as, in fwupdmgr's CamelCase
_MEMBERS = {
    "qube": "Qube", "device_id": "DeviceId", "device_name": "Name",
    "version_old": "VersionOld", "version": "Version", "appstream_id": "AppstreamId",
    "remote_id": "RemoteId", "cab_sha256": "CabSha256",
    "metadata_sha256": "MetadataSha256", "metadata_signed_at": "MetadataSigned",
}  # fmt: skip


class PlanMismatch(BrokerError):
    """A plan entry no longer matches what dom0 holds or a daemon offers: nothing installed."""


@dataclass(frozen=True)
class PlanEntry:
    qube: str
    device_id: str
    device_name: str  # shown, never decided on
    version_old: str
    version: str
    appstream_id: str
    remote_id: str
    cab_sha256: str
    metadata_sha256: str
    metadata_signed_at: str  # ISO 8601, as dom0 recorded the signature's time

    @property
    def key(self) -> tuple[str, str]:
        return self.qube, self.device_id

    def to_json(self) -> dict[str, str]:
        return {_MEMBERS[f.name]: getattr(self, f.name) for f in fields(self)}

    def __str__(self) -> str:
        return (f"{printable(self.device_name, 80)} [{self.qube}] "
                f"{printable(self.version_old, 64)} -> {printable(self.version, 64)}")  # fmt: skip


def entry_for(qd: QubeDevice, release: Release, catalog: Catalog) -> PlanEntry:
    return PlanEntry(
        qd.qube, qd.device.device_id, qd.device.name, qd.device.version, release.version,
        release.component_id, release.remote_id, release.sha256, catalog.metadata_sha256,
        catalog.signed_at,
    )  # fmt: skip


def parse(raw: bytes) -> list[PlanEntry]:
    """The entries of a plan file: a get-updates --json document (its "Plan") or the bare
    list. Every member is checked; anything else in the document is ignored."""
    if len(raw) > MAX_BYTES:
        raise LimitExceeded(f"the plan is more than {MAX_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FormatError(f"the plan is not JSON ({type(e).__name__})") from e
    entries = doc.get("Plan") if isinstance(doc, dict) else doc
    if not isinstance(entries, list):
        raise FormatError("the plan has no \"Plan\" list (get-updates --json writes one)")
    if len(entries) > MAX_ENTRIES:
        raise LimitExceeded(f"the plan has more than {MAX_ENTRIES} entries")
    out = [_entry(n, e) for n, e in enumerate(entries, 1)]
    seen: set[tuple[str, str]] = set()
    for entry in out:
        if entry.key in seen:
            raise FormatError(f"the plan names {entry.qube}:{entry.device_id} twice")
        seen.add(entry.key)
    if not out:
        raise NothingToDo("the plan is empty: nothing to install")
    return out


def _entry(n: int, untrusted: Any) -> PlanEntry:
    if not isinstance(untrusted, dict) or set(untrusted) != set(_MEMBERS.values()):
        raise FormatError(f"plan entry {n}: members must be {', '.join(_MEMBERS.values())}")
    values = {name: untrusted[member] for name, member in _MEMBERS.items()}
    if not all(isinstance(v, str) and len(v) <= 512 and v.isprintable() for v in values.values()):
        raise FormatError(f"plan entry {n}: every member must be a short printable string")
    for name in ("cab_sha256", "metadata_sha256"):
        if not _SHA256.fullmatch(values[name]):
            raise FormatError(f"plan entry {n}: {_MEMBERS[name]} is not a sha256")
    try:
        check_qube_name(values["qube"], "Qube")
    except ConfigError as e:
        raise FormatError(f"plan entry {n}: {e}") from e
    return PlanEntry(**values)


def match(
    entries: list[PlanEntry],
    catalogs: list[Catalog],
    found: list[tuple[QubeDevice, list[Release]]],
) -> list[tuple[QubeDevice, list[Release]]]:
    """Each entry's device with the one release it names, from what dom0 would install now
    (``found``: the owners' offers bound by the current catalogs). PlanMismatch, naming
    the first entry that no longer holds and why, if any does not."""
    by_remote = {c.remote_id: c for c in catalogs}
    by_key = {qd.key: (qd, rs) for qd, rs in found}
    out = []
    for entry in entries:
        catalog = by_remote.get(entry.remote_id)
        if catalog is None:
            _refuse(entry, f"dom0 holds no metadata of {printable(entry.remote_id, 64)} now")
        if (catalog.metadata_sha256, catalog.signed_at) != (
            entry.metadata_sha256, entry.metadata_signed_at,
        ):  # fmt: skip
            _refuse(entry, f"{entry.remote_id}'s metadata changed since the plan was made "
                    f"(signed {printable(entry.metadata_signed_at, 40) or 'unknown'}, "
                    f"now {catalog.signed_at or 'unknown'})")  # fmt: skip
        if entry.key not in by_key:
            _refuse(entry, "no update is offered for this device now")
        qd, offered = by_key[entry.key]
        if qd.device.version != entry.version_old:
            _refuse(entry, f"the device now runs {printable(qd.device.version, 64)}")
        # the remote too: the same cab offered from another remote (lvfs-testing) was not
        # what the plan's metadata binding covered
        named = (entry.cab_sha256, entry.version, entry.appstream_id, entry.remote_id)
        chosen = [r for r in offered
                  if (r.sha256, r.version, r.component_id, r.remote_id) == named]  # fmt: skip
        if not chosen:
            _refuse(entry, "that release is no longer offered for this device")
        out.append((qd, chosen[:1]))
    return out


def _refuse(entry: PlanEntry, why: str) -> NoReturn:
    raise PlanMismatch(f"plan refused, nothing installed: {entry}: {why}; make a new plan "
                       "with get-updates --json")  # fmt: skip
