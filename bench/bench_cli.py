"""make bench, CLI lines: the admin's commands end to end, each against what plain fwupdmgr
and bare qrexec calls need for the same job, measured in the same run on this machine.

- ``--help``, ``--version`` (``python -m broker.cli`` and the installed entry point): an
  absolute target of 150 ms; ``fwupdmgr --help`` beside them for reference.
- ``get-devices``: ``qubes-fwupdmgr get-devices`` on the sandbox (dom0's and sys-usb's
  fwupd) against ``fwupdmgr get-devices`` on ONE of those daemons plus one bare qrexec call
  of a no-op service in sys-usb from dom0.
- ``update -y``: ``qubes-fwupdmgr update -y WEBCAM`` (sys-usb's fake webcam, 1.2.2 -> 1.2.4:
  download through the UpdateVM, dom0's checks, install by sys-usb's fwupd) against
  ``fwupdmgr install CAB WEBCAM`` of the same cab on sys-usb's daemon, plus the cab floor
  (sha256 twice and one inflate of the cab, in this process) and three bare no-op qrexec
  calls.

The bare qrexec call is made as dom0's Transport makes it (broker/qrexec.py): ``qvm-run
--pass-io --no-gui --service -- sys-usb qubes.BenchNoop``, the sandbox's client on dom0's
PATH, started in dom0's namespaces with dom0's environment (the launcher's). The service
is ``exit 0`` in sys-usb's qubes-rpc dir; dom0's calls skip policy (broker/sandbox/
qrexecd.py, as in Qubes), so no policy file is added.

Between update rounds (untimed) sys-usb's fwupd is restarted (daemons.restart_fwupd: the
test plugin's webcam comes back at 1.2.2; no cab of 1.2.2 exists to install instead, and
the restart takes ~0.1 s) and dom0's cab cache is emptied, so each of our rounds downloads.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from common import (
    FWUPDMGR,
    PY,
    Bench,
    Line,
    bench_sandbox,
    clean_env,
    medians,
    print_table,
    run,
)

from broker.sandbox import daemons
from broker.sandbox.launcher import Launcher, Sandbox
from broker.sandbox.processes import ProcessTable

WEBCAM_GUID = "b585990a-003e-5270-89d5-3705a17f9a43"
WEBCAM_ID = "08d460be0f1f9f128413f816022a6439e0078018"  # the same in both daemons
CAB = "fakedevice124.cab"
QUBE = "sys-usb"  # the webcam is USB: sys-usb's (dom0's daemon sees one too, never used)
NOOP = "qubes.BenchNoop"
ENTRY_POINT = Path(PY).parent / "qubes-fwupdmgr"

HELP_ROUNDS = 15
DEVICES_ROUNDS = 11
UPDATE_ROUNDS = 9
HELP_LIMIT_MS = 150.0
DEVICES_LIMIT = 1.2
UPDATE_LIMIT = 1.5


def say(text: str) -> None:
    print(f"bench cli: {text}", file=sys.stderr, flush=True)


def _checked(what: str, r_code: int, stderr: bytes, ok: tuple[int, ...] = (0,)) -> None:
    if r_code not in ok:
        raise RuntimeError(f"{what}: exit {r_code}: {stderr.decode(errors='replace')[-800:]}")


# ---------------------------------------------------------------------- --help, --version
def _timed(argv: list[str], env: dict[str, str] | None = None) -> Callable[[], float]:
    def once() -> float:
        r = run(argv, env=env or clean_env())
        _checked(" ".join(argv), r.returncode, r.stderr)
        return r.seconds * 1000

    return once


def help_lines() -> list[Line]:
    say(f"--help/--version, {HELP_ROUNDS} rounds")
    runs = {
        "help": _timed([PY, "-m", "broker.cli", "--help"]),
        "version": _timed([PY, "-m", "broker.cli", "--version"]),
        "fwupdmgr help": _timed([FWUPDMGR, "--help"]),
    }
    if ENTRY_POINT.exists():
        runs["entry help"] = _timed([str(ENTRY_POINT), "--help"])
        runs["entry version"] = _timed([str(ENTRY_POINT), "--version"])
    got = medians(runs, HELP_ROUNDS)
    # fwupdmgr --version asks the daemon: its --help (no daemon) is the reference for both
    ref = "baseline: fwupdmgr --help, for reference; the target is absolute"
    lines = [
        Line("--help", got["help"], got["fwupdmgr help"], "ms", HELP_LIMIT_MS, "ms",
             f"python -m broker.cli --help; {ref}"),
        Line("--version", got["version"], got["fwupdmgr help"], "ms", HELP_LIMIT_MS, "ms",
             f"python -m broker.cli --version; {ref}"),
    ]  # fmt: skip
    if "entry help" in got:
        lines += [
            Line("qubes-fwupdmgr --help", got["entry help"], got["fwupdmgr help"], "ms",
                 HELP_LIMIT_MS, "ms", f"the installed entry point ({ENTRY_POINT}); {ref}"),
            Line("qubes-fwupdmgr --version", got["entry version"], got["fwupdmgr help"],
                 "ms", HELP_LIMIT_MS, "ms", "the installed entry point"),
        ]  # fmt: skip
    return lines


# ---------------------------------------------------------------------- the cab floor
def inflate_cab(data: bytes) -> int:
    """Every folder of a cabinet (MS-CAB: stored or MSZIP) inflated; the bytes it gave."""
    if data[:4] != b"MSCF":
        raise ValueError("not a cabinet")
    folders_n, _files_n, flags = struct.unpack_from("<HHH", data, 26)
    offset = 36
    folder_reserve = data_reserve = 0
    if flags & 4:  # cfhdrRESERVE_PRESENT
        header_reserve, folder_reserve, data_reserve = struct.unpack_from("<HBB", data, offset)
        offset += 4 + header_reserve
    if flags & 3:
        raise ValueError("multi-cabinet sets are not handled")
    total = 0
    for _ in range(folders_n):
        start, blocks, kind = struct.unpack_from("<IHH", data, offset)
        offset += 8 + folder_reserve
        at, window = start, b""
        for _ in range(blocks):
            _csum, size, _uncomp = struct.unpack_from("<IHH", data, at)
            at += 8 + data_reserve
            block = data[at : at + size]
            at += size
            if kind & 0xF == 0:  # stored
                out = block
            elif kind & 0xF == 1:  # MSZIP: "CK", then deflate with the last block as history
                if block[:2] != b"CK":
                    raise ValueError("bad MSZIP block")
                d = zlib.decompressobj(-15, zdict=window) if window else zlib.decompressobj(-15)
                out = d.decompress(block[2:]) + d.flush()
            else:
                raise ValueError(f"compression {kind & 0xF} is not handled")
            window = out[-32768:]
            total += len(out)
    return total


def cab_floor(cab: Path, rounds: int = 51) -> float:
    """Seconds (median) for what any receiver of the cab must do at the least: read it,
    sha256 it twice (dom0 against the catalog, the fwupd side again), inflate it once."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        data = cab.read_bytes()
        hashlib.sha256(data).hexdigest()
        hashlib.sha256(data).hexdigest()
        if inflate_cab(data) <= 0:
            raise ValueError(f"{cab}: nothing inflated")
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


