"""update --unattended on the sandbox: by default it installs nothing and names what
waits; opened for sys-usb, it installs sys-usb's webcam without a question (the webcam is
routed to sys-usb: dom0's copy of the fake device is not offered while sys-usb is up)."""

from __future__ import annotations

import pytest

from broker.sandbox.launcher import Sandbox
from tests.sandbox_helpers import WEBCAM_ID, manager, qube_paths, webcam_version

pytestmark = pytest.mark.sandbox


def test_unattended_installs_only_what_the_policy_allows(refreshed: Sandbox) -> None:
    sandbox = refreshed
    r = manager(sandbox, "install", "-y", f"sys-usb:{WEBCAM_ID}", "1.2.3")
    assert r.returncode == 0, r.stdout + r.stderr
    dom0_before = webcam_version(sandbox, "dom0")
    policy = qube_paths(sandbox, "dom0").unattended_file
    assert not policy.exists()

    # no unattended.conf: refresh-and-report only
    r = manager(sandbox, "update", "--unattended")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Waits for a person: Integrated Webcam™ [sys-usb] 1.2.3 -> 1.2.4: unattended " \
        "installs are not allowed for sys-usb's devices" in r.stdout
    assert (webcam_version(sandbox, "sys-usb"), webcam_version(sandbox, "dom0")) == (
        "1.2.3", dom0_before,
    )  # fmt: skip

    policy.write_text("[unattended]\nqubes = sys-usb\n")
    try:
        # no terminal, no -y: it never asks
        r = manager(sandbox, "update", "--unattended")
    finally:
        policy.unlink()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Updated Integrated Webcam™ [sys-usb] 1.2.3 -> 1.2.4" in r.stdout
    assert webcam_version(sandbox, "sys-usb") == "1.2.4"
    assert webcam_version(sandbox, "dom0") == dom0_before
