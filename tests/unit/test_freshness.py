"""Freeze attacks: a compromised UpdateVM can only replay older signed metadata, and its
signing time must give it away before an unattended install acts on it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.metadata import staleness

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def accepted(age: timedelta) -> dict[str, str]:
    return {"signed_at": (NOW - age).isoformat(), "sha256": "0" * 64}


@pytest.mark.parametrize(
    ("age", "stale"),
    [
        (timedelta(days=0), False),
        (timedelta(days=29, hours=23), False),
        (timedelta(days=30, seconds=1), True),
        (timedelta(days=400), True),
    ],
)
def test_metadata_older_than_max_age_is_stale(age: timedelta, stale: bool) -> None:
    reason = staleness(accepted(age), 30, NOW)
    assert (reason is not None) == stale
    if stale:
        assert reason is not None
        assert f"{age.days} days ago" in reason
        assert "metadata_max_age_days=30" in reason


def test_no_accepted_metadata_is_not_stale() -> None:
    assert staleness(None, 30, NOW) is None


def test_max_age_is_configurable() -> None:
    assert staleness(accepted(timedelta(days=3)), 2, NOW) is not None
    assert staleness(accepted(timedelta(days=3)), 7, NOW) is None
