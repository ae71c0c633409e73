"""kill -9 at a chosen side effect of a chosen process in the sandbox (the crash tests).

:class:`Faults` puts tests/faults_site.py where the sandbox's launcher makes a qube's
Python import it first (``Sandbox.faults_site``: in the qube's own tree, all a qube can
see), then, per run, either records what each role does (:meth:`recording`) or arms one
kill (:meth:`armed`). Roles, and the qube each runs in: ``manager`` (dom0's
qubes-fwupdmgr), ``receive`` (dom0's qubes.FwupdReceiveUpdates), ``download`` (the
UpdateVM's qubes.FwupdDownload), ``usbvm`` (sys-usb's qubes.FwupdUsbvm).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker.config import Config, Paths
from broker.metadata import ACCEPTED_NAME, INDEX_NAME, MetadataStore, verify_metadata_files
from broker.sandbox.launcher import Sandbox
from tests.adversarial.hostile import sandbox_processes
from tests.sandbox_helpers import qube_paths

_SITE = Path(__file__).with_name("faults_site.py")
ROLE_QUBE = {"manager": "dom0", "receive": "dom0", "download": "sys-firewall",
             "usbvm": "sys-usb"}  # fmt: skip


class Faults:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.qubes = sorted(set(ROLE_QUBE.values()))

    def _dir(self, qube: str) -> Path:
        return self.sandbox.faults_site(qube).parent

    def install(self) -> None:
        for qube in self.qubes:
            site = self.sandbox.faults_site(qube)
            site.mkdir(parents=True, exist_ok=True)
            # dom0's services run as its login user: they must read the hook, write marks
            site.parent.chmod(0o1777)
            site.chmod(0o755)
            target = site / "sitecustomize.py"
            shutil.copyfile(_SITE, target)
            target.chmod(0o644)

    def remove(self) -> None:
        for qube in self.qubes:
            shutil.rmtree(self._dir(qube), ignore_errors=True)

    def _clear(self) -> None:
        for qube in self.qubes:
            for name in ("plan.json", "killed"):
                (self._dir(qube) / name).unlink(missing_ok=True)
            shutil.rmtree(self._dir(qube) / "record", ignore_errors=True)

    @contextmanager
    def recording(self) -> Iterator[dict[str, list[list[str]]]]:
        """Each role's side effects during the block, one list per process in start
        order (filled in when the block ends)."""
        self._clear()
        for qube in self.qubes:
            (self._dir(qube) / "record").mkdir()
            (self._dir(qube) / "record").chmod(0o1777)
        out: dict[str, list[list[str]]] = {}
        try:
            yield out
        finally:
            # named ROLE.START_NS.PID
            files = [p for q in self.qubes for p in (self._dir(q) / "record").iterdir()]
            for path in sorted(files, key=lambda p: int(p.name.split(".")[1])):
                role = path.name.split(".")[0]
                out.setdefault(role, []).append(path.read_text().splitlines())
            self._clear()

    @contextmanager
    def armed(
        self, role: str, at: int, swap: tuple[Path, Path] | None = None, mark: bool = False
    ) -> Iterator[None]:
        """The first process of ``role`` to reach its ``at``-th side effect dies there; or
        with ``swap`` (target, source), changes target to source's bytes there; or with
        ``mark``, only says it got there (:meth:`struck`) and goes on."""
        self._clear()
        plan = self._dir(ROLE_QUBE[role]) / "plan.json"
        doc: dict[str, object] = {"role": role, "at": at, "mark": mark}
        if swap is not None:
            doc["swap"] = [str(swap[0]), str(swap[1])]
        plan.write_text(json.dumps(doc))
        plan.chmod(0o644)
        try:
            yield
        finally:
            plan.unlink(missing_ok=True)

    def struck(self, role: str) -> str | None:
        """Where the armed kill struck (``role pid n what``), or None if it did not."""
        try:
            return (self._dir(ROLE_QUBE[role]) / "killed").read_text().strip()
        except FileNotFoundError:
            return None


# --------------------------------------------------------------------------- checks
_CACHED_CAB = re.compile(r"[0-9a-f]{64}\.cab")
TEMP = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
_GENERATION = re.compile(r"(.+)\.[0-9a-f]{12}")
_LOCKS = ("run/qubes-fwupd/manager.lock", "var/lib/qubes-fwupd/metadata.lock",
          "var/lib/qubes-fwupd/manager/history.lock",
          "var/lib/qubes-fwupd/manager/pending-reboot.lock")  # fmt: skip


def dom0_problems(sandbox: Sandbox, strict: bool) -> list[str]:
    """What is wrong with dom0's trusted cache and state; ``strict``: leftovers too."""
    paths = qube_paths(sandbox, "dom0")
    config = Config.load(paths)
    store = MetadataStore(paths)
    found: list[str] = []
    linked = set()
    base = paths.metadata_dir
    for entry in sorted(base.iterdir()) if base.is_dir() else []:
        if TEMP.fullmatch(entry.name):  # a temp file, or the temp link of a swap
            if strict:
                found.append(f"metadata: temp file {entry.name} left")
        elif entry.is_symlink():
            linked.add(os.readlink(entry))
            found += _generation_problems(store, config, paths, entry)
        elif _GENERATION.fullmatch(entry.name) and entry.is_dir():
            pass  # an orphan unless linked: judged below, once every link is known
        else:
            found.append(f"metadata: unexpected entry {entry.name}")
    for entry in sorted(base.iterdir()) if base.is_dir() else []:
        if (_GENERATION.fullmatch(entry.name) and not entry.is_symlink()
                and entry.name not in linked and strict):  # fmt: skip
            found.append(f"metadata: unlinked generation {entry.name} left")
    try:
        json.loads(paths.metadata_state_file.read_bytes())
    except FileNotFoundError:
        pass
    except ValueError as e:
        found.append(f"state: metadata-state.json does not parse: {e}")
    for entry in sorted(paths.cabs_dir.iterdir()) if paths.cabs_dir.is_dir() else []:
        if not _CACHED_CAB.fullmatch(entry.name) or not entry.is_file() or entry.is_symlink():
            found.append(f"cabs: unexpected entry {entry.name}")
        elif hashlib.sha256(entry.read_bytes()).hexdigest() != entry.name[:64]:
            found.append(f"cabs: {entry.name} is not the file its name says")
    found += _state_files_problems(paths.sessions_dir, strict, "sessions")
    found += _state_files_problems(paths.manager_dir, strict, "manager")
    found += _session_lifetimes(paths.sessions_dir, config.limits.session_seconds)
    for lock in _LOCKS:
        holders = _lock_holders(sandbox.root("dom0") / lock)
        if holders:
            found.append(f"lock {lock} still held by {holders}")
    return found


