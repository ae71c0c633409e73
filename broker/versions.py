"""fwupd's own version rules (fwupd 2.0.20), for where dom0 orders firmware versions itself.

Rewritten from libfwupdplugin/fu-version-common.c (fu_version_compare, fu_version_from_uint*,
fu_version_parse_from_format, fu_version_ensure_semver, fu_version_guess_format,
fu_version_verify_format) and the glib/glibc parsing it relies on (g_strsplit,
g_ascii_strtoll, g_ascii_strtoull via fu_strtoull).  Nothing here guesses an order from
"dotted numbers"; every rule is fwupd's, including the odd ones:

* ``compare`` looks at the format only for ``plain`` (strcmp) and ``hex`` (each side goes
  through ``parse_from_format`` first).  For every other format, including ``triplet``, it
  compares the strings as they are: an integer such as ``"65546"`` is *not* converted to
  ``"0.1.10"`` first.  Where fwupd converts (device raw versions, fu-engine.c matching a
  release to the device version), do it explicitly with ``parse_from_format`` / ``from_uint32``.
* Each dot-separated section is parsed like C ``strtoll(s, &end, 10)``: leading white space and
  a sign are accepted, values saturate at the int64 limits (so two 20-digit numbers can compare
  equal), ``"02" == "2"``.  What follows the digits is compared byte by byte, with ``~`` lower
  than anything (even the end of the string) and bytes compared as *signed* chars, as on
  x86-64 where Qubes dom0 runs: a non-ASCII suffix (UTF-8 bytes >= 0x80) sorts *below* no
  suffix at all, so ``"1é" < "1"`` while ``"1a" > "1"``.
* Fewer sections sorts lower when all shared sections are equal: ``"1.2" < "1.2.0"``.

All parsing is ASCII-only, works on the UTF-8 bytes, stops at a NUL like a C string, never
raises on a str of any content and runs in time linear in the input length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import StrEnum
from typing import Any

__all__ = [
    "VersionFormat",
    "compare",
    "ensure_semver",
    "from_uint16",
    "from_uint32",
    "from_uint64",
    "guess_format",
    "parse_from_format",
    "sort_key",
    "verify_format",
    "version_format",
]

_INT64_MAX = (1 << 63) - 1
_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1
_UINT32_MAX = (1 << 32) - 1

_C_SPACE = b" \t\n\v\f\r"  # isspace() in the C locale
_DIGITS = b"0123456789"
_XDIGITS = b"0123456789abcdefABCDEF"


class VersionFormat(StrEnum):
    """fwupd's FwupdVersionFormat (libfwupd/fwupd-enums.h), in fwupd's enum order; the values
    are fwupd's names (fwupd_version_format_to_string), ``unknown`` for UNKNOWN."""

    UNKNOWN = "unknown"
    PLAIN = "plain"
    NUMBER = "number"
    PAIR = "pair"
    TRIPLET = "triplet"
    QUAD = "quad"
    BCD = "bcd"
    INTEL_ME = "intel-me"
    INTEL_ME2 = "intel-me2"
    SURFACE_LEGACY = "surface-legacy"
    SURFACE = "surface"
    DELL_BIOS = "dell-bios"
    HEX = "hex"
    DELL_BIOS_MSB = "dell-bios-msb"
    INTEL_CSME19 = "intel-csme19"


_BY_NAME: dict[str, VersionFormat] = {f.value: f for f in VersionFormat}


def version_format(name: str | None) -> VersionFormat:
    """fwupd_version_format_from_string: exact, case-sensitive; anything else is UNKNOWN."""
    if not isinstance(name, str):
        return VersionFormat.UNKNOWN
    return _BY_NAME.get(str(name), VersionFormat.UNKNOWN)


# --------------------------------------------------------------------------------------------
# C string helpers


def _c_text(text: str) -> str:
    """What a C caller would see: the text up to the first NUL."""
    return text.split("\0", 1)[0]


