"""What every fuzz target shares: the pass rule, atheris set-up, and known-finding suppression.

A target passes an input when the call returns, or raises a subclass of
``broker.errors.BrokerError`` whose message is one non-empty line (what the user reads,
tests/properties.py). Anything else is a finding: atheris prints the traceback and writes
the input to the artifact directory.

Nothing here imports ``broker`` at module level: a target imports the project inside
:func:`instrumented` so that atheris instruments it (coverage feedback).

Known findings: ``run.py`` restarts a target after a crash for the rest of its time, and
passes the signatures already found in ``FUZZ_KNOWN`` (a file, one per line) so that the
same bug is not found again and again; any other exception still stops the run.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

try:
    import atheris
except ImportError:  # a target's one() can still be imported and called without it
    atheris = None

SIGNATURE_PREFIX = "FUZZ-SIGNATURE: "


def instrumented() -> AbstractContextManager[Any]:
    """Around a target's ``broker`` imports: atheris's coverage instrumentation of the
    project's modules (not the standard library's, not lxml's)."""
    if atheris is None or os.environ.get("FUZZ_NO_INSTRUMENT"):
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=["broker"])


def scratch(prefix: str) -> Path:
    """A private directory for a target's files: under FUZZ_SCRATCH, which run.py makes
    per run and removes after it (libFuzzer's exit runs no atexit handler), else in
    /dev/shm (a run by hand leaves it behind)."""
    shm = "/dev/shm"  # noqa: S108  memory, not disk: cab members are written per input
    parent = os.environ.get("FUZZ_SCRATCH") or (shm if Path(shm).is_dir() else None)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def signature(error: BaseException) -> str:
    """The exception type and the innermost frame in the project (else the innermost):
    one bug, one signature, whatever input reached it."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "/broker/" in f.filename]
    frame = (ours or frames or [None])[-1]
    where = "?" if frame is None else f"{Path(frame.filename).name}:{frame.lineno}"
    return f"{type(error).__name__}@{where}"


def _known() -> frozenset[str]:
    path = os.environ.get("FUZZ_KNOWN")
    if not path or not Path(path).is_file():
        return frozenset()
    return frozenset(line.strip() for line in Path(path).read_text().splitlines() if line.strip())


def check(one: Callable[[bytes], None], data: bytes) -> None:
    """Run one input; re-raise anything outside the contract (AssertionError for a
    BrokerError whose message is empty or not one line)."""
    from broker.errors import BrokerError

    try:
        one(data)
    except BrokerError as e:
        user_message(e)


def user_message(error: Exception) -> None:
    """A BrokerError's message is what the user reads: one line, not empty."""
    message = str(error)
    if not message.strip() or "\n" in message:
        raise AssertionError(f"{type(error).__name__} with a bad message {message!r}") from error


def main(one: Callable[[bytes], None]) -> None:
    """The target's entry point: libFuzzer's flags and corpus dirs from argv."""
    if atheris is None:
        raise SystemExit("atheris is not installed (make fuzz installs it into the venv)")
    known = _known()

    def test_one_input(data: bytes) -> None:
        try:
            check(one, data)
        except Exception as e:
            sig = signature(e)
            if sig in known:
                return
            print(f"\n{SIGNATURE_PREFIX}{sig}", file=sys.stderr, flush=True)
            raise

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
