"""Fuzz target: broker.cabinet._parse_metainfo, the cab's metainfo XML as dom0 reads it
(once the payload jcat verified it: inspect_cab), then the version match it feeds."""

from __future__ import annotations

import harness

with harness.instrumented():
    from broker.cabinet import _parse_metainfo, _version_matches

NAME = "fakedevice124.metainfo.xml"


def one(data: bytes) -> None:
    info = _parse_metainfo(data, NAME)
    _version_matches(info.version, "1.2.4")
    _version_matches(info.version, "65540")


if __name__ == "__main__":
    harness.main(one)