def _c_bytes(text: str) -> bytes:
    """The bytes of a (NUL-truncated) str; lone surrogates are encoded, never an error."""
    text = _c_text(text)
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _split_dots(data: bytes) -> list[bytes]:
    """g_strsplit(s, ".", -1): like bytes.split, except that "" gives no sections at all."""
    return data.split(b".") if data else []


def _span(data: bytes, start: int, allowed: bytes) -> int:
    """Index of the first byte at or after ``start`` that is not in ``allowed``."""
    end = start
    while end < len(data) and data[end] in allowed:
        end += 1
    return end


def _magnitude(digits: bytes, base: int, limit: int) -> int | None:
    """Value of an ASCII digit run, or None when it is above ``limit`` (no big-int work)."""
    digits = digits.lstrip(b"0")
    max_len = 20 if base == 10 else 16  # anything longer is above 2**64 anyway
    if len(digits) > max_len:
        return None
    value = int(digits, base) if digits else 0
    return None if value > limit else value


def _strtoll10(data: bytes) -> tuple[int, bytes]:
    """C strtoll(data, &end, 10) in the C locale: (value, the bytes from ``end`` on)."""
    pos = _span(data, 0, _C_SPACE)
    negative = False
    if pos < len(data) and data[pos] in b"+-":
        negative = data[pos] == ord("-")
        pos += 1
    end = _span(data, pos, _DIGITS)
    if end == pos:  # no digits: nothing converted, end points at the start
        return 0, data
    limit = -_INT64_MIN if negative else _INT64_MAX
    magnitude = _magnitude(data[pos:end], 10, limit)
    if magnitude is None:  # saturates, end still after all the digits
        magnitude = limit
    return (-magnitude if negative else magnitude), data[end:]


def _fu_strtoull_u32(data: bytes) -> int | None:
    """fu_strtoull(str, &val, 0, G_MAXUINT32, FU_INTEGER_BASE_AUTO): the value, or None.

    "0x" selects base 16 (glibc's strtoull then accepts another 0x/0X prefix), white space
    and a sign may lead, a trailing newline (and whatever follows it) is tolerated, a
    negative value wraps modulo 2**64 like strtoull, and G_MAXUINT64 counts as overflow."""
    base = 10
    if data.startswith(b"0x"):
        data = data[2:]
        base = 16
    pos = _span(data, 0, _C_SPACE)
    negative = False
    if pos < len(data) and data[pos] in b"+-":
        negative = data[pos] == ord("-")
        pos += 1
    if base == 16 and data[pos : pos + 1] == b"0" and data[pos + 1 : pos + 2] in (b"x", b"X"):
        pos += 2
    end = _span(data, pos, _XDIGITS if base == 16 else _DIGITS)
    if end == pos:
        # nothing converted: strtoull gives 0 (fu_strtoull may even accept it, e.g. for ""),
        # and parse_from_format keeps the text for 0 and for a failure alike
        return None
    if end != len(data) and data[end] != ord("\n"):
        return None
    magnitude = _magnitude(data[pos:end], base, _UINT64_MAX)
    if magnitude is None:
        return None  # strtoull overflow -> G_MAXUINT64 -> "overflow"
    value = (-magnitude) % (1 << 64) if negative else magnitude
    if value == _UINT64_MAX or value > _UINT32_MAX:
        return None
    return value


# --------------------------------------------------------------------------------------------
# integer -> string


def _bcd(byte: int) -> int:
    """FU_COMMON_VERSION_DECODE_BCD of the low byte (nibbles above 9 are not rejected)."""
    return ((byte >> 4) & 0x0F) * 10 + (byte & 0x0F)


def from_uint64(value: int, fmt: VersionFormat) -> str | None:
    """fu_version_from_uint64; None where fwupd returns NULL (format not supported)."""
    val = value & _UINT64_MAX
    if fmt == VersionFormat.QUAD:
        return ".".join(str((val >> shift) & 0xFFFF) for shift in (48, 32, 16, 0))
    if fmt == VersionFormat.PAIR:
        return f"{(val >> 32) & _UINT32_MAX}.{val & _UINT32_MAX}"
    if fmt in (VersionFormat.NUMBER, VersionFormat.PLAIN):
        return str(val)
    if fmt == VersionFormat.HEX:
        return f"0x{val >> 32:08x}{val & _UINT32_MAX:08x}"
    return None


