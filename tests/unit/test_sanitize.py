"""broker.sanitize.printable: nothing another qube sends may drive the terminal."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.sanitize import printable


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\x1b]0;pwned\x07", "?]0;pwned?"),  # OSC: set the window title
        ("\x1b[2J", "?[2J"),  # CSI: clear the screen
        ("a\x9b31mb", "a?31mb"),  # C1 CSI on its own
        ("a\x85b", "a?b"),  # C1 NEL
        ("del\x7f", "del?"),
        ("nul\x00", "nul?"),
        ("tab\tnl\ncr\r", "tab?nl?cr?"),
        ("\u202eevil", "?evil"),  # right-to-left override
        ("\u202dx\u202a\u202b\u202c", "?x???"),  # other bidi embeddings and overrides
        ("\u2066\u2067\u2068\u2069", "????"),  # bidi isolates
        ("zero\u200bwidth\u200cnon\u200djoiner", "zero?width?non?joiner"),
        ("\ufeffbom", "?bom"),
        ("line\u2028para\u2029", "line?para?"),
        ("\ud800surrogate", "?surrogate"),
        ("\ue000private", "?private"),
        ("\U000e0001tag", "?tag"),  # language tag (Cf)
    ],
)
def test_controls_and_format_characters_are_replaced(text: str, expected: str) -> None:
    assert printable(text) == expected


@pytest.mark.parametrize(
    "text", ["plain ASCII, punctuation: ~!@#$%^&*()", "Caf\u00e9 \u65e5\u672c \u0414\u0430", ""]
)
def test_printable_text_is_unchanged(text: str) -> None:
    assert printable(text) == text


def test_length_is_capped_with_an_ellipsis() -> None:
    assert printable("a" * 512) == "a" * 512
    capped = printable("a" * 513)
    assert len(capped) == 512
    assert capped == "a" * 511 + "…"
    assert printable("abcdef", 4) == "abc…"
    assert printable("abcd", 4) == "abcd"


def test_cap_applies_after_replacement() -> None:
    # a control at the cut does not survive, and the cut does not exceed the cap
    out = printable("\x1b" * 10, 5)
    assert out == "????…"


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=600), st.integers(min_value=1, max_value=600))
def test_property_no_control_or_format_and_capped(text: str, cap: int) -> None:
    out = printable(text, cap)
    assert len(out) <= cap
    assert all(unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn") for c in out)
    if len(text) <= cap:
        assert len(out) == len(text)
