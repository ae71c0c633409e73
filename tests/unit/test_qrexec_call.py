"""The qrexec call seam against peers that misbehave (a hostile sys-usb or UpdateVM)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.errors import LimitExceeded, QrexecError
from broker.qrexec import Transport, call, check


@dataclass(frozen=True)
class LocalPeer(Transport):
    """Runs a local program in place of the qube's service: the seam's own test double."""

    code: str = ""

    def argv(self, target: str, service: str) -> list[str]:
        return [sys.executable, "-c", self.code]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_peer_that_never_reads_cannot_hold_us_past_the_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "peer.pid"
    peer = LocalPeer(
        "sandbox",
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)",
    )
    start = time.monotonic()
    with pytest.raises(QrexecError, match="did not finish in 2 s"):
        call(
            peer,
            "sys-usb",
            "qubes.FwupdUsbvm+Install",
            feed=lambda fd: os.write(fd, b"x" * (8 << 20)),
            timeout=2,
        )
    assert time.monotonic() - start < 6
    pid = int(pid_file.read_text())
    time.sleep(0.2)
    assert not _pid_alive(pid), "the peer was left running"


def test_a_peer_that_floods_stdout_is_cut_at_the_cap() -> None:
    peer = LocalPeer("sandbox", "import sys; sys.stdout.buffer.write(b'x' * (1 << 20))")
    with pytest.raises(LimitExceeded, match="more than 1000 bytes"):
        call(peer, "sys-usb", "qubes.FwupdUsbvm+GetDevices", max_stdout=1000)


def test_the_peers_error_reaches_the_user_as_one_clean_line() -> None:
    peer = LocalPeer(
        "sandbox",
        "import sys; sys.stderr.write('noise\\n\\x1b]0;owned\\x07bad \\x1b[2Jthing\\n')\n"
        "sys.exit(1)",
    )
    result = call(peer, "sys-usb", "qubes.FwupdUsbvm+Refresh")
    with pytest.raises(QrexecError) as e:
        check(result, "sys-usb", "qubes.FwupdUsbvm+Refresh")
    message = str(e.value)
    assert message.startswith("sys-usb: qubes.FwupdUsbvm+Refresh failed: ")
    assert "\x1b" not in message and "\x07" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("code", "words"), [(126, "refused by qrexec policy"), (127, "not installed")]
)
def test_qrexec_codes_are_named(code: int, words: str) -> None:
    result = call(LocalPeer("sandbox", f"import sys; sys.exit({code})"), "sys-usb", "qubes.X")
    with pytest.raises(QrexecError, match=words):
        check(result, "sys-usb", "qubes.X")


def test_progress_lines_are_handed_over_as_they_come_and_none_is_kept() -> None:
    peer = LocalPeer(
        "sandbox",
        "import sys, time\n"
        "for i in range(3):\n"
        "    sys.stdout.write(f'line {i}\\n'); sys.stdout.flush(); time.sleep(0.2)\n"
        "sys.stdout.write('tail')",
    )
    seen: list[tuple[bytes, float]] = []
    start = time.monotonic()
    result = call(peer, "sys-firewall", "qubes.FwupdDownload", max_stdout=4096,
                  on_line=lambda line: seen.append((line, time.monotonic() - start)))  # fmt: skip
    assert [line for line, _ in seen] == [b"line 0", b"line 1", b"line 2"]
    assert seen[0][1] < seen[2][1] - 0.3  # as they came, not all at the end
    assert result.stdout == b""


def test_a_line_over_the_cap_is_refused_like_a_flood() -> None:
    peer = LocalPeer("sandbox", "import sys; sys.stdout.write('x' * 100000)")
    with pytest.raises(LimitExceeded, match="more than 4096 bytes"):
        call(peer, "sys-firewall", "qubes.X", max_stdout=4096, on_line=lambda line: None)


def test_ctrl_c_ends_the_call_and_the_peer_with_it(tmp_path: Path) -> None:
    """The peer runs in its own session (no terminal SIGINT reaches it): our Ctrl-C must
    stop it, or an UpdateVM download would run on after the admin gave up."""
    pid_file = tmp_path / "peer.pid"
    peer = LocalPeer(
        "sandbox",
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)",
    )

    def interrupt(line: bytes) -> None:
        raise AssertionError("no output expected")

    def send_sigint() -> None:
        while not pid_file.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=send_sigint, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        call(peer, "sys-firewall", "qubes.FwupdDownload", timeout=30, on_line=interrupt)
    pid = int(pid_file.read_text())
    time.sleep(0.2)
    assert not _pid_alive(pid), "the peer ran on after Ctrl-C"
