"""What the admin reads when a daemon cannot be reached: whose fwupd, and what to do."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import cli
from broker.errors import EXIT_FAILURE, DaemonError
from broker.fwupd import FwupdClient


@pytest.fixture
def empty_bus(tmp_path: Path) -> Iterator[str]:
    """A real D-Bus bus on which no fwupd runs."""
    proc = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address",
         f"--address=unix:path={tmp_path}/bus"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    try:
        yield address
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_bus_without_fwupd_names_the_qube_and_what_to_do(empty_bus: str) -> None:
    with pytest.raises(DaemonError) as e:
        FwupdClient(empty_bus, qube="dom0").get_devices()
    message = str(e.value)
    assert message.startswith("dom0: fwupd is not running (")
    assert message.endswith("): systemctl start fwupd")


def test_no_bus_at_all_names_the_qube(tmp_path: Path) -> None:
    with pytest.raises(DaemonError, match=r"^dom0: cannot reach the system bus \(.*\): is dbus"):
        FwupdClient(f"unix:path={tmp_path}/none", qube="dom0").get_devices()


def test_a_sandbox_that_is_not_up_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QUBES_FWUPD_SANDBOX", str(tmp_path))
    monkeypatch.delenv("QUBES_FWUPD_QUBE", raising=False)
    assert cli.main(["get-devices"]) == EXIT_FAILURE
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == (
        f"qubes-fwupdmgr: no sandbox is up in {tmp_path} (qubes-fwupd-sandbox up --dir "
        f"{tmp_path})"
    )
