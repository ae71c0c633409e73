"""The interactive install on a terminal (a pty, as an admin types it): a numbered choice
of releases, the confirmation with what the admin weighs (urgency, size, what restarts,
release notes), download progress, and the end state on the real sys-usb daemon. Without
a terminal and without -y, nothing waits for an answer that cannot come."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from collections.abc import Iterator

import pytest

from broker.sandbox.launcher import Sandbox
from broker.sandbox.mirror import rate_file
from tests.sandbox_helpers import (
    WEBCAM_GUID,
    _manager_command,
    manager,
    plugin_knobs,
    webcam_version,
)

pytestmark = pytest.mark.sandbox


class Terminal:
    """qubes-fwupdmgr with stdin, stdout and stderr on one pty."""

    def __init__(self, sandbox: Sandbox, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(**{**_manager_command(sandbox, args), "stdin": slave,
                                        "stdout": slave, "stderr": slave})  # fmt: skip
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, timeout: float = 60) -> str:
        """Everything shown until ``text`` appears (and consumed up to it)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(0.0, left))
            if not ready:
                self.proc.kill()
                pytest.fail(f"{text!r} never came; the terminal shows:\n{self.seen}")
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                pytest.fail(f"{text!r} never came before the end:\n{self.seen}")
            self.seen += chunk.decode("utf-8", "replace")
        shown, _, self.seen = self.seen.partition(text)
        return shown + text

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def finish(self) -> tuple[int, str]:
        rest = self.seen
        while True:
            ready, _, _ = select.select([self.master], [], [], 60)
            try:
                chunk = os.read(self.master, 4096) if ready else b""
            except OSError:
                chunk = b""
            if not chunk:
                break
            rest += chunk.decode("utf-8", "replace")
        os.close(self.master)
        return self.proc.wait(30), rest


@pytest.fixture
def at_123(sandbox: Sandbox) -> Iterator[Sandbox]:
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    if webcam_version(sandbox, "sys-usb") != "1.2.3":
        r = manager(sandbox, "install", "-y", f"sys-usb:{WEBCAM_GUID}", "1.2.3")
        assert r.returncode == 0, r.stdout + r.stderr
    manager(sandbox, "clean")
    try:
        yield sandbox
    finally:
        rate_file(sandbox.lvfs_dir).unlink(missing_ok=True)


def test_choose_confirm_watch_it_download_and_find_it_installed(at_123: Sandbox) -> None:
    rate_file(at_123.lvfs_dir).write_text("1500")  # about 3 s: progress has time to show
    term = Terminal(at_123, "install", f"sys-usb:{WEBCAM_GUID}")
    menu = term.expect("[0-2]: ")
    assert "Choose a release:\r\n0. Cancel\r\n1. 1.2.4 (medium)" in menu, menu
    assert "\r\n2. 1.2.3 " in menu, menu
    term.type("9")  # not on the list: asked again
    assert "'9' is not one of 0-2" in term.expect("[0-2]: ")
    term.type("1")
    shown = term.expect("[y/N] ")
    assert "Integrated Webcam™ [sys-usb] 1.2.3 -> 1.2.4" in shown
    assert "Urgency:  medium" in shown
    assert "Download: 4.8 KiB (fakedevice124.cab from lvfs)" in shown
    assert "After:    nothing to restart" in shown
    # the release notes, as text (wrapped for the terminal)
    assert "with the flux capacitor to prevent time going backwards." in " ".join(shown.split())
    assert "<p>" not in shown
    term.type("y")
    code, rest = term.finish()
    assert code == 0, rest
    progress = [s for s in rest.replace("\r", "\n").split("\n") if "fakedevice124.cab" in s]
    assert any("s left" in s for s in progress), rest
    assert "Installed Integrated Webcam™ [sys-usb] 1.2.3 -> 1.2.4: now 1.2.4" in rest
    assert webcam_version(at_123, "sys-usb") == "1.2.4"


def test_cancel_at_the_menu_changes_nothing(at_123: Sandbox) -> None:
    term = Terminal(at_123, "install", WEBCAM_GUID)
    term.expect("[0-2]: ")
    term.type("0")
    code, rest = term.finish()
    assert code == 2, rest
    assert rest.strip().endswith("Cancelled"), rest
    assert webcam_version(at_123, "sys-usb") == "1.2.3"


def test_without_a_terminal_nothing_waits_for_an_answer(at_123: Sandbox) -> None:
    r = manager(at_123, "install", WEBCAM_GUID)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip() == (
        "qubes-fwupdmgr: several releases qualify (1.2.4 (medium) Firmware for the ACME "
        "Corp Integrated Webcam; 1.2.3 (medium) Firmware for the ACME Corp Integrated "
        "Webcam): name one"
    )
    r = manager(at_123, "update", WEBCAM_GUID)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().endswith("not a terminal: pass -y to answer yes without being asked")
    assert webcam_version(at_123, "sys-usb") == "1.2.3"


def test_a_slow_install_on_sys_usb_shows_its_fwupds_status_and_percentage(
    at_123: Sandbox,
) -> None:
    """sys-usb relays its fwupd's Status and Percentage while it writes (3 s here)."""
    with plugin_knobs(at_123, "sys-usb", WriteDelay="3000"):
        term = Terminal(at_123, "update", "-y", WEBCAM_GUID)
        code, shown = term.finish()
    assert code == 0, shown
    steps = [s for s in shown.replace("\r", "\n").split("\n") if "sys-usb: device-write" in s]
    percents = {int(s.rsplit(" ", 1)[1].rstrip("%")) for s in steps}
    assert len(percents) >= 3 and max(percents) <= 100, shown  # it moved while it wrote
    # the line is closed before the result is said, not overwritten by it
    assert "%\r\nUpdated Integrated Webcam™ [sys-usb] 1.2.3 -> 1.2.4: now 1.2.4" in shown, shown
    assert webcam_version(at_123, "sys-usb") == "1.2.4"
