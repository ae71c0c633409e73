"""make load (issue 21): many devices and many consecutive refresh/update cycles on the
sandbox's real parts, watching for leaked processes, fds, sessions, files and memory.

Devices: each fwupd daemon gets the test plugin's composite device (``[test]
CompositeChild=true``: the webcam, Module1, Module2) and, through a quirk file in its
``var/lib/fwupd/quirks.d`` (fwupd's own ``Children`` quirk on Module1), more children:
plain ``FuDevice``s of the test plugin, 1.2.2, updatable. dom0's webcam and modules have
sys-usb's DeviceIds, so the manager routes them to sys-usb and lists them once; the quirk
children have their own ids per qube. LOAD_DEVICES (default 20) is what ``qubes-fwupdmgr
get-devices`` lists. The webcam takes the fwupd-tests cabs; LOAD_UPDATABLE - 1 children
(default 3, in both qubes) get a 1.2.4 cab of their own, signed by the sandbox LVFS (one
GUID each: a cab for a composite's shared GUID would update its siblings in the same
Install). The rest have no release.

A cycle: the LVFS re-signs its catalog (so that refresh carries new metadata to dom0 and
both daemons), ``qubes-fwupdmgr refresh``, ``update -y`` (everything updatable), then both
daemons restarted (the test devices live in memory: back at 1.2.2). LOAD_CYCLES (default
50); cycles 1-4 warm up, from cycle 5 on each cycle is sampled: every process in the
sandbox's namespaces or naming its dir, the fds and RSS of the long-lived ones, dom0's
sessions, state, cache and tmp dirs, the tmp dirs of sys-usb and sys-firewall, the peak
RSS of each manager run. Leak: a process, session or file left after a cycle that was not
there after warm-up, or a figure growing steadily from the first sampled cycle to the last
beyond its tolerance. Prints the table (metric, first, last, max, verdict); exit 1 if a
leak was found, 2 if a cycle failed.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PY, REPO, Bench, bench_sandbox

from broker.config import Paths
from broker.sandbox import daemons, lvfs
from broker.sandbox.launcher import Launcher, Sandbox
from broker.sandbox.pki import create_pki
from broker.sandbox.processes import ProcessTable
from tests.adversarial.hostile import metainfo, signed_cab, trusted_signer

WARMUP = 4
MODULE1_GUID = "7fddead7-12b5-4fb9-9fa0-6d30305df755"  # the test plugin's composite child
COMPOSITE = 3  # the webcam, Module1, Module2: listed once (sys-usb's)
PAYLOAD_124 = b"0x1020004\0"  # the test plugin sets the version the payload names
QUIRK = "var/lib/fwupd/quirks.d/qubes-fwupd-load.quirk"
SETTLE_SECONDS = 5.0  # a process that ends with a cycle: given this long to be reaped


def say(text: str) -> None:
    print(f"load: {text}", file=sys.stderr, flush=True)


def env_int(name: str, default: int, low: int) -> int:
    value = int(os.environ.get(name) or default)
    if value < low:
        raise SystemExit(f"{name} must be at least {low}")
    return value


# ------------------------------------------------------------------------------ devices
@dataclass(frozen=True)
class Child:
    qube: str
    instance_id: str
    updatable: bool

    @property
    def guid(self) -> str:  # fwupd's GUID of an instance id
        return str(uuid.uuid5(uuid.NAMESPACE_DNS, self.instance_id))

    @property
    def name(self) -> str:
        return f"Load {self.instance_id.split(chr(92))[1]}"


def plan_children(devices: int, updatable: int) -> list[Child]:
    """devices - 3 children, alternately in sys-usb and dom0; the first updatable - 1
    have a release."""
    out = []
    for i in range(devices - COMPOSITE):
        qube = ("sys-usb", "dom0")[i % 2]
        tag = "USB" if qube == "sys-usb" else "DOM0"
        out.append(Child(qube, f"QUBESFWUPDLOAD\\{tag}_{i + 1:02d}", i < updatable - 1))
    return out


def quirk_text(children: list[Child]) -> str:
    text = f"[{MODULE1_GUID}]\nChildren = "
    text += ",".join(f"FuDevice|{c.instance_id}" for c in children) + "\n"
    for c in children:
        text += (f"\n[{c.instance_id}]\nName = {c.name}\nFlags = updatable,unsigned-payload\n"
                 "VersionFormat = triplet\nVersion = 1.2.2\nProtocol = com.acme.test\n")
    return text


def add_devices(sandbox: Sandbox, children: list[Child]) -> None:
    """The composite device and the quirk children into each daemon; restart it."""
    launcher, table = Launcher(sandbox), ProcessTable(sandbox.pids_file)
    for qube in ("dom0", "sys-usb"):
        daemons.write_fwupd_tree(sandbox, qube, {"CompositeChild": "true"})
        quirk = sandbox.root(qube) / QUIRK
        quirk.parent.mkdir(parents=True, exist_ok=True)
        quirk.write_text(quirk_text([c for c in children if c.qube == qube]))
        daemons.restart_fwupd(sandbox, launcher, table, qube)


def publish_cabs(sandbox: Sandbox, children: list[Child], workdir: Path) -> None:
    signer = trusted_signer(sandbox)
    cabs = []
    for c in children:
        if not c.updatable:
            continue
        tag = c.instance_id.split("\\")[1].lower()
        meta = metainfo(version="1.2.4", component_id=f"org.qubes.fwupd.load.{tag}",
                        guid=c.guid, payload=PAYLOAD_124, name=c.name)  # fmt: skip
        cab = workdir / f"load-{tag}-1.2.4.cab"
        cab.write_bytes(signed_cab(workdir, meta, signer, payload=PAYLOAD_124))
        cabs.append(cab)
    lvfs.publish(sandbox.lvfs_dir, cabs, create_pki(sandbox.pki_dir))


def resign(sandbox: Sandbox, cycle: int) -> None:
    """The same cabs in a catalog signed later, one or two LVFS-shaped components after
    them (dom0 takes the same bytes again as "already current"): the next refresh carries
    new metadata to dom0 and both daemons."""
    lvfs.publish(sandbox.lvfs_dir, [], create_pki(sandbox.pki_dir), generated=1 + cycle % 2)


# ----------------------------------------------------------------------------- sampling
def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def _status_kib(pid: int, field_name: str) -> int:
    for line in _read(f"/proc/{pid}/status").decode(errors="replace").splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def _ns(pid: int, kind: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return ""


def sandbox_processes(sandbox: Sandbox) -> dict[tuple[int, int], str]:
    """(pid, start time) -> name of every live process in a qube's mount or network
    namespace or whose command line or environment names the sandbox's dir."""
    table = ProcessTable(sandbox.pids_file)
    holders = [e for e in table.entries() if e.role == "ns-holder"]
    spaces = {n: e.qube for e in holders for kind in ("mnt", "net") if (n := _ns(e.pid, kind))}
    roles = {e.pid: f"{e.role}:{e.qube}" for e in table.entries()}
    mark = str(sandbox.dir).encode()
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
        if not stat:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        qube = spaces.get(_ns(pid, "mnt")) or spaces.get(_ns(pid, "net"))
        if qube is None and mark not in _read(f"/proc/{pid}/cmdline") + _read(
                f"/proc/{pid}/environ"):  # fmt: skip
            continue
        comm = _read(f"/proc/{pid}/comm").decode(errors="replace").strip()
        found[(pid, int(fields[19]))] = roles.get(pid, f"{comm}:{qube or '-'}")
    return found


