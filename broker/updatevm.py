"""The UpdateVM side: qubes.FwupdDownload (also what an offline import runs in its qube).

dom0 sends one JSON line naming what to fetch (URLs, caps and, for cabs, the sha256 from
dom0's verified metadata). We download under a byte cap, a whole-download deadline and a
minimum rate (requests' timeout only bounds each read: a watchdog enforces them), try
again what may pass (HTTP 5xx, a connection that broke off), check what we can (the first
validation: it saves dom0 work, it never replaces dom0's check), and push the files to
dom0's qubes.FwupdReceiveUpdates with the session nonce.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.adapters
import urllib3
import urllib3.connection

from broker.config import Limits, Remote
from broker.errors import LimitExceeded, TransferError, VerificationError
from broker.metadata import verify_metadata_files
from broker.qrexec import FROM_VM, call, check
from broker.service import ServiceContext, run_service
from broker.session import DownloadRequest
from broker.transfer import (
    CHUNK,
    ProgressLines,
    StreamReader,
    write_all,
    write_frame,
)

PUSH_SERVICE = "qubes.FwupdReceiveUpdates"
_CONNECT_SECONDS = 15.0
# before the 2nd and the 3rd attempt after a failure that may pass (HTTP 5xx and 429, a
# connection that broke off, a server that went silent); never past the deadline
RETRY_DELAYS = (1.0, 3.0)
# a download reads at most this much at once: a read returns only once it is whole, so
# this (plus what http.client buffers) is what the rate rule cannot see yet
_READ_MAX = 8 * 1024
_UNSEEN = _READ_MAX + 8 * 1024
_WATCH_INTERVAL = 0.2


# (done, total or None) after each chunk: how the UpdateVM tells dom0 how far it got
OnProgress = Callable[[int, int | None], None]


class _Again(Exception):
    """One attempt failed in a way the next one may not: the line the user reads if none
    of them succeeds."""


def _cause(
    e: requests.RequestException,
    connect_seconds: float,
    read_seconds: float,
    received: int | None = None,
    length: int | None = None,
) -> tuple[str, bool]:
    """What a person can act on (refused, timed out after how long, TLS, broke off
    after how much), and whether another attempt may do better. ``received``: the
    body's bytes so far, None while no reply has come."""
    text = str(e).lower()
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return f"no connection within {connect_seconds:g} s (timed out)", False
    # in the body, requests reports a read timeout as a ConnectionError
    if isinstance(e, requests.exceptions.ReadTimeout) or (
        received is not None and "timed out" in text
    ):
        return f"the server sent nothing for {read_seconds:g} s (timed out)", True
    if received is not None:  # reset, closed early, a TLS record cut short
        of = f" of {length}" if length is not None else ""
        return f"the connection broke off after {received}{of} bytes", True
    if isinstance(e, requests.exceptions.SSLError):
        return "TLS failed (certificate or protocol)", False
    if isinstance(e, requests.exceptions.ConnectionError):
        if "refused" in text:
            return "connection refused", False
        if any(s in text for s in ("name or service", "resolution", "nodename",
                                   "failed to resolve", "no address associated")):  # fmt: skip
            return "host name not resolved (is the UpdateVM online?)", False
        if any(s in text for s in ("reset", "aborted", "remotedisconnected", "broken pipe")):
            return "the connection broke off before the reply", True
        return "connection failed", False
    return type(e).__name__, False


class _Watchdog:
    """Ends one attempt whatever the server does. requests' timeout bounds each recv, and
    a read of a chunk returns only once the chunk is whole, so a server that sends a byte
    now and then (in its TLS handshake, its headers or its body) is never stopped by
    them. This thread shuts the attempt's sockets down once the download passes its
    deadline, or once the attempt's bytes so far, plus what it cannot see yet
    (:data:`_UNSEEN`), are below the minimum rate after the grace period: a server that
    keeps up with the floor is never cut off. The blocked read then ends, and
    :attr:`reason` says why."""

    def __init__(self, host: str, limits: Limits, deadline: float) -> None:
        self.host, self.limits, self.deadline = host, limits, deadline
        self.start = time.monotonic()
        self.counted = 0  # the body's bytes taken so far
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []  # our own dups: shut down, then closed
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="download-watchdog", daemon=True)

    def verdict(self, now: float) -> str | None:
        limits = self.limits
        if now > self.deadline:
            return f"{self.host}: download took longer than {limits.transfer_seconds:g} s"
        elapsed = now - self.start
        if (
            elapsed > limits.min_rate_grace_seconds
            and self.counted + _UNSEEN < limits.min_rate_bytes_per_s * elapsed
        ):
            return f"{self.host}: download slower than {limits.min_rate_bytes_per_s} bytes/s"
        return None

    def pace(self, total: int) -> None:
        """After each chunk, in the downloading thread: the same rule, at once."""
        self.counted = total
        reason = self.reason or self.verdict(time.monotonic())
        if reason is not None:
            raise TransferError(reason)

    def add(self, sock: object) -> None:
        """A socket of this attempt (a connection's, before TLS; a response's)."""
        if not isinstance(sock, socket.socket) or sock.fileno() < 0:
            return
        # a new object on a dup of the fd: TLS detaches the object it wraps (and an
        # SSLSocket refuses dup()); the dup stays the same connection, to shut down
        try:
            fd = os.dup(sock.fileno())
        except OSError:
            return
        try:
            dup = socket.socket(fileno=fd)
        except (OSError, ValueError):
            os.close(fd)
            return
        with self._lock:
            self._sockets.append(dup)
            if self.reason is not None:
                _shut(dup)

    def add_response(self, resp: requests.Response) -> None:
        """The response's socket, where this urllib3 keeps it (1.26 and 2.x): in case
        the connection did not come from our pool (a proxy of another kind)."""
        raw = resp.raw
        for path in (("_connection", "sock"), ("_fp", "fp", "raw", "_sock")):
            obj: object = raw
            for name in path:
                obj = getattr(obj, name, None)
            self.add(obj)

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        with self._lock:
            for s in self._sockets:
                s.close()
            self._sockets.clear()

    def _run(self) -> None:
        while not self._done.wait(_WATCH_INTERVAL):
            reason = self.verdict(time.monotonic())
            if reason is not None:
                with self._lock:
                    self.reason = reason
                    for s in self._sockets:
                        _shut(s)
                return


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # not connected (yet, or any more)
        sock.shutdown(socket.SHUT_RDWR)


