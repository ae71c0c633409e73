"""broker.plans: a reviewed plan is installed only while everything it names still holds."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from broker.errors import FormatError, LimitExceeded, NothingToDo
from broker.metadata import Catalog
from broker.plans import MAX_BYTES, PlanEntry, PlanMismatch, entry_for, match, parse
from tests.unit.test_unattended import RELEASE, WEBCAM

CATALOG = Catalog("lvfs", (RELEASE,), (), "b" * 64, "2026-12-01T10:00:00+00:00")
OLDER = replace(RELEASE, version="1.2.3", sha256="c" * 64)
FOUND = [(WEBCAM, [RELEASE, OLDER])]


def _entry(**changes: str) -> PlanEntry:
    return replace(entry_for(WEBCAM, RELEASE, CATALOG), **changes)


def _doc(*entries: PlanEntry) -> bytes:
    return json.dumps({"Devices": [], "Plan": [e.to_json() for e in entries]}).encode()


def test_an_entry_binds_the_device_the_release_and_the_metadata() -> None:
    assert _entry().to_json() == {
        "Qube": "sys-usb", "DeviceId": WEBCAM.device.device_id, "Name": "Webcam",
        "VersionOld": "1.2.3", "Version": "1.2.4", "AppstreamId": "c", "RemoteId": "lvfs",
        "CabSha256": "a" * 64, "MetadataSha256": "b" * 64,
        "MetadataSigned": "2026-12-01T10:00:00+00:00",
    }  # fmt: skip


def test_a_get_updates_document_and_a_bare_list_both_parse() -> None:
    assert parse(_doc(_entry())) == [_entry()]
    assert parse(json.dumps([_entry().to_json()]).encode()) == [_entry()]


@pytest.mark.parametrize(
    ("raw", "error", "words"),
    [
        (b"{", FormatError, "not JSON"),
        (b'{"Devices": []}', FormatError, 'no "Plan" list'),
        (b'{"Plan": []}', NothingToDo, "empty"),
        (b" " * (MAX_BYTES + 1), LimitExceeded, "bytes"),
        (json.dumps([{**_entry().to_json(), "Extra": "x"}]).encode(), FormatError, "members"),
        (json.dumps([{**_entry().to_json(), "Version": 1}]).encode(), FormatError, "string"),
        (json.dumps([{**_entry().to_json(), "Name": "a\x1b[2J"}]).encode(), FormatError,
         "printable"),
        (json.dumps([{**_entry().to_json(), "CabSha256": "A" * 64}]).encode(), FormatError,
         "CabSha256 is not a sha256"),
        (json.dumps([{**_entry().to_json(), "Qube": "../dom0"}]).encode(), FormatError,
         "valid qube name"),
        (_doc(_entry(), _entry()), FormatError, "twice"),
        (b"[" * 100_000, FormatError, "not JSON"),
    ],
)  # fmt: skip
def test_a_malformed_plan_is_refused_with_its_cause(
    raw: bytes, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        parse(raw)


def test_a_plan_that_still_holds_picks_exactly_its_release() -> None:
    assert match([_entry()], [CATALOG], FOUND) == [(WEBCAM, [RELEASE])]
    # the older release, if that is what was reviewed and is still offered
    older = _entry(version="1.2.3", cab_sha256="c" * 64)
    assert match([older], [CATALOG], FOUND) == [(WEBCAM, [OLDER])]


@pytest.mark.parametrize(
    ("entry", "catalogs", "found", "why"),
    [
        (_entry(), [replace(CATALOG, metadata_sha256="d" * 64)], FOUND,
         "lvfs's metadata changed since the plan was made"),
        (_entry(), [replace(CATALOG, signed_at="2026-12-02T10:00:00+00:00")], FOUND,
         "metadata changed"),
        (_entry(), [], FOUND, "dom0 holds no metadata of lvfs"),
        (_entry(), [CATALOG], [], "no update is offered for this device now"),
        (_entry(version_old="1.2.2"), [CATALOG], FOUND, "the device now runs 1.2.3"),
        (_entry(cab_sha256="e" * 64), [CATALOG], FOUND, "no longer offered"),
        (_entry(version="9.9.9"), [CATALOG], FOUND, "no longer offered"),
        (_entry(device_id="f" * 40), [CATALOG], FOUND, "no update is offered"),
        # the same cab from another remote is not what this plan's metadata covered
        (_entry(), [CATALOG, replace(CATALOG, remote_id="lvfs-testing")],
         [(WEBCAM, [replace(RELEASE, remote_id="lvfs-testing")])], "no longer offered"),
    ],
)  # fmt: skip
def test_anything_that_no_longer_matches_refuses_the_whole_plan(
    entry: PlanEntry, catalogs: list[Catalog], found: list[object], why: str
) -> None:
    with pytest.raises(PlanMismatch, match=why) as e:
        match([_entry(), entry], catalogs, found)  # type: ignore[arg-type]
    assert str(e.value).startswith("plan refused, nothing installed: ")
