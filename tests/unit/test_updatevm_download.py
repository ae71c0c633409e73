"""broker.updatevm.download against real local servers: what the admin reads when the
LVFS cannot be reached (refused and timed out must not look alike), and the progress
the UpdateVM reports while a download runs."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import broker.updatevm as updatevm
from broker.config import Limits
from broker.errors import LimitExceeded, TransferError
from broker.transfer import ProgressLines
from broker.updatevm import copy_from, download

BODY = bytes(range(256)) * 40  # 10,240 bytes


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/firmware.cab"
    finally:
        httpd.shutdown()


def test_progress_comes_in_about_one_percent_steps(server: str, tmp_path: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    fd = os.open(tmp_path / "cab", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        download(server, fd, 1 << 20, Limits(), lambda done, total: seen.append((done, total)))
    finally:
        os.close(fd)
    assert (tmp_path / "cab").read_bytes() == BODY
    assert len(seen) == 10 and seen[-1] == (len(BODY), len(BODY))  # 1 KiB reads of 10 KiB
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def _failure(tmp_path: Path, port: int, limits: Limits | None = None) -> str:
    """What a download from 127.0.0.1:port fails with."""
    fd = os.open(tmp_path / "x", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(TransferError) as e:
            download(f"http://127.0.0.1:{port}/firmware.cab", fd, 1 << 20, limits or Limits())
    finally:
        os.close(fd)
    return str(e.value)


def test_a_refused_connection_names_the_host_and_says_refused(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _failure(tmp_path, port) == "127.0.0.1: connection refused"


def test_a_server_that_never_answers_is_a_timeout_not_a_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # the kernel accepts each attempt's connection, nobody answers
    port = listener.getsockname()[1]
    monkeypatch.setattr(updatevm, "RETRY_DELAYS", (0.1, 0.1))  # a silent server may wake up
    try:
        said = _failure(tmp_path, port, Limits(stall_seconds=1))
    finally:
        listener.close()
    assert said == "127.0.0.1: the server sent nothing for 1 s (timed out), after 3 attempts"


def test_progress_to_a_dom0_that_went_away_cancels_the_download() -> None:
    read, write = os.pipe()
    os.close(read)  # dom0's end is gone (Ctrl-C)
    try:
        with pytest.raises(TransferError, match="dom0 went away: cancelled"):
            ProgressLines(write)("firmware.cab", 1024, 10240, final=True)
    finally:
        os.close(write)


# --- offline import: the same caps, from a dir in the qube --------------------------------
def test_an_imported_file_is_copied_hashed_and_capped(tmp_path: Path) -> None:
    src = tmp_path / "fakedevice124.cab"
    src.write_bytes(b"x" * 300_000)
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    seen: list[tuple[int, int | None]] = []
    try:
        digest = copy_from(src, out, 300_000, Limits(), lambda d, t: seen.append((d, t)))
        assert digest == hashlib.sha256(b"x" * 300_000).hexdigest()
        assert os.fstat(out).st_size == 300_000 and seen[-1] == (300_000, 300_000)
        with pytest.raises(LimitExceeded, match="cap is 299999"):
            copy_from(src, out, 299_999, Limits())
        (tmp_path / "link.cab").symlink_to(src)
        with pytest.raises(TransferError, match=r"link\.cab: Too many levels of symbolic links"):
            copy_from(tmp_path / "link.cab", out, 300_000, Limits())  # no symlinks
        os.mkfifo(tmp_path / "fifo.cab")
        with pytest.raises(TransferError, match="not a regular file"):
            copy_from(tmp_path / "fifo.cab", out, 300_000, Limits())  # never blocks on it
        with pytest.raises(TransferError, match="No such file"):
            copy_from(tmp_path / "absent.cab", out, 300_000, Limits())
    finally:
        os.close(out)
