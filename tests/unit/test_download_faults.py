"""broker.updatevm.download against a real local server that misbehaves on purpose: each
fault ends in one line naming its cause, what may pass is tried again (from the first
byte), what will not is not, and a server that stalls or trickles is stopped by the
deadline or the minimum rate whatever it does (in its headers too). The server counts
the requests it got, so each case also says how many attempts were made."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import broker.updatevm as updatevm
from broker.config import Limits
from broker.errors import TransferError
from broker.updatevm import download

BODY = bytes(range(256)) * 40  # 10,240 bytes
HEAD = f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\nConnection: close\r\n\r\n".encode()


def _status(code: int, reason: str) -> bytes:
    return f"HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()


# what the server does with one request: (connection, stop) -> None
Fault = Callable[[socket.socket, threading.Event], None]


def ok(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(HEAD + BODY)


def not_found(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(_status(404, "Not Found"))


def server_error(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(_status(500, "Internal Server Error"))


def reset(conn: socket.socket, stop: threading.Event) -> None:
    """Headers and 4 KiB of the body, then a TCP reset."""
    conn.sendall(HEAD + BODY[:4096])
    time.sleep(0.05)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def silence(conn: socket.socket, stop: threading.Event) -> None:
    """Headers, then nothing: the connection held open."""
    conn.sendall(HEAD)
    stop.wait(30)


def trickle(conn: socket.socket, stop: threading.Event) -> None:
    """Headers, then a byte every 0.2 s: no read ever times out."""
    conn.sendall(HEAD)
    for i in range(len(BODY)):
        if stop.wait(0.2):
            return
        conn.sendall(BODY[i : i + 1])


def trickle_headers(conn: socket.socket, stop: threading.Event) -> None:
    """The status line itself a byte every 0.2 s: requests has no response yet."""
    for i in range(len(HEAD)):
        if stop.wait(0.2):
            return
        conn.sendall(HEAD[i : i + 1])


def steady(conn: socket.socket, stop: threading.Event) -> None:
    """About 40 KB/s (2 KiB every 50 ms): slow, but above a 20,000 bytes/s floor."""
    body = BODY * 6
    conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    for i in range(0, len(body), 2048):
        if stop.wait(0.05):
            return
        conn.sendall(body[i : i + 2048])


class FaultServer:
    """HTTP on 127.0.0.1: request n gets plan[n] (the last one again once the plan ends)."""

    def __init__(self, plan: list[Fault], tls: ssl.SSLContext | None = None) -> None:
        self.plan = plan
        self.tls = tls
        self.requests = 0
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.sock.getsockname()[1]}/firmware.cab"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            request = b""
            try:
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                while b"\r\n\r\n" not in request:
                    data = conn.recv(4096)
                    if not data:
                        return
                    request += data
                fault = self.plan[min(self.requests, len(self.plan) - 1)]
                self.requests += 1
                fault(conn, self.stop)
            except OSError:
                pass  # the client shut the connection: what the watchdog does

    def close(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(5)
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., FaultServer]]:
    servers: list[FaultServer] = []

    def start(*plan: Fault, tls: ssl.SSLContext | None = None) -> FaultServer:
        servers.append(FaultServer(list(plan), tls))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same retries, with 0.1 s and 0.2 s between them instead of 1 s and 3 s."""
    monkeypatch.setattr(updatevm, "RETRY_DELAYS", (0.1, 0.2))


class Got:
    def __init__(self, result: str, seconds: float, data: bytes, seen: list[int]) -> None:
        self.result, self.seconds, self.data, self.seen = result, seconds, data, seen


def fetch(tmp_path: Path, url: str, limits: Limits | None = None) -> Got:
    """Download url: the sha256 or the error's line, how long it took, what was written,
    the progress reported."""
    seen: list[int] = []
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    t0 = time.monotonic()
    try:
        result = download(url, fd, 1 << 20, limits or Limits(), lambda d, t: seen.append(d))
    except TransferError as e:
        result = str(e)
    finally:
        os.close(fd)
    return Got(result, time.monotonic() - t0, (tmp_path / "out").read_bytes(), seen)


SHA256 = hashlib.sha256(BODY).hexdigest()


def test_404_is_not_tried_again(serve: Callable[..., FaultServer], tmp_path: Path) -> None:
    server = serve(not_found)
    got = fetch(tmp_path, server.url)
    assert got.result == f"{server.url}: HTTP 404"
    assert server.requests == 1


def test_500_then_ok_is_tried_again(serve: Callable[..., FaultServer], tmp_path: Path) -> None:
    server = serve(server_error, ok)
    got = fetch(tmp_path, server.url)
    assert got.result == SHA256 and got.data == BODY
    assert server.requests == 2


