"""broker.backoff: how long an unattended refresh waits after failures in a row."""

from __future__ import annotations

from pathlib import Path

from broker.backoff import Backoff

HOUR = 3600.0


def test_intervals_after_one_two_and_three_failures_then_capped_and_reset(tmp_path: Path) -> None:
    path = tmp_path / "refresh-backoff.json"
    state = Backoff.load(path)
    assert state.wait_until() is None
    waits = []
    for n in range(1, 5):
        state = state.failed(1000.0 * n, f"failure {n}")
        state.save(path)
        state = Backoff.load(path)  # it survives a reboot: read back every time
        until = state.wait_until()
        assert until is not None
        waits.append(until - 1000.0 * n)
    assert waits == [1 * HOUR, 4 * HOUR, 24 * HOUR, 24 * HOUR]
    assert (state.failures, state.last_error) == (4, "failure 4")
    Backoff().save(path)  # a refresh that worked
    assert not path.exists() and Backoff.load(path).wait_until() is None


def test_a_damaged_state_never_stops_refreshes_for_good(tmp_path: Path) -> None:
    path = tmp_path / "refresh-backoff.json"
    for text in ("{", '{"failures": "many"}', "[]", "x" * 10_000):
        path.write_text(text)
        assert Backoff.load(path).wait_until() is None


def test_the_error_kept_is_printable(tmp_path: Path) -> None:
    state = Backoff().failed(0.0, "sys-firewall: \x1b[2Jgone")
    assert "\x1b" not in state.last_error
