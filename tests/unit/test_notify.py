"""broker.notify: the waiting-updates state, the notification's text, and which desktop
sessions dom0 has (the delivery itself is tested on the sandbox's real dunst)."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.notify import (
    Waiting,
    WaitingUpdate,
    desktop_sessions,
    message,
    record,
)

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
CAM = WaitingUpdate("sys-usb", "1" * 40, "Webcam", "1.2.3", "1.2.4", "high", "lvfs")
UEFI = WaitingUpdate("dom0", "2" * 40, "System\x1b[2J", "1.0", "2.0", "", "lvfs")
SIGNED = {"lvfs": (T0 - timedelta(days=2)).isoformat()}


def test_the_state_says_since_when_updates_wait_and_goes_when_none_do(tmp_path: Path) -> None:
    path = tmp_path / "updates-waiting.json"
    first = record(path, [CAM], SIGNED, T0)
    assert first is not None and first.since == first.checked == "2026-12-03T12:00:00+00:00"
    # a day later the same update still waits, with another: since stays
    later = record(path, [CAM, UEFI], SIGNED, T0 + timedelta(days=1))
    assert later is not None
    assert (later.since, later.checked) == (first.since, "2026-12-04T12:00:00+00:00")
    assert Waiting.load(path) == later
    # a new set of updates starts its own wait
    other = WaitingUpdate("dom0", "2" * 40, "System", "1.0", "3.0", "", "lvfs")
    assert record(path, [other], SIGNED, T0 + timedelta(days=2)).since.startswith("2026-12-05")  # type: ignore[union-attr]
    assert record(path, [], SIGNED, T0) is None
    assert not path.exists()


def test_a_damaged_or_odd_state_file_reads_as_none(tmp_path: Path) -> None:
    path = tmp_path / "updates-waiting.json"
    for raw in (b"{", b"[]", b'{"since": 1}'):
        path.write_bytes(raw)
        assert Waiting.load(path) is None
    path.unlink()
    os.mkfifo(path)  # never blocks on a FIFO left in its place
    assert Waiting.load(path) is None


def test_the_message_names_each_update_the_metadata_age_and_the_command() -> None:
    waiting = Waiting("s", "c", (CAM, UEFI), tuple(SIGNED.items()))
    summary, body, urgency = message(waiting, T0)
    assert summary == "2 firmware updates waiting"
    assert body.splitlines() == [
        "Webcam [sys-usb]: 1.2.3 → 1.2.4, high",
        "System?[2J [dom0]: 1.0 → 2.0",
        "lvfs metadata signed 2 days ago",
        "Install with: qubes-fwupdmgr update",
    ]
    assert urgency == 2  # high: critical in the notification spec's three levels
    assert message(Waiting("s", "c", (UEFI,), ()), T0)[::2] == ("1 firmware update waiting", 1)


def test_a_device_name_cannot_bring_markup_into_the_notification() -> None:
    """Notification daemons read the body as markup; the name comes from sys-usb's fwupd."""
    forged = WaitingUpdate("sys-usb", "1" * 40, '<a href="x">Click</a> & <img src="/y">',
                           "1", "2", "", "lvfs")  # fmt: skip
    body = message(Waiting("s", "c", (forged,), ()), T0)[1]
    assert body.splitlines()[0] == (
        '&lt;a href="x"&gt;Click&lt;/a&gt; &amp; &lt;img src="/y"&gt; [sys-usb]: 1 → 2'
    )
    assert "<" not in body


def test_only_a_persons_own_session_bus_counts(tmp_path: Path) -> None:
    users = tmp_path / "run/user"
    uid = os.getuid()
    for name in ("1000", "42", "notanumber", "1001"):
        (users / name).mkdir(parents=True)
    listening = []
    for name in ("1000", "42", "1001"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(users / name / "bus"))
        listening.append(s)
    (users / "1002").mkdir()
    (users / "1002" / "bus").write_text("not a socket")
    try:
        found = desktop_sessions(tmp_path)
        # the dirs are ours (uid 0 here, or the tester's): a dir must belong to its uid
        assert [s.uid for s in found] == ([1000] if uid == 1000 else [])
        if uid == 0:
            os.chown(users / "1001", 1001, 1001)
            os.chown(users / "1001" / "bus", 1001, 1001)
            found = desktop_sessions(tmp_path)
            assert [(s.uid, s.gid, s.bus.name) for s in found] == [(1001, 1001, "bus")]
    finally:
        for s in listening:
            s.close()
    assert desktop_sessions(tmp_path / "nothing") == []
