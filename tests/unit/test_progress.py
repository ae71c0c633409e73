"""Progress a qube reports (the UpdateVM's download, sys-usb's install): shown, never
decided on, and unable to grow dom0's memory or flood its terminal."""

from __future__ import annotations

import json
import time
from pathlib import Path

from broker.config import Config, Paths
from broker.manager import Manager, Progress
from broker.qrexec import Transport


def _line(name: object, done: int, total: int | None, unit: str = "bytes") -> bytes:
    return json.dumps({"progress": {"name": name, "done": done, "total": total,
                                    "unit": unit}}).encode()  # fmt: skip


def _manager(tmp_path: Path) -> tuple[Manager, list[Progress]]:
    shown: list[Progress] = []
    app = Manager(Paths(tmp_path), Config(), Transport("dom0"), on_progress=shown.append)
    return app, shown


def test_only_expected_names_and_a_few_a_second(tmp_path: Path) -> None:
    app, shown = _manager(tmp_path)
    wanted = frozenset({"fw.cab"})
    start = time.monotonic()
    for n in range(20_000):  # a new name per line, as fast as it can
        app._progress_line("sys-firewall", _line(f"x{n}", n, None), "bytes", wanted)
        app._progress_line("sys-firewall", _line("fw.cab", n, 10**9), "bytes", wanted)
    took = time.monotonic() - start
    assert {p.what for p in shown} == {"fw.cab"}
    assert len(shown) <= took / 0.1 + 2  # about ten a second at most
    # the end of the step always shows, once
    app._progress_line("sys-firewall", _line("fw.cab", 10, 10), "bytes", wanted)
    app._progress_line("sys-firewall", _line("fw.cab", 10, 10), "bytes", wanted)
    assert [p.done for p in shown].count(10) == 1 and shown[-1].total == 10


def test_malformed_lines_and_wrong_units_are_ignored(tmp_path: Path) -> None:
    app, shown = _manager(tmp_path)
    names = frozenset({"device-write"})
    for bad in (b"", b"\xff", b"[]", b'{"progress": []}', b'{"progress": {"name": ["x"]}}',
                _line(["device-write"], 1, 100, "%"), _line("device-write", -1, 100, "%"),
                _line("device-write", 1, 100, "bytes"), _line("device-write", 1, 0, "%"),
                _line("device-write", True, 100, "%")):  # fmt: skip
        app._progress_line("sys-usb", bad, "%", names)
    assert shown == []
    app._progress_line("sys-usb", _line("device-write", 100, 100, "%"), "%", names)
    assert shown[-1] == Progress("sys-usb", "device-write", 100, 100, "%")
