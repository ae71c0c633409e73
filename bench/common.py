"""What every line of `make bench` shares: a sandbox to run on, timed runs of our commands and
of the peers they are held against (interleaved, medians), and the table they print.

A line is one figure of ours against a baseline measured in the same run on this machine:
the ratio is what counts, since these hosts are shared and noisy. A target is met or not;
the bench reports, it does not gate (exit 0 either way)."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
PY = sys.executable
FWUPDMGR = "/usr/bin/fwupdmgr"

from broker.sandbox import daemons  # noqa: E402  the checkout's, made importable above
from broker.sandbox.launcher import Sandbox  # noqa: E402


@dataclass(frozen=True)
class Line:
    """One row: ``figure`` of ours, ``baseline`` measured in the same run, and the target
    as ``limit`` on either the ratio (``per="x"``) or the figure itself (``per=unit``)."""

    name: str
    figure: float
    baseline: float | None
    unit: str  # "s", "ms", "MiB"
    limit: float | None
    per: str = "x"  # "x": figure/baseline <= limit; else the figure's own unit
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline <= 0:
            return None
        return self.figure / self.baseline

    @property
    def passed(self) -> bool | None:
        if self.limit is None:
            return None
        if self.per == "x":
            return None if self.ratio is None else self.ratio <= self.limit
        return self.figure <= self.limit

    def cells(self) -> list[str]:
        base = "-" if self.baseline is None else f"{self.baseline:.3g} {self.unit}"
        ratio = "-" if self.ratio is None else f"{self.ratio:.2f}x"
        target = "-" if self.limit is None else (
            f"<= {self.limit:g}x" if self.per == "x" else f"<= {self.limit:g} {self.per}")
        verdict = {True: "PASS", False: "FAIL", None: "info"}[self.passed]
        return [self.name, f"{self.figure:.3g} {self.unit}", base, ratio, target, verdict]


def print_table(lines: Sequence[Line], out: Callable[[str], None] = print) -> None:
    head = ["line", "figure", "baseline", "ratio", "target", "result"]
    rows = [head, *(line.cells() for line in lines)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for row in rows:
        out("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for line in lines:
        if line.note:
            out(f"  {line.name}: {line.note}")


@dataclass(frozen=True)
class Run:
    returncode: int
    seconds: float
    stdout: bytes
    stderr: bytes


def run(argv: Sequence[str], env: dict[str, str] | None = None, stdin: bytes | None = None,
        cwd: Path = REPO) -> Run:  # fmt: skip
    """One process and its wall time. (No peak RSS here: on Linux a child's ru_maxrss
    keeps its forking parent's RSS across exec; memory lines read VmHWM instead.)"""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        feed = subprocess.PIPE if stdin is not None else subprocess.DEVNULL
        proc = subprocess.Popen(list(argv), env=env, cwd=cwd, stdout=out, stderr=err,
                                stdin=feed)  # fmt: skip
        if stdin is not None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(stdin)
            proc.stdin.close()
        _, status = os.waitpid(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(proc.returncode, seconds, out.read(), err.read())


def medians(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Each callable ``rounds`` times, interleaved (a, b, a, b, ...) so that a slow moment
    of the host hits both; the median seconds (or whatever they return) of each."""
    got: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            got[name].append(fn())
    return {name: statistics.median(values) for name, values in got.items()}


def clean_env(**extra: str) -> dict[str, str]:
    return {"PATH": f"{Path(PY).parent}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
            **extra}  # fmt: skip


class Bench:
    """A sandbox for the bench's lines (up in a short dir, down and removed after)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def sandbox_cli(self, *args: str) -> None:
        r = run([PY, "-m", "broker.sandbox.cli", *args], env=clean_env())
        if r.returncode != 0:
            raise RuntimeError(f"qubes-fwupd-sandbox {' '.join(args)}: {r.stderr.decode()}")

    def manager(self, *args: str, stdin: bytes | None = None) -> Run:
        """qubes-fwupdmgr as the admin types it, in the sandbox's dom0."""
        env = clean_env(QUBES_FWUPD_SANDBOX=str(self.dir))
        return run([PY, "-m", "broker.cli", *args], env=env, stdin=stdin)

    def fwupdmgr(self, qube: str, *args: str) -> Run:
        """Plain fwupdmgr on one of the sandbox's daemons: the peer lines are held to."""
        bus = f"unix:path={self.dir}/vm/{qube}/run/dbus/system_bus_socket"
        return run([FWUPDMGR, "--no-unreported-check", "--no-metadata-check",
                    "--no-remote-check", "--no-security-fix", *args],
                   env=clean_env(DBUS_SYSTEM_BUS_ADDRESS=bus))  # fmt: skip

    @property
    def lvfs_dir(self) -> Path:
        return self.dir / "lvfs"


@contextlib.contextmanager
def bench_sandbox() -> Iterator[Bench]:
    # short: socket paths under it must stay below 107 bytes
    directory = Path(tempfile.mkdtemp(prefix="qfwb", dir="/tmp"))
    bench = Bench(directory)
    try:
        bench.sandbox_cli("up", "--dir", str(directory))
        yield bench
    finally:
        run([PY, "-m", "broker.sandbox.cli", "down", "--dir", str(directory)], env=clean_env())
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def fwupd_pid(directory: Path, qube: str) -> int:
    """The sandbox's fwupd daemon of ``qube``."""
    return daemons.fwupd_pid(Sandbox(directory), qube)
