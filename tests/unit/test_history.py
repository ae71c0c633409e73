"""broker.history: dom0's install log, appended by concurrent runs, bounded, and read
back even when a line was cut short."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from broker import history
from broker.config import Paths
from broker.history import Event, History


def event(n: int, result: str = history.SUCCESS) -> Event:
    return Event("2026-12-03T07:00:00+00:00", "sys-usb", "ab" * 20, "Webcam", "1.2.3",
                 f"1.2.{n}", "org.fwupd.fake", "lvfs", "cd" * 32, result)  # fmt: skip


def test_events_come_back_oldest_first_in_fwupds_history_shape(tmp_path: Path) -> None:
    log = History(Paths(tmp_path))
    log.append(event(4))
    log.append(event(5, history.NEEDS_REBOOT))
    log.append(Event(**{**event(6, history.FAILED).__dict__, "error": "fwupd refused"}))
    events = log.events()
    assert [e.version_new for e in events] == ["1.2.4", "1.2.5", "1.2.6"]
    device, release = events[2].dbus_form()
    assert (device["UpdateState"], device["UpdateError"], device["Version"]) == (
        3, "fwupd refused", "1.2.3",
    )  # fmt: skip
    assert release == {"AppstreamId": "org.fwupd.fake", "Version": "1.2.6",
                       "RemoteId": "lvfs", "Checksum": "cd" * 32}  # fmt: skip
    assert [e.dbus_form()[0]["UpdateState"] for e in events] == [2, 4, 3]


def test_a_line_cut_short_or_forged_is_skipped_and_counted(tmp_path: Path) -> None:
    log = History(Paths(tmp_path))
    log.append(event(4))
    with log.file.open("a") as f:
        f.write('{"time": "2026-12-03T07:0\n')  # power lost mid-write
        f.write(json.dumps({**event(5).__dict__, "result": "installed-by-magic"}) + "\n")
        f.write(json.dumps({**event(6).__dict__, "time": "yesterday"}) + "\n")
    log.append(event(7))
    assert [e.version_new for e in log.events()] == ["1.2.4", "1.2.7"]
    assert log.skipped == 3


def _append_many(root: str, start: int) -> None:
    log = History(Paths(Path(root)))
    for n in range(start, start + 200):
        log.append(event(n))


def test_concurrent_runs_lose_no_event_and_the_file_stays_bounded(tmp_path: Path) -> None:
    procs = [multiprocessing.Process(target=_append_many, args=(str(tmp_path), k * 1000))
             for k in range(4)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    log = History(Paths(tmp_path))
    assert len(log.events()) == 800 and log.skipped == 0
    # past the cap the oldest half goes, whole lines only
    for n in range(5000):
        log.append(event(n))
    assert log.file.stat().st_size <= history._MAX_BYTES + 1024
    kept = log.events()
    assert log.skipped == 0 and kept[-1].version_new == "1.2.4999"
