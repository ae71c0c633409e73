"""`qubes-fwupdmgr refresh` end to end while the LVFS misbehaves: a fault server in the
UpdateVM's network (as the sandbox's mirror is) answers 404, 500, resets, a TLS
certificate nobody trusts, or headers and then nothing; the remote's host may not
resolve at all. Each failure: exit 1, one line on stderr naming the cause, dom0's trusted
state unchanged and nothing left behind; a fault that passes (500 once) is retried and
the refresh succeeds. dom0's remote is pointed at the fault server for each case and put
back, as is sys-firewall's own qubes-fwupd.conf."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from broker.sandbox import mirror as sandbox_mirror
from broker.sandbox.cli import base_url
from broker.sandbox.launcher import Launcher, Sandbox
from tests.adversarial.hostile import (
    assert_clean,
    baseline,
    one_line,
    publish_variant,
)
from tests.sandbox_helpers import manager, qube_paths

pytestmark = pytest.mark.sandbox

# run in the UpdateVM's network with the host's files: request n gets plan[n] (the last
# again once the plan ends); "ok" serves the mirror's file; every request is logged
_SERVER = r"""
import socket, ssl, struct, sys, threading, time
from pathlib import Path

root, port_file, log = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
plan = sys.argv[4].split(",")
cert = sys.argv[5:]
context = None
if cert:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert[0], cert[1])
served = 0
lock = threading.Lock()