def _count_files(directory: Path) -> int:
    return sum(1 for _ in directory.rglob("*")) if directory.exists() else 0


def _dir_names(directory: Path) -> set[str]:
    if not directory.exists():
        return set()
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


@dataclass
class Sample:
    figures: dict[str, float] = field(default_factory=dict)
    processes: dict[tuple[int, int], str] = field(default_factory=dict)
    files: dict[str, set[str]] = field(default_factory=dict)


def watched_dirs(sandbox: Sandbox) -> dict[str, Path]:
    dom0 = Paths(sandbox.root("dom0"))
    return {
        "dom0 sessions": dom0.sessions_dir,
        "dom0 untrusted": dom0.untrusted_dir,
        "dom0 cabs": dom0.cabs_dir,
        "dom0 download": dom0.download_dir,
        "dom0 tmp": sandbox.root("dom0") / "tmp",
        "sys-usb tmp": sandbox.root("sys-usb") / "tmp",
        "sys-firewall tmp": sandbox.root("sys-firewall") / "tmp",
    }


def sample(sandbox: Sandbox, peaks: dict[str, float], seconds: dict[str, float]) -> Sample:
    s = Sample()
    deadline = time.monotonic() + SETTLE_SECONDS
    table = ProcessTable(sandbox.pids_file)
    recorded = {e.pid for e in table.entries() if table.alive(e)}
    while True:  # transient processes of the cycle: a moment to be reaped
        s.processes = sandbox_processes(sandbox)
        if all(pid in recorded for pid, _ in s.processes) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    s.figures["processes"] = len(s.processes)
    for (pid, _), name in sorted(s.processes.items(), key=lambda kv: kv[1]):
        if pid not in recorded and not name.startswith("gpg-agent"):
            continue
        fds = len(os.listdir(f"/proc/{pid}/fd")) if os.path.isdir(f"/proc/{pid}/fd") else 0
        s.figures[f"fds {name}"] = fds
        s.figures[f"rss MiB {name}"] = _status_kib(pid, "VmRSS") / 1024
    for label, directory in watched_dirs(sandbox).items():
        s.files[label] = _dir_names(directory)
        s.figures[f"files {label}"] = len(s.files[label])
    dom0 = Paths(sandbox.root("dom0"))
    s.figures["files dom0 state (all)"] = _count_files(dom0.state_dir)
    s.figures["files dom0 cache (all)"] = _count_files(dom0.cache_dir)
    history = dom0.manager_dir / "history.jsonl"
    s.figures["KiB dom0 history.jsonl"] = (history.stat().st_size / 1024
                                           if history.exists() else 0)  # fmt: skip
    for verb, mib in peaks.items():
        s.figures[f"peak MiB manager {verb}"] = mib
    for verb, secs in seconds.items():
        s.figures[f"s {verb}"] = secs
    return s


