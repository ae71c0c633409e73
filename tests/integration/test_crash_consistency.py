"""kill -9 at seeded points of refresh, cab transfer and install (issue 21).

Each scenario first records, in a clean run, every side effect of the role it kills (a file
opened for writing, a rename, an unlink, a lock, a connect, a process start: tests/faults.py).
The seed then picks points among them, and for each point the run is repeated with that
process killed just before that side effect. After every kill:

- dom0's trusted cache and state are old or new, complete: each remote's link names a whole
  generation whose signatures verify and whose records agree with the file; every cached cab
  is the file its name's sha256 says; every session, history and state file parses;
- nothing a killed write left stands under a final name (temp names only, swept later);
- no process of the killed run lives on once the rest of it has finished, and no lock of
  dom0's is held;
- sessions the run left expire within their lifetime;
- the next run succeeds (or says there is nothing to do), after which no leftover remains
  in the trusted dirs.

At the end, leftovers in the untrusted and sessions dirs are aged past any live transfer and
one more refresh must sweep them. ``CRASH_SEED`` replays a run's points; ``CRASH_POINTS``
scales how many (24 in ``make test``, 300 in ``make crash``).
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from broker.cabinet import ExpectedRelease
from broker.config import Config
from broker.sandbox import daemons, lvfs
from broker.sandbox.launcher import Launcher, Sandbox
from broker.sandbox.pki import SandboxPki, create_pki
from broker.sandbox.processes import ProcessTable
from broker.session import ExpectedFile, Sessions
from tests.adversarial.hostile import (
    FAKE_ID,
    RECEIVE,
    frame,
    publish_real,
    publish_variant,
    sandbox_processes,
)
from tests.faults import TEMP, Faults, dom0_problems, ran, settle
from tests.sandbox_helpers import (
    WEBCAM_GUID,
    call_from,
    manager,
    qube_paths,
    webcam_version,
)

pytestmark = pytest.mark.sandbox

SEED = int(os.environ.get("CRASH_SEED", "2112"))
POINTS = int(os.environ.get("CRASH_POINTS", "24"))  # make crash: 300
# each scenario's share of the points: the cheap direct pushes take most
SHARES = {"receive-metadata": 0.35, "receive-cab": 0.25, "refresh": 0.22, "update": 0.18}


def points(scenario: str, role: str, count: int, share_of: int) -> list[int]:
    """The seeded points for one role of one scenario: ``share_of`` of the scenario's
    points, spread over the role's ``count`` side effects (1-based, ascending)."""
    rng = random.Random(f"{SEED}:{scenario}:{role}")  # noqa: S311  repeatable, not secret
    k = min(count, share_of)
    return sorted(rng.sample(range(1, count + 1), k))


def split(scenario: str, weights: dict[str, int]) -> dict[str, int]:
    """The scenario's share of POINTS, split between roles by weight (at least 1 each)."""
    total = max(len(weights), round(POINTS * SHARES[scenario]))
    scale = sum(weights.values())
    return {role: max(1, round(total * w / scale)) for role, w in weights.items()}


# --------------------------------------------------------------------------- checks
@dataclass
class Point:
    scenario: str
    role: str
    at: int
    struck: str | None = None

    def __str__(self) -> str:
        where = self.struck or "(did not strike)"
        return f"CRASH_SEED={SEED} {self.scenario} {self.role}@{self.at}: {where}"


class Crashes:
    """Runs each point: arm, run, check, recover, check again; collects what failed."""

    def __init__(self, sandbox: Sandbox, faults: Faults) -> None:
        self.sandbox, self.faults = sandbox, faults
        self.failures: list[str] = []
        self.struck = 0

    def record(self, run: Callable[[], object]) -> dict[str, list[list[str]]]:
        with self.faults.recording() as rec:
            run()
        return rec

    def point(
        self,
        point: Point,
        run: Callable[[], object],
        recover: Callable[[], str | None],
    ) -> None:
        before = frozenset(sandbox_processes(self.sandbox))
        t1 = time.monotonic()
        with self.faults.armed(point.role, point.at):
            run()
            t2 = time.monotonic()
            left = settle(self.sandbox, before)
            point.struck = self.faults.struck(point.role)
        self.struck += point.struck is not None
        t3 = time.monotonic()
        problems = [f"process left: {v}" for v in left.values()]
        problems += dom0_problems(self.sandbox, strict=False)
        t4 = time.monotonic()
        failed = recover()
        if failed:
            problems.append(f"the next run failed: {failed}")
        t5 = time.monotonic()
        settle(self.sandbox, before, timeout=10)
        problems += [f"after the next run: {p}" for p in dom0_problems(self.sandbox, True)]
        t6 = time.monotonic()
        print(f"point {point}: killed run {t2 - t1:.1f} s, checks {t4 - t3 + t6 - t5:.1f} s, "
              f"next run {t5 - t4:.1f} s{' FAILED' if problems else ''}")
        if problems:
            self.failures.append(f"{point}\n    " + "\n    ".join(problems))

    def assert_ok(self, wanted: int) -> None:
        print(f"{wanted} points, {self.struck} struck, {len(self.failures)} failed")
        assert not self.failures, "\n".join(self.failures)
        # a point may miss (a side effect only some runs have); most must strike
        assert self.struck >= 0.8 * wanted, f"only {self.struck} of {wanted} points struck"


