"""Fuzz target: the framed stream dom0's qubes.FwupdReceiveUpdates reads (broker.receive):
StreamReader.readline under the header cap, parse_header, the session nonce, then each
file's bytes (copy_exact, hashed), then EOF.

The stream comes through a real pipe. The first byte, when odd, makes every read short
(16 to 4096 bytes, from the second byte), as a sender writing in small pieces would:
StreamReader's own buffer then carries what one read brought past a newline.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
import types

import harness

with harness.instrumented():
    import broker.transfer
    from broker.config import Limits
    from broker.session import check_nonce
    from broker.transfer import StreamReader, parse_header

# a header cap small enough for the fuzzer's inputs to pass it (the check is the same)
LIMITS = Limits(header_max_bytes=2048)
PIPE_BYTES = 1 << 20
DEVNULL = os.open(os.devnull, os.O_WRONLY)
_short = {"max": 0}


def _read(fd: int, n: int) -> bytes:
    return os.read(fd, min(n, _short["max"]) if _short["max"] else n)


# what broker.transfer sees as ``os``: the real one, with reads made short on demand
broker.transfer.os = types.SimpleNamespace(  # type: ignore[assignment]
    **{**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")}, "read": _read}
)


def one(data: bytes) -> None:
    if len(data) < 2 or len(data) - 2 > PIPE_BYTES:
        return
    _short["max"] = (data[1] + 1) * 16 if data[0] & 1 else 0
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        view = memoryview(data)[2:]
        while view:
            view = view[os.write(w, view) :]
        os.close(w)
        w = -1
        reader = StreamReader(r, time.monotonic() + 30)
        header, files = parse_header(reader.readline(LIMITS.header_max_bytes))
        check_nonce(header.get("nonce"))
        for f in files:
            reader.copy_exact(DEVNULL, f.size, hashlib.sha256())
        reader.expect_eof()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


if __name__ == "__main__":
    harness.main(one)
