"""fwupd decides what a device may take, dom0 what may cross: on both real daemons.

The sandbox LVFS publishes webcam releases whose components carry ``<requires>`` that the
fake device does not meet (a newer fwupd, another vendor id, another firmware's version)
beside one it meets. qubes-fwupdmgr must offer, per device, exactly what plain
``fwupdmgr get-updates --json`` lists on the owning daemon, install only that, and never
download the others.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import pytest

from broker import versions
from broker.config import Config
from broker.fwupd import FwupdClient
from broker.metadata import MetadataStore
from broker.sandbox import lvfs
from broker.sandbox.launcher import Sandbox
from broker.sandbox.pki import create_pki
from tests.adversarial.hostile import (
    publish_real,
    restore_mirror,
    signed_cab,
    trusted_signer,
)
from tests.sandbox_helpers import WEBCAM_GUID, manager, probe, qube_paths, webcam_version

pytestmark = pytest.mark.sandbox

WEBCAM_ID = "08d460be0f1f9f128413f816022a6439e0078018"
OTHER_GUID = "3fa9e5b4-0000-4000-8000-00000000f1f1"  # no device has it
# (component id suffix, version, requires): only the last is met by the fake webcam
VARIANTS = (
    ("req-fwupd", "1.2.5", '<id compare="ge" version="9.9.9">org.freedesktop.fwupd</id>'),
    ("req-vendor", "1.2.6", '<firmware compare="eq" version="USB:0xFFFF">vendor-id</firmware>'),
    ("req-other", "1.2.7", f'<firmware compare="ge" version="1.0.0">{OTHER_GUID}</firmware>'),
    ("req-met", "1.2.8", '<id compare="ge" version="1.0.0">org.freedesktop.fwupd</id>'),
)
UNMET = ("1.2.5", "1.2.7")
# fwupd lists releases with IGNORE_VID_PID (src/fu-engine.c) and checks a vendor-id
# requirement only when it installs, against the cab's own metainfo: 1.2.6 is offered by
# fwupdmgr get-updates, so by us too, and fwupd itself would refuse to install it
LISTED_BUT_NOT_INSTALLABLE = "1.2.6"


def _metainfo(suffix: str, version: str, requires: str, payload: bytes) -> bytes:
    digest = hashlib.sha256(payload).hexdigest()
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<component type="firmware">
  <id>org.fwupd.fakedevice.firmware.{suffix}</id>
  <name>FakeDevice</name>
  <summary>Firmware for the ACME Corp Integrated Webcam</summary>
  <provides><firmware type="flashed">{WEBCAM_GUID}</firmware></provides>
  <requires>{requires}</requires>
  <custom><value key="LVFS::VersionFormat">triplet</value>
    <value key="LVFS::UpdateProtocol">com.acme.test</value></custom>
  <releases>
    <release version="{version}" urgency="medium" date="2026-11-01">
      <checksum type="sha256" filename="firmware.bin" target="content">{digest}</checksum>
      <description><p>Requires {suffix}.</p></description>
    </release>
  </releases>
</component>
""".encode()


