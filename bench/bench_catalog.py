"""make bench, catalog lines: dom0's verify + decompress + parse of LVFS-scale catalogs, and
the whole `qubes-fwupdmgr refresh`, each against fwupd's own load of the same files.

- "catalog verify+parse Nx": dom0's own code path (broker.metadata.verify_metadata_files,
  open_catalog, parse_catalog, as broker.receive calls them, with the sandbox dom0's
  Config and Paths) in a child python that times the work alone (not its interpreter start
  or imports: the peer is a running daemon) and reports its peak RSS; against
  `fwupdmgr refresh FILE SIG lvfs` on the sandbox dom0's fwupd (wall time), at 4,400
  generated components (the LVFS today), 2x and 4x. fwupd drops metadata whose signing
  time is not strictly newer than what it holds (`--force` does not help a refresh from
  files), so each load gets the same bytes with a fresh .jcat, a second after the last.
  The daemon is restarted (untimed) before each load: every load then starts from the
  same state, and its RSS growth is that load's, not what earlier loads left behind.
- "catalog peak RSS Nx": our child's peak RSS against the daemon's VmRSS growth on that
  load (VmRSS after - before); "catalog peak RSS flat 1x->4x": our peak at 4x against ours
  at 1x.
- "whole refresh": `qubes-fwupdmgr refresh` (UpdateVM download, dom0 receive, dom0's and
  sys-usb's fwupd loading) of a catalog no one holds yet (a variant: the same releases
  plus a comment, freshly signed) against a direct `fwupdmgr refresh` of the same bytes,
  re-signed, on dom0's fwupd; at the sandbox's own catalog and at the LVFS-scale one.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zstandard
from common import PY, Bench, Line, bench_sandbox, clean_env, fwupd_pid, medians, run

from broker.sandbox import daemons, lvfs
from broker.sandbox.launcher import Launcher, Sandbox
from broker.sandbox.pki import create_pki
from broker.sandbox.processes import ProcessTable

LVFS_TODAY = 4400  # generated components: the LVFS's size today
SCALES = (1, 2, 4)
ROUNDS_PARSE = 3
ROUNDS_WHOLE_SMALL = 5
ROUNDS_WHOLE_LVFS = 3
META = "firmware.xml.zst"
REMOTE_ID = daemons.REMOTE_ID

# dom0's metadata path, as broker.receive runs it, timed in-process
_OURS = r"""
import json, os, sys, time
from pathlib import Path
from broker.config import Config, Paths
from broker.metadata import open_catalog, parse_catalog, verify_metadata_files

paths = Paths(Path(sys.argv[1]) / "vm/dom0")
config = Config.load(paths)
remote = config.remote(sys.argv[3])
files = Path(sys.argv[2])


def hwm_kib():
    # not getrusage's ru_maxrss: Linux carries the forking parent's RSS across exec into it
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])


before = hwm_kib()
t0 = time.perf_counter()
data_fd = os.open(files / remote.metadata_name, os.O_RDONLY)
sig_fd = os.open(files / remote.signature_name, os.O_RDONLY)
verified = verify_metadata_files(data_fd, sig_fd, remote, paths, config)
with open_catalog(data_fd, remote.metadata_name, config.limits) as stream:
    catalog = parse_catalog(stream, remote, config.limits)
seconds = time.perf_counter() - t0
peak = hwm_kib()
print(json.dumps({"seconds": seconds, "peak_kib": peak, "before_kib": before,
                  "releases": len(catalog.releases)}))
