"""make fuzz: every target under atheris (libFuzzer) for a bounded time, and a report.

Regressions in fuzz/regressions/<target>-*.bin are replayed first (each must now pass;
fuzz/test_regressions.py does the same under pytest). Per target, seeds made at run time
(fuzz/seeds.py) join its corpus under build/fuzz/corpus/<target> (kept between runs, never
committed), and libFuzzer runs with -max_total_time, -rss_limit_mb and -timeout. A finding
(an exception outside broker.errors.BrokerError, a hang past -timeout, memory past
-rss_limit_mb) is written to build/fuzz/findings/<target>/; after a crash the target goes
on for the rest of its time with that crash's signature known (fuzz/harness.py), so one
bug is counted once.

Environment: FUZZ_SECONDS (per target, default 60), FUZZ_RUNS (stop a target once it has
run this many inputs, within FUZZ_SECONDS: FUZZ_RUNS=1000000 FUZZ_SECONDS=1200 is the
issue's bar), FUZZ_TARGETS (comma list, default all), FUZZ_JOBS (targets at once, default
the CPU count), FUZZ_RSS_MB (default 2048), FUZZ_TIMEOUT (seconds per input, default 10),
FUZZ_STRICT=1 (exit 1 on any finding or failing regression; otherwise the report is all,
exit 0).

    python fuzz/run.py [--replay] [TARGET ...]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
WORK = ROOT / "build" / "fuzz"
REGRESSIONS = FUZZ_DIR / "regressions"
SIGNATURE_PREFIX = "FUZZ-SIGNATURE: "
# the targets' scratch files (cab members, config trees): memory, not disk
_SHM = "/dev/shm" if Path("/dev/shm").is_dir() else None  # noqa: S108

# target -> (libFuzzer's -max_len: large enough for the seeds, its dictionary in dicts/)
TARGETS = {
    "jcat": (16 * 1024, "json"),
    "catalog": (128 * 1024, "catalog"),
    "metainfo": (16 * 1024, "metainfo"),
    "cab": (64 * 1024, "cab"),
    "transfer": (16 * 1024, "json"),
    "usbvm": (16 * 1024, "json"),
    "config": (8 * 1024, "config"),
    "signature": (8 * 1024, None),
    "versions": (1024, None),
}
_EXECS = re.compile(r"^#(\d+)\s", re.MULTILINE)
_FINAL = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_MAX_RESTARTS = 25


@dataclass
class Finding:
    kind: str  # crash, timeout, oom, leak, ...
    signature: str
    artifact: str
    excerpt: str


@dataclass
class Result:
    target: str
    execs: int = 0
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    regressions: list[tuple[str, bool]] = field(default_factory=list)
    error: str = ""

    @property
    def rate(self) -> float:
        return self.execs / self.seconds if self.seconds else 0.0


def _command(target: str, *args: str) -> list[str]:
    return [sys.executable, str(FUZZ_DIR / f"fuzz_{target}.py"), *args]


def _env(known: Path | None = None, scratch: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if scratch is not None:
        env["FUZZ_SCRATCH"] = scratch
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("FUZZ_KNOWN", None)
    if known is not None:
        env["FUZZ_KNOWN"] = str(known)
    return env


def _excerpt(log: str) -> str:
    """The traceback atheris printed (or libFuzzer's own line for a hang or OOM)."""
    start = log.find("=== Uncaught Python exception: ===")
    if start < 0:
        for marker in ("=== Timeout", "out-of-memory", "ERROR: libFuzzer:"):
            start = log.find(marker)
            if start >= 0:
                break
    if start < 0:
        return log[-1500:]
    return log[start : start + 3000]


def replay(target: str, timeout: int, rss_mb: int = 2048) -> list[tuple[str, bool]]:
    """Each regression input of the target, run once under the fuzzing caps (-timeout,
    -rss_limit_mb): does it pass now?"""
    out = []
    for path in sorted(REGRESSIONS.glob(f"{target}-*.bin")):
        args = [f"-timeout={timeout}", f"-rss_limit_mb={rss_mb}", str(path)]
        try:
            with tempfile.TemporaryDirectory(prefix="qfw-fuzz-", dir=_SHM) as tmp:
                proc = subprocess.run(
                    _command(target, *args), env=_env(scratch=tmp), capture_output=True,
                    text=True, timeout=timeout + 60, check=False,
                )  # fmt: skip
            ok = proc.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        out.append((path.name, ok))
    return out


def fuzz(target: str, seconds: float, rss_mb: int, timeout: int, runs: int = 0) -> Result:
    import seeds

    result = Result(target)
    corpus = WORK / "corpus" / target
    findings_dir = WORK / "findings" / target
    findings_dir.mkdir(parents=True, exist_ok=True)
    try:
        seeds.write_seeds(target, corpus)
    except Exception as e:  # a missing seed source must not stop the other targets
        result.error = f"seeds: {type(e).__name__}: {e}"
        corpus.mkdir(parents=True, exist_ok=True)
    known = WORK / f"known-{target}.txt"
    known.write_text("")
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + seconds
    restarts = 0
    while (left := deadline - time.monotonic()) >= 1 and restarts <= _MAX_RESTARTS:
        if runs and result.execs >= runs:
            break
        args = [
            *([f"-runs={runs - result.execs}"] if runs else []),
            str(corpus),
            f"-max_total_time={int(left)}",
            f"-rss_limit_mb={rss_mb}",
            f"-timeout={timeout}",
            f"-max_len={TARGETS[target][0]}",
            *(
                [f"-dict={FUZZ_DIR / 'dicts' / (TARGETS[target][1] + '.dict')}"]
                if TARGETS[target][1]
                else []
            ),
            f"-artifact_prefix={findings_dir}/",
            "-print_final_stats=1",
            "-print_pcs=0",
        ]
        log_path = logs / f"{target}-{restarts}.log"
        started = time.monotonic()
        try:
            with (
                open(log_path, "w") as log,
                tempfile.TemporaryDirectory(prefix="qfw-fuzz-", dir=_SHM) as tmp,
            ):
                proc = subprocess.run(
                    _command(target, *args), env=_env(known, tmp), stdout=log,
                    stderr=subprocess.STDOUT, timeout=left + timeout + 120, check=False,
                )  # fmt: skip
        except subprocess.TimeoutExpired:
            result.seconds += time.monotonic() - started
            result.error = f"libFuzzer did not stop in time (see {log_path})"
            break
        result.seconds += time.monotonic() - started
        text = log_path.read_text(errors="replace")
        final = _FINAL.findall(text)
        progress = _EXECS.findall(text)
        result.execs += int(final[-1]) if final else max((int(n) for n in progress), default=0)
        artifact = _ARTIFACT.search(text)
        if proc.returncode == 0 and artifact is None:
            break
        if artifact is None:
            result.error = f"exit {proc.returncode} without a finding (see {log_path})"
            break
        name = Path(artifact.group(1)).name
        kind = name.split("-", 1)[0]
        sig = next(
            (line.removeprefix(SIGNATURE_PREFIX).strip() for line in text.splitlines()
             if line.startswith(SIGNATURE_PREFIX)),
            kind,
        )  # fmt: skip
        result.findings.append(Finding(kind, sig, artifact.group(1), _excerpt(text)))
        if kind != "crash" or sig == kind:
            break  # a hang or OOM has no signature to set aside: stop, not meet it again
        with open(known, "a") as f:
            f.write(sig + "\n")
        restarts += 1
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    parser.add_argument("--replay", action="store_true",
                        help="only replay fuzz/regressions/*.bin and report")  # fmt: skip
    args = parser.parse_args()
    chosen = args.targets or [
        t.strip() for t in os.environ.get("FUZZ_TARGETS", ",".join(TARGETS)).split(",") if t.strip()
    ]
    unknown = [t for t in chosen if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets: {', '.join(unknown)} (one of {', '.join(TARGETS)})")
    seconds = float(os.environ.get("FUZZ_SECONDS", "60"))
    jobs = int(os.environ.get("FUZZ_JOBS", str(os.cpu_count() or 1)))
    rss_mb = int(os.environ.get("FUZZ_RSS_MB", "2048"))
    timeout = int(os.environ.get("FUZZ_TIMEOUT", "10"))
    runs = int(os.environ.get("FUZZ_RUNS", "0"))
    strict = os.environ.get("FUZZ_STRICT") == "1"
    WORK.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(FUZZ_DIR))

    if args.replay:
        failing = 0
        for target in chosen:
            for name, ok in replay(target, timeout, rss_mb):
                print(f"{'pass' if ok else 'FAIL'}  {name}")
                failing += not ok
        return 1 if failing and strict else 0

    until = f"{runs:,} runs or {seconds:g} s" if runs else f"{seconds:g} s"
    print(f"fuzzing {len(chosen)} targets, {until} each, {jobs} at a time "
          f"(rss {rss_mb} MB, {timeout} s per input); work dir {WORK}", flush=True)  # fmt: skip
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        # regressions first, so that a slow one does not take CPU from a target's fuzzing
        replays = list(pool.map(lambda t: replay(t, timeout, rss_mb), chosen))
        results = list(pool.map(lambda t: fuzz(t, seconds, rss_mb, timeout, runs), chosen))
    for r, regressions in zip(results, replays, strict=True):
        r.regressions = regressions

    print()
    print(f"{'target':<10} {'execs':>11} {'seconds':>8} {'exec/s':>8} {'findings':>8}  regressions")
    total = Result("total")
    failing = 0
    for r in results:
        bad = sum(not ok for _, ok in r.regressions)
        failing += bad
        regs = f"{len(r.regressions) - bad}/{len(r.regressions)} pass" if r.regressions else "-"
        print(f"{r.target:<10} {r.execs:>11,} {r.seconds:>8.0f} {r.rate:>8.0f} "
              f"{len(r.findings):>8}  {regs}")  # fmt: skip
        total.execs += r.execs
        total.seconds += r.seconds
        total.findings += r.findings
    print(f"{'total':<10} {total.execs:>11,} {total.seconds:>8.0f} {total.rate:>8.0f} "
          f"{len(total.findings):>8}")  # fmt: skip
    for r in results:
        if r.error:
            print(f"\n{r.target}: {r.error}")
        for reg, ok in r.regressions:
            if not ok:
                print(f"\n{r.target}: regression {reg} still fails")
        for f in r.findings:
            print(f"\n{r.target}: {f.kind} {f.signature}\n  input: {f.artifact}")
            print("  " + "\n  ".join(f.excerpt.strip().splitlines()[:40]))
    if strict and (total.findings or failing):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