# --------------------------------------------------------------------------- scenarios
class Signer:
    """The mirror's catalog, signed again (a new signing time) whenever one was used up:
    dom0 takes metadata only once, and only signed later than what it holds."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.pki = lvfs_pki(sandbox)
        self.xml = lvfs.catalog_xml(sandbox.lvfs_dir)
        self.last = 0
        self.data = self.jcat = b""
        self.fresh()

    def fresh(self) -> None:
        # strictly later than any signing dom0 holds (1 s resolution)
        while int(time.time()) <= self.last:
            time.sleep(0.05)
        self.last = int(time.time())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "firmware.xml.zst"
            path.write_bytes(zstandard.ZstdCompressor(level=3).compress(
                self.xml + f"<!-- crash {time.time()} -->\n".encode()))  # fmt: skip
            self.data, self.jcat = path.read_bytes(), lvfs.sign_file(self.pki, path)


def lvfs_pki(sandbox: Sandbox) -> SandboxPki:
    return create_pki(sandbox.pki_dir)


def push(
    sandbox: Sandbox,
    kind: str,
    files: list[tuple[ExpectedFile, bytes]],
    release: ExpectedRelease | None = None,
) -> str | None:
    """What the UpdateVM does once dom0 has opened a session for these files: push them to
    dom0's real receive service. None if dom0 took them, else what it said."""
    sessions = Sessions(qube_paths(sandbox, "dom0").sessions_dir)
    expected = tuple(f for f, _ in files)
    session = sessions.open(kind, "lvfs", expected, 600, release, updatevm="sys-firewall")
    try:
        body = frame([(f.name, len(b)) for f, b in files], nonce=session.nonce)
        body += b"".join(b for _, b in files)
        r = call_from(sandbox, "sys-firewall", "dom0", RECEIVE, body)
        outcome = sessions.outcome(session.nonce)
        if outcome is None or not outcome.ok:
            return f"exit {r.returncode}: {r.stderr.decode(errors='replace').strip()}"
        return None
    finally:
        sessions.close(session.nonce)


def push_metadata(sandbox: Sandbox, data: bytes, jcat: bytes) -> str | None:
    limits = Config.load(qube_paths(sandbox, "dom0")).limits
    return push(sandbox, "metadata", [
        (ExpectedFile("firmware.xml.zst", limits.metadata_max_bytes), data),
        (ExpectedFile("firmware.xml.zst.jcat", limits.jcat_max_bytes), jcat),
    ])  # fmt: skip


def push_cab(sandbox: Sandbox, cab: bytes, release: ExpectedRelease) -> str | None:
    sha256 = hashlib.sha256(cab).hexdigest()
    expected = ExpectedFile("fakedevice124.cab", len(cab), sha256, len(cab))
    return push(sandbox, "cab", [(expected, cab)], release)


def test_kill_receive_during_metadata_push(faultbox: tuple[Sandbox, Faults]) -> None:
    sandbox, faults = faultbox
    crashes = Crashes(sandbox, faults)
    signer = Signer(sandbox)
    rec = crashes.record(lambda: push_metadata(sandbox, signer.data, signer.jcat))
    (events,) = rec["receive"]
    signer.fresh()
    wanted = split("receive-metadata", {"receive": 1})["receive"]
    for at in points("receive-metadata", "receive", len(events), wanted):
        # the same bytes as the recovery push: fresh for the killed run, current after
        crashes.point(
            Point("receive-metadata", "receive", at),
            lambda: push_metadata(sandbox, signer.data, signer.jcat),
            lambda: push_metadata(sandbox, signer.data, signer.jcat),
        )
        signer.fresh()
    crashes.assert_ok(wanted)