# ------------------------------------------------------------------------------ verdicts
# (prefix, tolerance, is it expected to grow): any growth of a count is a leak; RSS gets
# slack for allocator noise; history.jsonl is the update history, meant to grow
TOLERANCES: list[tuple[str, Callable[[float], float], bool]] = [
    ("KiB dom0 history", lambda first: 0, True),
    ("s ", lambda first: 0, True),
    ("rss MiB", lambda first: max(2.0, 0.1 * first), False),
    ("peak MiB", lambda first: max(2.0, 0.1 * first), False),
    ("fds", lambda first: 1, False),
    ("", lambda first: 0, False),
]


def verdict(name: str, series: list[float]) -> str:
    _, tol_of, expected = next(t for t in TOLERANCES if name.startswith(t[0]))
    if expected:
        return "info"
    tol = tol_of(series[0])
    head = statistics.median(series[:5])
    tail = statistics.median(series[-5:])
    steady = sum(b >= a for a, b in itertools.pairwise(series)) >= 0.8 * (len(series) - 1)
    if series[-1] - series[0] > tol and tail - head > tol and (steady or len(series) < 10):
        return "LEAK"
    return "ok"


# ----------------------------------------------------------------------------------- run
_WRAPPER = (  # a fresh small parent: its RUSAGE_CHILDREN is the manager's own peak
    "import pathlib, resource, subprocess, sys\n"
    "code = subprocess.run([sys.executable, '-m', 'broker.cli', *sys.argv[2:]]).returncode\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "pathlib.Path(sys.argv[1]).write_text(str(peak))\n"
    "sys.exit(code)\n"
)


