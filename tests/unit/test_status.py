"""broker.status: what status prints is printable, whatever the state files it reads say
(they are in dirs dom0's login user, who runs the receive service, may write to)."""

from __future__ import annotations

from datetime import UTC, datetime

from broker.backoff import Backoff
from broker.notify import Waiting, WaitingUpdate
from broker.reboots import Pending
from broker.status import RemoteAge, Status

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def test_every_line_is_printable_and_ages_read_as_elsewhere() -> None:
    odd = "\x1b]0;pwned\x07\x1b[2J"
    state = Status(
        None, None, Backoff(), "nothing: refresh and report only",
        Waiting(f"2026-12-01{odd}", "2026-12-03", (WaitingUpdate(
            f"sys-usb{odd}", "1" * 40, "Cam", "1", "2", "", "lvfs"),), ()),
        (Pending(f"sys-usb{odd}", "1" * 40, "Cam", "2", "t"),),
        (RemoteAge("lvfs", True, "2026-12-02T12:00:00+00:00"), RemoteAge("x", False, odd)),
    )  # fmt: skip
    lines = state.lines(NOW)
    assert not [line for line in lines if not line.isprintable()], lines
    assert "Metadata:    lvfs: signed 2026-12-02T12:00:00+00:00 (1 day ago)" in lines
    assert "Metadata:    x (disabled): never" in lines
