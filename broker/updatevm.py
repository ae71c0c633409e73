"""The UpdateVM side: qubes.FwupdDownload (also what an offline import runs in its qube).

dom0 sends one JSON line naming what to fetch (URLs, caps and, for cabs, the sha256 from
dom0's verified metadata). We download under a byte cap, a whole-download deadline and a
minimum rate (requests' timeout only bounds each read), check what we can (the first
validation: it saves dom0 work, it never replaces dom0's check), and push the files to
dom0's qubes.FwupdReceiveUpdates with the session nonce.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import requests

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
_GRACE_SECONDS = 10.0  # before the minimum-rate rule applies (TLS set-up, slow start)


# (done, total or None) after each chunk: how the UpdateVM tells dom0 how far it got
OnProgress = Callable[[int, int | None], None]


def _cause(e: requests.RequestException, connect_seconds: float, read_seconds: float) -> str:
    """What a person can act on: refused, timed out (after how long), TLS, or other."""
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return f"no connection within {connect_seconds:.0f} s (timed out)"
    if isinstance(e, requests.exceptions.ReadTimeout):
        return f"the server sent nothing for {read_seconds:.0f} s (timed out)"
    if isinstance(e, requests.exceptions.SSLError):
        return "TLS failed (certificate or protocol)"
    if isinstance(e, requests.exceptions.ConnectionError):
        text = str(e).lower()
        if "refused" in text:
            return "connection refused"
        if "name or service" in text or "resolution" in text or "nodename" in text:
            return "host name not resolved (is the UpdateVM online?)"
        return "connection failed"
    return type(e).__name__


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
    url: str, out_fd: int, max_size: int, limits: Limits, progress: OnProgress | None = None
) -> str:
    """Stream url into out_fd; returns the sha256. Caps bytes, total time and rate."""
    start = time.monotonic()
    host = urlsplit(url).hostname or url
    connect_seconds, read_seconds = 15.0, 30.0

    def pace(total: int) -> None:
        elapsed = time.monotonic() - start
        if elapsed > limits.transfer_seconds:
            raise TransferError(
                f"{host}: download took longer than {limits.transfer_seconds:.0f} s"
            )
        if elapsed > _GRACE_SECONDS and total / elapsed < limits.min_rate_bytes_per_s:
            raise TransferError(
                f"{host}: download slower than {limits.min_rate_bytes_per_s} bytes/s"
            )

    try:
        with requests.get(
            url, stream=True, timeout=(connect_seconds, read_seconds), allow_redirects=True
        ) as resp:
            if resp.status_code != 200:
                raise TransferError(f"{url}: HTTP {resp.status_code}")
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_size:
                raise LimitExceeded(f"{url}: {declared} bytes announced, cap is {max_size}")
            length = int(declared) if declared and declared.isdigit() else None
            # a read returns once it has its whole size: about 1% of the file each, so
            # progress moves on a slow link too (a read of CHUNK would hold it for minutes)
            step = min(CHUNK, max(1024, (length or max_size) // 100))
            chunks = resp.iter_content(step)
            return _take(chunks, out_fd, max_size, url, length, progress, pace)
    except requests.RequestException as e:
        raise TransferError(f"{host}: {_cause(e, connect_seconds, read_seconds)}") from e


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
                    digest = download(w.url, fd, w.max_size, limits, partial(report, w.name))
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
