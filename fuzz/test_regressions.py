"""Every finding of the fuzzers, replayed: fuzz/regressions/<target>-<n>.bin must now pass
its target (fuzz/fuzz_<target>.py) within the fuzzing caps: return, or raise a
broker.errors.BrokerError with a one-line message, in under 10 s and 2 GiB.

Each input runs in a subprocess, as libFuzzer replays it: the targets patch broker modules
(fuzz_cab's stand-in verifier, fuzz_transfer's short reads) and must not do so here.
Not collected by ``make test`` (testpaths is tests/); run ``pytest fuzz``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

FUZZ_DIR = Path(__file__).resolve().parent
CASES = sorted((FUZZ_DIR / "regressions").glob("*-*.bin"))
TIMEOUT_S = 10


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="needs atheris")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_finding_is_fixed(case: Path) -> None:
    target = case.name.split("-", 1)[0]
    env = {**os.environ, "PYTHONPATH": str(FUZZ_DIR.parent)}
    env.pop("FUZZ_KNOWN", None)
    argv = [sys.executable, str(FUZZ_DIR / f"fuzz_{target}.py"),
            f"-timeout={TIMEOUT_S}", "-rss_limit_mb=2048", str(case)]  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="qfw-fuzz-") as tmp:
            proc = subprocess.run(
                argv, env={**env, "FUZZ_SCRATCH": tmp}, capture_output=True, text=True,
                timeout=TIMEOUT_S + 60, check=False,
            )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case.name}: still running after {TIMEOUT_S + 60} s")
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-30:])
        pytest.fail(f"{case.name}: fuzz_{target} exits {proc.returncode}\n{tail}")
