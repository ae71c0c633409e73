"""broker.versions: fwupd 2.0.20's version rules, row by row.

Rows marked "self-test" are fwupd's own expectations, from libfwupdplugin/fu-self-test.c at
tag 2.0.20 (fu_common_vercmp_func, fu_common_version_func, fu_version_semver_func,
fu_version_guess_format_func, fu_version_verify_format_func, fu_device_version_format_func).
The other rows follow from libfwupdplugin/fu-version-common.c; every compare row is also run
through the real ``fwupdtool vercmp`` when fwupd 2.0.20 is installed (test_matches_fwupdtool).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.versions import (
    VersionFormat,
    compare,
    ensure_semver,
    from_uint16,
    from_uint32,
    from_uint64,
    guess_format,
    parse_from_format,
    sort_key,
    verify_format,
    version_format,
)

U = VersionFormat.UNKNOWN
PLAIN = VersionFormat.PLAIN
NUMBER = VersionFormat.NUMBER
PAIR = VersionFormat.PAIR
TRIPLET = VersionFormat.TRIPLET
QUAD = VersionFormat.QUAD
BCD = VersionFormat.BCD
ME = VersionFormat.INTEL_ME
ME2 = VersionFormat.INTEL_ME2
CSME19 = VersionFormat.INTEL_CSME19
SURFACE_LEGACY = VersionFormat.SURFACE_LEGACY
SURFACE = VersionFormat.SURFACE
DELL = VersionFormat.DELL_BIOS
DELL_MSB = VersionFormat.DELL_BIOS_MSB
HEX = VersionFormat.HEX

# (a, b, format, sign of fu_version_compare(a, b, format))
COMPARE_ROWS: list[tuple[str, str, VersionFormat, int]] = [
    # self-test: fu_common_vercmp_func
    ("1.2.3", "1.2.3", U, 0),
    ("001.002.003", "001.002.003", U, 0),
    ("0x00000002", "0x2", HEX, 0),
    ("1.2.3", "1.2.4", U, -1),
    ("001.002.000", "001.002.009", U, -1),
    ("1.2.3", "1.2.2", U, 1),
    ("001.002.009", "001.002.000", U, 1),
    ("1.2.3", "1.2.3.1", U, -1),
    ("1.2.3.1", "1.2.4", U, -1),
    ("1.2.3a", "1.2.3a", U, 0),
    ("1.2.3a", "1.2.3b", U, -1),
    ("1.2.3b", "1.2.3a", U, 1),
    ("1.2.3", "1.2.3a", U, -1),
    ("1.2.3a", "1.2.3", U, 1),
    ("alpha", "alpha", U, 0),
    ("alpha", "beta", U, -1),
    ("beta", "alpha", U, 1),
    ("1.2a.3", "1.2a.3", U, 0),
    ("1.2a.3", "1.2b.3", U, -1),
    ("1.2b.3", "1.2a.3", U, 1),
    ("1.2.3~rc1", "1.2.3~rc1", U, 0),
    ("1.2.3~rc1", "1.2.3", U, -1),
    ("1.2.3", "1.2.3~rc1", U, 1),
    ("1.2.3~rc2", "1.2.3~rc1", U, 1),
    # plain numbers: number/unknown compare values, plain is strcmp
    ("9", "10", NUMBER, -1),
    ("10", "9", U, 1),
    ("10", "9", PLAIN, -1),
    ("100", "99", PLAIN, -1),
    ("1.10", "1.9", PLAIN, -1),
    ("1.2.3", "1.2.3", PLAIN, 0),
    ("B", "a", PLAIN, -1),
    ("1.2.3~rc1", "1.2.3", PLAIN, 1),  # no tilde rule for plain
    # triplet
    ("1.2.10", "1.2.9", TRIPLET, 1),
    ("1.2.9", "1.2.10", TRIPLET, -1),
    ("1.10.0", "1.9.99", TRIPLET, 1),
    ("1.2", "1.2.0", TRIPLET, -1),  # fewer sections is lower, even when the rest is 0
    ("1.2.0", "1.2", TRIPLET, 1),
    ("1.2.3~rc1", "1.2.3", TRIPLET, -1),
    # quad
    ("1.2.3.10", "1.2.3.9", QUAD, 1),
    ("10.0.0.0", "9.255.255.255", QUAD, 1),
    ("1.2.3.4", "1.2.3.4", QUAD, 0),
    # pair
    ("1.10", "1.9", PAIR, 1),
    ("2.0", "1.65535", PAIR, 1),
    ("1.05", "1.5", PAIR, 0),
    # bcd
    ("1.10", "1.9", BCD, 1),
    ("99.99", "100.0", BCD, -1),
    # intel-me / intel-me2 / intel-csme19
    ("11.8.50.3460", "11.8.50.3399", ME, 1),
    ("16.1.30.2307", "16.1.27.2176", ME, 1),
    ("11.8.50.3460", "11.12.0.1", ME2, -1),
    ("19.0.0.1857", "19.0.0.1900", CSME19, -1),
    # surface / surface-legacy
    ("6.25.136", "6.100.1", SURFACE, -1),
    ("137.2706.768", "137.2706.769", SURFACE_LEGACY, -1),
    # dell-bios / dell-bios-msb
    ("1.15.2", "1.9.0", DELL, 1),
    ("01.15.02", "1.15.2", DELL, 0),
    ("1.15.2", "1.15.10", DELL_MSB, -1),
    # hex: both sides become 0x%08x first when they are plain numbers
    ("0x0000000a", "0x9", HEX, 1),
    ("0xa", "9", HEX, 1),
    ("10", "0xa", HEX, 0),
    ("0xA", "0xa", HEX, 0),
    ("0x1a", "0x9", HEX, 1),
    ("0xff", "0x100", HEX, -1),
    ("0xff", "0x100", U, 1),  # without the hex format: "xff" > "x100" as text
    ("0x10", "9", NUMBER, -1),  # as a number section "0x10" is 0
    ("0x10", "9", HEX, 1),
    ("20150915", "0xffffffff", HEX, 1),  # 8 chars starting "20" is a date, kept
    ("20000000", "0x1", HEX, 1),
    ("2000000", "0x1e8480", HEX, 0),  # 7 chars: a number again
    ("0", "0x1", HEX, -1),  # zero is kept as text
    ("0", "0x0", HEX, -1),
    ("4294967296", "0xffffffff", HEX, 1),  # above 32 bits: kept as text
    ("4294967295", "0xffffffff", HEX, 0),
    ("1.2", "0x10", HEX, 1),
    ("123\nabc", "0x7b", HEX, 0),  # fu_strtoull stops happily at a newline
    (" 42", "0x2a", HEX, 0),
    ("+5", "5", HEX, 0),
    ("0x0x10", "16", HEX, 0),  # glibc strtoull base 16 takes a second 0x
    ("0X10", "16", HEX, -1),  # but fwupd only strips a lower-case 0x
    ("0x-1", "0xffffffff", HEX, -1),  # wraps to 2**64-1: overflow, kept as text
    ("-18446744069414584321", "0xffffffff", HEX, 0),  # wraps to exactly 0xffffffff
    # integers under each format are NOT converted first (only hex converts)
    ("65546", "1.0.10", TRIPLET, 1),
    ("16909060", "1.2.3.5", QUAD, 1),
    ("65537", "1.2", PAIR, 1),
    ("272", "1.10", BCD, 1),
    ("187827578", "11.11.50.1402", ME, 1),
    ("100669832", "6.25.136", SURFACE, 1),
    ("16711681", "255.0.1", DELL, 1),  # converted it would be "255.0.1", equal
    ("0x010f0201", "1.15.2", DELL_MSB, -1),
    # letters and suffixes
    ("1.2.3-rc1", "1.2.3", U, 1),  # '-' is just a byte: a "-rc" sorts after the release
    ("1.2.3-rc1", "1.2.3", TRIPLET, 1),
    ("1.2.3-rc1", "1.2.3-rc2", U, -1),
    ("1.2.3-rc10", "1.2.3-rc9", U, -1),  # suffixes compare byte by byte
    ("1.2.3a", "1.2.10", U, -1),
    ("1.2.3a", "1.2.3A", U, 1),
    ("v1.2.3", "1.2.3", U, -1),  # "v1" is 0 followed by "v1"
    ("v2.0.0", "v1.9.9", U, 1),
    ("v10.0", "v9.0", U, -1),
    ("1.2.3 ", "1.2.3", U, 1),
    (" 1.2.3", "1.2.3", U, 0),  # strtoll skips leading white space
    ("1.+2.3", "1.2.3", U, 0),
    ("1.-2.3", "1.0.3", U, -1),
    ("1~", "1", U, -1),
    ("~", "~~", U, 1),
    ("a", "~", U, 1),
    # leading zeros
    ("1.02", "1.2", U, 0),
    ("1.010", "1.9", U, 1),
    ("0001", "1", NUMBER, 0),
    ("0001", "1", PLAIN, -1),
    # empty and garbage
    ("", "", U, 0),
    ("", "1", U, -1),
    ("1", "", U, 1),
    ("", ".", U, -1),
    (".", "", U, 1),
    ("1..2", "1.0.2", U, 0),
    ("1.2.", "1.2", U, 1),
    ("1.2.", "1.2.0", U, 0),
    ("...", "..", U, 1),
    ("abc", "", U, 1),
    ("~", "", U, 1),  # a section beats no section, tilde or not
    ("", "", HEX, 0),
    ("", "x", PLAIN, -1),
    # huge numbers saturate at the int64 limits
    ("99999999999999999999", "99999999999999999998", U, 0),
    ("9223372036854775807", "9223372036854775808", U, 0),
    ("9223372036854775806", "9223372036854775807", U, -1),
    ("-99999999999999999999", "-9223372036854775808", U, 0),
    ("1" + "0" * 60, "2", U, 1),
    # non-ASCII: never digits; UTF-8 bytes are signed chars, below even the end of a string
    ("1²", "1", U, -1),
    ("²", "1", U, -1),
    ("١٢٣", "1", U, -1),  # Arabic-Indic 123 is 0 followed by text
    ("١٢٣", "٩", U, -1),
    ("1é", "1", U, -1),
    ("1é", "1a", U, -1),
    ("1é", "1~", U, 1),
    ("1é", "1", PLAIN, 1),  # strcmp compares unsigned bytes
]

# "Never guess from dotted numbers alone": rows where int()-per-section and fwupd disagree.
NAIVE_DIFFERS: list[tuple[str, str, VersionFormat, int]] = [
    ("100", "99", PLAIN, -1),
    ("1.02", "1.2", PLAIN, -1),
    ("0xff", "0x100", U, 1),
    ("0x10", "9", NUMBER, -1),
    ("0X10", "16", HEX, -1),
    ("0", "0x0", HEX, -1),
    ("9223372036854775807", "9223372036854775808", U, 0),
    ("99999999999999999999", "99999999999999999998", U, 0),
    ("1.1_0", "1.9", U, -1),  # int() accepts "1_0"
    ("1.٣", "1.2", U, -1),  # int() accepts Arabic-Indic digits
    ("1.१०", "1.9", U, -1),  # and Devanagari ones
    ("1.2 ", "1.2", U, 1),  # and trailing white space
    ("1.2\n", "1.2", U, 1),
]


def _naive(a: str, b: str) -> int:
    """The guess this module exists to avoid: int() of each dotted section, tuples compared."""

    def key(version: str) -> tuple[int, ...]:
        return tuple(int(p, 0) if p[:2].lower() == "0x" else int(p) for p in version.split("."))

    ka, kb = key(a), key(b)
    return (ka > kb) - (ka < kb)


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


@pytest.mark.parametrize(("a", "b", "fmt", "expected"), COMPARE_ROWS)
def test_compare(a: str, b: str, fmt: VersionFormat, expected: int) -> None:
    assert compare(a, b, fmt) == expected
    assert compare(b, a, fmt) == -expected


@pytest.mark.parametrize(("a", "b", "fmt", "expected"), NAIVE_DIFFERS)
def test_not_a_dotted_int_guess(a: str, b: str, fmt: VersionFormat, expected: int) -> None:
    assert _naive(a, b) != expected
    assert compare(a, b, fmt) == expected


def test_compare_default_format_is_unknown() -> None:
    assert compare("1.2.10", "1.2.9") == 1
    assert compare("0xff", "0x100") == 1


def test_nul_ends_the_string_like_c() -> None:
    assert compare("1.2\x00junk", "1.2") == 0
    assert compare("1.2\x00junk", "1.2", PLAIN) == 0
    assert parse_from_format("5\x009", TRIPLET) == "0.0.5"


def test_lone_surrogates_do_not_raise() -> None:
    assert compare("1\udcff", "1") == -1  # surrogateescape: the byte 0xff
    assert compare("1\ud800", "1") == -1  # surrogatepass: ed a0 80
    assert parse_from_format("\ud800", HEX) == "\ud800"


# (version, format, fu_version_parse_from_format)
PARSE_ROWS: list[tuple[str, VersionFormat, str | None]] = [
    # self-test: fu_common_version_func version_parse[] (triplet)
    ("0", TRIPLET, "0"),
    ("0x1a", TRIPLET, "0.0.26"),
    ("257", TRIPLET, "0.0.257"),
    ("1.2.3", TRIPLET, "1.2.3"),
    ("0xff0001", TRIPLET, "0.255.1"),
    ("16711681", TRIPLET, "0.255.1"),
    ("20150915", TRIPLET, "20150915"),
    ("dave", TRIPLET, "dave"),
    ("0x1x", TRIPLET, "0x1x"),
    # each format renders the 32-bit value with from_uint32
    ("65546", TRIPLET, "0.1.10"),
    ("16909060", QUAD, "1.2.3.4"),
    ("65537", PAIR, "1.1"),
    ("0x0110", BCD, "0.0.1.10"),
    ("0x0b32057a", ME, "11.11.50.1402"),
    ("0xb8320d84", ME2, "11.8.50.3460"),
    ("0x00000741", CSME19, "19.0.0.1857"),
    ("0x226a4b00", SURFACE_LEGACY, "137.2706.768"),
    ("0x6001988", SURFACE, "6.25.136"),
    ("0x00ff0001", DELL, "255.0.1"),
    ("0x010f0201", DELL_MSB, "1.15.2"),
    ("0x10", NUMBER, "16"),
    ("0x10", PLAIN, "16"),
    ("16", HEX, "0x00000010"),
    ("0x10", U, None),  # fwupd: g_critical and NULL
    ("0x10.1", U, "0x10.1"),  # has a dot: never converted
    # fu_strtoull's edges
    ("4294967295", TRIPLET, "255.255.65535"),
    ("4294967296", TRIPLET, "4294967296"),
    ("-1", TRIPLET, "-1"),
    ("-18446744069414584321", TRIPLET, "255.255.65535"),
    ("123\n", TRIPLET, "0.0.123"),
    ("123\nabc", TRIPLET, "0.0.123"),
    (" 42", TRIPLET, "0.0.42"),
    ("+5", TRIPLET, "0.0.5"),
    ("0x+a", TRIPLET, "0.0.10"),
    ("0x-1", TRIPLET, "0x-1"),
    ("0x0x10", TRIPLET, "0.0.16"),
    ("0X10", TRIPLET, "0X10"),
    ("0x", TRIPLET, "0x"),
    ("", TRIPLET, ""),
    ("\n", TRIPLET, "\n"),
    ("20abcdef", TRIPLET, "20abcdef"),
    ("20000000", TRIPLET, "20000000"),
    ("2000000", TRIPLET, "0.30.33920"),
    ("1a", TRIPLET, "1a"),
    ("²", TRIPLET, "²"),
    ("١٢٣", TRIPLET, "١٢٣"),
    ("9" * 64, TRIPLET, "9" * 64),
    ("0x" + "f" * 62, TRIPLET, "0x" + "f" * 62),
]


@pytest.mark.parametrize(("version", "fmt", "expected"), PARSE_ROWS)
def test_parse_from_format(version: str, fmt: VersionFormat, expected: str | None) -> None:
    assert parse_from_format(version, fmt) == expected


def test_convert_then_compare_is_explicit() -> None:
    # fwupd converts an integer only where it says so (device raw versions, the hex format)
    assert compare("65546", "1.0.10", TRIPLET) == 1
    converted = parse_from_format("65546", TRIPLET)
    assert converted == "0.1.10"
    assert compare(converted, "1.0.10", TRIPLET) == -1


# (value, format, fu_version_from_uint32)
UINT32_ROWS: list[tuple[int, VersionFormat, str | None]] = [
    # self-test: fu_common_version_func version_from_uint32[]
    (0x0, QUAD, "0.0.0.0"),  # noqa: S104 (a version, not an address)
    (0xFF, QUAD, "0.0.0.255"),
    (0xFF01, QUAD, "0.0.255.1"),
    (0xFF0001, QUAD, "0.255.0.1"),
    (0xFF000100, QUAD, "255.0.1.0"),
    (0x0, TRIPLET, "0.0.0"),
    (0xFF, TRIPLET, "0.0.255"),
    (0xFF01, TRIPLET, "0.0.65281"),
    (0xFF0001, TRIPLET, "0.255.1"),
    (0xFF000100, TRIPLET, "255.0.256"),
    (0x0, NUMBER, "0"),
    (0xFF000100, NUMBER, "4278190336"),
    (0x0, ME, "11.0.0.0"),
    (0xFFFFFFFF, ME, "18.31.255.65535"),
    (0x0B32057A, ME, "11.11.50.1402"),
    (0xB8320D84, ME2, "11.8.50.3460"),
    (0x00000741, CSME19, "19.0.0.1857"),
    (0x226A4B00, SURFACE_LEGACY, "137.2706.768"),
    (0x6001988, SURFACE, "6.25.136"),
    (0x00FF0001, DELL, "255.0.1"),
    (0x010F0201, DELL_MSB, "1.15.2"),
    (0xC8, HEX, "0x000000c8"),
    # the rest of fu_version_from_uint32
    (0x00010002, PAIR, "1.2"),
    (0xFFFFFFFF, PAIR, "65535.65535"),
    (0x10, PLAIN, "16"),
    (0x01020304, BCD, "1.2.3.4"),
    (0x12345678, BCD, "12.34.56.78"),
    (0x000000FF, BCD, "0.0.0.165"),  # invalid BCD nibbles are not rejected
    (0x0, ME2, "0.0.0.0"),  # noqa: S104 (a version, not an address)
    (0xFFFFFFFF, CSME19, "26.31.255.65535"),
    (0xFFFFFFFF, SURFACE_LEGACY, "1023.4095.1023"),
    (0xFFFFFFFF, HEX, "0xffffffff"),
    (0x1_0000_0001, NUMBER, "1"),  # a guint32 argument: modulo 2**32
    (-1, NUMBER, "4294967295"),
    (0x10, U, None),
]


@pytest.mark.parametrize(("value", "fmt", "expected"), UINT32_ROWS)
def test_from_uint32(value: int, fmt: VersionFormat, expected: str | None) -> None:
    assert from_uint32(value, fmt) == expected


# (value, format, fu_version_from_uint16)
UINT16_ROWS: list[tuple[int, VersionFormat, str | None]] = [
    # self-test: fu_common_version_func version_from_uint16[]
    (0x0, PAIR, "0.0"),
    (0xFF, PAIR, "0.255"),
    (0xFF01, PAIR, "255.1"),
    (0x0, BCD, "0.0"),
    (0x0110, BCD, "1.10"),
    (0x9999, BCD, "99.99"),
    (0x0, NUMBER, "0"),
    (0x1234, NUMBER, "4660"),
    (0x1234, TRIPLET, "1.2.52"),
    # the rest of fu_version_from_uint16
    (0x1234, QUAD, "1.2.3.4"),
    (0x12, HEX, "0x0012"),
    (0x1234, PLAIN, "4660"),
    (0xABCD, BCD, "111.133"),
    (0x1_0001, NUMBER, "1"),
    (0x1234, ME, None),
    (0x1234, DELL, None),
    (0x1234, SURFACE, None),
    (0x1234, U, None),
]


@pytest.mark.parametrize(("value", "fmt", "expected"), UINT16_ROWS)
def test_from_uint16(value: int, fmt: VersionFormat, expected: str | None) -> None:
    assert from_uint16(value, fmt) == expected


# self-test: fu_common_version_func version_from_uint64[]
UINT64_ROWS: list[tuple[int, VersionFormat, str | None]] = [
    (0x0, QUAD, "0.0.0.0"),  # noqa: S104 (a version, not an address)
    (0xFF, QUAD, "0.0.0.255"),
    (0xFFFFFFFFFFFFFFFF, QUAD, "65535.65535.65535.65535"),
    (0xFF, PAIR, "0.255"),
    (0xFFFFFFFFFFFFFFFF, PAIR, "4294967295.4294967295"),
    (0x0, NUMBER, "0"),
    (0x11000000C8, HEX, "0x00000011000000c8"),
    (0x1234, TRIPLET, None),
]


@pytest.mark.parametrize(("value", "fmt", "expected"), UINT64_ROWS)
def test_from_uint64(value: int, fmt: VersionFormat, expected: str | None) -> None:
    assert from_uint64(value, fmt) == expected


SEMVER_ROWS: list[tuple[str, VersionFormat, str | None]] = [
    # self-test: fu_version_semver_func
    ("1.2.3", TRIPLET, "1.2.3"),
    ("1.2.3.4", TRIPLET, "1.2.3"),
    ("1.2", TRIPLET, "0.1.2"),
    ("1", TRIPLET, "0.0.1"),
    ("CBET1.2.3", TRIPLET, "1.2.3"),
    ("4.11-1190-g12d8072e6b-dirty", TRIPLET, "4.11.1190"),
    ("4.11-1190-g12d8072e6b-dirty", PAIR, "4.11"),
    # self-test: fu_device_version_format_func
    ("Ver1.2.3 RELEASE", TRIPLET, "1.2.3"),
    # the rest of fu_version_ensure_semver
    ("no digits", TRIPLET, None),
    ("", TRIPLET, None),
    ("0x10", TRIPLET, "0.0.16"),
    ("1.2.3", U, "1.2.3"),
    ("1..2", TRIPLET, "0.1.2"),
    ("1.2.", QUAD, "0.0.1.2"),
    ("1-~2", PAIR, "1."),
    ("1.2.3", PLAIN, "1"),
    ("²1", TRIPLET, "0.0.1"),
]


@pytest.mark.parametrize(("version", "fmt", "expected"), SEMVER_ROWS)
def test_ensure_semver(version: str, fmt: VersionFormat, expected: str | None) -> None:
    assert ensure_semver(version, fmt) == expected


GUESS_ROWS: list[tuple[str | None, VersionFormat]] = [
    # self-test: fu_version_guess_format_func
    (None, U),
    ("", U),
    ("1234ac", HEX),
    ("1.2", PAIR),
    ("1.2.3", TRIPLET),
    ("1.2.3.4", QUAD),
    ("1.2.3.4.5", U),
    ("1a.2b.3", PLAIN),
    ("1", NUMBER),
    ("1A", HEX),
    ("0x10201", NUMBER),
    # more
    ("1..2", TRIPLET),  # an empty section counts as digits
    ("١٢٣", PLAIN),
    ("²", PLAIN),
]


@pytest.mark.parametrize(("version", "expected"), GUESS_ROWS)
def test_guess_format(version: str | None, expected: VersionFormat) -> None:
    assert guess_format(version) == expected


VERIFY_ROWS: list[tuple[str, VersionFormat, bool]] = [
    # self-test: fu_version_verify_format_func
    ("1A", HEX, True),
    ("1A", NUMBER, False),
    # more
    ("0x10", HEX, True),
    ("1.2.3", TRIPLET, True),
    ("1.2.3", DELL, True),
    ("1.2.3", SURFACE, True),
    ("1.2", BCD, True),
    ("1.2.3.4", BCD, True),
    ("1.2.3", BCD, False),
    ("1.2.3.4", ME, True),
    ("1.2.3", QUAD, False),
    ("1.2.3a", TRIPLET, False),
    ("anything at all", PLAIN, True),
    ("anything at all", U, True),
]


@pytest.mark.parametrize(("version", "fmt", "expected"), VERIFY_ROWS)
def test_verify_format(version: str, fmt: VersionFormat, expected: bool) -> None:
    assert verify_format(version, fmt) is expected


def test_version_format_names() -> None:
    # fwupd_version_format_from_string / _to_string, in the enum order of fwupd-enums.h
    assert [f.value for f in VersionFormat] == [
        "unknown",
        "plain",
        "number",
        "pair",
        "triplet",
        "quad",
        "bcd",
        "intel-me",
        "intel-me2",
        "surface-legacy",
        "surface",
        "dell-bios",
        "hex",
        "dell-bios-msb",
        "intel-csme19",
    ]
    for fmt in VersionFormat:
        assert version_format(fmt.value) is fmt


@pytest.mark.parametrize("name", [None, "", "Triplet", "triplet ", "last", "quad\x00", "٣"])
def test_version_format_unknown(name: str | None) -> None:
    assert version_format(name) is VersionFormat.UNKNOWN


def test_sort_key() -> None:
    offered = ["1.2.10", "1.2.9", "1.2.3a", "1.2.3", "1.2.3~rc1"]
    assert sorted(offered, key=sort_key(TRIPLET)) == [
        "1.2.3~rc1",
        "1.2.3",
        "1.2.3a",
        "1.2.9",
        "1.2.10",
    ]
    assert sorted(["0x100", "0xff", "0x9"], key=sort_key(HEX)) == ["0x9", "0xff", "0x100"]
    assert sorted(["0x100", "0xff", "0x9"], key=sort_key(U)) == ["0x100", "0x9", "0xff"]
    assert max(["2.0", "10.0", "9.9"], key=sort_key(PLAIN)) == "9.9"


_ANY_FORMAT = st.sampled_from(list(VersionFormat))
_VERSIONS = st.text(max_size=64) | st.text(alphabet="0123456789.x~-+ ab\n²٣", max_size=64)


@settings(max_examples=500, deadline=None)
@given(a=_VERSIONS, b=_VERSIONS, fmt=_ANY_FORMAT)
def test_never_raises_and_is_antisymmetric(a: str, b: str, fmt: VersionFormat) -> None:
    rc = compare(a, b, fmt)
    assert rc in (-1, 0, 1)
    assert compare(b, a, fmt) == -rc
    assert compare(a, a, fmt) == 0
    parsed = parse_from_format(a, fmt)
    assert parsed is None or isinstance(parsed, str)
    assert guess_format(a) in VersionFormat
    assert isinstance(verify_format(a, fmt), bool)
    semver = ensure_semver(a, fmt)
    assert semver is None or isinstance(semver, str)


def test_linear_time_on_long_input() -> None:
    long_inputs = [
        "1." * 100_000,
        "9" * 200_000,
        "0x" + "f" * 200_000,
        "~" * 200_000,
        "a" * 199_999 + "b",
        ".".join(["9" * 40] * 5_000),
    ]
    start = time.monotonic()
    for text in long_inputs:
        for fmt in (U, PLAIN, HEX, TRIPLET):
            compare(text, text + "1", fmt)
            parse_from_format(text, fmt)
            ensure_semver(text, fmt)
            verify_format(text, fmt)
    assert time.monotonic() - start < 5


# --------------------------------------------------------------------------------------------
# cross-check with the real fwupd 2.0.20, when installed

_FWUPDTOOL = shutil.which("fwupdtool")


def _scrubbed_env(root: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "FWUPD_SYSCONFDIR": str(root / "etc"),
        "FWUPD_LOCALSTATEDIR": str(root / "var"),
        "FWUPD_RUNDIR": str(root / "run"),
        "FWUPD_LOCKDIR": str(root / "run" / "lock"),
    }


@pytest.fixture(scope="module")
def fwupdtool_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if _FWUPDTOOL is None:
        pytest.skip("fwupdtool is not installed")
    env = _scrubbed_env(tmp_path_factory.mktemp("fwupd"))
    out = subprocess.run(
        [_FWUPDTOOL, "--version"], env=env, capture_output=True, text=True, timeout=30
    ).stdout
    if not re.search(r"^runtime\s+org\.freedesktop\.fwupd\s+2\.0\.20$", out, re.MULTILINE):
        pytest.skip("the installed fwupd is not 2.0.20")
    return env


def _argv_safe(text: str) -> bool:
    """fwupdtool would read a leading '-' as an option; argv cannot hold NUL or surrogates."""
    if text.startswith("-") or "\0" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@pytest.mark.parametrize(
    ("a", "b", "fmt", "expected"),
    [row for row in COMPARE_ROWS + NAIVE_DIFFERS if _argv_safe(row[0]) and _argv_safe(row[1])],
)
def test_matches_fwupdtool(
    fwupdtool_env: dict[str, str], a: str, b: str, fmt: VersionFormat, expected: int
) -> None:
    assert _FWUPDTOOL is not None
    argv = [_FWUPDTOOL, "vercmp", a, b] + ([] if fmt == U else [fmt.value])
    proc = subprocess.run(
        argv, env=fwupdtool_env, capture_output=True, text=True, timeout=30, cwd=os.sep
    )
    assert proc.returncode == 0, proc.stderr
    ops = {f"{a} < {b}\n": -1, f"{a} == {b}\n": 0, f"{a} > {b}\n": 1}
    assert proc.stdout in ops, proc.stdout
    assert ops[proc.stdout] == expected
    assert compare(a, b, fmt) == expected
