"""A malicious sys-usb (it faces hostile USB devices) answering dom0's
qubes.FwupdUsbvm+GetDevices: escape sequences in what it reports must never reach dom0's
terminal, and malformed or oversized replies are refused with one line.

Each case runs `qubes-fwupdmgr get-devices` (escapes: and `--json`): either exit 1 with one line on
stderr naming the cause, or (a well-formed reply with hostile strings) exit 0 with no
control, format or escape character anywhere in the output. Either way dom0's trusted cache
is unchanged, nothing is left behind and no process is left."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from broker.sandbox.launcher import Sandbox
from tests.adversarial.hostile import (
    WEBCAM_GUID,
    MaliciousUsbvm,
    assert_clean,
    assert_printable,
    baseline,
    one_line,
)
from tests.sandbox_helpers import manager

pytestmark = pytest.mark.sandbox

MiB = 1024 * 1024
WEBCAM_ID = "08d460be0f1f9f128413f816022a6439e0078018"
DEVICE: dict[str, Any] = {
    "DeviceId": WEBCAM_ID,
    "Name": "Integrated Webcam",
    "Version": "1.2.2",
    "Guid": [WEBCAM_GUID],
    "Vendor": "ACME Corp.",
    "VendorId": "USB:0x046D",
    "Plugin": "test",
    "Protocol": "com.acme.test",
    "Flags": 2,
}


def reply(*devices: dict[str, Any], **top: Any) -> bytes:
    return json.dumps({"devices": list(devices), **top}).encode() + b"\n"


def device(**fields: Any) -> dict[str, Any]:
    d = {**DEVICE, **fields}
    return {k: v for k, v in d.items() if v is not ...}


@pytest.fixture
def usbvm(sandbox: Sandbox) -> Iterator[MaliciousUsbvm]:
    with MaliciousUsbvm(sandbox) as vm:
        yield vm


# (id, sys-usb's GetDevices reply, what must show instead of the hostile name)
ESCAPES = [
    ("osc-window-title", device(Name="\x1b]0;pwned\x07Webcam"), "?]0;pwned?Webcam"),
    ("osc-8-hyperlink", device(Name="\x1b]8;;http://evil/\x1b\\click\x1b]8;;\x1b\\"),
     "?]8;;http://evil/?\\click?]8;;?\\"),
    ("csi-clear-screen", device(Name="\x1b[2J\x1b[HWebcam"), "?[2J?[HWebcam"),
    ("c1-csi", device(Name="\x9b31mWebcam\x9b0m"), "?31mWebcam?0m"),
    ("bidi-override", device(Name="Webcam\u202egnp.exe"), "Webcam?gnp.exe"),
    ("zero-width-and-line-separator", device(Name="Web\u200bcam\u2028\u2029\x85"),
     "Web?cam???"),
    ("escapes-in-vendor", device(Vendor="\x1b[8mACME\x1b[0m\r\x08"), "?[8mACME?[0m??"),
    ("newline-forging-a-device", device(Name="Webcam\n  DeviceId: 0000\nFake [dom0]"),
     "Webcam?  DeviceId: 0000?Fake [dom0]"),
]  # fmt: skip


@pytest.mark.parametrize(("dev", "shown"), [c[1:] for c in ESCAPES], ids=[c[0] for c in ESCAPES])
def test_escape_sequences_from_usbvm_never_reach_the_terminal(
    sandbox: Sandbox, usbvm: MaliciousUsbvm, dev: dict[str, Any], shown: str
) -> None:
    usbvm.answer(reply(dev))
    before = baseline(sandbox)
    r = manager(sandbox, "get-devices")
    assert r.returncode == 0, r.stderr
    assert_printable(r.stdout, r.stderr)
    assert shown in r.stdout, r.stdout
    r = manager(sandbox, "get-devices", "--json")
    assert r.returncode == 0, r.stderr
    assert_printable(r.stdout, r.stderr)
    (usb,) = [d for d in json.loads(r.stdout)["Devices"] if d["Qube"] == "sys-usb"]
    assert_printable(*(v for v in usb.values() if isinstance(v, str)))  # once decoded, too
    assert_clean(sandbox, before)


# (id, sys-usb's GetDevices stdout, what dom0's one line must name)
MALFORMED = [
    ("empty-reply", b"", "sys-usb reply is not valid JSON"),
    ("truncated-json", reply(DEVICE)[:50], "sys-usb reply is not valid JSON"),
    ("not-utf8", b'{"devices": [{"Name": "\xff\xfe"}]}', "sys-usb reply is not valid JSON"),
    ("deeply-nested", b"[" * 200000, "sys-usb reply is not valid JSON"),
    ("nan-flags", reply(DEVICE).replace(b'"Flags": 2', b'"Flags": NaN'),
     "Flags is not a 64-bit unsigned integer"),
    ("top-level-list", json.dumps([DEVICE]).encode(), "not an object with a devices list"),
    ("devices-not-a-list", reply(devices={"a": DEVICE}), "not an object with a devices list"),
    ("device-not-an-object", reply("webcam"), "a device is not an object"),
    ("device-id-missing", reply(device(DeviceId=...)), "malformed DeviceId"),
    ("device-id-traversal", reply(device(DeviceId="../../../../etc/passwd")),
     "malformed DeviceId"),
    ("device-id-uppercase", reply(device(DeviceId=WEBCAM_ID.upper())), "malformed DeviceId"),
    ("version-trailing-newline", reply(device(Version="1.2.2\n")), "malformed Version"),
    ("version-escape", reply(device(Version="1.2.2\x1b[2J")), "malformed Version"),
    ("version-number", reply(device(Version=122)), "malformed Version"),
    ("flags-string", reply(device(Flags="2")), "Flags is not a 64-bit unsigned integer"),
    ("flags-negative", reply(device(Flags=-1)), "Flags is not a 64-bit unsigned integer"),
    ("flags-2-to-the-64", reply(device(Flags=2**64)), "Flags is not a 64-bit unsigned integer"),
    ("flags-bool", reply(device(Flags=True)), "Flags is not a 64-bit unsigned integer"),
    ("guid-not-a-list", reply(device(Guid=WEBCAM_GUID)), "Guid is not a short list"),
    ("guid-malformed", reply(device(Guid=["b585990a; rm -rf /"])), "malformed Guid"),
    ("guids-65", reply(device(Guid=[WEBCAM_GUID] * 65)), "Guid is not a short list"),
    ("name-not-a-string", reply(device(Name=["Webcam"])),
     "Name is not a string of at most 256 chars"),
    ("name-300-chars", reply(device(Name="W" * 300)), "Name is not a string of at most 256"),
    ("vendor-id-escape", reply(device(VendorId="USB:0x046D\x1b[2J")), "malformed VendorId"),
    ("plugin-with-path", reply(device(Plugin="../../lib/evil")), "malformed Plugin"),
    ("protocol-with-space", reply(device(Protocol="com.acme.test; reboot")),
     "malformed Protocol"),
    ("raw-not-an-object", reply(device(Raw=["Summary", "x"])), "Raw is not an object"),
    ("1025-devices", reply(*[device(DeviceId=f"{i:040x}") for i in range(1025)]),
     "sys-usb reports more than 1024 devices"),
    ("reply-over-4-mib", b" " * (5 * MiB), "sent more than 4194304 bytes"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "cause"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_usbvm_reply_is_refused(
    sandbox: Sandbox, usbvm: MaliciousUsbvm, data: bytes, cause: str
) -> None:
    usbvm.answer(data)
    before = baseline(sandbox)
    r = manager(sandbox, "get-devices")
    assert r.returncode == 1, r.stdout + r.stderr
    line = one_line(r.stderr)
    assert line.startswith("qubes-fwupdmgr: "), line
    assert line.startswith("qubes-fwupdmgr: sys-usb: unreachable: "), line
    assert cause in line, line
    # sys-usb cannot veto dom0's devices: the webcam dom0's fwupd reports is listed
    assert "[dom0]" in r.stdout and "[sys-usb]" not in r.stdout, r.stdout
    assert_printable(r.stdout, r.stderr)
    assert_clean(sandbox, before)


def test_usbvm_failure_line_with_escape_sequences_is_made_printable(
    sandbox: Sandbox, usbvm: MaliciousUsbvm
) -> None:
    usbvm.answer(b"", exit_code=1, stderr="\x1b]0;pwned\x07\x1b[2J\x9b31mno devices\u202e\n")
    before = baseline(sandbox)
    r = manager(sandbox, "get-devices")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert line.startswith(
        "qubes-fwupdmgr: sys-usb: unreachable: qubes.FwupdUsbvm+GetDevices failed: "
    ), line
    assert "no devices" in line
    assert_printable(r.stdout, r.stderr)
    assert_clean(sandbox, before)


def test_duplicate_device_ids_from_usbvm_are_refused(
    sandbox: Sandbox, usbvm: MaliciousUsbvm
) -> None:
    """One device, reported twice with two versions: dom0 must not show (nor update) it
    twice. The reply is refused, with one line naming the duplicate."""
    usbvm.answer(reply(DEVICE, device(Version="0.0.1", Name="Webcam (the other one)")))
    before = baseline(sandbox)
    r = manager(sandbox, "get-devices", "--json")
    assert_clean(sandbox, before)
    assert r.returncode == 1, r.stdout
    assert f"lists DeviceId {WEBCAM_ID} twice" in one_line(r.stderr)


# what sys-usb may put in the a{sv} it relays for --json (Raw): never decided on, only
# rendered through broker.fwupd_json, and every string made printable on the way out
HOSTILE_RAW: dict[str, Any] = {
    "DeviceId": "0" * 40,  # not the checked id: the checked fields win
    "Version": "9.9.9",
    "Flags": "all of them",
    "Summary": "\x1b]0;pwned\x07Camera\u202e",
    "Icon": ["\x1b[2Jicon", 7, None],
    "Serial": "SN\r\nDeviceId: forged",
    "InstanceIds": ["USB\\VID_046D\x9b31m"],
    "Created": 2**70,
    "BatteryLevel": -5,
    "Checksum": {"not": "a string"},
    "Release": [
        {
            "Version": "1.2.3\x1b[8m",
            "Description": "<p>\x1b[2J</p>",
            "Metadata": {"Size": "huge", "x\x1b": "\x07y"},
        }
    ],
    "UpdateError": "\x1b[31merror\x1b[0m",
    "\x1b[2Jkey": "value",
    "Nested": {"a": [{"b": [[[["deep"]]]]}]},
}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_what_sys_usb_relays_for_json_is_rendered_printable_and_never_believed(
    sandbox: Sandbox, usbvm: MaliciousUsbvm
) -> None:
    usbvm.answer(reply(device(Raw=HOSTILE_RAW)))
    before = baseline(sandbox)
    r = manager(sandbox, "get-devices", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_printable(r.stdout, r.stderr)
    doc = json.loads(r.stdout)
    (usb,) = [d for d in doc["Devices"] if d["Qube"] == "sys-usb"]
    assert_printable(*_strings(usb))  # once decoded, too: a script reads these
    # what dom0 checked is what is shown, whatever the relayed dict said
    assert (usb["DeviceId"], usb["Version"], usb["Name"]) == (WEBCAM_ID, "1.2.2", DEVICE["Name"])
    assert usb["Flags"] == ["updatable"]
    assert usb["Summary"] == "?]0;pwned?Camera?"
    assert "Created" not in usb and "BatteryLevel" not in usb  # out of range: not printed
    assert_clean(sandbox, before)


# (id, sys-usb's GetResults reply, what dom0's one line names)
RESULTS = [
    ("another-device", b'{"result": {"DeviceId": "' + b"0" * 40 + b'", "UpdateState": 2}}\n',
     "the result is about another device"),
    ("result-not-an-object", b'{"result": [1, 2]}\n', "result is not an object"),
    ("extra-keys", b'{"result": null, "devices": []}\n', "not an object with a result"),
    ("not-json", b"\x1b]0;pwned\x07", "not valid JSON"),
    ("too-large", b'{"result": "' + b"x" * (5 * MiB) + b'"}',
     "qubes.FwupdUsbvm+GetResults in sys-usb sent more than 4194304 bytes"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "cause"), [c[1:] for c in RESULTS], ids=[c[0] for c in RESULTS])
def test_a_hostile_results_reply_is_refused_with_one_line(
    sandbox: Sandbox, usbvm: MaliciousUsbvm, data: bytes, cause: str
) -> None:
    usbvm.answer(reply(device()))
    usbvm.answer(data, argument="GetResults")
    before = baseline(sandbox)
    r = manager(sandbox, "get-results", f"sys-usb:{WEBCAM_ID}")
    assert r.returncode == 1, r.stdout + r.stderr
    line = one_line(r.stderr)
    assert line.startswith("qubes-fwupdmgr: ") and "sys-usb" in line, line
    assert cause in line, line
    assert r.stdout == ""
    assert json.loads(usbvm.request("GetResults").split(b"\n", 1)[0])["device_id"] == WEBCAM_ID
    assert_printable(r.stdout, r.stderr)
    assert_clean(sandbox, before)


def test_a_results_reply_with_escapes_is_shown_printable(
    sandbox: Sandbox, usbvm: MaliciousUsbvm
) -> None:
    usbvm.answer(reply(device()))
    usbvm.answer(json.dumps({"result": {
        "DeviceId": WEBCAM_ID, "Name": "\x1b]0;pwned\x07Webcam", "UpdateState": 3,
        "UpdateError": "\x1b[2Jflash failed\u202e", "Version": "1.2.2"}}).encode(),
        argument="GetResults")  # fmt: skip
    for args in ((), ("--json",)):
        r = manager(sandbox, "get-results", WEBCAM_ID, *args)
        assert r.returncode == 0, r.stdout + r.stderr
        assert_printable(r.stdout, r.stderr)
        assert "flash failed" in r.stdout
    assert json.loads(r.stdout)["UpdateState"] == 3
