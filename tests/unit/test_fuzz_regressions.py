"""What make fuzz found, kept found: each input in fuzz/regressions/<target>-<n>.bin runs
through its fuzz target's one() (fuzz/fuzz_<target>.py), uninstrumented and without
atheris, and must return or raise a BrokerError within a few seconds.

- usbvm-1: a sys-usb GetResults reply whose release Metadata has 19,683 keys built to
  share one g_str_hash value: rendering it took 20 s of dom0's CPU (quadratic hash order).
- cab-1: a metainfo repeating one sha512 checksum thousands of times: the member was
  re-hashed for each (45 s for 5,000 over 8 MiB).

Each runs in a subprocess: some targets stand in for broker functions (fuzz_cab's
verifier), which must not leak into other tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
CASES = sorted((FUZZ / "regressions").glob("*-*.bin"))
SECONDS = 10


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_fuzz_finding_stays_fixed(case: Path, tmp_path: Path) -> None:
    target = case.name.split("-", 1)[0]
    code = (f"import sys; sys.path.insert(0, {str(FUZZ)!r}); import fuzz_{target} as t; "
            f"t.one(open({str(case)!r}, 'rb').read())")  # fmt: skip
    env = {**os.environ, "FUZZ_NO_INSTRUMENT": "1", "FUZZ_SCRATCH": str(tmp_path)}
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=SECONDS, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case.name}: still running after {SECONDS} s")
    assert r.returncode == 0, r.stderr[-3000:]


def test_there_are_findings_to_replay() -> None:
    assert {c.name for c in CASES} >= {"usbvm-1.bin", "cab-1.bin"}
