"""qubes-fwupdmgr's exit codes, one row per cause, on the sandbox's real daemons and qubes.

The table shows, for each way a run can end, the code fwupdmgr's scripts expect (0 done,
1 failure or usage error, 2 nothing to do or declined, 3 no such device, 130 Ctrl-C) and
the one line that names the cause: on stderr for a failure, on stdout for a result. A qube
that is down is the sandbox's halted file (qrexec then fails as qvm-run does for a qube
that cannot start). Every row also shows that nothing is left in dom0's sessions or
untrusted dir, that no traceback is printed, and what became of sys-usb's webcam; each
puts back the webcam version, halted files and fwupd config it changed.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import subprocess
import termios
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from broker.sandbox.launcher import Sandbox
from tests.sandbox_helpers import (
    WEBCAM_GUID,
    WEBCAM_ID,
    _manager_command,
    fwupd_call,
    fwupd_log,
    halted,
    manager,
    plugin_knobs,
    qube_paths,
    webcam_version,
)

pytestmark = pytest.mark.sandbox

RELEASES = ("1.2.3", "1.2.4")  # what the sandbox LVFS has for the webcam
PROMPT = "[y/N] "


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    code: int
    says: str  # a regex that must match the one line naming the cause
    on: str = "stderr"  # where that line is; with "stdout", stderr must be empty
    also_stdout: str = ""  # text that must be on stdout as well
    webcam: str | None = None  # sys-usb's webcam at this version first
    webcam_after: str | None = None  # None: the run must not change it
    clean: bool = False  # dom0's cab cache emptied first: the cab must come via the UpdateVM
    halted: str | None = None  # a qube that is down during the run
    refuses_writes: bool = False  # sys-usb's fwupd refuses to write firmware
    answer: str | None = None  # run on a terminal, typing this at the [y/N] prompt


CASES = [
    pytest.param(Case(
        ("install", "-y", f"sys-usb:{WEBCAM_ID}", "1.2.3"), 0,
        r"^Installed Integrated Webcam™ \[sys-usb\] 1\.2\.4 -> 1\.2\.3: now 1\.2\.3$",
        on="stdout", webcam="1.2.4", webcam_after="1.2.3",
    ), id="success"),
    pytest.param(Case(
        ("update", "-y"), 2, r"^No updates available$", on="stdout", webcam="1.2.4",
    ), id="nothing-to-do"),
    pytest.param(Case(
        ("update", WEBCAM_GUID), 2, r"^skipped$", on="stdout", webcam="1.2.3", answer="n\n",
    ), id="declined"),
    pytest.param(Case(
        ("update", "-y", "deadbeef"), 3,
        r"^qubes-fwupdmgr: no device matches 'deadbeef' \(see get-devices\)$",
    ), id="unknown-device"),
    pytest.param(Case(
        ("update", "--bogus"), 1,
        r"^qubes-fwupdmgr: unrecognized arguments: --bogus \(see --help\)$",
    ), id="usage-error"),
    pytest.param(Case(
        ("update", "-y", WEBCAM_ID), 1,
        r"^qubes-fwupdmgr: sys-usb: qubes\.FwupdUsbvm\+Install failed: .*fwupd refused",
        webcam="1.2.3", refuses_writes=True,
    ), id="daemon-refused"),
    pytest.param(Case(
        ("update", "-y", WEBCAM_ID), 1,
        r"^qubes-fwupdmgr: sys-firewall is not running and could not be started: "
        r"sys-firewall: could not be started \(sandbox: halted\)$",
        also_stdout="Downloading fakedevice124.cab through sys-firewall",
        webcam="1.2.3", clean=True, halted="sys-firewall",
    ), id="updatevm-down"),
    pytest.param(Case(
        ("get-devices",), 1,
        r"^qubes-fwupdmgr: sys-usb: unreachable: .*sys-usb is not running.*; "
        r"only the other qube's devices were handled$",
        also_stdout="Integrated Webcam™  [dom0]", halted="sys-usb",
    ), id="sys-usb-down"),
    pytest.param(Case(
        ("update", WEBCAM_GUID), 130, r"^qubes-fwupdmgr: interrupted$",
        webcam="1.2.3", answer="\x03",
    ), id="ctrl-c"),
]  # fmt: skip


@pytest.fixture(scope="module")
def refreshed(sandbox: Sandbox) -> Sandbox:
    r = manager(sandbox, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    return sandbox


@pytest.fixture
def kept(refreshed: Sandbox) -> Iterator[Sandbox]:
    """sys-usb's webcam back at its version afterwards, however the case ended (the
    factory 1.2.2 has no cab, so it cannot be put back: the case's version stays)."""
    before = webcam_version(refreshed, "sys-usb")
    yield refreshed
    if before in RELEASES:
        _webcam_at(refreshed, before)


def _webcam_at(sandbox: Sandbox, version: str) -> None:
    if webcam_version(sandbox, "sys-usb") == version:
        return
    r = manager(sandbox, "install", "-y", f"sys-usb:{WEBCAM_ID}", version)
    if r.returncode != 0 and "not in supported mode" in r.stderr:
        # once in CI (stop 24), sys-usb's fwupd still refused writes right after the
        # daemon-refused case's ResetConfig had returned; not seen in 42 tries here,
        # 27 of them under CPU load.
        # Putting the webcam back is set-up, not what is tested: reset and try once more,
        # and keep fwupd's log in the message if that fails too
        fwupd_call(sandbox, "sys-usb", "ResetConfig", "s", "test")
        time.sleep(2)
        r = manager(sandbox, "install", "-y", f"sys-usb:{WEBCAM_ID}", version)
    assert r.returncode == 0, r.stdout + r.stderr + fwupd_log(sandbox, "sys-usb")


