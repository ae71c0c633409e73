"""A malicious sys-usb naming the releases its devices "may take" (qubes.FwupdUsbvm+
GetUpgrades): it decides nothing that crosses into dom0.

dom0 keeps an offer only if its own verified catalog holds a release with the offer's
container sha256, for the device's GUID, of the same component and version; location,
size and sha256 then come from dom0's catalog. Anything else is refused with one line on
stderr, nothing is downloaded, and dom0's trusted cache, sessions and untrusted dir are
unchanged."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from broker.config import Config
from broker.metadata import MetadataStore, Release
from broker.sandbox.launcher import Sandbox
from tests.adversarial.hostile import (
    FAKE_ID,
    WEBCAM_GUID,
    MaliciousUsbvm,
    assert_clean,
    assert_printable,
    baseline,
    one_line,
)
from tests.sandbox_helpers import manager, qube_paths

pytestmark = pytest.mark.sandbox

WEBCAM_ID = "08d460be0f1f9f128413f816022a6439e0078018"
# updatable | supported: a device fwupdmgr get-updates would ask about
WEBCAM: dict[str, Any] = {
    "DeviceId": WEBCAM_ID, "Name": "Integrated Webcam", "Version": "1.2.2",
    "Guid": [WEBCAM_GUID], "Vendor": "ACME Corp.", "VendorId": "USB:0x046D",
    "Plugin": "test", "Protocol": "com.acme.test", "Flags": (1 << 1) | (1 << 5),
}  # fmt: skip
UNKNOWN_SHA = "5" * 64


@pytest.fixture
def usbvm(sandbox: Sandbox) -> Iterator[MaliciousUsbvm]:
    with MaliciousUsbvm(sandbox) as vm:
        vm.answer(json.dumps({"devices": [WEBCAM]}).encode())
        yield vm


@pytest.fixture
def held(sandbox: Sandbox) -> dict[str, Release]:
    """dom0's verified releases of the webcam, by version (refreshed if need be: 2 when
    an earlier test already did)."""
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    paths = qube_paths(sandbox, "dom0")
    config = Config.load(paths)
    catalog = MetadataStore(paths).catalog(config.remotes[0], config.limits)
    assert catalog is not None
    found = {r.version: r for r in catalog.releases if WEBCAM_GUID in r.guids}
    assert {"1.2.3", "1.2.4"} <= set(found), found
    return found


def offer(version: str, sha256: str, component: str = FAKE_ID, remote: str = "lvfs") -> Any:
    return {"AppstreamId": component, "Version": version, "RemoteId": remote,
            "Checksum": ["0" * 40, sha256]}  # fmt: skip


def offers_reply(*releases: Any) -> bytes:
    return json.dumps({"offers": {WEBCAM_ID: {"releases": list(releases)}}}).encode()


def calls(sandbox: Sandbox, target_service: str) -> int:
    """How many calls dom0 has made so far, e.g. "sys-firewall qubes.FwupdDownload"."""
    return (sandbox.log_dir / "qrexec.log").read_text().count(f"allow dom0 -> {target_service}")


def downloads(sandbox: Sandbox) -> int:
    return calls(sandbox, "sys-firewall qubes.FwupdDownload")


# (id, what sys-usb offers for the webcam, what dom0's one line must name)
REFUSED = [
    ("sha256-dom0-lacks", lambda held: offer("9.9.9", UNKNOWN_SHA),
     "offered org.fwupd.fakedevice.firmware 9.9.9, refused: dom0's verified catalog holds no "
     "release with sha256 5555555555555555"),
    ("real-version-other-checksum", lambda held: offer("1.2.4", UNKNOWN_SHA),
     "offered org.fwupd.fakedevice.firmware 1.2.4, refused: dom0's verified catalog holds no "
     "release with sha256"),
    ("real-checksum-other-version", lambda held: offer("1.2.4", held["1.2.3"].sha256),
     "offered org.fwupd.fakedevice.firmware 1.2.4, refused: dom0's verified catalog names that "
     "cab org.fwupd.fakedevice.firmware 1.2.3"),
    ("real-checksum-other-component", lambda held: offer(
        "1.2.4", held["1.2.4"].sha256, component="com.evil.firmware"),
     "refused: dom0's verified catalog names that cab org.fwupd.fakedevice.firmware 1.2.4"),
    ("remote-dom0-never-verified", lambda held: offer("1.2.4", held["1.2.4"].sha256, remote="evil"),
     "refused: remote 'evil' has no metadata dom0 verified"),
    ("sha1-only", lambda held: {**offer("1.2.4", held["1.2.4"].sha256), "Checksum": ["1" * 40]},
     "refused: it names no sha256 checksum"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "cause"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
@pytest.mark.parametrize("verb", [("get-updates",), ("update", "-y")])
def test_an_offer_dom0s_catalog_does_not_bind_is_refused_and_nothing_is_fetched(
    sandbox: Sandbox,
    usbvm: MaliciousUsbvm,
    held: dict[str, Release],
    make: Any,
    cause: str,
    verb: tuple[str, ...],
) -> None:
    usbvm.answer(offers_reply(make(held)), argument="GetUpgrades")
    before, fetched = baseline(sandbox), downloads(sandbox)
    r = manager(sandbox, *verb)
    assert r.returncode == 1, r.stdout + r.stderr
    line = one_line(r.stderr)
    assert line.startswith(f"qubes-fwupdmgr: sys-usb: Integrated Webcam ({WEBCAM_ID[:12]}): ")
    assert cause in line, line
    assert_printable(r.stdout, r.stderr)
    assert downloads(sandbox) == fetched  # nothing was asked of the UpdateVM
    assert_clean(sandbox, before)
    # dom0 asked sys-usb only about the device it listed
    request = usbvm.request("GetUpgrades").split(b"\n", 1)[0]
    assert json.loads(request)["device_ids"] == [WEBCAM_ID]


def test_a_refused_offer_does_not_hide_the_ones_dom0_can_bind(
    sandbox: Sandbox, usbvm: MaliciousUsbvm, held: dict[str, Release]
) -> None:
    """The honest part of the answer still counts: 1.2.4 is listed (from dom0's catalog),
    the forged 9.9.9 is refused on its own line, and the exit code says part failed."""
    good = offer("1.2.4", held["1.2.4"].sha256)
    usbvm.answer(offers_reply(offer("9.9.9", UNKNOWN_SHA), good), argument="GetUpgrades")
    before = baseline(sandbox)
    r = manager(sandbox, "get-updates", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "9.9.9, refused" in one_line(r.stderr)
    (device,) = json.loads(r.stdout)["Devices"]
    (release,) = device["Releases"]
    # what dom0 hands on comes from its own verified catalog, not from sys-usb's answer
    assert (release["Version"], release["Checksum"]) == ("1.2.4", ["0" * 40, held["1.2.4"].sha256])
    assert release["Locations"] == [held["1.2.4"].url]
    assert release["AppstreamId"] == held["1.2.4"].component_id
    assert_clean(sandbox, before)


MALFORMED = [
    ("not-json", b"{offers", "sys-usb reply is not valid JSON"),
    ("device-not-asked-about", json.dumps({"offers": {"0" * 40: {"releases": []}}}).encode(),
     "sys-usb reply names a device dom0 did not ask about"),
    ("checksum-with-escape", offers_reply({**offer("1.2.4", UNKNOWN_SHA),
                                           "Checksum": ["\x1b[2J" + "a" * 60]}),
     "sys-usb reply: malformed Checksum"),
    ("version-with-newline", offers_reply(offer("1.2.4\n", UNKNOWN_SHA)),
     "sys-usb reply: malformed Version"),
    ("too-many-releases", offers_reply(*[offer("1.2.4", UNKNOWN_SHA)] * 1025),
     "sys-usb offers more than 1024 releases for a device"),
    ("entry-both-error-and-releases",
     json.dumps({"offers": {WEBCAM_ID: {"error": "x", "releases": []}}}).encode(),
     "an offer entry is not {releases} or {error}"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("reply", "cause"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_a_malformed_offers_reply_is_refused_with_one_line(
    sandbox: Sandbox, usbvm: MaliciousUsbvm, reply: bytes, cause: str
) -> None:
    usbvm.answer(reply, argument="GetUpgrades")
    before, fetched = baseline(sandbox), downloads(sandbox)
    r = manager(sandbox, "update", "-y")
    assert r.returncode == 1, r.stdout + r.stderr
    assert cause in one_line(r.stderr)
    assert_printable(r.stdout, r.stderr)
    assert downloads(sandbox) == fetched
    assert_clean(sandbox, before)


def test_a_device_sys_usb_cannot_answer_for_is_left_out_like_fwupdmgr_does(
    sandbox: Sandbox, usbvm: MaliciousUsbvm
) -> None:
    reply = json.dumps({"offers": {WEBCAM_ID: {"error": "\x1b]0;pwned\x07 not supported"}}})
    usbvm.answer(reply.encode(), argument="GetUpgrades")
    before = baseline(sandbox)
    r = manager(sandbox, "get-updates")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout.strip() == "No updates available"
    assert_printable(r.stdout, r.stderr)
    assert_clean(sandbox, before)


def test_many_forged_offers_cost_dom0_a_bounded_report(
    sandbox: Sandbox, usbvm: MaliciousUsbvm
) -> None:
    """1,000 distinct forged offers (and each repeated): judged once each, reported in 20
    lines and a count, not in a thousand."""
    forged = [offer(f"9.{i}", f"{i:064x}") for i in range(1000)]
    usbvm.answer(offers_reply(*forged, *forged[:24]), argument="GetUpgrades")
    before = baseline(sandbox)
    r = manager(sandbox, "get-updates")
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 21, lines[-3:]
    assert lines[-1] == "qubes-fwupdmgr: … and 980 more problems like these"
    assert_printable(r.stdout, r.stderr)
    assert_clean(sandbox, before)


def test_a_sys_usb_that_fails_does_not_veto_dom0s_devices(
    sandbox: Sandbox, usbvm: MaliciousUsbvm
) -> None:
    """GetDevices answered with garbage: sys-usb is reported unreachable on one line, and
    dom0's own fwupd's devices are still listed (the webcam both report is then dom0's)."""
    usbvm.answer(b"\x1b[2J not json")
    before = baseline(sandbox)
    r = manager(sandbox, "get-devices", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert one_line(r.stderr) == (
        "qubes-fwupdmgr: sys-usb: unreachable: sys-usb reply is not valid JSON; only the "
        "other qube's devices were handled"
    )
    devices = json.loads(r.stdout)["Devices"]
    assert [(d["Qube"], d["DeviceId"]) for d in devices] == [("dom0", WEBCAM_ID)]
    # and the offers path: a sys-usb that fails GetUpgrades leaves dom0's offers standing
    usbvm.answer(json.dumps({"devices": [WEBCAM]}).encode())
    usbvm.answer(b"", exit_code=1, stderr="fwupd crashed\n", argument="GetUpgrades")
    r = manager(sandbox, "get-updates")
    assert r.returncode == 1, r.stdout + r.stderr
    line = one_line(r.stderr)
    assert line.startswith("qubes-fwupdmgr: sys-usb: unreachable: "), line
    assert "fwupd crashed" in line
    assert_printable(r.stdout, r.stderr)
    assert_clean(sandbox, before)


def test_a_sys_usb_that_fails_refresh_does_not_stop_dom0s_fwupd_loading(
    sandbox: Sandbox, usbvm: MaliciousUsbvm
) -> None:
    r = manager(sandbox, "refresh")  # dom0 current first: what follows changes nothing
    assert r.returncode in (0, 2), r.stdout + r.stderr
    usbvm.answer(b"", exit_code=1, stderr="\x1b[2Jdisk full\n", argument="Refresh")
    before = baseline(sandbox)
    r = manager(sandbox, "refresh")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "lvfs: dom0 fwupd already had the metadata" in r.stdout
    line = one_line(r.stderr)
    assert line.startswith("qubes-fwupdmgr: sys-usb: unreachable: qubes.FwupdUsbvm+Refresh"), line
    assert "disk full" in line
    assert_printable(r.stdout, r.stderr)
    assert_clean(sandbox, before)


def test_a_sys_usb_claiming_many_devices_gets_a_bounded_run_and_dom0_keeps_no_cab(
    sandbox: Sandbox, usbvm: MaliciousUsbvm, held: dict[str, Release]
) -> None:
    """Twelve 'webcams', each offered the real 1.2.4: one run updates at most
    update_max_devices (8) unless a device is named, fetches the cab once (then dom0's
    verified cache serves it), and deletes it from dom0's cache once installed."""
    # the real webcam among them, so dom0's own copy of it stays sys-usb's (routing)
    ids = [WEBCAM_ID, *(f"{i:040x}" for i in range(1, 12))]
    usbvm.answer(json.dumps({"devices": [{**WEBCAM, "DeviceId": i} for i in ids]}).encode())
    good = offer("1.2.4", held["1.2.4"].sha256)
    usbvm.answer(
        json.dumps({"offers": {i: {"releases": [good]} for i in ids}}).encode(),
        argument="GetUpgrades",
    )
    usbvm.answer(b'{"status": "installed"}\n', argument="Install")
    cab = qube_paths(sandbox, "dom0").cabs_dir / f"{held['1.2.4'].sha256}.cab"
    cab.unlink(missing_ok=True)
    before = baseline(sandbox)
    downloads_before = downloads(sandbox)
    installs_before = calls(sandbox, "sys-usb qubes.FwupdUsbvm+Install")
    r = manager(sandbox, "update", "-y")
    assert r.returncode == 0, r.stdout + r.stderr
    assert one_line(r.stderr) == (
        "qubes-fwupdmgr: 4 more devices have updates; one run updates at most "
        "update_max_devices=8 unless devices are named: run again"
    )
    assert downloads(sandbox) - downloads_before == 1, r.stdout
    assert calls(sandbox, "sys-usb qubes.FwupdUsbvm+Install") - installs_before == 8
    assert r.stdout.count("from dom0's cache") == 7
    assert not cab.exists()  # installed: gone from dom0's cache
    assert_clean(sandbox, before)


def test_what_sys_usb_relays_with_an_offer_is_rendered_printable_and_never_believed(
    sandbox: Sandbox, usbvm: MaliciousUsbvm, held: dict[str, Release]
) -> None:
    """A bound offer's relayed a{sv} (Raw) fills the fwupdmgr-shaped --json, printable, in
    the schema's types; where it comes from and what it is stay dom0's."""
    raw = {
        "Locations": ["https://attacker.example/x.cab"], "Uri": "ipfs://evil",
        "Version": "6.6.6", "AppstreamId": "com.evil", "Checksum": "1" * 64,
        "Description": "<p>\x1b]8;;http://evil/\x1b\\click\x1b]8;;\x1b\\</p>\u202e",
        "Size": "big", "TrustFlags": 2**80, "Urgency": "critical",
        "Metadata": {"Locations": "https://evil/", "Flags": "x", "Note\x1b[2J": "\x07",
                     "LVFS::Note": "fine"},
        "Reports": [{"Metadata": {"VendorId": "x"}, "DistroId": "\x1b[2Jfedora"}, "junk"],
    }  # fmt: skip
    release = held["1.2.4"]
    usbvm.answer(offers_reply({**offer("1.2.4", release.sha256), "Raw": raw}),
                 argument="GetReleases")  # fmt: skip
    before = baseline(sandbox)
    r = manager(sandbox, "get-releases", WEBCAM_ID, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_printable(r.stdout, r.stderr)
    doc = json.loads(r.stdout)
    (shown,) = doc["Releases"]
    # dom0's word for what it matched and would fetch
    assert shown["Locations"] == [release.url]
    assert (shown["Version"], shown["AppstreamId"]) == ("1.2.4", FAKE_ID)
    assert shown["Checksum"] == ["0" * 40, release.sha256]
    assert shown["LVFS::Note"] == "fine"
    assert "Size" not in shown  # not a number: not printed, as fwupdmgr would not
    for text in (shown["Description"], *shown, *(v for v in shown.values() if isinstance(v, str))):
        assert_printable(text)
    assert shown["Reports"][0]["DistroId"] == "?[2Jfedora"
    assert_clean(sandbox, before)