def measured_manager(directory: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """qubes-fwupdmgr in the sandbox's dom0, as the admin runs it, and its peak RSS (MiB)."""
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "QUBES_FWUPD_SANDBOX": str(directory)}
    with tempfile.NamedTemporaryFile(prefix="qfl-peak-") as peak:
        r = subprocess.run([PY, "-c", _WRAPPER, peak.name, *args], capture_output=True,
                           text=True, env=env, cwd=REPO, stdin=subprocess.DEVNULL, check=False)
        kib = int(Path(peak.name).read_text() or 0)
    return r, kib / 1024


def checked(what: str, r_code: int, out: str, ok: tuple[int, ...] = (0,)) -> None:
    if r_code not in ok:
        raise RuntimeError(f"{what}: exit {r_code}:\n{out[-1500:]}")


def revert(sandbox: Sandbox, expected: dict[str, int]) -> None:
    """Both daemons restarted: every test device back at 1.2.2."""
    launcher, table = Launcher(sandbox), ProcessTable(sandbox.pids_file)
    for qube in ("dom0", "sys-usb"):
        daemons.restart_fwupd(sandbox, launcher, table, qube)
    deadline = time.monotonic() + 10
    while True:  # the bus name comes before coldplug ends
        r = Bench(sandbox.dir).manager("get-devices", "--json")
        if r.returncode == 0:
            got = Counter(d.get("Qube") for d in json.loads(r.stdout)["Devices"]
                          if d.get("Version") == "1.2.2")  # fmt: skip
            if all(got[q] >= n for q, n in expected.items()):
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"devices did not come back at 1.2.2: {r.stdout[-800:]!r}")
        time.sleep(0.1)


def count_devices(sandbox: Sandbox) -> tuple[Counter[str], int]:
    r = Bench(sandbox.dir).manager("get-devices", "--json")
    checked("qubes-fwupdmgr get-devices --json", r.returncode, (r.stdout + r.stderr).decode())
    devices = json.loads(r.stdout)["Devices"]
    return Counter(str(d.get("Qube")) for d in devices), sum(
        "updatable" in d.get("Flags", []) for d in devices)  # fmt: skip