def _session(watch: _Watchdog) -> requests.Session:
    """A requests session whose every new connection hands its socket to ``watch`` as
    soon as it is connected: before TLS and before the reply, which a server may trickle
    as well as the body. One session per attempt: no connection outlives it."""

    class Conn(urllib3.connection.HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            watch.add(sock)
            return sock

    class TLSConn(urllib3.connection.HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            watch.add(sock)
            return sock

    class Pool(urllib3.HTTPConnectionPool):
        ConnectionCls = Conn

    class TLSPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = TLSConn

    classes = {"http": Pool, "https": TLSPool}

    class Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = classes

        def proxy_manager_for(self, proxy: Any, **kwargs: Any) -> Any:
            manager = super().proxy_manager_for(proxy, **kwargs)
            if isinstance(manager, urllib3.ProxyManager):  # not SOCKS: its own classes
                manager.pool_classes_by_scheme = classes
            return manager

    session = requests.Session()
    session.mount("http://", Adapter())
    session.mount("https://", Adapter())
    return session


def _take(
    chunks: Iterable[bytes],
    out_fd: int,
    max_size: int,
    what: str,
    length: int | None,
    progress: OnProgress | None,
    pace: Callable[[int], None],
) -> str:
    """Chunks into out_fd, never more than max_size, hashed and reported as they come;
    ``pace(total)`` after each raises when the source is too slow or takes too long.
    Returns the sha256."""
    h, total = hashlib.sha256(), 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_size:
            raise LimitExceeded(f"{what}: more than {max_size} bytes")
        h.update(chunk)
        write_all(out_fd, chunk)
        if progress is not None:
            progress(total, length)
        pace(total)
    return h.hexdigest()


def download(
    url: str,
    out_fd: int,
    max_size: int,
    limits: Limits,
    progress: OnProgress | None = None,
    deadline: float | None = None,
) -> str:
    """Stream url into out_fd; returns the sha256. Caps bytes, total time (until
    ``deadline``, a time.monotonic(); default: ``limits.transfer_seconds`` from now) and
    rate. What may pass (HTTP 5xx and 429, a connection that broke off, a silent server)
    is tried again from the start, up to twice, within the same deadline; progress does
    not go back meanwhile: a retry reports only once it got further than the last."""
    if deadline is None:
        deadline = time.monotonic() + limits.transfer_seconds
    host = urlsplit(url).hostname or url
    furthest = 0

    def report(done: int, total: int | None) -> None:
        nonlocal furthest
        if progress is not None and done > furthest:
            furthest = done
            progress(done, total)

    for attempt in itertools.count(1):
        if attempt > 1:  # the file starts again from its first byte
            os.ftruncate(out_fd, 0)
            os.lseek(out_fd, 0, os.SEEK_SET)
        try:
            return _attempt(url, host, out_fd, max_size, limits, deadline, report)
        except _Again as e:
            tries = f", after {attempt} attempts" if attempt > 1 else ""
            if attempt > len(RETRY_DELAYS):
                raise TransferError(f"{e}{tries}") from e
            delay = RETRY_DELAYS[attempt - 1]
            if time.monotonic() + delay >= deadline:
                raise TransferError(f"{e}{tries}") from e
            time.sleep(delay)
    raise AssertionError("unreachable")


def _attempt(
    url: str,
    host: str,
    out_fd: int,
    max_size: int,
    limits: Limits,
    deadline: float,
    progress: OnProgress,
) -> str:
    """One try at url, under a watchdog; raises _Again for what may pass."""
    connect_seconds = max(0.1, min(_CONNECT_SECONDS, deadline - time.monotonic()))
    length: int | None = None
    received: int | None = None  # None until the reply's headers came
    with _Watchdog(host, limits, deadline) as watch, _session(watch) as session:
        try:
            with session.get(
                url,
                stream=True,
                timeout=(connect_seconds, limits.stall_seconds),
                allow_redirects=True,
            ) as resp:
                watch.add_response(resp)
                status = resp.status_code
                if status != 200:
                    retry = status >= 500 or status == 429
                    raise (_Again if retry else TransferError)(f"{url}: HTTP {status}")
                declared = resp.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > max_size:
                    raise LimitExceeded(f"{url}: {declared} bytes announced, cap is {max_size}")
                length = int(declared) if declared and declared.isdigit() else None
                # progress moves about 1% of the file at a time, on a slow link too; reads
                # are small so that the rate rule sees bytes as they come
                step = min(_READ_MAX, max(1024, (length or max_size) // 100))
                received = 0
                digest = _take(
                    resp.iter_content(step), out_fd, max_size, url, length, progress, watch.pace
                )
        except requests.RequestException as e:
            if watch.reason is not None:
                raise TransferError(watch.reason) from e
            if received is not None:
                received = watch.counted
            cause, again = _cause(e, connect_seconds, limits.stall_seconds, received, length)
            raise (_Again if again else TransferError)(f"{host}: {cause}") from e
        complete = length is None or watch.counted == length
        if watch.reason is not None and not (length is not None and complete):
            raise TransferError(watch.reason)  # what the server sent until we shut it
        if not complete:  # urllib3 1.26 takes a short body without a word
            raise _Again(
                f"{host}: the connection broke off after {watch.counted} of {length} bytes"
            )
        return digest


def copy_from(
    path: Path, out_fd: int, max_size: int, limits: Limits, progress: OnProgress | None = None
) -> str:
    """An offline import's file (a USB stick, a dir received with qvm-copy) into out_fd,
    under the same caps as a download; returns the sha256."""
    deadline = time.monotonic() + limits.transfer_seconds

    def pace(total: int) -> None:
        if time.monotonic() > deadline:
            raise TransferError(
                f"{path}: reading took longer than {limits.transfer_seconds:.0f} s"
            )

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TransferError(f"{path}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TransferError(f"{path}: not a regular file")
        if st.st_size > max_size:
            raise LimitExceeded(f"{path}: {st.st_size} bytes, cap is {max_size}")
        chunks = iter(lambda: f.read(CHUNK), b"")
        return _take(chunks, out_fd, max_size, str(path), st.st_size, progress, pace)


def fetch_and_push(ctx: ServiceContext) -> int:
    limits = ctx.config.limits
    if ctx.caller != "dom0":
        raise TransferError("only dom0 may ask for downloads")
    reader = StreamReader(ctx.stdin_fd, time.monotonic() + 60)
    request = DownloadRequest.from_json(reader.readline(limits.header_max_bytes))
    ctx.paths.download_dir.mkdir(parents=True, exist_ok=True)
    # one deadline for all the files: dom0 waits transfer_seconds (+ a minute) for the call
    deadline = time.monotonic() + limits.transfer_seconds
    with tempfile.TemporaryDirectory(dir=ctx.paths.download_dir) as tmp:
        fds: list[tuple[str, int]] = []
        try:
            report = ProgressLines(ctx.stdout_fd)
            for w in request.files:
                fd = os.open(Path(tmp) / w.name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                fds.append((w.name, fd))
                if request.source_dir is not None:
                    source = Path(request.source_dir) / w.name
                    digest = copy_from(source, fd, w.max_size, limits, partial(report, w.name))
                else:
                    digest = download(
                        w.url, fd, w.max_size, limits, partial(report, w.name), deadline
                    )
                report(w.name, os.fstat(fd).st_size, w.size, final=True)
                if w.sha256 is not None and digest != w.sha256:
                    raise VerificationError(f"{w.name}: sha256 differs from dom0's metadata")
            if request.kind == "metadata":
                _first_check_metadata(ctx, request, dict(fds))
            frame_header = {"nonce": request.nonce}
            result = call(
                FROM_VM,
                "dom0",
                PUSH_SERVICE,
                feed=lambda out: write_frame(out, frame_header, fds),
            )
            check(result, "dom0", PUSH_SERVICE)
        finally:
            for _, fd in fds:
                os.close(fd)
    return 0


def _first_check_metadata(
    ctx: ServiceContext, request: DownloadRequest, fds: dict[str, int]
) -> None:
    data_name = next(n for n in fds if not n.endswith((".jcat", ".asc")))
    signature = "asc" if f"{data_name}.asc" in fds else "jcat"
    remote = Remote(request.remote, f"https://updatevm.invalid/{data_name}", None, signature)
    verify_metadata_files(fds[data_name], fds[remote.signature_name], remote, ctx.paths, ctx.config)


def main() -> int:
    return run_service("qubes.FwupdDownload", fetch_and_push)


if __name__ == "__main__":
    sys.exit(main())
