"""broker.unattended: what an unattended run may install; by default nothing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.fwupd import Device
from broker.metadata import Release
from broker.routing import QubeDevice
from broker.unattended import UnattendedPolicy

GUID = "b585990a-003e-5270-89d5-3705a17f9a43"
WEBCAM = QubeDevice("sys-usb", Device(
    "08d460be0f1f9f128413f816022a6439e0078018", "Webcam", "1.2.3", (GUID,), "ACME",
    ("USB:0x046D",), "test", ("com.acme.test",), 2,
))  # fmt: skip
CAPSULE = QubeDevice("dom0", Device(
    "1" * 40, "System Firmware", "1.0", ("2082b5e0-7a64-478a-b1b2-e3404fab6dad",), "OEM",
    ("DMI:OEM",), "uefi_capsule", ("org.uefi.capsule",), 2 | 1 | (1 << 8),
))  # fmt: skip
RELEASE = Release(
    remote_id="lvfs", component_id="c", name="A", summary="", version="1.2.4", guids=(GUID,),
    url="https://fwupd.org/downloads/a.cab", filename="a.cab", sha256="a" * 64, size=10,
    urgency="medium", description="",
)  # fmt: skip


def _load(tmp_path: Path, text: str) -> UnattendedPolicy:
    path = tmp_path / "unattended.conf"
    path.write_text(text)
    return UnattendedPolicy.load(path)


def test_no_file_and_an_empty_section_install_nothing(tmp_path: Path) -> None:
    for policy in (UnattendedPolicy.load(tmp_path / "absent"), _load(tmp_path, "[unattended]\n")):
        assert policy.refusal(WEBCAM, RELEASE) == (
            "unattended installs are not allowed for sys-usb's devices"
        )


def test_a_qube_opened_allows_its_devices_and_each_list_narrows(tmp_path: Path) -> None:
    assert _load(tmp_path, "[unattended]\nqubes = sys-usb\n").refusal(WEBCAM, RELEASE) is None
    cases = {
        f"devices = {GUID.upper()}": None,
        "devices = 08D460BE0F1F9F128413F816022A6439E0078018": None,
        "devices = deadbeef": "the device is not among unattended.conf's devices",
        "protocols = com.acme.test": None,
        "protocols = org.other": "its protocol is not among unattended.conf's protocols",
        "plugins = uvc": "its plugin is not among unattended.conf's plugins",
        "vendors = usb:0x046d": None,
        "vendors = USB:0x1234": "its vendor is not among unattended.conf's vendors",
        "min_urgency = medium": None,
        "min_urgency = high": "urgency medium is below high",
    }
    for line, why in cases.items():
        policy = _load(tmp_path, f"[unattended]\nqubes = sys-usb dom0\n{line}\n")
        assert policy.refusal(WEBCAM, RELEASE) == why, line
    unset = replace(RELEASE, urgency="")
    policy = _load(tmp_path, "[unattended]\nqubes = sys-usb\nmin_urgency = low\n")
    assert policy.refusal(WEBCAM, unset) == "urgency unset is below low"


def test_an_update_that_completes_at_a_reboot_needs_its_own_yes(tmp_path: Path) -> None:
    policy = _load(tmp_path, "[unattended]\nqubes = dom0\n")
    assert policy.refusal(CAPSULE, RELEASE) == (
        "it completes only at a reboot (allow_needs_reboot = no)"
    )
    policy = _load(tmp_path, "[unattended]\nqubes = dom0\nallow_needs_reboot = yes\n")
    assert policy.refusal(CAPSULE, RELEASE) is None


@pytest.mark.parametrize(("text", "message"), [
    ("[unattended]\nmin_urgency = urgent\n", "min_urgency must be one of low, medium"),
    ("[unattended]\nallow_needs_reboot = sure\n", "allow_needs_reboot must be yes or no"),
    ("qubes = dom0\n", "not KEY = VALUE lines"),
])  # fmt: skip
def test_a_bad_file_is_refused_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text)


def test_an_unknown_key_is_named_and_ignored(tmp_path: Path) -> None:
    policy = _load(tmp_path, "[unattended]\nqube = sys-usb\n")
    assert policy.warnings == (f"{tmp_path}/unattended.conf: unknown key 'qube' in "
                               "[unattended] (ignored)",)  # fmt: skip
    assert policy.qubes == frozenset()


def test_the_shipped_file_allows_nothing_and_names_every_key(tmp_path: Path) -> None:
    shipped = (Path(__file__).resolve().parents[2] / "packaging/unattended.conf").read_text()
    assert _load(tmp_path, shipped) == UnattendedPolicy()
    uncommented = "\n".join(line.removeprefix("#") if " = " in line else line
                            for line in shipped.splitlines())  # fmt: skip
    opened = _load(tmp_path, uncommented)
    assert opened.warnings == ()
    assert opened.qubes == {"sys-usb"} and opened.min_urgency == "high"