def from_uint32(value: int, fmt: VersionFormat) -> str | None:
    """fu_version_from_uint32; ``value`` is taken modulo 2**32 like a C guint32 argument.
    None where fwupd returns NULL (UNKNOWN, or a format it cannot render)."""
    val = value & _UINT32_MAX
    b3, b2, b1, b0 = (val >> 24) & 0xFF, (val >> 16) & 0xFF, (val >> 8) & 0xFF, val & 0xFF
    if fmt == VersionFormat.QUAD:
        return f"{b3}.{b2}.{b1}.{b0}"
    if fmt == VersionFormat.TRIPLET:
        return f"{b3}.{b2}.{val & 0xFFFF}"
    if fmt == VersionFormat.PAIR:
        return f"{(val >> 16) & 0xFFFF}.{val & 0xFFFF}"
    if fmt in (VersionFormat.NUMBER, VersionFormat.PLAIN):
        return str(val)
    if fmt == VersionFormat.BCD:
        return f"{_bcd(b3)}.{_bcd(b2)}.{_bcd(b1)}.{_bcd(b0)}"
    if fmt == VersionFormat.INTEL_ME:
        return f"{((val >> 29) & 0x07) + 11}.{(val >> 24) & 0x1F}.{b2}.{val & 0xFFFF}"
    if fmt == VersionFormat.INTEL_ME2:
        return f"{(val >> 28) & 0x0F}.{(val >> 24) & 0x0F}.{b2}.{val & 0xFFFF}"
    if fmt == VersionFormat.INTEL_CSME19:
        return f"{((val >> 29) & 0x07) + 19}.{(val >> 24) & 0x1F}.{b2}.{val & 0xFFFF}"
    if fmt == VersionFormat.SURFACE_LEGACY:
        return f"{(val >> 22) & 0x3FF}.{(val >> 10) & 0xFFF}.{val & 0x3FF}"
    if fmt == VersionFormat.SURFACE:
        return f"{b3}.{(val >> 8) & 0xFFFF}.{b0}"
    if fmt == VersionFormat.DELL_BIOS:
        return f"{b2}.{b1}.{b0}"
    if fmt == VersionFormat.HEX:
        return f"0x{val:08x}"
    if fmt == VersionFormat.DELL_BIOS_MSB:
        return f"{b3}.{b2}.{b1}"
    return None


def from_uint16(value: int, fmt: VersionFormat) -> str | None:
    """fu_version_from_uint16; ``value`` is taken modulo 2**16 like a C guint16 argument.
    None where fwupd returns NULL (only bcd, pair, quad, triplet, number, plain, hex work)."""
    val = value & 0xFFFF
    if fmt == VersionFormat.BCD:
        return f"{_bcd(val >> 8)}.{_bcd(val)}"
    if fmt == VersionFormat.PAIR:
        return f"{(val >> 8) & 0xFF}.{val & 0xFF}"
    if fmt == VersionFormat.QUAD:
        return f"{(val >> 12) & 0xF}.{(val >> 8) & 0xF}.{(val >> 4) & 0xF}.{val & 0xF}"
    if fmt == VersionFormat.TRIPLET:
        return f"{(val >> 12) & 0xF}.{(val >> 8) & 0xF}.{val & 0xFF}"
    if fmt in (VersionFormat.NUMBER, VersionFormat.PLAIN):
        return str(val)
    if fmt == VersionFormat.HEX:
        return f"0x{val:04x}"
    return None


# --------------------------------------------------------------------------------------------
# string -> string


