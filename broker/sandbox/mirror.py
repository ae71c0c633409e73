"""The sandbox's LVFS CDN: serves the regular files under one directory over HTTP.

    python -m broker.sandbox.mirror --root DIR --port-file FILE [--host 127.0.0.1] [--port 0]

The port file is written (atomically) only once the socket is bound, so a caller starts
the process, then :func:`wait_for_port`. It is removed on exit; nothing else is.
"""

from __future__ import annotations

import argparse
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

_CHUNK = 64 * 1024


def _write_port_file(port_file: Path, port: int) -> None:
    # a poller must never read a half-written number
    fd, name = tempfile.mkstemp(dir=port_file.parent, prefix=f".{port_file.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{port}\n")
        os.replace(name, port_file)
    finally:
        Path(name).unlink(missing_ok=True)


def _resolve(root: Path, url_path: str) -> Path | None:
    """The regular file under ``root`` that ``url_path`` names, or None.

    Dot segments are refused rather than normalised, and the resolved path (symlinks
    followed) must stay inside ``root``."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(url_path).path)
    segments = [s for s in path.split("/") if s]
    if not segments or "\0" in path or any(s in (".", "..") or "\\" in s for s in segments):
        return None
    try:
        target = root.joinpath(*segments).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not target.is_relative_to(root) or not target.is_file():
        return None
    return target


def rate_file(root: Path) -> Path:
    """Beside the root, never served: bytes per second to send at, for tests of a slow
    CDN (progress, Ctrl-C during a download). Absent: as fast as the machine goes."""
    return root.with_name(root.name + ".rate")


def _rate(root: Path) -> int:
    try:
        return max(0, int(rate_file(root).read_text()))
    except (OSError, ValueError):
        return 0


class _Handler(BaseHTTPRequestHandler):
    server_version = "qubes-fwupd-sandbox-lvfs/1"
    root: Path  # set on the subclass made by serve()

    def do_GET(self) -> None:
        self._send(body=True)

    def do_HEAD(self) -> None:
        self._send(body=False)

    def _send(self, body: bool) -> None:
        target = _resolve(self.root, self.path)
        fd = -1
        if target is not None:
            try:
                # the last component was resolved a moment ago; refuse one swapped since
                fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                fd = -1
        if fd < 0:
            self._not_found(body)
            return
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                self._not_found(body)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(st.st_size))
            self.send_header("Last-Modified", self.date_time_string(st.st_mtime))
            self.end_headers()
            if not body:
                return
            # send what fstat announced, even if the file grows meanwhile
            left = st.st_size
            rate = _rate(self.root)
            step = max(1, rate // 10) if rate else _CHUNK
            while left > 0:
                chunk = f.read(min(step, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)
                if rate:
                    self.wfile.flush()
                    time.sleep(0.1)

    def _not_found(self, body: bool) -> None:
        # no send_error(): it would log a second line for the request
        payload = b"not found\n"
        self.send_response(404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_error(self, format: str, *args: Any) -> None:
        # send_error() reports "code N, message M" and then logs the request line too
        if not format.startswith("code %d"):
            self.log_message(format, *args)

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"mirror: {self.address_string()} {format % args}\n")
        sys.stderr.flush()


def serve(root: Path, host: str, port: int, port_file: Path) -> None:
    """Serve ``root`` on host:port (0: any free port) until SIGTERM or SIGINT."""
    root = root.resolve(strict=True)
    if not root.is_dir():
        raise NotADirectoryError(str(root))
    handler = type("Handler", (_Handler,), {"root": root})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    bound = int(server.server_address[1])

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever() to return, which runs in this very thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        _write_port_file(port_file, bound)
        sys.stderr.write(f"mirror: serving {root} on {host}:{bound}\n")
        sys.stderr.flush()
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        for s, h in previous.items():
            signal.signal(s, h)
        # a stale port file would send the next waiter to a dead port
        try:
            if int(port_file.read_text().strip()) == bound:
                port_file.unlink()
        except (OSError, ValueError):
            pass


def wait_for_port(
    port_file: Path, timeout: float, proc: subprocess.Popen[Any] | None = None
) -> int:
    """The port a starting mirror wrote to ``port_file``.

    Raises TimeoutError after ``timeout`` seconds, or RuntimeError as soon as ``proc``
    (the mirror, when given) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            port = int(port_file.read_text().strip())
            if 0 < port < 65536:
                return port
        except (FileNotFoundError, ValueError):
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mirror exited with {proc.returncode} before binding")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no port in {port_file} after {timeout} s")
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.sandbox.mirror", description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="directory to serve")
    parser.add_argument("--port-file", type=Path, required=True, help="written once bound")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    args = parser.parse_args(argv)
    try:
        serve(args.root, args.host, args.port, args.port_file)
    except OSError as e:
        sys.stderr.write(f"mirror: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