"""

# an LVFS-scale catalog, compressed as the sandbox LVFS publishes it (in a child: the
# 4x catalog's tree would stay in this process's heap)
_GENERATE = r"""
import sys
from pathlib import Path
from broker.sandbox import lvfs
xml = lvfs.catalog_xml(Path(sys.argv[1]), generated=int(sys.argv[2]))
Path(sys.argv[3]).write_bytes(lvfs._compress(sys.argv[3], xml))
"""


def _progress(msg: str) -> None:
    print(f"bench catalog: {msg}", file=sys.stderr, flush=True)


class _Signer:
    """Signs as the sandbox LVFS, each signature a second after the last one any daemon
    may hold (fwupd: 'signing timestamp was not newer', 1 s resolution)."""

    def __init__(self, bench: Bench) -> None:
        self.pki = create_pki(bench.dir / "pki")
        self.lvfs_dir = bench.lvfs_dir
        self.last = time.time()

    def _wait(self) -> None:
        lvfs._wait_past_previous_signing(self.lvfs_dir)
        delay = int(self.last) + 1 + 0.05 - time.time()
        if delay > 0:
            time.sleep(delay)

    def resign(self, data: Path) -> Path:
        """A fresh .jcat beside ``data`` (the same bytes, signed now)."""
        self._wait()
        jcat = data.with_name(data.name + ".jcat")
        lvfs._write_atomic(jcat, lvfs.sign_file(self.pki, data))
        self.last = time.time()
        return jcat

    def publish(self, xml: bytes, scratch: Path) -> None:
        """``xml`` as the mirror's firmware.xml.zst and its .jcat."""
        self._wait()
        data = scratch / META
        data.write_bytes(zstandard.ZstdCompressor(level=3).compress(xml))
        jcat = lvfs.sign_file(self.pki, data)
        lvfs._write_atomic(self.lvfs_dir / META, data.read_bytes())
        lvfs._write_atomic(self.lvfs_dir / f"{META}.jcat", jcat)
        self.last = time.time()


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _restart_dom0_fwupd(directory: Path) -> int:
    sandbox = Sandbox(directory)
    daemons.restart_fwupd(sandbox, Launcher(sandbox), ProcessTable(sandbox.pids_file), "dom0")
    time.sleep(0.2)  # let it settle (coldplug of the test device) before it is measured
    return fwupd_pid(directory, "dom0")


def _fwupd_refresh(bench: Bench, qube: str, data: Path, jcat: Path) -> float:
    r = bench.fwupdmgr(qube, "refresh", str(data), str(jcat), REMOTE_ID)
    if r.returncode != 0:
        raise RuntimeError(f"fwupdmgr refresh {data} on {qube}: exit {r.returncode}: "
                           f"{(r.stdout + r.stderr).decode(errors='replace')[-400:]}")  # fmt: skip
    return r.seconds


def _generate(bench: Bench, work: Path) -> dict[int, Path]:
    files = {}
    for scale in SCALES:
        n = LVFS_TODAY * scale
        directory = work / f"{scale}x"
        directory.mkdir()
        data = directory / META
        _progress(f"generating {n} components ({scale}x)")
        r = run([PY, "-c", _GENERATE, str(bench.lvfs_dir), str(n), str(data)], env=clean_env())
        if r.returncode != 0:
            raise RuntimeError(f"generating {n} components: {r.stderr.decode()[-400:]}")
        files[scale] = data
    return files


def _verify_parse_lines(bench: Bench, signer: _Signer, files: dict[int, Path]) -> list[Line]:
    ours_mem: dict[int, list[float]] = {s: [] for s in SCALES}
    ours_before: dict[int, list[float]] = {s: [] for s in SCALES}
    releases: dict[int, int] = {}
    fwupd_growth: dict[int, list[float]] = {s: [] for s in SCALES}
    fwupd_peak: dict[int, list[float]] = {s: [] for s in SCALES}

    def ours(scale: int) -> Callable[[], float]:
        def once() -> float:
            data = files[scale]
            if not data.with_name(META + ".jcat").exists():
                signer.resign(data)
            r = run([PY, "-c", _OURS, str(bench.dir), str(data.parent), REMOTE_ID],
                    env=clean_env())  # fmt: skip
            if r.returncode != 0:
                raise RuntimeError(f"dom0's verify+parse at {scale}x: {r.stderr.decode()[-600:]}")
            got = json.loads(r.stdout.decode().strip().splitlines()[-1])
            ours_mem[scale].append(got["peak_kib"] / 1024)
            ours_before[scale].append(got["before_kib"] / 1024)
            releases[scale] = got["releases"]
            return float(got["seconds"])

        return once

    def fwupd(scale: int) -> Callable[[], float]:
        def once() -> float:
            data = files[scale]
            jcat = signer.resign(data)
            pid = _restart_dom0_fwupd(bench.dir)
            # VmHWM from here on (root may reset it; only for the note)
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            before = _status_kib(pid)
            seconds = _fwupd_refresh(bench, "dom0", data, jcat)
            after = _status_kib(pid)
            fwupd_growth[scale].append((after["VmRSS"] - before["VmRSS"]) / 1024)
            fwupd_peak[scale].append((after.get("VmHWM", 0) - before["VmRSS"]) / 1024)
            return seconds

        return once

    runs: dict[str, Callable[[], float]] = {}
    for scale in SCALES:
        runs[f"ours {scale}x"] = ours(scale)
        runs[f"fwupd {scale}x"] = fwupd(scale)
    _progress(f"verify+parse vs fwupd's load, {ROUNDS_PARSE} rounds of {len(runs)}")
    got = medians(runs, ROUNDS_PARSE)

    med = statistics.median
    lines = []
    for scale in SCALES:
        n = LVFS_TODAY * scale
        size_mib = files[scale].stat().st_size / 2**20
        lines.append(Line(
            f"catalog verify+parse {scale}x ({n} components)", got[f"ours {scale}x"],
            got[f"fwupd {scale}x"], "s", 0.4,
            note=(f"{size_mib:.1f} MiB zstd, {releases[scale]} releases; ours in-process "
                  "(no interpreter start), fwupd = fwupdmgr refresh FILE SIG lvfs on a "
                  "just-restarted dom0 fwupd, wall time"),
        ))  # fmt: skip
    for scale in SCALES:
        n = LVFS_TODAY * scale
        lines.append(Line(
            f"catalog peak RSS {scale}x ({n} components)", med(ours_mem[scale]),
            med(fwupd_growth[scale]), "MiB", 0.5,
            note=(f"ours = the child's whole peak RSS ({med(ours_before[scale]):.0f} MiB of it "
                  "interpreter + imports); baseline = dom0 fwupd's VmRSS growth over the load "
                  f"(its peak growth, VmHWM: {med(fwupd_peak[scale]):.0f} MiB)"),
        ))  # fmt: skip
    lines.append(Line(
        f"catalog peak RSS flat 1x->4x ({LVFS_TODAY}->{LVFS_TODAY * 4} components)",
        med(ours_mem[4]), med(ours_mem[1]), "MiB", 1.25,
        note="figure = our peak RSS at 4x, baseline = our peak RSS at 1x: memory must stay "
             "flat (streaming) as the catalog grows 4x",
    ))  # fmt: skip
    return lines