@pytest.fixture(scope="module")
def requiring_cabs(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The four cabs published beside the real ones; version -> cab sha256. Afterwards the
    mirror (and, after the next refresh, dom0 and both daemons) serve the real ones."""
    work = tmp_path_factory.mktemp("requiring")
    signer = trusted_signer(sandbox)
    cabs, shas = [], {}
    for suffix, version, requires in VARIANTS:
        # the test plugin reads the version it becomes from the payload (uint32, triplet)
        major, minor, micro = (int(p) for p in version.split("."))
        payload = f"0x{major:x}{minor:02x}{micro:04x}".encode() + b"\0"  # 9 bytes read
        cab = signed_cab(work, _metainfo(suffix, version, requires, payload), signer, payload)
        path = work / f"fakedevice-{suffix}-{version}.cab"
        path.write_bytes(cab)
        cabs.append(path)
        shas[version] = hashlib.sha256(cab).hexdigest()
    lvfs.publish(sandbox.lvfs_dir, cabs, create_pki(sandbox.pki_dir))
    try:
        r = manager(sandbox, "refresh")
        assert r.returncode == 0, r.stdout + r.stderr
        yield shas
    finally:
        for path in cabs:
            (sandbox.lvfs_dir / path.name).unlink(missing_ok=True)
        restore_mirror(sandbox)
        publish_real(sandbox)


@contextmanager
def without_usb_qube(sandbox: Sandbox) -> Iterator[None]:
    """dom0's config with no USB qube: every device is dom0's fwupd's."""
    conf = qube_paths(sandbox, "dom0").config_file
    original = conf.read_text()
    assert "usbvm = sys-usb\n" in original
    conf.write_text(original.replace("usbvm = sys-usb\n", "usbvm =\n"))
    try:
        yield
    finally:
        conf.write_text(original)


def fwupdmgr_updates(sandbox: Sandbox, qube: str) -> dict[str, list[str]]:
    """What plain fwupdmgr get-updates --json lists on that qube's daemon: device id ->
    release versions, in fwupdmgr's order."""
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "DBUS_SYSTEM_BUS_ADDRESS": sandbox.bus_address(qube),
        "HOME": str(sandbox.root(qube)),
    }
    r = subprocess.run(
        ["fwupdmgr", "--json", "--no-metadata-check", "--no-remote-check", "get-updates"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    doc = json.loads(r.stdout)
    return {d["DeviceId"]: [rel["Version"] for rel in d.get("Releases", [])]
            for d in doc.get("Devices", [])}  # fmt: skip


def ours(
    sandbox: Sandbox,
) -> tuple[dict[tuple[str, str], list[str]], subprocess.CompletedProcess[str]]:
    r = manager(sandbox, "get-updates", "--json")
    doc = json.loads(r.stdout) if r.stdout.strip() else {"Devices": []}
    return {(d["Qube"], d["DeviceId"]): [rel["Version"] for rel in d["Releases"]]
            for d in doc["Devices"]}, r  # fmt: skip


def _fetched(sandbox: Sandbox, version: str) -> int:
    """How often the UpdateVM asked the LVFS mirror for that release's cab."""
    (suffix,) = [sfx for sfx, v, _ in VARIANTS if v == version]
    log = (sandbox.log_dir / "mirror.log").read_text()
    return log.count(f'"GET /fakedevice-{suffix}-{version}.cab ')


@pytest.mark.parametrize("owner", ["sys-usb", "dom0"])
def test_the_owning_fwupd_decides_what_the_device_may_take(
    sandbox: Sandbox, requiring_cabs: dict[str, str], owner: str
) -> None:
    with without_usb_qube(sandbox) if owner == "dom0" else nullcontext():
        theirs = fwupdmgr_updates(sandbox, owner)
        mine, r = ours(sandbox)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stderr == ""
        webcam_ids = [k for k in mine if k[0] == owner]
        assert len(webcam_ids) == 1, mine
        (key,) = webcam_ids
        # exactly what fwupd offers on the owning daemon, nothing dom0 guessed
        assert mine[key] == theirs[key[1]]
        assert mine[key][0] == "1.2.8"
        assert LISTED_BUT_NOT_INSTALLABLE in mine[key]
        assert not set(UNMET) & set(mine[key])

        r = manager(sandbox, "update", "-y")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"Installing on {owner}" in r.stdout
        assert webcam_version(sandbox, owner) == "1.2.8"
        # the releases fwupd would not offer were never fetched into dom0
        for version in (*UNMET, LISTED_BUT_NOT_INSTALLABLE):
            assert _fetched(sandbox, version) == 0, version
        assert _fetched(sandbox, "1.2.8") >= 1
        # installed: dom0 keeps no copy in its cache
        cab = qube_paths(sandbox, "dom0").cabs_dir / f"{requiring_cabs['1.2.8']}.cab"
        assert not cab.exists()
        # now at 1.2.8: fwupd offers nothing newer, nor do we
        mine, r = ours(sandbox)
        assert r.returncode == 2, r.stdout + r.stderr
        assert key not in mine
        assert fwupdmgr_updates(sandbox, owner).get(key[1], []) == []


def test_unmet_releases_are_in_dom0s_catalog_all_the_same(
    sandbox: Sandbox, requiring_cabs: dict[str, str]
) -> None:
    """dom0 holds them (they are signed and well-formed): it is fwupd that withholds them."""
    paths = qube_paths(sandbox, "dom0")
    config = Config.load(paths)
    catalog = MetadataStore(paths).catalog(config.remotes[0], config.limits)
    assert catalog is not None
    held = {r.sha256 for r in catalog.releases}
    assert set(requiring_cabs.values()) <= held


def test_sys_usbs_releases_and_downgrades_arrive_as_its_fwupd_gives_them(
    sandbox: Sandbox, requiring_cabs: dict[str, str]
) -> None:
    """qubes.FwupdUsbvm+GetReleases/+GetDowngrades/+GetUpgrades, called from dom0, carry
    what sys-usb's fwupd answers over D-Bus (for the manager's install/downgrade verbs)."""
    code = f"""
import json
from broker.config import Config, Paths
from broker.qrexec import FROM_DOM0
from broker.usbvm import UsbvmClient
client = UsbvmClient(FROM_DOM0, "sys-usb", Config.load(Paths.from_env()).limits)
out = {{}}
for kind in ("releases", "downgrades", "upgrades"):
    found = client.offers(kind, ["{WEBCAM_ID}"])["{WEBCAM_ID}"]
    out[kind] = found if isinstance(found, str) else [[r.version, r.checksums] for r in found]
print(json.dumps(out))
"""
    through_qrexec = probe(sandbox, "dom0", code)
    direct = FwupdClient(sandbox.bus_address("sys-usb")).offers("releases", [WEBCAM_ID])[WEBCAM_ID]
    assert not isinstance(direct, str)
    assert through_qrexec["releases"] == [[r.version, list(r.checksums)] for r in direct]
    assert {"1.2.3", "1.2.4", "1.2.8"} <= {v for v, _ in through_qrexec["releases"]}
    # every release the daemon lists names the container sha256 dom0 holds for it
    sha_of = {v: s for v, s in through_qrexec["releases"]}
    assert requiring_cabs["1.2.8"] in sha_of["1.2.8"]
    current = webcam_version(sandbox, "sys-usb")
    downgrades = through_qrexec["downgrades"]
    assert isinstance(downgrades, list)
    assert all(versions.compare(v, current) < 0 for v, _ in downgrades)
