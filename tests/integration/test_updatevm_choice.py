"""Which qube downloads: the admin's choice (the config's updatevm, --updatevm), else dom0's
own UpdateVM (qubes-prefs updatevm) where one is set, else sys-firewall."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.sandbox.launcher import Sandbox
from broker.sandbox.qrexec_client import prefs_file
from tests.sandbox_helpers import manager, qube_paths

pytestmark = pytest.mark.sandbox


@pytest.fixture
def unpinned(refreshed: Sandbox) -> Iterator[Path]:
    """dom0's config without an updatevm line; the qubes-prefs file, removed after."""
    conf = qube_paths(refreshed, "dom0").config_file
    original = conf.read_text()
    conf.write_text("".join(line for line in original.splitlines(keepends=True)
                            if not line.startswith("updatevm")))  # fmt: skip
    prefs = prefs_file(refreshed.root("dom0"))
    prefs.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield prefs
    finally:
        conf.write_text(original)
        prefs.unlink(missing_ok=True)


def test_dom0s_own_updatevm_is_used_unless_the_admin_chose_one(
    refreshed: Sandbox, unpinned: Path
) -> None:
    sandbox = refreshed
    # qubes-prefs names work: the download goes there (work has no route to the mirror)
    unpinned.write_text("updatevm work\n")
    r = manager(sandbox, "refresh")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr == ("qubes-fwupdmgr: work: qubes.FwupdDownload failed: qubes.FwupdDownload:"
                        " 127.0.0.1: connection refused\n")  # fmt: skip
    # --updatevm is the admin's choice for the run
    r = manager(sandbox, "refresh", "--updatevm", "sys-firewall")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    # qubes-prefs names sys-firewall: as the default would
    unpinned.write_text("updatevm sys-firewall\n")
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    # unset: the default
    unpinned.write_text("")
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    # a value that is no qube name is refused, in one line
    unpinned.write_text("updatevm ../dom0\n")
    r = manager(sandbox, "refresh")
    assert r.returncode == 1 and "qubes-prefs updatevm" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr


def test_the_configs_updatevm_wins_over_qubes_prefs(refreshed: Sandbox) -> None:
    prefs = prefs_file(refreshed.root("dom0"))
    prefs.parent.mkdir(parents=True, exist_ok=True)
    prefs.write_text("updatevm work\n")
    try:
        r = manager(refreshed, "refresh")  # the sandbox's config says sys-firewall
    finally:
        prefs.unlink()
    assert r.returncode in (0, 2), r.stdout + r.stderr