def _whole_refresh_line(bench: Bench, signer: _Signer, generated: int, rounds: int,
                        work: Path) -> Line:  # fmt: skip
    scratch = work / f"whole-{generated}"
    scratch.mkdir()
    base_xml = lvfs.catalog_xml(bench.lvfs_dir, generated=generated)
    messages: list[str] = []

    def ours() -> float:
        stamp = f"<!-- bench variant {time.time()} -->\n".encode()
        signer.publish(base_xml + stamp, scratch)
        r = bench.manager("refresh")
        out = r.stdout.decode(errors="replace")
        if r.returncode != 0 or out.count("loaded the metadata") < 2:
            raise RuntimeError(f"qubes-fwupdmgr refresh: exit {r.returncode}: {out[-300:]}"
                               f"{r.stderr.decode(errors='replace')[-300:]}")  # fmt: skip
        messages.append(out.strip().splitlines()[0])
        return r.seconds

    def fwupd() -> float:
        # the bytes the refresh just carried, signed again: dom0's fwupd holds them now
        return _fwupd_refresh(bench, "dom0", scratch / META, signer.resign(scratch / META))

    if generated:
        what = f"1x LVFS-scale ({generated} components)"
    else:
        components = len(re.findall(rb"<component[\s>]", base_xml))
        what = f"sandbox catalog ({components} component{'s' * (components != 1)})"
    _progress(f"whole refresh, {what}, {rounds} rounds")
    got = medians({"ours": ours, "fwupd": fwupd}, rounds)
    accepted = messages[-1].split(": ", 2)[-1] if messages else ""
    size_kib = (scratch / META).stat().st_size / 1024
    return Line(
        f"whole refresh, {what}", got["ours"], got["fwupd"], "s", 1.5,
        note=(f"{size_kib:.0f} KiB zstd ({accepted}); qubes-fwupdmgr refresh (UpdateVM "
              "download, dom0 receive, dom0 + sys-usb fwupd load) vs fwupdmgr refresh FILE "
              "SIG lvfs of the same bytes on dom0's fwupd"),
    )  # fmt: skip


def collect() -> list[Line]:
    started = time.monotonic()
    _progress("sandbox up")
    with bench_sandbox() as bench:
        work = Path(tempfile.mkdtemp(prefix="catalog-", dir=bench.dir))
        signer = _Signer(bench)
        files = _generate(bench, work)
        lines = _verify_parse_lines(bench, signer, files)
        lines.append(_whole_refresh_line(bench, signer, 0, ROUNDS_WHOLE_SMALL, work))
        if time.monotonic() - started < 150:
            lines.append(_whole_refresh_line(bench, signer, LVFS_TODAY, ROUNDS_WHOLE_LVFS, work))
        else:
            _progress("skipping the LVFS-scale whole refresh: out of time")
        _progress("sandbox down")
    return lines


if __name__ == "__main__":
    from common import print_table

    print_table(collect())