def test_kill_receive_during_cab_push(faultbox: tuple[Sandbox, Faults]) -> None:
    sandbox, faults = faultbox
    crashes = Crashes(sandbox, faults)
    cab = (sandbox.lvfs_dir / "fakedevice124.cab").read_bytes()
    release = ExpectedRelease(FAKE_ID, "1.2.4", (WEBCAM_GUID,))
    rec = crashes.record(lambda: push_cab(sandbox, cab, release))
    (events,) = rec["receive"]
    wanted = split("receive-cab", {"receive": 1})["receive"]
    for at in points("receive-cab", "receive", len(events), wanted):
        crashes.point(
            Point("receive-cab", "receive", at),
            lambda: push_cab(sandbox, cab, release),
            lambda: push_cab(sandbox, cab, release),
        )
    crashes.assert_ok(wanted)


def test_kill_during_refresh(faultbox: tuple[Sandbox, Faults]) -> None:
    """The manager, the UpdateVM's download and dom0's receive, each killed mid-refresh."""
    sandbox, faults = faultbox
    crashes = Crashes(sandbox, faults)
    publish_variant(sandbox, "crash")
    rec = crashes.record(lambda: manager(sandbox, "refresh"))
    counts = {role: len(procs[0]) for role, procs in rec.items() if role != "usbvm"}
    wanted = split("refresh", {"manager": 2, "download": 2, "receive": 1})
    total = 0
    for role, count in sorted(counts.items()):
        for at in points("refresh", role, count, wanted[role]):
            publish_variant(sandbox, "crash")
            crashes.point(
                Point("refresh", role, at),
                lambda: manager(sandbox, "refresh"),
                lambda: ran(manager(sandbox, "refresh")),
            )
            total += 1
    crashes.assert_ok(total)


def test_kill_during_update(faultbox: tuple[Sandbox, Faults]) -> None:
    """The manager, the UpdateVM, dom0's receive and sys-usb's agent, each killed while the
    webcam's 1.2.4 cab is fetched and installed; the next update gets it to 1.2.4."""
    sandbox, faults = faultbox
    crashes = Crashes(sandbox, faults)
    publish_real(sandbox)
    assert ran(manager(sandbox, "refresh")) is None

    def reset() -> None:
        manager(sandbox, "clean")
        daemons.restart_fwupd(sandbox, Launcher(sandbox), ProcessTable(sandbox.pids_file),
                              "sys-usb")  # fmt: skip
        assert webcam_version(sandbox, "sys-usb") == "1.2.2"

    def recover() -> str | None:
        failed = ran(manager(sandbox, "update", "-y"))
        if failed is None and webcam_version(sandbox, "sys-usb") != "1.2.4":
            failed = f"the webcam is at {webcam_version(sandbox, 'sys-usb')} after the next run"
        return failed

    reset()
    rec = crashes.record(lambda: manager(sandbox, "update", "-y"))
    counts = {role: max(len(p) for p in procs) for role, procs in rec.items()}
    wanted = split("update", {"manager": 2, "usbvm": 2, "receive": 1, "download": 1})
    total = 0
    for role, count in sorted(counts.items()):
        for at in points("update", role, count, wanted[role]):
            reset()
            crashes.point(
                Point("update", role, at),
                lambda: manager(sandbox, "update", "-y"),
                recover,
            )
            total += 1
    crashes.assert_ok(total)


def test_leftovers_of_killed_runs_are_swept(faultbox: tuple[Sandbox, Faults]) -> None:
    """Received files and temp files that kills left in dom0 go once they are older than
    any live transfer or write: the next refresh's tidy removes them."""
    sandbox, faults = faultbox
    paths = qube_paths(sandbox, "dom0")
    limits = Config.load(paths).limits
    crashes = Crashes(sandbox, faults)
    signer = Signer(sandbox)
    # a receive killed while the data is written (a received file left), and a manager
    # killed with its session pending
    for at in (4, 5):
        crashes.point(Point("sweep", "receive", at),
                      lambda: push_metadata(sandbox, signer.data, signer.jcat),
                      lambda: None)  # fmt: skip
    left = list(paths.untrusted_dir.iterdir())
    assert left, "the kills left nothing to sweep: the points moved"
    (paths.manager_dir / ".history.jsonl.0badc0de.tmp").write_bytes(b"{\"half")
    (paths.sessions_dir / ".0123.outcome.0badc0de.tmp").write_bytes(b"{")
    old = time.time() - limits.transfer_seconds - limits.session_seconds - 120
    for d in (paths.untrusted_dir, paths.manager_dir, paths.sessions_dir):
        for p in d.iterdir():
            os.utime(p, (old, old), follow_symlinks=False)
    publish_variant(sandbox, "sweep")
    assert ran(manager(sandbox, "refresh")) is None
    assert list(paths.untrusted_dir.iterdir()) == []
    assert [p.name for p in paths.sessions_dir.iterdir()] == []
    assert not [p.name for p in paths.manager_dir.iterdir() if TEMP.fullmatch(p.name)]
    assert dom0_problems(sandbox, strict=True) == []