def _at_the_prompt(sandbox: Sandbox, argv: tuple[str, ...], answer: str) -> tuple[int, str, str]:
    """qubes-fwupdmgr with stdin and stdout on its controlling terminal (so a typed Ctrl-C
    is SIGINT to it) and stderr piped; ``answer`` typed at the [y/N] prompt. The exit
    code, what the terminal showed, and stderr after the prompt."""
    master, slave = pty.openpty()

    def on_the_terminal() -> None:
        # a shell's background job starts with SIGINT ignored and a child inherits that:
        # a typed Ctrl-C must reach qubes-fwupdmgr as it would an admin's
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(**{**_manager_command(sandbox, argv), "text": False,
                               "stdin": slave, "stdout": slave, "stderr": subprocess.PIPE,
                               "start_new_session": True,
                               "preexec_fn": on_the_terminal})  # fmt: skip
    os.close(slave)
    assert proc.stderr is not None
    err = proc.stderr.fileno()
    seen = {master: b"", err: b""}
    open_fds, answered = {master, err}, False
    deadline = time.monotonic() + 120
    try:
        while open_fds:
            ready, _, _ = select.select(list(open_fds), [], [], deadline - time.monotonic())
            if not ready:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"qubes-fwupdmgr hung: {seen!r}")
            for fd in ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the last writer closed the terminal
                    chunk = b""
                if not chunk:
                    open_fds.discard(fd)
                seen[fd] += chunk
            if not answered and PROMPT.encode() in seen[err]:
                # as a person types: a Ctrl-C between input()'s prompt and its read() only
                # sets Python's flag, and the read then waits for a line nobody types
                time.sleep(0.5)
                os.write(master, answer.encode())
                answered = True
    finally:
        os.close(master)
    code = proc.wait(30)
    proc.stderr.close()
    _, prompt, after = seen[err].decode().partition(PROMPT)
    assert prompt, f"no prompt: {seen!r}"
    terminal = seen[master].decode().replace("\r\n", "\n")
    return code, terminal, after


@pytest.mark.parametrize("case", CASES)
def test_exit_code_and_the_line_that_says_why(kept: Sandbox, case: Case) -> None:
    sandbox = kept
    dom0 = qube_paths(sandbox, "dom0")
    if case.webcam:
        _webcam_at(sandbox, case.webcam)
    if case.clean:
        assert manager(sandbox, "clean").returncode in (0, 2)
    before = webcam_version(sandbox, "sys-usb")
    with ExitStack() as stack:
        if case.halted:
            stack.enter_context(halted(sandbox, case.halted))
        if case.refuses_writes:
            stack.enter_context(plugin_knobs(sandbox, "sys-usb", WriteSupported="false"))
        if case.answer is None:
            r = manager(sandbox, *case.argv)
            code, out, err = r.returncode, r.stdout, r.stderr
        else:
            code, out, err = _at_the_prompt(sandbox, case.argv, case.answer)
    assert code == case.code, out + err
    assert "Traceback" not in err, err
    if case.on == "stderr":
        lines = err.strip().splitlines()
        assert len(lines) == 1 and re.search(case.says, lines[0]), err
    else:
        assert re.search(case.says, out, re.MULTILINE), out
        assert err.strip() == "", err
    assert case.also_stdout in out, out
    assert webcam_version(sandbox, "sys-usb") == (case.webcam_after or before)
    assert not list(dom0.sessions_dir.iterdir()), "a session was left open"
    if dom0.untrusted_dir.exists():
        assert not list(dom0.untrusted_dir.iterdir()), "untrusted files were left"


def test_with_sys_usb_down_its_webcam_is_updated_through_dom0s_fwupd(kept: Sandbox) -> None:
    """What the code does when the device's owner is down: routing gives the device to the
    other daemon that reports it (the sandbox's dom0 fwupd sees the fake webcam too, as a
    dom0 holding the USB controller would), dom0's copy is updated, and the run still
    exits 1 with sys-usb's one line, as every run with a problem does."""
    sandbox = kept
    dom0 = qube_paths(sandbox, "dom0")
    usb_before = webcam_version(sandbox, "sys-usb")
    dom0_before = webcam_version(sandbox, "dom0")
    unreachable = (
        r"^qubes-fwupdmgr: sys-usb: unreachable: .*sys-usb is not running.*; "
        r"only the other qube's devices were handled$"
    )
    with halted(sandbox, "sys-usb"):
        try:
            if dom0_before != "1.2.3":
                # dom0's copy behind, whatever earlier tests did to it; 1 for sys-usb alone
                r = manager(sandbox, "install", "-y", WEBCAM_ID, "1.2.3")
                assert r.returncode == 1 and "[dom0]" in r.stdout, r.stdout + r.stderr
            r = manager(sandbox, "update", "-y", WEBCAM_ID)
            assert r.returncode == 1, r.stdout + r.stderr
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and re.search(unreachable, lines[0]), r.stderr
            assert "Installing on dom0" in r.stdout, r.stdout
            assert "[dom0] 1.2.3 -> 1.2.4: now 1.2.4" in r.stdout, r.stdout
            assert webcam_version(sandbox, "dom0") == "1.2.4"
            assert webcam_version(sandbox, "sys-usb") == usb_before
            assert not list(dom0.sessions_dir.iterdir()), "a session was left open"
        finally:
            # dom0's factory 1.2.2 has no cab: then its copy stays at 1.2.4
            if dom0_before in RELEASES and webcam_version(sandbox, "dom0") != dom0_before:
                manager(sandbox, "install", "-y", WEBCAM_ID, dom0_before)
    assert webcam_version(sandbox, "dom0") in (dom0_before, "1.2.4")
