"""make mutation: mutmut 3 over the trust modules, each against its own unit tests only.

For each module, a throwaway copy of the work tree (the files git tracks, and new ones it
does not ignore) gets a [tool.mutmut] table naming that module and its tests under
tests/unit; `mutmut run --max-children N` runs there, the verdicts are read from its
mutants/ directory, and the copy is deleted: nothing is written to the work tree. Then one
table: module, mutants, killed, survived, no tests, timeout/suspicious, score (killed or
timed out, of all mutants), minutes; and the name of every mutant not killed (`mutmut show
NAME` in a copy kept with MUTATION_KEEP=1 prints its diff). docs/mutation.md lists the
equivalent ones. tools/mutation_fixtures.py (a pytest plugin) makes the tests' costly
fixtures once per module, not once per mutant.

Environment: MUTATION_ONLY (comma list of modules, default all), MUTATION_JOBS (mutmut's
--max-children, default 1: the tests run gpg and openssl, and the machine is shared),
MUTATION_KEEP=1 (keep each copy and print where), MUTATION_MIN (a score in %: exit 1 when a
module scores below it; default 0, the report is all).

    python tools/mutation.py [MODULE ...]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Module:
    tests: tuple[str, ...]
    # only these functions are mutated (mutmut's names after the module's prefix); all if empty
    functions: tuple[str, ...] = ()


MODULES = {
    "signatures": Module(("tests/unit/test_signatures.py",)),
    "jcat": Module(("tests/unit/test_jcat.py",)),
    # test_tidy.py: what a killed run leaves (the store's tidy and record, the sweeps)
    "metadata": Module(("tests/unit/test_metadata.py", "tests/unit/test_metadata_asc.py",
                        "tests/unit/test_tidy.py")),
    "cabinet": Module(("tests/unit/test_cabinet.py",)),
    "transfer": Module(("tests/unit/test_transfer.py", "tests/unit/test_tidy.py")),
    "session": Module(("tests/unit/test_session.py", "tests/unit/test_tidy.py")),
    "receive": Module(("tests/unit/test_receive.py",)),
    # the reply parsing: what sys-usb's answers must pass before dom0 uses them
    "usbvm": Module(
        ("tests/unit/test_usbvm_reply.py",),
        ("x__string__*", "x__match__*", "x__load_reply__*", "x_parse_*", "x__raw__*",
         "x__offered_release__*", "x__expected_release__*"),
    ),
}  # fmt: skip

# mutmut's exit codes (mutmut.stats.status_by_exit_code) folded into the table's columns
_KILLED = {1, 3, 37}
_SURVIVED = {0}
_NO_TESTS = {5, 33}
_SKIPPED = {34, None}
_TIMEOUT = {36, -24, 24, 152, 255}


@dataclass
class Result:
    module: str
    seconds: float = 0.0
    killed: int = 0
    timeout: list[str] = field(default_factory=list)  # the tests hung: detected too
    survived: list[str] = field(default_factory=list)
    no_tests: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # suspicious, segfault
    error: str = ""

    @property
    def mutants(self) -> int:
        return (self.killed + len(self.timeout) + len(self.survived) + len(self.no_tests)
                + len(self.other))  # fmt: skip

    @property
    def score(self) -> float:
        """Killed or timed out (a mutant that makes a test hang is caught), of all."""
        caught = self.killed + len(self.timeout)
        return 100.0 * caught / self.mutants if self.mutants else 0.0


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.split(b"\0")  # fmt: skip
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if src.is_file():  # a deleted file git still lists
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def run_module(name: str, jobs: int, keep: bool) -> Result:
    module = MODULES[name]
    result = Result(name)
    tests = [t for t in module.tests if (ROOT / t).is_file()]
    if not tests:
        result.error = f"no unit tests ({', '.join(module.tests)})"
        return result
    work = Path(tempfile.mkdtemp(prefix=f"qfw-mut-{name}-"))
    try:
        _copy_tree(work)
        # the tests read docs/, fuzz/, policies/ ...: mutmut runs them from mutants/
        also = sorted(p.name for p in work.iterdir() if p.name not in ("broker", "tests"))
        with (work / "pyproject.toml").open("a") as f:
            f.write(
                "\n[tool.mutmut]\n"
                'source_paths = ["broker"]\n'
                f"also_copy = {_toml_list(also)}\n"
                f'only_mutate = ["broker/{name}.py"]\n'
                f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
                'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "mutation_fixtures"]\n'
            )
        prefix = f"broker.{name}."
        patterns = [prefix + f for f in module.functions]
        start = time.monotonic()
        env = dict(os.environ, PYTHONPATH=str(work / "tools"),
                   PYTEST_DEBUG_TEMPROOT=str(work / "tmp"),
                   MUTATION_BASETEMP=str(work / "tmp" / "kept"))  # fmt: skip
        (work / "tmp" / "kept").mkdir(parents=True)
        proc = subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *patterns],
            cwd=work, env=env, capture_output=True, text=True,
        )  # fmt: skip
        result.seconds = time.monotonic() - start
        meta = work / "mutants" / "broker" / f"{name}.py.meta"
        if proc.returncode != 0 or not meta.is_file():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            result.error = f"mutmut exited {proc.returncode}:\n    " + "\n    ".join(tail)
            return result
        verdicts = json.loads(meta.read_text())["exit_code_by_key"]
        for key, code in sorted(verdicts.items(), key=lambda kv: _natural(kv[0])):
            if patterns and not any(fnmatch.fnmatch(key, p) for p in patterns):
                continue
            if code in _KILLED:
                result.killed += 1
            elif code in _SURVIVED:
                result.survived.append(key)
            elif code in _NO_TESTS:
                result.no_tests.append(key)
            elif code in _TIMEOUT:
                result.timeout.append(key)
            elif code not in _SKIPPED:
                result.other.append(f"{key} (exit {code}: {'suspicious' if code == 35 else '?'})")
        return result
    finally:
        if keep:
            print(f"  {name}: kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _natural(key: str) -> tuple[str, int]:
    stem, _, number = key.rpartition("_")
    return (stem, int(number)) if number.isdigit() else (key, 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=", ".join(MODULES))
    args = parser.parse_args()
    only = os.environ.get("MUTATION_ONLY", "")
    chosen = args.modules or [m.strip() for m in only.split(",") if m.strip()] or list(MODULES)
    unknown = [m for m in chosen if m not in MODULES]
    if unknown:
        parser.error(f"unknown modules: {', '.join(unknown)} (one of {', '.join(MODULES)})")
    jobs = int(os.environ.get("MUTATION_JOBS", "1"))
    keep = os.environ.get("MUTATION_KEEP") == "1"
    minimum = float(os.environ.get("MUTATION_MIN", "0"))

    results = []
    for name in chosen:
        print(f"mutmut over broker/{name}.py ...", flush=True)
        results.append(run_module(name, jobs, keep))

    print()
    print(f"{'module':<11} {'mutants':>7} {'killed':>6} {'survived':>8} {'no tests':>8} "
          f"{'timeout/susp':>12} {'score':>6} {'minutes':>7}")  # fmt: skip
    print("(score: killed or timed out, of all mutants)")
    for r in results:
        if r.error:
            print(f"{r.module:<11} {'-':>7}  {r.error}")
            continue
        print(f"{r.module:<11} {r.mutants:>7} {r.killed:>6} {len(r.survived):>8} "
              f"{len(r.no_tests):>8} {f'{len(r.timeout)}/{len(r.other)}':>12} {r.score:>5.1f}% "
              f"{r.seconds / 60:>7.1f}")  # fmt: skip
    for r in results:
        for title, names in (("survived", r.survived), ("no tests", r.no_tests),
                             ("timeout", r.timeout), ("suspicious", r.other)):  # fmt: skip
            if names:
                print(f"\n{r.module}: {title} ({len(names)})")
                for n in names:
                    print(f"  {n}")
    failed = [r for r in results if r.error or r.score < minimum]
    return 1 if minimum and failed else 0


if __name__ == "__main__":
    sys.exit(main())