def parse_from_format(version: str, fmt: VersionFormat) -> str | None:
    """fu_version_parse_from_format.

    Text with a dot, an 8-character text starting "20" (a date), anything that is not a
    whole base-10 or 0x-prefixed base-16 number in 1..0xffffffff, is returned unchanged;
    such a number is rendered with ``from_uint32(value, fmt)``, which is None (fwupd: NULL)
    for a format that cannot render a 32-bit value, e.g. UNKNOWN."""
    text = _c_text(version)
    data = _c_bytes(text)
    if b"." in data:
        return text
    if data.startswith(b"20") and len(data) == 8:
        return text
    value = _fu_strtoull_u32(data)
    if not value:  # not a number, or zero
        return text
    return from_uint32(value, fmt)


def _format_sections(fmt: VersionFormat) -> int:
    """fu_version_format_number_sections."""
    if fmt in (VersionFormat.PLAIN, VersionFormat.NUMBER, VersionFormat.HEX):
        return 1
    if fmt in (VersionFormat.PAIR, VersionFormat.BCD):
        return 2
    if fmt in (
        VersionFormat.TRIPLET,
        VersionFormat.SURFACE_LEGACY,
        VersionFormat.SURFACE,
        VersionFormat.DELL_BIOS,
        VersionFormat.DELL_BIOS_MSB,
    ):
        return 3
    if fmt in (
        VersionFormat.QUAD,
        VersionFormat.INTEL_ME,
        VersionFormat.INTEL_ME2,
        VersionFormat.INTEL_CSME19,
    ):
        return 4
    return 0


def _ensure_semver_internal(version: str) -> str | None:
    text = _c_text(version)
    data = _c_bytes(text)
    if data.startswith(b"0x"):
        return parse_from_format(text, VersionFormat.TRIPLET)
    out = bytearray()
    dot_valid = False
    digits = 0
    for i, ch in enumerate(data):
        if ch in _DIGITS:
            out.append(ch)
            digits += 1
            dot_valid = True
        elif ch in b"-~" or (ch == ord(".") and dot_valid and i + 1 < len(data)):
            # '-' and '~' always become a dot; a '.' only after a digit and not at the end
            out += b"."
            dot_valid = False
    if out.endswith(b"."):
        del out[-1]
    if digits == 0:
        return None
    return out.decode("ascii")


def ensure_semver(version: str, fmt: VersionFormat) -> str | None:
    """fu_version_ensure_semver: keep digits, turn '-'/'~' into dots, then pad with leading
    "0" sections or cut to the format's section count; None when there are no digits."""
    tmp = _ensure_semver_internal(version)
    if tmp is None:
        return None
    if fmt == VersionFormat.UNKNOWN:
        return tmp
    split = tmp.split(".") if tmp else []
    expected = _format_sections(fmt)
    sections = ["0"] * max(0, expected - len(split)) + split[:expected]
    return ".".join(sections)


# --------------------------------------------------------------------------------------------
# format checks


def _all_in(data: bytes, allowed: bytes) -> bool:
    return _span(data, 0, allowed) == len(data)


def guess_format(version: str | None) -> VersionFormat:
    """fu_version_guess_format (a heuristic fwupd uses only to *verify* a declared format)."""
    if version is None:
        return VersionFormat.UNKNOWN
    data = _c_bytes(version)
    if not data:
        return VersionFormat.UNKNOWN
    split = _split_dots(data)
    if len(split) == 1:
        if data.startswith(b"0x") or _all_in(data, _DIGITS):
            return VersionFormat.NUMBER
        if _all_in(data, _XDIGITS):
            return VersionFormat.HEX
        return VersionFormat.PLAIN
    if not all(_all_in(section, _DIGITS) for section in split):  # "" counts as digits
        return VersionFormat.PLAIN
    return {
        2: VersionFormat.PAIR,
        3: VersionFormat.TRIPLET,
        4: VersionFormat.QUAD,
    }.get(len(split), VersionFormat.UNKNOWN)


