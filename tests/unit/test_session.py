"""broker.session: dom0 sessions are taken once, expire, and carry dom0's verdict back."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

import pytest

from broker.errors import FormatError, TransferError
from broker.session import ExpectedFile, Outcome, Session, Sessions, check_nonce

FILES = (
    ExpectedFile("firmware.xml.zst", 64 * 1024 * 1024),
    ExpectedFile("fw.cab", 1000, sha256="ab" * 32, size=1000),
)


@pytest.fixture
def sessions(tmp_path: Path) -> Sessions:
    return Sessions(tmp_path / "sessions")


def test_open_writes_a_pending_session_only_owner_and_group_see(sessions: Sessions) -> None:
    """In dom0 the receive service runs as the login user (group qubes), the manager as
    root: the session is readable by the group, by nobody else."""
    s = sessions.open("metadata", "lvfs", FILES, ttl=60)
    assert re.fullmatch(r"[0-9a-f]{32}", s.nonce)
    pending = sessions.dir / f"{s.nonce}.pending"
    assert pending.exists()
    assert stat.S_IMODE(pending.stat().st_mode) == 0o640
    assert stat.S_IMODE(sessions.dir.stat().st_mode) & 0o007 == 0
    doc = json.loads(pending.read_text())
    assert doc["kind"] == "metadata" and doc["remote_id"] == "lvfs"
    # nothing but the session file (no temp file left behind)
    assert [p.name for p in sessions.dir.iterdir()] == [pending.name]


def test_nonces_are_unique(sessions: Sessions) -> None:
    nonces = {sessions.open("cab", "lvfs", FILES, ttl=60).nonce for _ in range(20)}
    assert len(nonces) == 20


def test_take_returns_the_session_once(sessions: Sessions) -> None:
    opened = sessions.open("cab", "lvfs", FILES, ttl=60)
    taken = sessions.take(opened.nonce, "sys-firewall", "sys-firewall")
    assert taken == opened
    assert isinstance(taken, Session)
    assert taken.files == FILES
    assert not (sessions.dir / f"{opened.nonce}.pending").exists()
    assert (sessions.dir / f"{opened.nonce}.taken").exists()
    with pytest.raises(TransferError, match="no pending dom0 session for this nonce"):
        sessions.take(opened.nonce, "sys-firewall", "sys-firewall")


def test_take_refuses_an_unknown_nonce(sessions: Sessions) -> None:
    sessions.open("cab", "lvfs", FILES, ttl=60)
    with pytest.raises(TransferError, match="no pending dom0 session"):
        sessions.take("0" * 32, "sys-firewall", "sys-firewall")


def test_take_refuses_with_no_session_directory(tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="no pending dom0 session"):
        Sessions(tmp_path / "absent").take("f" * 32, "sys-firewall", "sys-firewall")


@pytest.mark.parametrize(
    "nonce",
    [
        "../x",
        "../" + "a" * 29,
        "A" * 32,
        "0123456789ABCDEF0123456789abcdef",
        "a" * 31,
        "a" * 33,
        "",
        "g" * 32,
        "a" * 31 + "/",
        " " + "a" * 32,
        None,
        123,
        ["a" * 32],
    ],
)
def test_take_refuses_malformed_nonces(sessions: Sessions, nonce: object) -> None:
    sessions.dir.mkdir(parents=True)
    with pytest.raises(TransferError, match="malformed session nonce"):
        sessions.take(nonce, "sys-firewall", "sys-firewall")
    with pytest.raises(TransferError, match="malformed session nonce"):
        check_nonce(nonce)


def test_check_nonce_refuses_a_trailing_newline() -> None:
    with pytest.raises(TransferError, match="malformed session nonce"):
        check_nonce("a" * 32 + "\n")


def test_take_of_a_nonce_with_a_trailing_newline_finds_no_session(sessions: Sessions) -> None:
    # whatever check_nonce says, the pending file of a real session is not reached
    opened = sessions.open("cab", "lvfs", FILES, ttl=60)
    with pytest.raises(TransferError):
        sessions.take(opened.nonce + "\n", "sys-firewall", "sys-firewall")
    assert (sessions.dir / f"{opened.nonce}.pending").exists()


def test_check_nonce_returns_a_valid_nonce() -> None:
    assert check_nonce("0123456789abcdef" * 2) == "0123456789abcdef" * 2


def test_take_refuses_an_expired_session(sessions: Sessions) -> None:
    opened = sessions.open("metadata", "lvfs", FILES, ttl=-1)
    with pytest.raises(TransferError, match="dom0 session expired"):
        sessions.take(opened.nonce, "sys-firewall", "sys-firewall")
    # it is used up all the same: a retry with the same nonce is refused too
    with pytest.raises(TransferError, match="no pending"):
        sessions.take(opened.nonce, "sys-firewall", "sys-firewall")


def test_finish_and_outcome_round_trip(sessions: Sessions) -> None:
    opened = sessions.open("cab", "lvfs", FILES, ttl=60)
    assert sessions.outcome(opened.nonce) is None
    outcome = Outcome(True, "fw.cab accepted", ("/var/cache/qubes-fwupd/cabs/x.cab",))
    sessions.finish(opened.nonce, outcome)
    assert sessions.outcome(opened.nonce) == outcome
    refused = Outcome(False, "sha256 does not match")
    sessions.finish(opened.nonce, refused)  # a later verdict replaces the earlier one
    assert sessions.outcome(opened.nonce) == refused
    nothing = Outcome(True, "already current", nothing_new=True)
    sessions.finish(opened.nonce, nothing)
    got = sessions.outcome(opened.nonce)
    assert got == nothing and got is not None and got.nothing_new


def test_outcome_refuses_a_corrupt_record(sessions: Sessions) -> None:
    sessions.dir.mkdir(parents=True)
    nonce = "c" * 32
    (sessions.dir / f"{nonce}.outcome").write_text(json.dumps({"ok": True}))
    with pytest.raises(FormatError, match="corrupt session outcome"):
        sessions.outcome(nonce)


def test_close_removes_every_file_of_the_session(sessions: Sessions) -> None:
    kept = sessions.open("cab", "lvfs", FILES, ttl=60)
    opened = sessions.open("cab", "lvfs", FILES, ttl=60)
    sessions.take(opened.nonce, "sys-firewall", "sys-firewall")
    sessions.finish(opened.nonce, Outcome(True, "ok"))
    assert {p.name for p in sessions.dir.iterdir()} == {
        f"{kept.nonce}.pending",
        f"{opened.nonce}.taken",
        f"{opened.nonce}.outcome",
    }
    sessions.close(opened.nonce)
    assert [p.name for p in sessions.dir.iterdir()] == [f"{kept.nonce}.pending"]
    sessions.close(kept.nonce)
    assert list(sessions.dir.iterdir()) == []
    sessions.close(kept.nonce)  # closing twice is harmless


def test_open_sweeps_sessions_a_killed_manager_left(sessions: Sessions) -> None:
    old = sessions.open("cab", "lvfs", FILES, ttl=60)
    stale = sessions.dir / f"{old.nonce}.pending"
    long_ago = time.time() - 3600
    os.utime(stale, (long_ago, long_ago))
    fresh = sessions.open("cab", "lvfs", FILES, ttl=60)
    assert not stale.exists()
    assert (sessions.dir / f"{fresh.nonce}.pending").exists()


def test_sweep_tolerates_a_session_closed_while_it_runs(
    sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another manager may close its session between the listing and the stat."""
    s = sessions.open("cab", "lvfs", FILES, ttl=60)
    listed = list(sessions.dir.iterdir())
    sessions.close(s.nonce)
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(listed))
    sessions.sweep(60)  # must not raise FileNotFoundError
    assert not (sessions.dir / f"{s.nonce}.pending").exists()


def test_only_the_qube_a_session_asked_may_take_it_and_a_wrong_one_cannot_burn_it(
    tmp_path: Path,
) -> None:
    sessions = Sessions(tmp_path)
    opened = sessions.open("metadata", "lvfs", (ExpectedFile("f.xml.zst", 10),), 60,
                           updatevm="sys-whonix")  # fmt: skip
    assert sessions.asked() == {"sys-whonix"}
    with pytest.raises(TransferError, match="qube sys-firewall pushed for a download dom0 "
                       "asked of sys-whonix; refused"):  # fmt: skip
        sessions.take(opened.nonce, "sys-firewall", "sys-firewall")
    assert sessions.take(opened.nonce, "sys-whonix", "sys-firewall").updatevm == "sys-whonix"


def test_an_expired_session_asks_no_qube(tmp_path: Path) -> None:
    sessions = Sessions(tmp_path)
    sessions.open("metadata", "lvfs", (ExpectedFile("f", 1),), -1, updatevm="sys-whonix")
    assert sessions.asked() == set()
