"""broker.session: dom0 sessions are taken once, expire, and carry dom0's verdict back."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

import pytest

import broker.session as session_module
from broker.cabinet import ExpectedRelease
from broker.errors import ConfigError, FormatError, TransferError
from broker.session import (
    DownloadRequest,
    ExpectedFile,
    Outcome,
    Session,
    Sessions,
    Wanted,
    check_nonce,
    check_source_dir,
)
from broker.transfer import FRAME_VERSION, temp_name

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


# --- what the mutation run (make mutation) found untested --------------------------------

T0 = 2_000_000_000.0  # a fixed clock for the boundary tests


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [T0]
    monkeypatch.setattr(session_module.time, "time", lambda: now[0])
    return now


def _message(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    return str(excinfo.value)


def test_refusals_say_exactly_what_is_wrong(sessions: Sessions) -> None:
    with pytest.raises(TransferError) as e:
        check_nonce("x")
    assert _message(e) == "malformed session nonce"
    sessions.dir.mkdir(parents=True)
    with pytest.raises(TransferError) as e:
        sessions.take("a" * 32, "sys-firewall", "sys-firewall")
    assert _message(e) == "no pending dom0 session for this nonce"
    opened = sessions.open("cab", "lvfs", FILES, ttl=-1)
    with pytest.raises(TransferError) as e:
        sessions.take(opened.nonce, "sys-firewall", "sys-firewall")
    assert _message(e) == "dom0 session expired"
    (sessions.dir / f"{'d' * 32}.outcome").write_text("{}")
    with pytest.raises(FormatError) as e:
        sessions.outcome("d" * 32)
    assert _message(e) == "corrupt session outcome"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_damaged_session_file_is_refused(sessions: Sessions, content: str) -> None:
    sessions.dir.mkdir(parents=True)
    (sessions.dir / f"{'e' * 32}.pending").write_text(content)
    with pytest.raises(TransferError) as e:
        sessions.take("e" * 32, "sys-firewall", "sys-firewall")
    assert _message(e) == "dom0's session file is damaged"


def test_the_loser_of_two_pushes_racing_for_one_nonce_finds_no_session(
    sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both read the pending file; the other push renamed it first."""
    opened = sessions.open("cab", "lvfs", FILES, ttl=60)
    rename = os.rename

    def lose(src: Path, dst: Path) -> None:
        rename(src, dst)  # the winner
        rename(src, dst)  # ours

    monkeypatch.setattr(session_module.os, "rename", lose)
    with pytest.raises(TransferError) as e:
        sessions.take(opened.nonce, "sys-firewall", "sys-firewall")
    assert _message(e) == "no pending dom0 session for this nonce"


def test_a_wrong_caller_is_named_cut_to_64_characters(sessions: Sessions) -> None:
    opened = sessions.open("cab", "lvfs", FILES, ttl=60, updatevm="sys-firewall")
    with pytest.raises(TransferError) as e:
        sessions.take(opened.nonce, "q" * 100, "sys-firewall")
    assert _message(e) == (
        f"qube {'q' * 63}… pushed for a download dom0 asked of sys-firewall; refused"
    )


def test_a_cab_session_carries_its_release_and_a_forced_one_its_force(
    tmp_path: Path,
) -> None:
    """The release the cab's metainfo must name, and refresh --force, survive the file."""
    sessions = Sessions(tmp_path / "not" / "yet" / "made")  # parents made too
    release = ExpectedRelease("com.example.Fw", "1.2.3", ("guid-a", "guid-b"))
    opened = sessions.open("cab", "lvfs", FILES, 60, release=release, force=True,
                           updatevm="sys-firewall")  # fmt: skip
    taken = sessions.take(opened.nonce, "sys-firewall", "sys-whonix")
    assert taken.release == release and taken.force is True
    assert taken == opened
    plain = sessions.open("metadata", "lvfs", FILES, 60)
    doc = json.loads((sessions.dir / f"{plain.nonce}.pending").read_text())
    assert doc["force"] is False and doc["release"] is None
    taken = sessions.take(plain.nonce, "sys-firewall", "sys-firewall")
    assert taken.release is None and taken.force is False


