"""`--updatevm` routes a download through another qube, under the policy (issue 19).

sys-whonix stands for a Tor gateway: a networked qube with the UpdateVM package in its
template, on a network of its own where the same LVFS URL answers (the sandbox's second
mirror). Until the admin tags it (`qvm-tags sys-whonix add fwupd-updatevm`) it can
download but not push: the policy refuses the push and dom0 keeps what it had. Tagged, the
bytes dom0 accepts are the ones sys-whonix fetched, and sys-firewall's mirror sees nothing.

That dom0's session for a `--updatevm` run accepts a push from the qube it asked and no
other, even a tagged one holding the nonce, is shown by
tests/adversarial/test_push_framing.py::test_a_session_counts_only_for_the_qube_dom0_asked.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from broker.sandbox.launcher import TOR_GATEWAY, UPDATEVM, UPDATEVM_TAG, Launcher, Sandbox
from tests.adversarial.hostile import assert_clean, baseline, publish_variant, restore_mirror
from tests.sandbox_helpers import (
    WEBCAM_ID,
    LogMark,
    manager,
    mirror_marks,
    qube_paths,
    served,
    webcam_version,
)

pytestmark = pytest.mark.sandbox

META = "firmware.xml.zst"
RECEIVE = "qubes.FwupdReceiveUpdates"


@pytest.fixture
def routed(refreshed: Sandbox) -> Sandbox:
    """With isolation off every qube shares the host's network and one mirror: no route
    to tell apart."""
    state = Launcher(refreshed).isolation()
    if not state.on:
        pytest.skip(f"isolation: {state}")
    return refreshed


@pytest.fixture
def new_metadata(routed: Sandbox) -> Iterator[str]:
    """The mirror serves a newly signed catalog that dom0 does not hold (its sha256);
    after the test, the mirror as `up` left it."""
    publish_variant(routed, "whonix")
    try:
        yield hashlib.sha256((routed.lvfs_dir / META).read_bytes()).hexdigest()
    finally:
        restore_mirror(routed)


@pytest.fixture
def tagged(routed: Sandbox) -> Iterator[Sandbox]:
    """sys-whonix tagged fwupd-updatevm, as `qvm-tags sys-whonix add fwupd-updatevm`."""
    tags = routed.tags_file(TOR_GATEWAY)
    tags.parent.mkdir(exist_ok=True)
    assert not tags.exists()
    tags.write_text(f"{UPDATEVM_TAG}\n")
    try:
        yield routed
    finally:
        tags.unlink()


@contextmanager
def remote_updatevm(sandbox: Sandbox, qube: str) -> Iterator[None]:
    """dom0's `[remote lvfs]` with `updatevm = QUBE`, its original bytes put back after."""
    conf = qube_paths(sandbox, "dom0").config_file
    original = conf.read_bytes()
    section = "[remote lvfs]\n"
    assert original.decode().count(section) == 1
    conf.write_text(original.decode().replace(section, f"{section}updatevm = {qube}\n", 1))
    try:
        yield
    finally:
        conf.write_bytes(original)


def accepted_sha256(sandbox: Sandbox) -> str:
    state = json.loads(qube_paths(sandbox, "dom0").metadata_state_file.read_text())
    return str(state["lvfs"]["sha256"])


def refreshed_through(
    sandbox: Sandbox, via: str, not_via: str, expected_sha256: str, *flags: str
) -> list[str]:
    """`refresh FLAGS` is accepted, and its metadata came through ``via`` alone: its
    mirror served both files, ``not_via``'s nothing, and qrexec never named ``not_via``.
    Returns the qubes whose push to dom0 qrexec allowed, for the test to name."""
    mirrors = mirror_marks(sandbox)
    qrexec = LogMark(sandbox.log_dir / "qrexec.log")
    r = manager(sandbox, "refresh", *flags)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "metadata for lvfs accepted" in r.stdout, r.stdout
    assert accepted_sha256(sandbox) == expected_sha256
    assert served(mirrors[via]) == [f"GET /{META} 200", f"GET /{META}.jcat 200"]
    assert served(mirrors[not_via]) == []
    calls = qrexec.since()
    assert f"allow dom0 -> {via} qubes.FwupdDownload+" in calls
    assert not_via not in calls, calls
    return re.findall(rf"allow (\S+) -> dom0 {re.escape(RECEIVE)}\+", calls)


