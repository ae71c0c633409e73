"""Fuzz target: broker.versions, fwupd's version rules as dom0 applies them to versions from
sys-usb's devices and the catalog's releases (broker.offers orders offers with sort_key,
the CLI compares a release with a device's version). Its contract is stronger than the
other parsers': it never raises, on a str of any content. And compare must be an order:
antisymmetric, reflexive, transitive (sorted() assumes it).

The first byte picks the format; the rest is three versions split at newlines.
"""

from __future__ import annotations

import harness

with harness.instrumented():
    from broker import versions
    from broker.versions import VersionFormat

FORMATS = list(VersionFormat)


def _text(raw: bytes) -> str:
    try:  # as JSON can carry them: lone surrogates too
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape")


def one(data: bytes) -> None:
    if not data:
        return
    fmt = FORMATS[data[0] % len(FORMATS)]
    a, b, c = (_text(part) for part in [*data[1:].split(b"\n", 2), b"", b""][:3])
    for v in (a, b, c):
        versions.parse_from_format(v, fmt)
        versions.ensure_semver(v, fmt)
        versions.verify_format(v, fmt)
        versions.guess_format(v)
        if versions.compare(v, v, fmt) != 0:
            raise AssertionError(f"compare({v!r}, itself, {fmt}) is not 0")
    ab, ba = versions.compare(a, b, fmt), versions.compare(b, a, fmt)
    if ab not in (-1, 0, 1) or ab != -ba:
        raise AssertionError(f"compare is not antisymmetric for {a!r}, {b!r} ({fmt})")
    bc, ac = versions.compare(b, c, fmt), versions.compare(a, c, fmt)
    if (ab <= 0 and bc <= 0 and ac > 0) or (ab >= 0 and bc >= 0 and ac < 0):
        raise AssertionError(f"compare is not transitive for {a!r}, {b!r}, {c!r} ({fmt})")
    sorted((a, b, c), key=versions.sort_key(fmt))


if __name__ == "__main__":
    harness.main(one)
