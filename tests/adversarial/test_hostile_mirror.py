"""A hostile mirror whose catalog is signed by the trusted key (a compromised LVFS signing
key), a compromised UpdateVM during `update`, and stale metadata: the whole path, from the
mirror through `refresh` to `qubes-fwupdmgr update -y`.

Each catalog announces one release newer than anything (9.9.x) for the fake webcam, so
`update -y` picks it whatever version the webcam runs. Each case: the manager exits 1 with
one line on stderr naming the cause, nothing is installed, dom0's trusted cache is as the
refresh left it, nothing is left in its untrusted, sessions or tmp dirs, no process is
left. At the end the mirror serves its real catalog again (hostile.restore_mirror)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.config import Config
from broker.sandbox.launcher import Sandbox
from tests.adversarial.hostile import (
    FAKE_ID,
    CompromisedUpdateVM,
    Signer,
    assert_clean,
    assert_printable,
    baseline,
    dom0_config,
    frame,
    metainfo,
    one_line,
    publish_catalog,
    signed_cab,
    trusted_signer,
    write_cab,
)
from tests.sandbox_helpers import manager, qube_paths

pytestmark = pytest.mark.sandbox

MiB = 1024 * 1024
REAL_CAB = "fakedevice124.cab"


def refresh(sandbox: Sandbox) -> None:
    r = manager(sandbox, "refresh")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sys-usb fwupd loaded the metadata" in r.stdout


def assert_refused_update(sandbox: Sandbox, cause: str) -> None:
    before = baseline(sandbox)
    r = manager(sandbox, "update", "-y")
    assert r.returncode == 1, r.stdout + r.stderr
    line = one_line(r.stderr)
    assert line.startswith("qubes-fwupdmgr: "), line
    assert cause in line, line
    assert "Installing" not in r.stdout
    assert_printable(r.stdout, r.stderr)
    assert_clean(sandbox, before)


Cab = Callable[[Path, Signer], bytes]

# (id, the cab on the mirror (None: the real LVFS-signed fakedevice124.cab), the version
#  and component id the signed catalog announces for it, what dom0's refusal must name)
RELEASES: list[tuple[str, Cab | None, str, str, str]] = [
    ("catalog-version-is-not-the-cabs", None, "9.9.1", FAKE_ID,
     "dom0 refused what sys-firewall sent: fakedevice124.metainfo.xml: release version "
     "'1.2.4' is not the expected 9.9.1"),
    ("catalog-component-is-not-the-cabs", None, "9.9.2", "org.evil.firmware",
     "component id 'org.fwupd.fakedevice.firmware' is not the expected org.evil.firmware"),
    ("cab-with-path-traversal", lambda w, t: signed_cab(
        w, metainfo("9.9.3"), t, members=[("../../etc/cron.d/evil", b"* * * * * root sh\n")]),
     "9.9.3", FAKE_ID, "cab member name '../../etc/cron.d/evil' holds a path separator"),
    ("cab-deflate-bomb", lambda w, t: write_cab(
        [("firmware.bin", bytes(64 * MiB)), ("firmware.metainfo.xml", metainfo("9.9.5"))]),
     "9.9.5", FAKE_ID, "more than 200 times its size"),
    ("cab-metainfo-billion-laughs", lambda w, t: signed_cab(w, metainfo(
        "9.9.6", doctype='<!DOCTYPE component [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;">]>\n',
        name="&b;"), t), "9.9.6", FAKE_ID, "has a DOCTYPE or entity declarations"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("cab", "version", "component_id", "cause"),
    [c[1:] for c in RELEASES],
    ids=[c[0] for c in RELEASES],
)
def test_update_refuses_hostile_release_from_signed_catalog(
    mirror: Sandbox,
    tmp_path: Path,
    cab: Cab | None,
    version: str,
    component_id: str,
    cause: str,
) -> None:
    data = cab(tmp_path, trusted_signer(mirror)) if cab is not None else None
    publish_catalog(mirror, version, cab=data, component_id=component_id)
    refresh(mirror)
    assert_refused_update(mirror, cause)


def test_update_refuses_a_release_larger_than_the_cab_cap(mirror: Sandbox) -> None:
    """The signed catalog announces a 1 TiB cab: refused before anything is downloaded."""
    publish_catalog(mirror, "9.9.11", size=1 << 40)
    refresh(mirror)
    before = baseline(mirror)
    r = manager(mirror, "update", "-y")
    assert r.returncode == 1, r.stdout + r.stderr
    line = one_line(r.stderr)
    assert "fakedevice124.cab is 1099511627776 bytes, more than cab_max_bytes" in line, line
    assert "Downloading" not in r.stdout
    assert_clean(mirror, before)


def _swap(vm: CompromisedUpdateVM, mirror: Sandbox, name: str, data: bytes) -> None:
    vm.plan([(frame([(name, len(data))]), [vm.add_file("cab", data)])])


SIZE = 4955  # of fakedevice124.cab, which the signed catalog names for 9.9.8

# (id, what the compromised UpdateVM pushes instead of the cab, the refusal's cause)
SWAPS: list[tuple[str, Callable[[CompromisedUpdateVM, Sandbox], None], str]] = [
    ("other-bytes-same-size", lambda vm, m: _swap(vm, m, REAL_CAB, bytes(SIZE)),
     "fakedevice124.cab: sha256 does not match dom0's verified metadata"),
    ("smaller", lambda vm, m: _swap(vm, m, REAL_CAB, bytes(SIZE - 55)),
     f"fakedevice124.cab is {SIZE - 55} bytes, verified metadata says {SIZE}"),
    ("larger", lambda vm, m: _swap(vm, m, REAL_CAB, bytes(SIZE + 45)),
     f"fakedevice124.cab is {SIZE + 45} bytes, more than the cap {SIZE}"),
    ("older-real-cab-renamed", lambda vm, m: _swap(
        vm, m, REAL_CAB, (m.lvfs_dir / "fakedevice123.cab").read_bytes()),
     "verified metadata says 4955"),
    ("other-file-name", lambda vm, m: _swap(vm, m, "evil.cab", bytes(SIZE)),
     "pushed files do not match what dom0 asked for (expected fakedevice124.cab)"),
]  # fmt: skip


_swap_catalog: dict[str, str] = {}


@pytest.fixture
def swap_catalog(mirror: Sandbox) -> Sandbox:
    """dom0 holds a signed catalog naming fakedevice124.cab as 9.9.8 (taken once, while
    no other test here has replaced it)."""
    state = qube_paths(mirror, "dom0").metadata_state_file
    if _swap_catalog.get("state") != state.read_text():
        assert (mirror.lvfs_dir / REAL_CAB).stat().st_size == SIZE
        publish_catalog(mirror, "9.9.8")
        refresh(mirror)
        _swap_catalog["state"] = state.read_text()
    return mirror


@pytest.mark.parametrize(("swap", "cause"), [c[1:] for c in SWAPS], ids=[c[0] for c in SWAPS])
def test_update_refuses_cab_swapped_by_compromised_updatevm(
    swap_catalog: Sandbox, swap: Callable[[CompromisedUpdateVM, Sandbox], None], cause: str
) -> None:
    mirror = swap_catalog
    with CompromisedUpdateVM(mirror) as vm:
        swap(vm, mirror)
        assert_refused_update(mirror, cause)
        assert vm.request()["files"][0]["sha256"]  # dom0 told it which bytes it wants


def test_unattended_update_on_stale_metadata_is_refused(mirror: Sandbox) -> None:
    """A freeze: the UpdateVM withholds new metadata; what dom0 has grows old. Here the
    allowed age is 0 days, so the metadata just taken is already too old."""
    publish_catalog(mirror, "9.9.9")
    refresh(mirror)
    with dom0_config(mirror, metadata_max_age_days="0"):
        before = baseline(mirror)
        r = manager(mirror, "update", "-y")
        assert r.returncode == 1, r.stdout + r.stderr
        line = one_line(r.stderr)
        assert "more than metadata_max_age_days=0; refusing an unattended update" in line, line
        assert "Downloading" not in r.stdout
        assert_clean(mirror, before)


ESCAPES = "\x9b31m\u202eevil\u200b\u2028\x85\ufeff\U000e0041"


def test_escape_sequences_in_signed_catalog_are_not_printed(mirror: Sandbox) -> None:
    """XML allows C1 controls, bidi overrides and invisible format characters."""
    publish_catalog(mirror, "9.9.10", summary=f"Firmware {ESCAPES} for the webcam")
    refresh(mirror)
    before = baseline(mirror)
    r = manager(mirror, "get-updates")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "-> 9.9.10 (critical) Firmware ?31m?evil" in r.stdout, r.stdout
    assert_printable(r.stdout, r.stderr)
    r = manager(mirror, "get-updates", "--json")
    assert r.returncode == 0, r.stderr
    assert_printable(r.stdout, r.stderr)
    releases = [rel for d in json.loads(r.stdout)["Devices"] for rel in d["Releases"]]
    assert any(rel["Version"] == "9.9.10" for rel in releases)
    assert_clean(mirror, before)


@pytest.mark.parametrize(
    ("location", "offered"),
    [
        # another host, fwupd.org only in the query: no file name in the path at all
        ("https://attacker.example/?x=fwupd.org/downloads/{cab}", False),
        ("http://fwupd.org/downloads/{cab}", False),  # not TLS
        ("ipfs://QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", False),
        # a look-alike host and a path climbing out: only the basename counts
        ("https://fwupd.org.attacker.example/downloads/{cab}", True),
        ("https://fwupd.org/downloads/../../x/{cab}", True),
    ],
)
def test_a_signed_catalog_cannot_send_the_updatevm_elsewhere(
    mirror: Sandbox, tmp_path: Path, location: str, offered: bool
) -> None:
    """Every URL dom0 hands the UpdateVM is the remote's base plus a plain file name; a
    release with no https location naming one is never offered (fwupd's offer of it is
    refused with one line)."""
    cab = signed_cab(tmp_path, metainfo("9.9.7"), trusted_signer(mirror))
    publish_catalog(mirror, "9.9.7", cab, location=location.format(cab="x.cab"))
    refresh(mirror)
    base = _remote_base(mirror)
    r = manager(mirror, "get-updates", "--json")
    doc = json.loads(r.stdout) if r.stdout.strip() else {"Devices": []}
    uris = [u for d in doc["Devices"] for rel in d["Releases"] for u in rel["Locations"]]
    assert all(u.startswith(base + "/") and "/" not in u[len(base) + 1 :] for u in uris), uris
    listed = [rel["Version"] for d in doc["Devices"] for rel in d["Releases"]]
    if offered:
        assert "9.9.7" in listed and f"{base}/x.cab" in uris
        assert r.returncode == 0, r.stdout + r.stderr
    else:
        assert "9.9.7" not in listed
        assert r.returncode == 1, r.stdout + r.stderr
        assert "offered org.fwupd.fakedevice.firmware 9.9.7, refused" in one_line(r.stderr)


def _remote_base(sandbox: Sandbox) -> str:
    (remote,) = Config.load(qube_paths(sandbox, "dom0")).remotes
    assert remote.firmware_base_uri is not None
    return remote.firmware_base_uri.rstrip("/")
