"""The qrexec call seam against peers that misbehave (a hostile sys-usb or UpdateVM)."""

from __future__ import annotations

import os
import sys
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