def serve(conn):
    global served
    with conn:
        try:
            if context is not None:
                conn = context.wrap_socket(conn, server_side=True)
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(4096)
                if not data:
                    return
                request += data
        except OSError:
            return  # the client refused our certificate
        with lock:
            fault = plan[min(served, len(plan) - 1)]
            served += 1
            path = request.split(b" ")[1].decode()
            with log.open("a") as f:
                f.write(f"{fault} {path}\n")
        if fault in ("404", "500"):
            conn.sendall(f"HTTP/1.1 {fault} X\r\nContent-Length: 0\r\n\r\n".encode())
            return
        body = (root / path.lstrip("/")).read_bytes()
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        if fault == "ok":
            conn.sendall(head + body)
        elif fault == "reset":
            conn.sendall(head + body[: len(body) // 2])
            time.sleep(0.05)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif fault == "silence":
            conn.sendall(head)
            time.sleep(600)

listener = socket.create_server(("127.0.0.1", 0))
tmp = port_file.with_suffix(".tmp")
tmp.write_text(f"{listener.getsockname()[1]}\n")
tmp.rename(port_file)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class FaultServer:
    def __init__(self, sandbox: Sandbox, work: Path, plan: str, tls: bool = False) -> None:
        self.log = work / "requests.log"
        self.log.unlink(missing_ok=True)
        port_file = work / "port"
        port_file.unlink(missing_ok=True)
        script = work / "server.py"
        script.write_text(_SERVER)
        cert: list[str] = []
        if tls:  # self-signed: no CA the UpdateVM trusts issued it
            key, pem = work / "server.key", work / "server.pem"
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                 "-keyout", str(key), "-out", str(pem)],
                check=True, capture_output=True,
            )  # fmt: skip
            cert = [str(pem), str(key)]
        self.proc = Launcher(sandbox).popen_on_network_of(
            "sys-firewall",
            [sys.executable, str(script), str(sandbox.lvfs_dir), str(port_file), str(self.log),
             plan, *cert],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port = sandbox_mirror.wait_for_port(port_file, 10.0, self.proc)
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    def requests(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@contextmanager
def qube_config(sandbox: Sandbox, qube: str, old: str, new: str) -> Iterator[None]:
    """The qube's qubes-fwupd.conf with ``old`` replaced by ``new``; put back afterwards."""
    conf = qube_paths(sandbox, qube).config_file
    original = conf.read_bytes()
    assert old.encode() in original
    conf.write_bytes(original.replace(old.encode(), new.encode(), 1))
    try:
        yield
    finally:
        conf.write_bytes(original)


@contextmanager
def remote_at(sandbox: Sandbox, base: str) -> Iterator[None]:
    """dom0's lvfs remote (metadata and firmware) at ``base`` instead of the mirror."""
    with qube_config(sandbox, "dom0", base_url(sandbox), base):
        yield


@contextmanager
def fault_server(
    sandbox: Sandbox, tmp_path: Path, plan: str, tls: bool = False
) -> Iterator[FaultServer]:
    server = FaultServer(sandbox, tmp_path, plan, tls)
    try:
        with remote_at(sandbox, server.base):
            yield server
    finally:
        server.close()


def assert_refresh_fails(sandbox: Sandbox, cause: str) -> float:
    """refresh: exit 1, one line naming ``cause``, nothing changed or left; its seconds."""
    before = baseline(sandbox)
    t0 = time.monotonic()
    r = manager(sandbox, "refresh")
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    line = one_line(r.stderr)
    assert line.startswith("qubes-fwupdmgr: sys-firewall: "), line
    assert line.endswith(cause), line
    assert_clean(sandbox, before)
    return took


def test_404_fails_at_once(mirror: Sandbox, tmp_path: Path) -> None:
    with fault_server(mirror, tmp_path, "404") as server:
        assert_refresh_fails(mirror, f"{server.base}/firmware.xml.zst: HTTP 404")
        assert server.requests() == ["404 /firmware.xml.zst"]  # not tried again


def test_500_then_ok_is_retried_and_the_refresh_succeeds(mirror: Sandbox, tmp_path: Path) -> None:
    publish_variant(mirror, "http-faults")  # new metadata, for the refresh to take
    with fault_server(mirror, tmp_path, "500,ok") as server:
        r = manager(mirror, "refresh")
        assert r.returncode == 0, r.stdout + r.stderr
        assert server.requests() == [
            "500 /firmware.xml.zst", "ok /firmware.xml.zst", "ok /firmware.xml.zst.jcat",
        ]  # fmt: skip


def test_a_reset_every_time_says_the_connection_broke_off(mirror: Sandbox, tmp_path: Path) -> None:
    with fault_server(mirror, tmp_path, "reset") as server:
        size = (mirror.lvfs_dir / "firmware.xml.zst").stat().st_size
        # what it had taken: whole reads of 1 KiB here (the half of the last one is lost)
        taken = size // 2 // 1024 * 1024
        assert_refresh_fails(
            mirror,
            f"127.0.0.1: the connection broke off after {taken} of {size} bytes, after 3 attempts",
        )
        assert len(server.requests()) == 3


def test_an_untrusted_certificate_is_a_tls_failure(mirror: Sandbox, tmp_path: Path) -> None:
    with fault_server(mirror, tmp_path, "ok", tls=True) as server:
        assert_refresh_fails(mirror, "127.0.0.1: TLS failed (certificate or protocol)")
        assert server.requests() == []  # no request ever crossed


def test_a_host_that_does_not_resolve(mirror: Sandbox) -> None:
    with remote_at(mirror, "https://lvfs.invalid"):
        assert_refresh_fails(
            mirror, "lvfs.invalid: host name not resolved (is the UpdateVM online?)"
        )


def test_a_stall_ends_at_the_updatevms_deadline(mirror: Sandbox, tmp_path: Path) -> None:
    """Headers, then nothing: sys-firewall's own transfer_seconds (3 s here) ends it."""
    with (
        fault_server(mirror, tmp_path, "silence") as server,
        qube_config(mirror, "sys-firewall", "]\n", "]\ntransfer_seconds = 3\n"),
    ):
        took = assert_refresh_fails(mirror, "127.0.0.1: download took longer than 3 s")
        assert server.requests() == ["silence /firmware.xml.zst"]
    assert took < 15, took
