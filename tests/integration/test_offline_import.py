"""Offline import on the sandbox: metadata and a cab taken from a dir in the `work` qube
(a USB stick, a dir received with qvm-copy) instead of the network. The same session,
nonce and checks as a download; `work` is trusted no more than the UpdateVM: a bad
signature from it stops in dom0 with nothing stored."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.sandbox.launcher import Sandbox
from tests.adversarial.hostile import (
    CompromisedUpdateVM,
    assert_clean,
    baseline,
    frame,
    publish_variant,
)
from tests.sandbox_helpers import WEBCAM_ID, manager, qube_paths, webcam_version

pytestmark = pytest.mark.sandbox

META = "firmware.xml.zst"
JCAT = f"{META}.jcat"


@pytest.fixture
def stick(refreshed: Sandbox) -> Iterator[Path]:
    """A dir in `work` holding what the mirror serves now (newly signed), and `work`
    tagged fwupd-import, as `qvm-tags work add fwupd-import` would; both undone after."""
    sandbox = refreshed
    publish_variant(sandbox, "offline")
    directory = sandbox.root("work") / "media/stick"
    directory.mkdir(parents=True)
    for name in (META, JCAT, "fakedevice123.cab", "fakedevice124.cab"):
        shutil.copy(sandbox.lvfs_dir / name, directory / name)
    tags = sandbox.tags_file("work")
    tags.parent.mkdir(exist_ok=True)
    tags.write_text("fwupd-import\n")
    try:
        yield directory
    finally:
        tags.unlink()
        shutil.rmtree(directory)


def _accepted_sha256(sandbox: Sandbox) -> str:
    state = json.loads(qube_paths(sandbox, "dom0").metadata_state_file.read_text())
    return str(state["lvfs"]["sha256"])


def test_an_offline_import_from_work_is_checked_and_accepted(
    refreshed: Sandbox, stick: Path
) -> None:
    sandbox = refreshed
    halted = sandbox.halted_file("sys-firewall")  # no network for this: the UpdateVM is down
    halted.parent.mkdir(exist_ok=True)
    halted.touch()
    try:
        r = manager(sandbox, "refresh", "--from-qube", "work", "--dir", str(stick))
        assert r.returncode == 0, r.stdout + r.stderr
        assert _accepted_sha256(sandbox) == hashlib.sha256((stick / META).read_bytes()).hexdigest()
        log = (sandbox.log_dir / "qrexec.log").read_text()
        assert "allow dom0 -> work qubes.FwupdDownload+" in log
        assert "allow work -> dom0 qubes.FwupdReceiveUpdates+" in log
    finally:
        halted.unlink()
    # the webcam at 1.2.3, then updated from the stick alone
    r = manager(sandbox, "install", "-y", f"sys-usb:{WEBCAM_ID}", "1.2.3")
    assert r.returncode == 0, r.stdout + r.stderr
    halted.touch()
    try:
        r = manager(sandbox, "update", "-y", "--from-qube", "work", "--dir", str(stick))
    finally:
        halted.unlink()
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Importing fakedevice124.cab from work:{stick}" in r.stdout
    assert webcam_version(sandbox, "sys-usb") == "1.2.4"


def test_without_the_tag_the_policy_refuses_the_push(refreshed: Sandbox, stick: Path) -> None:
    sandbox = refreshed
    sandbox.tags_file("work").write_text("")
    before = _accepted_sha256(sandbox)
    r = manager(sandbox, "refresh", "--from-qube", "work", "--dir", str(stick))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "call to qubes.FwupdReceiveUpdates refused by qrexec policy" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert _accepted_sha256(sandbox) == before


def test_a_bad_signature_from_the_import_qube_stops_in_dom0_with_nothing_stored(
    refreshed: Sandbox, stick: Path
) -> None:
    """A compromised `work` skips its own check and pushes the metadata with a jcat
    signed by nobody dom0 trusts (here: junk bytes where the signature goes)."""
    sandbox = refreshed
    meta = (stick / META).read_bytes()
    jcat = b"\x1f\x8b" + b"not a signature" * 10
    before = baseline(sandbox)
    with CompromisedUpdateVM(sandbox, "work") as vm:
        vm.plan([(frame([(META, len(meta)), (JCAT, len(jcat))], nonce="@NONCE@"),
                  [vm.add_file(META, meta), vm.add_file(JCAT, jcat)])])  # fmt: skip
        r = manager(sandbox, "refresh", "--from-qube", "work", "--dir", str(stick))
        assert vm.request()["dir"] == str(stick)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "qubes-fwupdmgr: dom0 refused what work sent: "
    ), r.stderr
    assert_clean(sandbox, before)


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["refresh", "--from-qube", "work"], "--from-qube and --dir go together"),
        (["refresh", "--dir", "/media/stick"], "--from-qube and --dir go together"),
        (["refresh", "--from-qube", "work", "--dir", "media/stick"], "absolute path"),
        (["update", "--from-qube", "work", "--dir", "/m", "--updatevm", "sys-firewall"],
         "not both"),
        (["refresh", "--from-qube=-work", "--dir", "/m"], "not a valid qube name"),
    ],
)  # fmt: skip
def test_import_arguments_are_checked_first(
    refreshed: Sandbox, argv: list[str], error: str
) -> None:
    r = manager(refreshed, *argv)
    assert (r.returncode, r.stdout) == (1, ""), r.stdout + r.stderr
    assert error in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
