"""Reviewed plans on the sandbox: `get-updates --json` writes a plan bound to dom0's
verified metadata and the cab; `update --plan` installs it while it holds, and refuses it,
installing nothing, once the metadata has changed (a new signed catalog refreshed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.sandbox.launcher import Sandbox
from tests.adversarial.hostile import publish_real, publish_variant
from tests.sandbox_helpers import WEBCAM_ID, manager, qube_paths, webcam_version

pytestmark = pytest.mark.sandbox


def _plan(sandbox: Sandbox, name: str) -> tuple[Path, list[dict[str, str]]]:
    r = manager(sandbox, "get-updates", "--json", f"sys-usb:{WEBCAM_ID}")
    assert r.returncode == 0, r.stdout + r.stderr
    entries = json.loads(r.stdout)["Plan"]
    # dom0's own files are where its manager can read them (its tree is bound back)
    path = qube_paths(sandbox, "dom0").root / name
    path.write_text(json.dumps({"Plan": entries}))
    return path, entries


def test_a_plan_is_refused_after_the_metadata_changed_and_accepted_before(
    refreshed: Sandbox,
) -> None:
    sandbox = refreshed
    r = manager(sandbox, "install", "-y", f"sys-usb:{WEBCAM_ID}", "1.2.3")
    assert r.returncode == 0, r.stdout + r.stderr
    signed_before = qube_paths(sandbox, "dom0").metadata_state_file.read_text()

    stale, entries = _plan(sandbox, "plan-old.json")
    assert [(e["Qube"], e["DeviceId"], e["VersionOld"], e["Version"]) for e in entries] == [
        ("sys-usb", WEBCAM_ID, "1.2.3", "1.2.4")
    ]
    assert entries[0]["MetadataSha256"] in signed_before
    assert entries[0]["MetadataSigned"] in signed_before

    # the mirror signs a new catalog (the same releases) and dom0 takes it
    publish_variant(sandbox, "plan")
    try:
        r = manager(sandbox, "refresh")
        assert r.returncode == 0, r.stdout + r.stderr
        r = manager(sandbox, "update", "--plan", str(stale))
        assert r.returncode == 1, r.stdout + r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith(
            "qubes-fwupdmgr: plan refused, nothing installed: Integrated Webcam™ [sys-usb] "
            "1.2.3 -> 1.2.4: lvfs's metadata changed since the plan was made"
        ), r.stderr
        assert webcam_version(sandbox, "sys-usb") == "1.2.3"

        fresh, entries = _plan(sandbox, "plan-new.json")
        assert entries[0]["MetadataSha256"] != json.loads(stale.read_text())["Plan"][0][
            "MetadataSha256"
        ]
        r = manager(sandbox, "update", "--plan", str(fresh))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Updated Integrated Webcam™ [sys-usb] 1.2.3 -> 1.2.4" in r.stdout
        assert webcam_version(sandbox, "sys-usb") == "1.2.4"

        # done: the same plan again no longer matches the device
        r = manager(sandbox, "update", "--plan", str(fresh))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "no update is offered for this device now" in r.stderr
    finally:
        stale.unlink(missing_ok=True)
        (qube_paths(sandbox, "dom0").root / "plan-new.json").unlink(missing_ok=True)
        publish_real(sandbox)


def test_a_plan_that_is_not_one_is_refused_before_any_daemon_is_asked(
    refreshed: Sandbox,
) -> None:
    path = qube_paths(refreshed, "dom0").root / "plan-bad.json"
    path.write_text('{"Devices": []}')
    try:
        r = manager(refreshed, "update", "--plan", str(path))
    finally:
        path.unlink()
    assert (r.returncode, r.stdout) == (1, ""), r.stdout + r.stderr
    assert r.stderr == 'qubes-fwupdmgr: the plan has no "Plan" list (get-updates --json ' \
        "writes one)\n"