def test_untagged_sys_whonix_downloads_but_the_policy_refuses_its_push(
    routed: Sandbox, new_metadata: str
) -> None:
    sandbox = routed
    assert not sandbox.tags_file(TOR_GATEWAY).exists()
    before = baseline(sandbox)
    mirrors = mirror_marks(sandbox)
    qrexec = LogMark(sandbox.log_dir / "qrexec.log")
    r = manager(sandbox, "refresh", "--updatevm", TOR_GATEWAY)
    assert (r.returncode, r.stdout) == (1, ""), r.stdout + r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"qubes-fwupdmgr: {TOR_GATEWAY}: "), line
    assert line.endswith(f"call to {RECEIVE} refused by qrexec policy"), line
    # its network worked: the policy, not a missing route, stopped the new bytes
    assert served(mirrors[TOR_GATEWAY]) == [f"GET /{META} 200", f"GET /{META}.jcat 200"]
    assert served(mirrors[UPDATEVM]) == []
    assert f"deny {TOR_GATEWAY} -> dom0 {RECEIVE}+" in qrexec.since()
    assert_clean(sandbox, before)  # dom0's metadata byte for byte, no session, no process
    assert accepted_sha256(sandbox) != new_metadata


def test_tagged_sys_whonix_carries_the_refresh(
    routed: Sandbox, new_metadata: str, tagged: Sandbox
) -> None:
    # the configured UpdateVM takes no part: the one push dom0 took came from sys-whonix
    pushed = refreshed_through(routed, TOR_GATEWAY, UPDATEVM, new_metadata,
                               "--updatevm", TOR_GATEWAY)  # fmt: skip
    assert pushed == [TOR_GATEWAY]


def test_tagged_sys_whonix_carries_the_cabs_of_an_update(tagged: Sandbox) -> None:
    sandbox = tagged
    mirrors = mirror_marks(sandbox)
    device = f"sys-usb:{WEBCAM_ID}"
    r = manager(sandbox, "install", "-y", device, "1.2.3", "--updatevm", TOR_GATEWAY)
    assert r.returncode == 0, r.stdout + r.stderr
    assert webcam_version(sandbox, "sys-usb") == "1.2.3"
    r = manager(sandbox, "update", "-y", device, "--updatevm", TOR_GATEWAY)
    assert r.returncode == 0, r.stdout + r.stderr
    assert webcam_version(sandbox, "sys-usb") == "1.2.4"
    assert served(mirrors[TOR_GATEWAY]) == ["GET /fakedevice123.cab 200",
                                            "GET /fakedevice124.cab 200"]  # fmt: skip
    assert served(mirrors[UPDATEVM]) == []


def test_a_remotes_own_updatevm_routes_its_refresh_unless_the_run_names_one(
    routed: Sandbox, new_metadata: str, tagged: Sandbox
) -> None:
    sandbox = routed
    with remote_updatevm(sandbox, TOR_GATEWAY):
        # no flag: the remote's own line sends its metadata through sys-whonix
        assert refreshed_through(sandbox, TOR_GATEWAY, UPDATEVM, new_metadata) == [TOR_GATEWAY]

        # --updatevm wins over the remote's line: sys-firewall fetches, sys-whonix does not
        publish_variant(sandbox, "again")
        again = hashlib.sha256((sandbox.lvfs_dir / META).read_bytes()).hexdigest()
        assert again != new_metadata
        pushed = refreshed_through(sandbox, UPDATEVM, TOR_GATEWAY, again, "--updatevm", UPDATEVM)
        assert pushed == [UPDATEVM]
