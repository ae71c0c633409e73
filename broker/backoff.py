"""Refresh backoff: consecutive failed refreshes lengthen the wait before an unattended
refresh tries again (1 h, 4 h, then a day), and a refresh that works resets it. The state
survives reboots (dom0's state dir); an admin's own refresh never waits for it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from broker.errors import BrokerError
from broker.sanitize import printable
from broker.transfer import read_small, write_atomic

INTERVALS = (3600.0, 4 * 3600.0, 24 * 3600.0)  # after 1, 2, then 3 or more failures
_MAX_BYTES = 4096


@dataclass(frozen=True)
class Backoff:
    failures: int = 0
    last_failure: float = 0.0  # seconds since the epoch
    last_error: str = ""

    def wait_until(self) -> float | None:
        if self.failures <= 0:
            return None
        return self.last_failure + INTERVALS[min(self.failures, len(INTERVALS)) - 1]

    def failed(self, now: float, error: str) -> Backoff:
        return Backoff(self.failures + 1, now, printable(error, 300))

    @classmethod
    def load(cls, path: Path) -> Backoff:
        """The recorded state; none when absent or unreadable (a damaged file must not
        stop refreshes for good: the next failure writes a sound one)."""
        try:
            doc = json.loads(read_small(path, _MAX_BYTES))
            return cls(int(doc["failures"]), float(doc["last_failure"]), str(doc["last_error"]))
        except (OSError, BrokerError, ValueError, KeyError, TypeError, RecursionError):
            return cls()

    def save(self, path: Path) -> None:
        if self == Backoff():
            path.unlink(missing_ok=True)
        else:
            write_atomic(path, json.dumps(asdict(self)).encode())
