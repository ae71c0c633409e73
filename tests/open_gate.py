"""Hold a process inside open(2) of one file until the test lets it go.

A race between two real services (a refresh landing while dom0 hands metadata to the
daemons) happens once in a million runs on its own. fanotify's permission events make it
happen every time, from outside, with no hook in the code under test: the kernel stops
whoever opens the marked inode until this listener answers. Root only (as the sandbox).
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import threading
from pathlib import Path
from types import TracebackType

_FAN_CLOEXEC = 0x1
_FAN_CLASS_CONTENT = 0x4
_FAN_MARK_ADD = 0x1
_FAN_OPEN_PERM = 0x10000
_FAN_ALLOW = 0x1
_AT_FDCWD = -100
# struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid
_EVENT = struct.Struct("=IBBHQii")
_RESPONSE = struct.Struct("=iI")  # struct fanotify_response: fd, response

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [
    ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p,
]  # fmt: skip


class OpenGate:
    """The first open of ``path`` (that inode: a rename elsewhere does not free it) is
    held until :meth:`release`; every later open passes at once."""

    def __init__(self, path: Path) -> None:
        fd = _libc.fanotify_init(_FAN_CLASS_CONTENT | _FAN_CLOEXEC, os.O_RDONLY)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "fanotify_init")
        self._fd = fd
        if _libc.fanotify_mark(fd, _FAN_MARK_ADD, _FAN_OPEN_PERM, _AT_FDCWD, bytes(path)) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"fanotify_mark {path}")
        self._held: tuple[int, int] | None = None  # (event fd, opener's pid)
        self._lock = threading.Lock()
        self.opened = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop:
            ready, _, _ = select.select([self._fd], [], [], 0.05)
            if not ready:
                continue
            buf = os.read(self._fd, 4096)
            pos = 0
            while pos + _EVENT.size <= len(buf):
                length, _, _, _, _, efd, pid = _EVENT.unpack_from(buf, pos)
                pos += length
                with self._lock:
                    if self._held is None and not self.opened.is_set():
                        self._held = (efd, pid)
                        self.opened.set()
                        continue
                self._allow(efd)

    def _allow(self, efd: int) -> None:
        os.write(self._fd, _RESPONSE.pack(efd, _FAN_ALLOW))
        os.close(efd)

    @property
    def pid(self) -> int:
        assert self._held is not None, "nothing is held"
        return self._held[1]

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, None
        if held is not None:
            self._allow(held[0])

    def close(self) -> None:
        self.release()
        self._stop = True
        self._thread.join()
        os.close(self._fd)

    def __enter__(self) -> OpenGate:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