def test_500_three_times_fails_naming_it(serve: Callable[..., FaultServer], tmp_path: Path) -> None:
    server = serve(server_error)
    got = fetch(tmp_path, server.url)
    assert got.result == f"{server.url}: HTTP 500, after 3 attempts"
    assert server.requests == 3


def test_a_reset_mid_body_is_tried_again_from_the_first_byte(
    serve: Callable[..., FaultServer], tmp_path: Path
) -> None:
    server = serve(reset, ok)
    got = fetch(tmp_path, server.url)
    assert got.result == SHA256 and got.data == BODY  # the 4 KiB of the first not kept
    assert server.requests == 2
    assert got.seen == sorted(got.seen) and got.seen[-1] == len(BODY)  # never backwards


def test_a_reset_every_time_says_the_connection_broke_off(
    serve: Callable[..., FaultServer], tmp_path: Path
) -> None:
    server = serve(reset)
    got = fetch(tmp_path, server.url)
    assert got.result == (
        f"127.0.0.1: the connection broke off after 4096 of {len(BODY)} bytes, after 3 attempts"
    )
    assert server.requests == 3


def test_headers_then_silence_times_out_each_read_and_is_tried_again(
    serve: Callable[..., FaultServer], tmp_path: Path
) -> None:
    server = serve(silence)
    got = fetch(tmp_path, server.url, Limits(stall_seconds=0.5))
    said = "127.0.0.1: the server sent nothing for 0.5 s (timed out), after 3 attempts"
    assert got.result == said
    assert server.requests == 3
    assert got.seconds < 3


def test_headers_then_silence_ends_at_the_deadline(
    serve: Callable[..., FaultServer], tmp_path: Path
) -> None:
    server = serve(silence)
    got = fetch(tmp_path, server.url, Limits(transfer_seconds=1.5))  # reads wait 30 s
    assert got.result == "127.0.0.1: download took longer than 1.5 s"
    assert server.requests == 1
    assert 1.5 <= got.seconds < 2.5


def test_a_trickle_ends_after_the_grace_period(
    serve: Callable[..., FaultServer], tmp_path: Path
) -> None:
    server = serve(trickle)
    limits = Limits(min_rate_bytes_per_s=20_000, min_rate_grace_seconds=0.5)
    got = fetch(tmp_path, server.url, limits)
    assert got.result == "127.0.0.1: download slower than 20000 bytes/s"
    assert server.requests == 1
    # 16 KiB are allowed for what a read has not handed over yet: 16384 / 20000 s
    assert 0.8 <= got.seconds < 1.8


def test_a_trickle_of_headers_ends_too(serve: Callable[..., FaultServer], tmp_path: Path) -> None:
    server = serve(trickle_headers)
    limits = Limits(min_rate_bytes_per_s=20_000, min_rate_grace_seconds=0.5)
    got = fetch(tmp_path, server.url, limits)
    assert got.result == "127.0.0.1: download slower than 20000 bytes/s"
    assert server.requests == 1
    assert got.seconds < 1.8


def test_a_trickle_above_the_floor_ends_at_the_deadline(
    serve: Callable[..., FaultServer], tmp_path: Path
) -> None:
    server = serve(trickle)
    got = fetch(tmp_path, server.url, Limits(transfer_seconds=1.5, min_rate_bytes_per_s=1))
    assert got.result == "127.0.0.1: download took longer than 1.5 s"
    assert server.requests == 1
    assert 1.5 <= got.seconds < 2.5


def test_a_slow_server_above_the_floor_is_not_cut_off(
    serve: Callable[..., FaultServer], tmp_path: Path
) -> None:
    server = serve(steady)
    limits = Limits(min_rate_bytes_per_s=20_000, min_rate_grace_seconds=0.5)
    got = fetch(tmp_path, server.url, limits)
    assert got.result == hashlib.sha256(BODY * 6).hexdigest()
    assert server.requests == 1 and got.seconds > 1


@pytest.fixture
def tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server certificate for 127.0.0.1 that requests trusts (REQUESTS_CA_BUNDLE), as
    the UpdateVM trusts the LVFS's CDN: HTTPS as the real downloads are."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def test_an_https_download_works(
    serve: Callable[..., FaultServer], tmp_path: Path, tls: ssl.SSLContext
) -> None:
    """The watchdog holds the TLS connection's socket too (an SSLSocket cannot be
    dup()ed: taking it that way failed every HTTPS download)."""
    server = serve(ok, tls=tls)
    got = fetch(tmp_path, server.url)
    assert got.result == SHA256 and got.data == BODY
    assert server.requests == 1


def test_https_silence_ends_at_the_deadline(
    serve: Callable[..., FaultServer], tmp_path: Path, tls: ssl.SSLContext
) -> None:
    server = serve(silence, tls=tls)
    got = fetch(tmp_path, server.url, Limits(transfer_seconds=1.5))
    assert got.result == "127.0.0.1: download took longer than 1.5 s", got.result
    assert got.seconds < 4
