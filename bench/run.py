"""make bench: every line of issue 20 on this machine, each against a baseline measured in the
same run, as a table (line, figure, baseline, ratio, target, PASS/FAIL), then the memory
lines of bench_memory.py. Exits 0 whatever the results: the bench reports, it does not gate.

    python bench/run.py [--only catalog,cab,cli,memory]
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Line, print_table

# each module's collect() -> list[Line], run one after the other (never at once: they
# would measure each other)
PARTS = ("catalog", "cab", "cli")


def machine() -> str:
    cpus = len(__import__("os").sched_getaffinity(0))
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (f"{platform.node()}: {platform.machine()}, {cpus} CPUs{mem}, "
            f"Python {platform.python_version()}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument("--only", default=",".join((*PARTS, "memory")))
    wanted = parser.parse_args().only.split(",")
    t0 = time.monotonic()
    lines: list[Line] = []
    for part in PARTS:
        if part not in wanted:
            continue
        started = time.monotonic()
        try:
            lines += importlib.import_module(f"bench_{part}").collect()
        except Exception:  # one part failing must not hide the others
            traceback.print_exc()
            print(f"bench {part}: failed (above); its lines are missing", file=sys.stderr)
        print(f"bench {part}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    print(f"make bench on {machine()}")
    print_table(lines)
    if "memory" in wanted:
        import bench_memory  # its own sandbox, after the others

        bench_memory.main()
    print(f"make bench: {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