# ---------------------------------------------------------------------- in the sandbox
class Cli:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.sandbox = Sandbox(bench.dir.resolve())
        self.launcher = Launcher(self.sandbox)
        self.table = ProcessTable(self.sandbox.pids_file)
        self.cab = bench.lvfs_dir / CAB  # what the mirror serves: the very same bytes

    def install_noop(self) -> None:
        """qubes.BenchNoop in sys-usb: an executable that does nothing, as a service."""
        path = self.sandbox.rpc_dir(QUBE) / NOOP
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)

    def noop_call(self) -> float:
        """One bare qrexec call from dom0, as broker.qrexec's Transport makes it."""
        argv = ["qvm-run", "--pass-io", "--no-gui", "--service", "--", QUBE, NOOP]
        t0 = time.perf_counter()
        proc = self.launcher.popen("dom0", argv, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        _, err = proc.communicate(timeout=60)
        seconds = time.perf_counter() - t0
        _checked(f"qrexec {NOOP}", proc.returncode, err)
        return seconds

    def webcam_version(self) -> str:
        r = self.bench.fwupdmgr(QUBE, "get-devices", "--json")
        _checked("fwupdmgr get-devices --json", r.returncode, r.stderr)
        devices = json.loads(r.stdout).get("Devices", [])
        return next(str(d.get("Version")) for d in devices if WEBCAM_GUID in d.get("Guid", []))

    def reset(self) -> None:
        """The webcam back at 1.2.2 and dom0's cab cache empty (untimed)."""
        daemons.restart_fwupd(self.sandbox, self.launcher, self.table, QUBE)
        cabs = self.launcher.paths("dom0").cabs_dir
        for p in cabs.glob("*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        for _ in range(50):  # the restarted daemon answers on the bus before coldplug ends
            try:
                if self.webcam_version() == "1.2.2":
                    return
            except (StopIteration, RuntimeError, ValueError):
                pass
            time.sleep(0.05)
        raise RuntimeError("sys-usb's webcam did not come back at 1.2.2")

    # the rounds
    def ours_get_devices(self) -> float:
        r = self.bench.manager("get-devices")
        _checked("qubes-fwupdmgr get-devices", r.returncode, r.stderr)
        return r.seconds

    def peer_get_devices(self) -> float:
        r = self.bench.fwupdmgr(QUBE, "get-devices")
        _checked("fwupdmgr get-devices", r.returncode, r.stderr)
        return r.seconds + self.noop_call()

    def ours_update(self) -> float:
        self.reset()
        r = self.bench.manager("update", "-y", WEBCAM_ID)
        _checked("qubes-fwupdmgr update -y", r.returncode, r.stdout + r.stderr)
        if (v := self.webcam_version()) != "1.2.4":
            raise RuntimeError(f"qubes-fwupdmgr update -y left the webcam at {v}")
        return r.seconds

    def peer_update(self, floor: float) -> float:
        self.reset()
        r = self.bench.fwupdmgr(QUBE, "install", str(self.cab), WEBCAM_ID, "-y")
        _checked("fwupdmgr install", r.returncode, r.stdout + r.stderr)
        if (v := self.webcam_version()) != "1.2.4":
            raise RuntimeError(f"fwupdmgr install left the webcam at {v}")
        return r.seconds + floor + sum(self.noop_call() for _ in range(3))


def sandbox_lines() -> list[Line]:
    say("sandbox up")
    with bench_sandbox() as bench:
        cli = Cli(bench)
        cli.install_noop()
        cli.noop_call()  # warm: the first call pays for page cache misses
        say("qubes-fwupdmgr refresh")
        r = bench.manager("refresh")
        _checked("qubes-fwupdmgr refresh", r.returncode, r.stdout + r.stderr, ok=(0, 2))
        noop = medians({"noop": cli.noop_call}, 11)["noop"]

        say(f"get-devices, {DEVICES_ROUNDS} rounds")
        cli.ours_get_devices()  # warm
        dev = medians({"ours": cli.ours_get_devices, "peer": cli.peer_get_devices},
                      DEVICES_ROUNDS)  # fmt: skip

        floor = cab_floor(cli.cab)
        say(f"update -y, {UPDATE_ROUNDS} rounds (cab floor {floor * 1000:.2f} ms)")
        upd = medians({"ours": cli.ours_update, "peer": lambda: cli.peer_update(floor)},
                      UPDATE_ROUNDS)  # fmt: skip
        cli.reset()
    return [
        Line("get-devices", dev["ours"], dev["peer"], "s", DEVICES_LIMIT,
             note=f"baseline: fwupdmgr get-devices on {QUBE}'s fwupd + one bare no-op qrexec "
                  f"call dom0 -> {QUBE} (that call alone: {noop * 1000:.0f} ms)"),
        Line("update -y", upd["ours"], upd["peer"], "s", UPDATE_LIMIT,
             note=f"{CAB} on {QUBE}'s webcam 1.2.2 -> 1.2.4; baseline: fwupdmgr install of "
                  f"the cab on {QUBE}'s fwupd + cab floor ({floor * 1000:.2f} ms: sha256 x2 "
                  f"+ inflate) + 3 bare no-op qrexec calls; between rounds (untimed) "
                  f"{QUBE}'s fwupd restarted (webcam back at 1.2.2) and dom0's cab cache "
                  "emptied"),
    ]  # fmt: skip


def collect() -> list[Line]:
    t0 = time.monotonic()
    lines = help_lines()
    lines += sandbox_lines()
    say(f"done in {time.monotonic() - t0:.0f} s")
    return lines


if __name__ == "__main__":
    print_table(collect())