_VERIFIED: set[tuple[str, str, str]] = set()


def _generation_problems(
    store: MetadataStore, config: Config, paths: Paths, link: Path
) -> list[str]:
    remote = config.remote(link.name)
    gen = link.parent / os.readlink(link)
    if not gen.is_dir():
        return [f"metadata: {link.name} names a missing generation"]
    names = {p.name for p in gen.iterdir()}
    want = {remote.metadata_name, remote.jcat_name, INDEX_NAME, ACCEPTED_NAME}
    if names != want:
        return [f"metadata: generation {gen.name} holds {sorted(names)}"]
    problems = []
    sha256 = hashlib.sha256((gen / remote.metadata_name).read_bytes()).hexdigest()
    jcat = (gen / remote.jcat_name).read_bytes()
    key = (gen.name, sha256, hashlib.sha256(jcat).hexdigest())
    if key not in _VERIFIED:  # the same bytes verify the same way: once is enough
        with open(gen / remote.metadata_name, "rb") as d, open(gen / remote.jcat_name, "rb") as j:
            verified = verify_metadata_files(d.fileno(), j.fileno(), remote, paths, config)
        if verified.sha256 != sha256:
            problems.append(f"metadata: {gen.name}'s jcat does not bind its file")
        _VERIFIED.add(key)
    accepted = store.accepted(remote.id) or {}
    if accepted.get("sha256") != sha256:
        problems.append(f"metadata: the accepted record of {remote.id} is not its file's")
    catalog = store.catalog(remote, config.limits)
    if catalog is None or catalog.signed_at != accepted.get("signed_at"):
        problems.append(f"metadata: {remote.id}'s catalog disagrees with its record")
    return problems


def _state_files_problems(directory: Path, strict: bool, what: str) -> list[str]:
    found = []
    for entry in sorted(directory.iterdir()) if directory.is_dir() else []:
        if TEMP.fullmatch(entry.name):
            # swept once a minute old, by the next run's start: one a minute older than
            # that outlived a run (no point takes a minute)
            if strict and time.time() - entry.lstat().st_mtime > 120:
                found.append(f"{what}: temp file {entry.name} left")
            continue
        if entry.suffix == ".lock" or not entry.is_file():
            continue
        text = entry.read_bytes()
        try:
            if entry.suffix == ".jsonl":
                for line in text.splitlines():
                    json.loads(line)
            else:
                json.loads(text)
        except ValueError:
            found.append(f"{what}: {entry.name} does not parse")
    return found


def _session_lifetimes(directory: Path, ttl: float) -> list[str]:
    found = []
    for entry in directory.glob("*.pending") if directory.is_dir() else []:
        doc = json.loads(entry.read_bytes())
        if float(doc["expires"]) > time.time() + ttl + 5:
            found.append(f"sessions: {entry.name} outlives its lifetime")
    return found


def _lock_holders(path: Path) -> list[str]:
    """PIDs holding a lock on this file, from the kernel's /proc/locks (whose MAJ:MIN:INODE
    names the file: the inode alone could be another filesystem's)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return []
    key = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    holders = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields or len(fields) < 6:
            continue
        parts = fields[5].split(":")
        with contextlib.suppress(ValueError):
            if (int(parts[0], 16), int(parts[1], 16), int(parts[2])) == key:
                holders.append(fields[4])
    return holders


# not the run's: fwupd's libjcat starts gpg-agent and leaves it, and a test that crashes a
# fwupd starts the qube's next one
_DAEMONS = ("gpg-agent", "/usr/libexec/fwupd/fwupd")


def settle(
    sandbox: Sandbox, before: frozenset[tuple[int, str]], timeout: float = 30
) -> dict[tuple[int, str], str]:
    """Wait until every process the run started has ended; what is left after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = {k: v for k, v in sandbox_processes(sandbox).items() if k not in before
                and not any(d in v for d in _DAEMONS)}  # fmt: skip
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def ran(r: subprocess.CompletedProcess[str]) -> str | None:
    """None if a manager run succeeded or had nothing to do, else its output."""
    return None if r.returncode in (0, 2) else f"exit {r.returncode}: {r.stdout}{r.stderr}"


def handover_point(role: str, events: list[str]) -> int:
    """Where a process hands a checked cab to fwupd, as faults_site counts (1-based): for
    dom0's manager, its first connect once the cab's session is closed (D-Bus to dom0's
    fwupd, after every check of the cab); for sys-usb's agent, its last connect."""
    connects = [i for i, e in enumerate(events) if e.endswith(" socket.connect")]
    if role == "manager":
        closed = max(i for i, e in enumerate(events)
                     if " os.remove " in e and e.endswith(".outcome"))  # fmt: skip
        return next(i for i in connects if i > closed) + 1
    return connects[-1] + 1
