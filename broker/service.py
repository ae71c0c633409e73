"""The one way a qrexec service entry point runs: read what qrexec gives, call one
handler, map the error to an exit status and one sanitized line on stderr. Tracebacks go
to the local log only, never back to the caller."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from broker.config import Config, Paths
from broker.errors import BrokerError, TransferError, exit_code_for
from broker.sanitize import printable


@dataclass(frozen=True)
class ServiceContext:
    caller: str  # QREXEC_REMOTE_DOMAIN: set by qrexec, not by the caller
    argument: str  # QREXEC_SERVICE_ARGUMENT ("" when none)
    paths: Paths
    config: Config
    stdin_fd: int = 0
    stdout_fd: int = 1


def log(paths: Paths, text: str) -> None:
    try:
        paths.log_file.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(_open_log(paths), "a", encoding="utf-8") as f:
            f.write(f"{datetime.now(UTC).isoformat(timespec='seconds')} {text}\n")
    except OSError:
        pass  # logging must never turn a verdict into a crash


def _open_log(paths: Paths) -> int:
    """dom0's log is shared by the root manager and the receive service (the login user):
    whichever makes it leaves it group-writable, or the other's lines would be lost."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(paths.log_file, flags, 0o660)
    try:
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, 0o660)
    except OSError:
        os.close(fd)
        raise
    return fd


def run_service(name: str, handler: Callable[[ServiceContext], int]) -> int:
    paths = Paths.from_env()
    try:
        caller = os.environ.get("QREXEC_REMOTE_DOMAIN", "")
        if not caller:
            raise TransferError("not started by qrexec (no QREXEC_REMOTE_DOMAIN)")
        ctx = ServiceContext(
            caller=caller,
            argument=os.environ.get("QREXEC_SERVICE_ARGUMENT", ""),
            paths=paths,
            config=Config.load(paths),
        )
        return handler(ctx)
    except BrokerError as e:
        message = printable(str(e))
        log(paths, f"{name}: refused: {message}")
        print(f"{name}: {message}", file=sys.stderr)
        return exit_code_for(e)
    except Exception:
        log(paths, f"{name}: internal error\n{traceback.format_exc()}")
        print(f"{name}: internal error (details in the service log)", file=sys.stderr)
        return 1