def main() -> int:
    cycles = env_int("LOAD_CYCLES", 50, 2)
    wanted = env_int("LOAD_DEVICES", 20, COMPOSITE)
    updatable = min(env_int("LOAD_UPDATABLE", 4, 1), wanted - COMPOSITE + 1)
    warmup = min(WARMUP, cycles // 2)
    t0 = time.monotonic()
    children = plan_children(wanted, updatable)
    samples: list[Sample] = []
    failures: list[str] = []
    per_cycle: list[float] = []
    say(f"sandbox up; {wanted} devices, {updatable} with an update, {cycles} cycles")
    with bench_sandbox() as bench, tempfile.TemporaryDirectory(prefix="qfl-cabs-") as work:
        sandbox = Sandbox(bench.dir)
        add_devices(sandbox, children)
        publish_cabs(sandbox, children, Path(work))
        r = measured_manager(sandbox.dir, "refresh")[0]
        checked("qubes-fwupdmgr refresh", r.returncode, r.stdout + r.stderr)
        listed, flagged = count_devices(sandbox)
        say(f"qubes-fwupdmgr get-devices lists {sum(listed.values())} devices "
            f"({', '.join(f'{q}: {n}' for q, n in sorted(listed.items()))}), "
            f"{flagged} flagged updatable")  # fmt: skip
        at_122 = {q: sum(1 for c in children if c.qube == q) for q in ("dom0", "sys-usb")}
        at_122["sys-usb"] += 1  # the webcam
        baseline: Sample | None = None
        installs = 0
        for cycle in range(1, cycles + 1):
            started = time.monotonic()
            try:
                resign(sandbox, cycle)
                t = time.monotonic()
                refresh, refresh_peak = measured_manager(sandbox.dir, "refresh")
                t_refresh, t = time.monotonic() - t, time.monotonic()
                checked("refresh", refresh.returncode, refresh.stdout + refresh.stderr)
                update, update_peak = measured_manager(sandbox.dir, "update", "-y")
                checked("update -y", update.returncode, update.stdout + update.stderr)
                t_update, t = time.monotonic() - t, time.monotonic()
                done = update.stdout.count("Updated ")
                installs += done
                if done != updatable:
                    raise RuntimeError(f"update -y updated {done} devices, not {updatable}:"
                                       f"\n{update.stdout[-1500:]}")  # fmt: skip
                revert(sandbox, at_122)
                t_revert = time.monotonic() - t
            except RuntimeError as e:
                failures.append(f"cycle {cycle}: {e}")
                say(f"cycle {cycle} FAILED: {e}")
                break
            per_cycle.append(time.monotonic() - started)
            if cycle <= warmup:
                say(f"cycle {cycle} (warm-up): {per_cycle[-1]:.1f} s")
                continue
            s = sample(sandbox, {"refresh": refresh_peak, "update -y": update_peak},
                       {"refresh": t_refresh, "update -y": t_update, "daemons restart": t_revert})
            if baseline is None:
                baseline = s
            else:
                new = {k: v for k, v in s.processes.items() if k not in baseline.processes
                       and not v.startswith("fwupd:")}  # fmt: skip
                if new:
                    failures.append(f"cycle {cycle}: processes left: {sorted(new.values())}")
                for label, names in s.files.items():
                    if left := names - baseline.files[label]:
                        failures.append(f"cycle {cycle}: left in {label}: {sorted(left)[:5]}")
            samples.append(s)
            say(f"cycle {cycle}: {per_cycle[-1]:.1f} s, {int(s.figures['processes'])} "
                "processes")
        say("sandbox down")
    elapsed = time.monotonic() - t0
    lines = []
    leaks = [f for f in failures if "left" in f]
    failures = [f for f in failures if "left" not in f]
    for name in sorted({n for s in samples for n in s.figures}):
        series = [s.figures.get(name, 0.0) for s in samples]
        v = verdict(name, series)
        if v == "LEAK":
            leaks.append(f"{name}: {series[0]:g} -> {series[-1]:g} over {len(series)} cycles")
        lines.append([name, f"{series[0]:.4g}", f"{series[-1]:.4g}", f"{max(series):.4g}", v])
    print(f"make load: {len(per_cycle)}/{cycles} cycles ({warmup} warm-up, "
          f"{len(samples)} sampled), {sum(listed.values())} devices listed "
          f"({', '.join(f'{q}: {n}' for q, n in sorted(listed.items()))}), {installs} "
          f"installs, {elapsed:.0f} s (cycle median "
          f"{statistics.median(per_cycle) if per_cycle else 0:.1f} s)")  # fmt: skip
    head = ["metric", "first", "last", "max", "verdict"]
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    for row in [head, *lines]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    time.sleep(1)  # what down stopped: reaped by now
    after = sorted(sandbox_processes(sandbox).values())
    if after or sandbox.dir.exists():
        leaks.append(f"after down: processes {after}, dir left: {sandbox.dir.exists()}")
    for line in failures + leaks:
        print(f"  {line}")
    if failures:
        print("make load: FAILED (a cycle did not complete)")
        return 2
    if leaks:
        print(f"make load: LEAK ({len(set(leaks))} findings above)")
        return 1
    print("make load: no leak found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
