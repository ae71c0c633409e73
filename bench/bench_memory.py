"""make bench: peak memory of dom0's metadata path on an LVFS-scale catalog and on a hostile
one, on the sandbox's real services, beside fwupd's own growth on the same load.

Lines printed (MiB): the receive service (qubes.FwupdReceiveUpdates, as qrexec runs it) and
`qubes-fwupdmgr get-updates`, each on
- the LVFS-scale catalog (4,400 generated components, ~21 MB of XML: broker.sandbox.lvfs_catalog);
- a hostile catalog, signed by the trusted key: one component of millions of tiny elements,
  ~0.3 MiB of zstd (what once took the receive service to 1.26 GB);
and, as the baseline measured in the same run, the growth of dom0's fwupd daemon when it
loads the LVFS-scale catalog. Exits 1 if a line of ours exceeds LIMIT_MIB.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import fwupd_pid  # noqa: E402

from broker.sandbox import lvfs  # noqa: E402
from broker.sandbox.pki import create_pki  # noqa: E402

LIMIT_MIB = 128
PY = sys.executable


def sandbox_cli(*args: str) -> None:
    subprocess.run([PY, "-m", "broker.sandbox.cli", *args], check=True, capture_output=True)


def manager(directory: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """qubes-fwupdmgr in the sandbox's dom0; its peak RSS (MiB) from a fresh wrapper."""
    code = (
        "import resource, subprocess, sys\n"
        f"r = subprocess.run([{PY!r}, '-m', 'broker.cli', *sys.argv[1:]], capture_output=True)\n"
        "sys.stderr.write(r.stderr.decode())\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(r.returncode)\n"
    )
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "QUBES_FWUPD_SANDBOX": str(directory)}
    r = subprocess.run([PY, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO)
    kib = int(r.stdout.strip().splitlines()[-1])
    return r, kib / 1024


def _status_kib(pid: str, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakWatcher(threading.Thread):
    """The high-water mark (VmHWM) of every process whose command line names ``needle``."""

    def __init__(self, needle: bytes) -> None:
        super().__init__(daemon=True)
        self.needle, self.peak_kib, self.seen, self.stop = needle, 0, 0, threading.Event()

    def run(self) -> None:
        seen: set[str] = set()
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    if self.needle not in Path(f"/proc/{pid}/cmdline").read_bytes():
                        continue
                except OSError:
                    continue
                seen.add(pid)
                hwm = _status_kib(pid, "VmHWM")
                if hwm:
                    self.peak_kib = max(self.peak_kib, hwm)
            self.seen = len(seen)
            time.sleep(0.003)


def refresh_watching_receive(directory: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    watcher = PeakWatcher(b"qubes.FwupdReceiveUpdates")
    watcher.start()
    r, _ = manager(directory, "refresh")
    watcher.stop.set()
    watcher.join()
    if not watcher.seen:
        raise RuntimeError("the receive service was never seen running")
    return r, watcher.peak_kib / 1024


def fwupd_rss_kib(directory: Path, qube: str) -> int:
    return _status_kib(str(fwupd_pid(directory, qube)), "VmRSS") or 0


def publish_hostile(directory: Path, elements: int) -> int:
    """One component of ``elements`` tiny elements, zstd, signed by the sandbox LVFS."""
    lvfs_dir = directory / "lvfs"
    xml = (
        b"<?xml version='1.0' encoding='utf-8'?>\n<components origin=\"lvfs\"><component>"
        b"<id>org.example.tiny</id><releases>" + b"<a/>" * elements + b"</releases>"
        b"</component></components>\n"
    )
    data = zstandard.ZstdCompressor(level=19).compress(xml)
    lvfs._wait_past_previous_signing(lvfs_dir)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "firmware.xml.zst"
        path.write_bytes(data)
        jcat = lvfs.sign_file(create_pki(directory / "pki"), path)
    lvfs._write_atomic(lvfs_dir / "firmware.xml.zst", data)
    lvfs._write_atomic(lvfs_dir / "firmware.xml.zst.jcat", jcat)
    return len(xml)


def main() -> int:
    directory = Path(tempfile.mkdtemp(prefix="qfwb", dir="/tmp"))
    lines: list[tuple[str, float, bool]] = []  # (what, MiB, held to LIMIT_MIB)
    try:
        sandbox_cli("up", "--dir", str(directory))
        sandbox_cli("publish", "--dir", str(directory), "--generated", "4400")
        xml_mib = len(lvfs.catalog_xml(directory / "lvfs", generated=4400)) / 2**20
        before = fwupd_rss_kib(directory, "dom0")
        r, receive = refresh_watching_receive(directory)
        if r.returncode != 0:
            raise RuntimeError(f"refresh of the LVFS-scale catalog failed: {r.stderr}")
        growth = (fwupd_rss_kib(directory, "dom0") - before) / 1024
        what = f"receive service, LVFS-scale catalog ({xml_mib:.1f} MiB XML)"
        lines.append((what, receive, True))
        r, peak = manager(directory, "get-updates")
        lines.append(("get-updates, LVFS-scale catalog", peak, True))
        lines.append(("baseline: dom0 fwupd's RSS growth loading it", growth, False))

        hostile_mib = publish_hostile(directory, 10_000_000) / 2**20
        r, receive = refresh_watching_receive(directory)
        if r.returncode == 0:
            raise RuntimeError("the hostile catalog was accepted")
        cause = r.stderr.strip().splitlines()[-1][:90] if r.stderr.strip() else "?"
        what = f"receive service, hostile catalog ({hostile_mib:.0f} MiB XML): {cause}"
        lines.append((what, receive, True))
        r, peak = manager(directory, "get-updates")
        lines.append(("get-updates after the hostile push", peak, True))
    finally:
        subprocess.run(
            [PY, "-m", "broker.sandbox.cli", "down", "--dir", str(directory)],
            capture_output=True, check=False,
        )  # fmt: skip
        subprocess.run(["rm", "-rf", str(directory)], check=False)
    print(f"bench memory: peak RSS in MiB (ours held to {LIMIT_MIB} MiB)")
    for what, mib, held in lines:
        mark = ("ok" if mib <= LIMIT_MIB else "OVER") if held else "baseline"
        print(f"  {mib:7.1f}  {mark:<8} {what}")
    receive_lvfs, fwupd_growth = lines[0][1], lines[2][1]
    if fwupd_growth > 0:
        ratio = receive_lvfs / fwupd_growth
        print(f"  ratio receive service / fwupd growth, same catalog: {ratio:.2f}")
    return 0 if all(mib <= LIMIT_MIB for _, mib, held in lines if held) else 1


if __name__ == "__main__":
    sys.exit(main())