def _convert_base(fmt: VersionFormat) -> VersionFormat:
    """fu_version_format_convert_base."""
    if fmt in (VersionFormat.INTEL_ME, VersionFormat.INTEL_ME2, VersionFormat.INTEL_CSME19):
        return VersionFormat.QUAD
    if fmt in (
        VersionFormat.DELL_BIOS,
        VersionFormat.DELL_BIOS_MSB,
        VersionFormat.SURFACE,
        VersionFormat.SURFACE_LEGACY,
    ):
        return VersionFormat.TRIPLET
    if fmt == VersionFormat.BCD:
        return VersionFormat.PAIR
    if fmt == VersionFormat.HEX:
        return VersionFormat.NUMBER
    return fmt


def verify_format(version: str, fmt: VersionFormat) -> bool:
    """fu_version_verify_format: whether fwupd accepts ``version`` as a ``fmt`` version."""
    if fmt in (VersionFormat.PLAIN, VersionFormat.UNKNOWN):
        return True
    if fmt == VersionFormat.HEX and _all_in(_c_bytes(version), _XDIGITS):
        return True
    guess = guess_format(version)
    if fmt == VersionFormat.BCD and guess in (VersionFormat.PAIR, VersionFormat.QUAD):
        return True
    return guess == _convert_base(fmt)


# --------------------------------------------------------------------------------------------
# comparison


def _signed_char(byte: int) -> int:
    """A gchar on x86-64 (signed): bytes >= 0x80 are negative."""
    return byte - 256 if byte >= 0x80 else byte


def _compare_char(c1: int, c2: int) -> int:
    """fu_version_compare_char; 0 stands for the terminating NUL."""
    if c1 == c2:
        return 0
    if c1 == ord("~"):
        return -1
    if c2 == ord("~"):
        return 1
    return -1 if _signed_char(c1) < _signed_char(c2) else 1


def _compare_chunk(s1: bytes, s2: bytes) -> int:
    """fu_version_compare_chunk: byte by byte, '~' lowest, then the NUL terminators."""
    if s1 == s2:
        return 0
    common = min(len(s1), len(s2))
    for i in range(common):
        rc = _compare_char(s1[i], s2[i])
        if rc:
            return rc
    c1 = s1[common] if common < len(s1) else 0
    c2 = s2[common] if common < len(s2) else 0
    return _compare_char(c1, c2)


def _compare_safe(a: bytes, b: bytes) -> int:
    """fu_version_compare_safe for two non-NULL strings."""
    if a == b:
        return 0
    split_a = _split_dots(a)
    split_b = _split_dots(b)
    for i in range(max(len(split_a), len(split_b))):
        if i >= len(split_a):  # "we lost or gained a dot"
            return -1
        if i >= len(split_b):
            return 1
        ver_a, rest_a = _strtoll10(split_a[i])
        ver_b, rest_b = _strtoll10(split_b[i])
        if ver_a != ver_b:
            return -1 if ver_a < ver_b else 1
        if rest_a or rest_b:
            rc = _compare_chunk(rest_a, rest_b)
            if rc:
                return -1 if rc < 0 else 1
    return 0


def compare(a: str, b: str, fmt: VersionFormat = VersionFormat.UNKNOWN) -> int:
    """fu_version_compare: -1 if a < b, 0 if equal, 1 if a > b (plain's strcmp normalised).

    ``plain`` is a byte-wise strcmp; ``hex`` runs both sides through ``parse_from_format``
    first; every other format, UNKNOWN included, uses the same section-by-section rules."""
    if fmt == VersionFormat.PLAIN:
        data_a, data_b = _c_bytes(a), _c_bytes(b)
        return (data_a > data_b) - (data_a < data_b)
    if fmt == VersionFormat.HEX:
        # HEX is always renderable, so parse_from_format never gives None here
        a = parse_from_format(a, fmt) or ""
        b = parse_from_format(b, fmt) or ""
    return _compare_safe(_c_bytes(a), _c_bytes(b))


def sort_key(fmt: VersionFormat) -> Callable[[str], Any]:
    """A key for ``sorted()`` / ``max()`` ordering version strings with ``compare(..., fmt)``."""
    return functools.cmp_to_key(functools.partial(compare, fmt=fmt))
