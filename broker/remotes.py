"""Which of the configured remotes dom0 uses (get-remotes, enable-remote, disable-remote).

The remotes themselves, their URLs and signer pins, come from dom0's config; whether each
is enabled is dom0's own state, changed only by the admin. A disabled remote is not
refreshed, dom0 drops its catalog from every decision, and what a daemon still offers
from it is left out quietly (the admin asked for that), never installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.config import Config, Paths, Remote
from broker.errors import BrokerError, ConfigError, NotFound
from broker.sanitize import printable
from broker.transfer import read_small, write_atomic

_MAX_BYTES = 64 * 1024  # a list of remote ids


@dataclass(frozen=True)
class RemoteState:
    """A configured remote as get-remotes shows it."""

    remote: Remote
    enabled: bool
    signed_at: datetime | None  # of the metadata dom0 accepted last; None: never refreshed


class RemoteSwitches:
    """The admin's enable-remote/disable-remote choices, in dom0's state dir."""

    def __init__(self, paths: Paths) -> None:
        self.file = paths.manager_dir / "remotes.json"
        self._read: frozenset[str] | None = None  # once per instance: one run reads it once

    def disabled(self) -> frozenset[str]:
        if self._read is None:
            self._read = self._load()
        return self._read

    def _load(self) -> frozenset[str]:
        try:
            doc = json.loads(read_small(self.file, _MAX_BYTES))
        except FileNotFoundError:
            return frozenset()
        except (OSError, BrokerError, ValueError, RecursionError) as e:
            raise ConfigError(f"{self.file}: unreadable ({type(e).__name__})") from e
        names = doc.get("disabled") if isinstance(doc, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{self.file}: not a list of disabled remote ids")
        return frozenset(names)

    def set_enabled(self, config: Config, remote_id: str, enabled: bool) -> bool:
        """Switch a configured remote; False when it already was so."""
        if remote_id not in {r.id for r in config.remotes}:
            known = ", ".join(r.id for r in config.remotes)
            raise NotFound(f"no remote {printable(remote_id, 64)!r} (configured: {known})")
        disabled = self.disabled()
        now = disabled - {remote_id} if enabled else disabled | {remote_id}
        if now == disabled:
            return False
        self.file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.file, json.dumps({"disabled": sorted(now)}).encode())
        self._read = now
        return True


def enabled(config: Config, switches: RemoteSwitches) -> tuple[Remote, ...]:
    off = switches.disabled()
    return tuple(r for r in config.remotes if r.id not in off)


# FwupdRemoteFlags: bit 0 is "enabled" (fwupd_remote_flag_to_string)
_REMOTE_FLAG_ENABLED = 1 << 0


def remote_json(state: RemoteState, refresh_interval: int) -> dict[str, Any]:
    """A remote with the keys and types of fwupdmgr 2.0's get-remotes --json for a
    "download" remote; "Mtime" is the signing time of the metadata dom0 accepted (-1:
    none yet), "RefreshInterval" the age in seconds after which dom0 calls it stale."""
    r = state.remote
    out: dict[str, Any] = {"Id": r.id, "Kind": "download", "MetadataUri": r.metadata_url,
                           "MetadataUriSig": f"{r.metadata_url}.{r.signature}"}  # fmt: skip
    if r.firmware_base_uri:
        out["FirmwareBaseUri"] = r.firmware_base_uri
    out.update(
        Title=r.id,
        Flags=_REMOTE_FLAG_ENABLED if state.enabled else 0,
        Enabled=state.enabled,
        ApprovalRequired=False,
        AutomaticReports=False,
        AutomaticSecurityReports=False,
        Priority=0,
        Mtime=int(state.signed_at.timestamp()) if state.signed_at else -1,
        RefreshInterval=refresh_interval,
    )
    return out
