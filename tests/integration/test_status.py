"""status on the sandbox: what the automated runs would meet, from dom0's own state, at
once, even while another run holds the lock."""

from __future__ import annotations

import fcntl
import json
import os
import time

import pytest

from broker.sandbox.launcher import Sandbox
from tests.sandbox_helpers import manager, qube_paths

pytestmark = pytest.mark.sandbox


def test_status_shows_the_lock_holder_an_inhibit_file_and_the_metadata_age(
    refreshed: Sandbox,
) -> None:
    paths = qube_paths(refreshed, "dom0")
    r = manager(refreshed, "status")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["Run lock:    free", "Inhibit:     none"]
    assert "Unattended:  nothing: refresh and report only" in lines
    assert any(line.startswith("Metadata:    lvfs: signed ") and line.endswith("(0 days ago)")
               for line in lines), r.stdout  # fmt: skip

    # a run at work (this test, as far as the lock can tell) and an inhibit file
    inhibit = paths.root / "etc/qubes-fwupd/inhibit"
    inhibit.write_text("waiting for the vendor's advisory\n")
    paths.run_lock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(paths.run_lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        since = time.time()
        os.pwrite(fd, json.dumps({"pid": 4242, "verb": "update", "since": since}).encode(), 0)
        t0 = time.monotonic()
        r = manager(refreshed, "status")
        took = time.monotonic() - t0
        j = manager(refreshed, "status", "--json")
    finally:
        os.close(fd)
        inhibit.unlink()
    assert r.returncode == 0, r.stdout + r.stderr
    assert took < 30  # never waits lock_wait_seconds (60) for the lock it reports
    lines = r.stdout.splitlines()
    assert lines[0].startswith("Run lock:    held by pid 4242, update, since "), lines[0]
    assert lines[1] == "Inhibit:     inhibited by /etc/qubes-fwupd/inhibit (waiting for " \
        "the vendor's advisory): nothing refreshed or installed; remove it to go on"
    doc = json.loads(j.stdout)["Status"]  # and valid against the schema (manager())
    assert doc["Lock"] == {"Pid": 4242, "Verb": "update", "Since": int(since)}
    assert doc["Remotes"][0]["Id"] == "lvfs" and doc["Remotes"][0]["Enabled"] is True
