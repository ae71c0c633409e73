"""local-install on the sandbox's real daemons: a cab file in dom0 goes to its device's
owner only if dom0's verified catalog holds its sha256 for that device (so dom0's cab
parser never meets unbound bytes), after the same cab and payload checks as a download.
A tampered cab is refused in dom0, unread, and sys-usb's fwupd is never called."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.sandbox.launcher import Sandbox
from tests.adversarial.hostile import assert_clean, baseline
from tests.sandbox_helpers import WEBCAM_ID, manager, qube_paths, webcam_version

pytestmark = pytest.mark.sandbox

REAL_CABS = Path("/usr/share/installed-tests/fwupd")


@pytest.fixture
def at_124(sandbox: Sandbox) -> Sandbox:
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    if webcam_version(sandbox, "sys-usb") != "1.2.4":
        r = manager(sandbox, "install", "-y", f"sys-usb:{WEBCAM_ID}", "1.2.4")
        assert r.returncode == 0, r.stdout + r.stderr
    return sandbox


def _in_dom0(sandbox: Sandbox, name: str, data: bytes) -> Path:
    """A file the admin put in dom0 (say, copied from a qube): dom0's own home."""
    path = sandbox.root("dom0") / "home" / name
    path.write_bytes(data)
    return path


def test_a_cab_dom0s_metadata_holds_is_installed_through_its_owner(at_124: Sandbox) -> None:
    sandbox = at_124
    cab = _in_dom0(sandbox, "fakedevice123.cab", (REAL_CABS / "fakedevice123.cab").read_bytes())
    # older than what runs: only with --allow-older, as fwupdmgr
    r = manager(sandbox, "local-install", str(cab), "-y")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip() == (
        "qubes-fwupdmgr: 1.2.3 is older than 1.2.4 on Integrated Webcam™: pass --allow-older "
        "to install it"
    )
    r = manager(sandbox, "local-install", str(cab), "-y", "--allow-older", WEBCAM_ID[:8])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Installed Integrated Webcam™ [sys-usb] 1.2.4 -> 1.2.3: now 1.2.3" in r.stdout
    assert webcam_version(sandbox, "sys-usb") == "1.2.3"
    history = manager(sandbox, "get-history").stdout.strip().splitlines()
    assert history[-1].endswith("1.2.4 -> 1.2.3  success")
    # installed: not kept in dom0's cache; the admin's file is the admin's
    assert not any(qube_paths(sandbox, "dom0").cabs_dir.glob("*.cab"))
    assert cab.exists()
    cab.unlink()


@pytest.mark.parametrize(
    ("name", "damage"),
    [("one-byte-flipped", lambda b: b[:-100] + bytes([b[-100] ^ 1]) + b[-99:]),
     ("truncated", lambda b: b[: len(b) // 2]),
     ("not-a-cab", lambda b: b"MSCF" + b"\0" * 60)],
)  # fmt: skip
def test_a_tampered_cab_is_refused_in_dom0_unread(at_124: Sandbox, name: str, damage) -> None:  # type: ignore[no-untyped-def]
    sandbox = at_124
    cab = _in_dom0(sandbox, f"{name}.cab", damage((REAL_CABS / "fakedevice123.cab").read_bytes()))
    before = baseline(sandbox)
    history = manager(sandbox, "get-history").stdout
    r = manager(sandbox, "local-install", str(cab), "-y", "--allow-older")
    assert r.returncode == 1, r.stdout + r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"qubes-fwupdmgr: {name}.cab (sha256 "), line
    assert line.endswith("is no release in dom0's verified metadata for these devices: "
                         "refused unread"), line  # fmt: skip
    assert "Installing" not in r.stdout
    assert webcam_version(sandbox, "sys-usb") == "1.2.4"
    assert manager(sandbox, "get-history").stdout == history  # the daemon was never called
    assert_clean(sandbox, before)
    cab.unlink()


def test_what_is_not_a_cab_file_is_named(at_124: Sandbox) -> None:
    r = manager(at_124, "local-install", "/nonexistent/x.cab", "-y")
    assert (r.returncode, r.stderr.strip()) == (
        3, "qubes-fwupdmgr: /nonexistent/x.cab: No such file or directory"
    )  # fmt: skip
    r = manager(at_124, "local-install", "/dev/zero", "-y")
    assert (r.returncode, r.stderr.strip()) == (
        1, "qubes-fwupdmgr: /dev/zero: not a regular file"
    )  # fmt: skip