def test_a_session_file_without_the_newer_fields_names_no_qube(sessions: Sessions) -> None:
    """A pending file written by an older manager: no updatevm, no release, no force."""
    sessions.dir.mkdir(parents=True)
    nonce = "b" * 32
    doc = {"nonce": nonce, "kind": "metadata", "remote_id": "lvfs",
           "files": [{"name": "f", "max_size": 1}], "expires": time.time() + 60}  # fmt: skip
    (sessions.dir / f"{nonce}.pending").write_text(json.dumps(doc))
    assert sessions.asked() == set()
    taken = sessions.take(nonce, "sys-firewall", "sys-firewall")
    assert (taken.updatevm, taken.release, taken.force) == ("", None, False)


def test_a_session_is_good_until_the_second_it_expires(
    sessions: Sessions, clock: list[float]
) -> None:
    opened = sessions.open("cab", "lvfs", FILES, ttl=0, updatevm="sys-firewall")
    assert opened.expires == T0
    assert sessions.asked() == {"sys-firewall"}
    assert sessions.take(opened.nonce, "sys-firewall", "sys-firewall") == opened


def test_a_session_that_names_no_qube_asks_none(sessions: Sessions) -> None:
    sessions.open("cab", "lvfs", FILES, ttl=60)
    assert sessions.asked() == set()


def test_asked_skips_every_kind_of_damaged_pending_file(sessions: Sessions) -> None:
    sessions.open("cab", "lvfs", FILES, ttl=60, updatevm="sys-whonix")
    (sessions.dir / "a.pending").mkdir()  # OSError
    (sessions.dir / "b.pending").write_text("{not json")  # ValueError
    (sessions.dir / "c.pending").write_text("[]")  # AttributeError
    (sessions.dir / "d.pending").write_text('{"expires": null}')  # TypeError
    assert sessions.asked() == {"sys-whonix"}


def test_sweep_removes_what_is_older_than_any_session_and_only_that(
    sessions: Sessions, clock: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Older than ttl + 60 s: a .pending, .taken or .outcome goes; a file at exactly the
    cutoff, a younger one and a file that is no session's stay, wherever they are listed."""
    sessions.dir.mkdir(parents=True)
    ttl = 60.0
    ages = {"old.pending": 120.5, "old.taken": 121, "old.outcome": 500,
            "edge.pending": 120, "young.taken": 119.5, "notes.txt": 5000}  # fmt: skip
    for name, age in ages.items():
        (sessions.dir / name).write_text("x")
        os.utime(sessions.dir / name, (T0 - age, T0 - age))
    order = sorted(sessions.dir.iterdir(), key=lambda p: p.suffix != ".txt")  # the stranger first
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(order))
    assert sorted(sessions.sweep(ttl)) == ["old.outcome", "old.pending", "old.taken"]
    assert sorted(p.name for p in order if p.exists()) == [
        "edge.pending", "notes.txt", "young.taken",
    ]  # fmt: skip


