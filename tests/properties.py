"""The property every parser of hostile input must have."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from broker.errors import BrokerError


def assert_user_message(error: BrokerError) -> None:
    """What the user reads: one line, not empty."""
    message = str(error)
    assert message.strip(), f"{type(error).__name__} with an empty message"
    assert "\n" not in message, repr(message)


@contextmanager
def expect_only_our_errors() -> Iterator[None]:
    """The body returns, or raises one of the project's errors with a one-line message;
    any other exception fails the test."""
    try:
        yield
    except BrokerError as e:
        assert_user_message(e)