def test_sweep_reports_a_session_closed_between_its_stat_and_its_unlink(
    sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = sessions.open("cab", "lvfs", FILES, ttl=60)
    pending = sessions.dir / f"{old.nonce}.pending"
    os.utime(pending, (time.time() - 3600,) * 2)
    real_stat = Path.stat

    def stat_then_close(self: Path, **kwargs: bool) -> os.stat_result:
        result = real_stat(self, **kwargs)
        if self == pending:
            sessions.close(old.nonce)  # the other manager
        return result

    monkeypatch.setattr(Path, "stat", stat_then_close)
    assert sessions.sweep(60) == [pending.name]


def test_an_outcome_without_nothing_new_is_something_new(sessions: Sessions) -> None:
    sessions.dir.mkdir(parents=True)
    (sessions.dir / f"{'f' * 32}.outcome").write_text(
        json.dumps({"ok": True, "message": "m", "stored": []})
    )
    assert sessions.outcome("f" * 32) == Outcome(True, "m", (), nothing_new=False)


# --- the download request dom0 sends the UpdateVM (qubes.FwupdDownload) ------------------

WANTED = (
    Wanted("firmware.xml.zst", "https://cdn.fwupd.org/downloads/firmware.xml.zst", 1 << 26),
    Wanted("fw.cab", "https://fwupd.org/downloads/fw.cab", 1000, sha256="ab" * 32, size=999),
)


def test_a_download_request_is_one_json_line_of_the_frame_version() -> None:
    line = DownloadRequest("a" * 32, "cab", "lvfs", WANTED).to_json()
    assert line.endswith(b"}\n") and line.count(b"\n") == 1
    doc = json.loads(line)
    assert doc == {
        "version": FRAME_VERSION, "nonce": "a" * 32, "kind": "cab", "remote": "lvfs",
        "files": [
            {"name": "firmware.xml.zst", "url": WANTED[0].url, "max_size": 1 << 26,
             "sha256": None, "size": None},
            {"name": "fw.cab", "url": WANTED[1].url, "max_size": 1000, "sha256": "ab" * 32,
             "size": 999},
        ],
    }  # fmt: skip
    imported = DownloadRequest("a" * 32, "cab", "lvfs", WANTED, source_dir="/media/usb")
    assert json.loads(imported.to_json())["dir"] == "/media/usb"


@pytest.mark.parametrize("source_dir", [None, "/media/usb/fw"])
def test_a_download_request_round_trips(source_dir: str | None) -> None:
    request = DownloadRequest("0123456789abcdef" * 2, "metadata", "lvfs", WANTED, source_dir)
    assert DownloadRequest.from_json(request.to_json()) == request


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"nonce": "a" * 32, "kind": "cab", "remote": "lvfs", "files": [{"name": "f"}]},
        {"nonce": "a" * 32, "kind": "cab", "remote": "lvfs", "files": 5},
        {"nonce": "a" * 32, "kind": "cab", "remote": "lvfs",
         "files": [{"name": "f", "url": "https://h/f", "max_size": "big"}]},
        {"nonce": "a" * 32, "kind": "cab", "files": []},
        {"nonce": "a" * 32, "remote": "lvfs", "files": []},
        [],
    ],
)  # fmt: skip
def test_a_malformed_download_request_is_refused(doc: object) -> None:
    with pytest.raises(FormatError) as e:
        DownloadRequest.from_json(json.dumps(doc).encode())
    assert _message(e) == "malformed download request"


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", 5, None])
def test_a_download_request_names_plain_files_only(name: object) -> None:
    doc = {"nonce": "a" * 32, "kind": "cab", "remote": "lvfs",
           "files": [{"name": name, "url": "https://h/f", "max_size": 1}]}  # fmt: skip
    with pytest.raises(FormatError) as e:
        DownloadRequest.from_json(json.dumps(doc).encode())
    assert _message(e) == "download request names an invalid file"


def test_a_download_request_url_is_checked_and_named() -> None:
    doc = {"nonce": "a" * 32, "kind": "cab", "remote": "lvfs",
           "files": [{"name": "f", "url": "file:///etc/shadow", "max_size": 1}]}  # fmt: skip
    with pytest.raises(ConfigError) as e:
        DownloadRequest.from_json(json.dumps(doc).encode())
    assert _message(e).startswith("download URL: ")


def test_a_download_request_nonce_is_checked() -> None:
    doc = {"nonce": "../x", "kind": "cab", "remote": "lvfs", "files": []}
    with pytest.raises(TransferError, match="malformed session nonce"):
        DownloadRequest.from_json(json.dumps(doc).encode())


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("/" + "d" * 4095, True),
        ("/" + "d" * 4096, False),
        ("/media/usb", True),
        ("media/usb", False),
        ("/media/\nusb", False),
        ("/media/\x1b[2Jusb", False),
        (["/media"], False),
    ],
)
def test_an_import_dir_is_absolute_printable_and_at_most_path_max(value: object, ok: bool) -> None:
    if ok:
        assert check_source_dir(value) == value
        return
    with pytest.raises(FormatError) as e:
        check_source_dir(value)
    assert _message(e) == "the import dir must be an absolute path of printable characters"
    doc = {"nonce": "a" * 32, "kind": "cab", "remote": "lvfs", "files": [], "dir": value}
    with pytest.raises(FormatError):
        DownloadRequest.from_json(json.dumps(doc).encode())


def test_sweep_takes_a_session_temp_once_a_minute_old(tmp_path: Path) -> None:
    """A session write killed before its rename leaves a temp file: the next sweep takes
    it once it is a minute old (no live write takes that long), and not before."""
    sessions = Sessions(tmp_path)
    young, old = temp_name(tmp_path / "a.outcome"), temp_name(tmp_path / "b.outcome")
    for p in (young, old):
        p.write_bytes(b"{")
    then = time.time() - 60.5
    os.utime(old, (then, then))
    assert sessions.sweep(1800) == [old.name]
    assert young.exists() and not old.exists()
