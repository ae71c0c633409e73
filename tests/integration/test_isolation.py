"""Xen's facts, made by namespaces (issue 11): dom0 and sys-usb have no network, each
networked qube (sys-firewall, sys-whonix) has its own, no qube sees another's files, and
`down` leaves no namespace, mount or process behind.

Probes run through the same launcher that starts each qube's daemons and services."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import broker
from broker.sandbox.cli import TOR_MIRROR_ROLE, tor_port_file
from broker.sandbox.launcher import (
    HOLDER_ROLE,
    ISOLATION_ENV,
    QUBES,
    TOR_GATEWAY,
    UPDATEVM,
    Launcher,
    Sandbox,
    isolation_available,
)
from broker.sandbox.processes import ProcessTable
from tests.sandbox_helpers import (
    manager,
    mirror_marks,
    mounts_under,
    netns_names,
    probe,
    processes_mentioning,
    qube_paths,
    sandbox_cli,
    sandbox_prerequisites,
    served,
    short_tmpdir,
    tree_snapshot,
    up,
)

pytestmark = pytest.mark.sandbox

NO_ROUTE = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH}
NETWORKED = (UPDATEVM, TOR_GATEWAY)  # each with an LVFS mirror on its own 127.0.0.1
OTHER_QUBES = ("dom0", "sys-usb", "work")


@pytest.fixture
def isolated(sandbox: Sandbox) -> Sandbox:
    state = Launcher(sandbox).isolation()
    if not state.on:
        pytest.skip(f"isolation: {state}")
    return sandbox


def ns_ids(pid: int) -> dict[str, str]:
    return {ns: os.readlink(f"/proc/{pid}/ns/{ns}") for ns in ("net", "mnt")}


def holders(sandbox: Sandbox) -> dict[str, int]:
    table = ProcessTable(sandbox.pids_file)
    return {e.qube: e.pid for e in table.entries() if e.role == HOLDER_ROLE and table.alive(e)}


def mirror_port(sandbox: Sandbox) -> int:
    return int((sandbox.dir / "lvfs.port").read_text())


CONNECT = """
import json, socket
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("127.0.0.1", {port}))
    s.sendall(b"HEAD /firmware.xml.zst.jcat HTTP/1.0\\r\\n\\r\\n")
    result = s.recv(12).decode()
except OSError as e:
    result = e.errno
print(json.dumps({{"result": result, "links": [n for _, n in socket.if_nameindex()]}}))
"""

OPEN = """
import errno, json
out = {{}}
for mode, path in {attempts!r}:
    try:
        with open(path, mode) as f:
            out[path + " " + mode] = f.read() if mode == "r" else "opened"
    except OSError as e:
        out[path + " " + mode] = errno.errorcode[e.errno]
print(json.dumps(out))
"""


def test_status_reports_isolation(sandbox: Sandbox) -> None:
    r = sandbox_cli("status", "--dir", str(sandbox.dir))
    state = Launcher(sandbox).isolation()
    assert f"isolation: {state}" in r.stdout.splitlines()
    # where the kernel allows it, the sandbox that every integration test uses is isolated
    assert state.on == isolation_available(sandbox).on, state


def test_every_process_of_a_qube_runs_in_that_qubes_namespaces(isolated: Sandbox) -> None:
    host = ns_ids(os.getpid())
    qubes = {qube: ns_ids(pid) for qube, pid in holders(isolated).items()}
    assert sorted(qubes) == sorted(QUBES)
    for ids in qubes.values():
        assert ids["net"] != host["net"] and ids["mnt"] != host["mnt"]
    assert len({ids["net"] for ids in qubes.values()}) == len(qubes), "a network ns is shared"
    assert len({ids["mnt"] for ids in qubes.values()}) == len(qubes), "a mount ns is shared"
    mirrors = {}
    for e in ProcessTable(isolated.pids_file).entries():
        ids = ns_ids(e.pid)
        if e.role in ("dbus", "fwupd"):
            assert ids == qubes[e.qube], e
        elif e.role in ("mirror", TOR_MIRROR_ROLE):
            # host files, a qube's network
            mirrors[e.role] = ids["net"]
            assert ids["mnt"] == host["mnt"], e
        elif e.role == "qrexecd":
            assert ids == host, e
    assert mirrors == {"mirror": qubes[UPDATEVM]["net"],
                       TOR_MIRROR_ROLE: qubes[TOR_GATEWAY]["net"]}  # fmt: skip


def test_only_the_networked_qubes_reach_a_mirror_each_its_own(isolated: Sandbox) -> None:
    port = mirror_port(isolated)
    assert int(tor_port_file(isolated).read_text()) == port  # the same URL in both
    code = CONNECT.format(port=port)
    for qube in OTHER_QUBES:
        seen = probe(isolated, qube, code)
        assert seen["result"] in NO_ROUTE, (qube, seen)
        assert seen["links"] == ["lo"], (qube, seen)
    for qube in NETWORKED:
        marks = mirror_marks(isolated)
        seen = probe(isolated, qube, code)
        assert seen["result"] == "HTTP/1.0 200", (qube, seen)
        assert seen["links"] == ["lo"], (qube, seen)
        # answered by the mirror in that qube's network, and by no other
        assert {q: served(m) for q, m in marks.items()} == {
            q: ["HEAD /firmware.xml.zst.jcat 200"] if q == qube else [] for q in NETWORKED
        }, qube


def test_dom0_cannot_open_the_updatevms_files(isolated: Sandbox) -> None:
    conf = qube_paths(isolated, UPDATEVM).config_file
    ca_key = isolated.pki_dir / "ca.key"  # the sandbox CA's: no qube's business
    assert conf.is_file() and ca_key.is_file()
    code = OPEN.format(attempts=[("r", str(conf)), ("r", str(ca_key))])
    seen = probe(isolated, "dom0", code)
    assert seen == {f"{conf} r": "ENOENT", f"{ca_key} r": "ENOENT"}
    seen = probe(isolated, UPDATEVM, code)
    assert seen == {f"{conf} r": conf.read_text(), f"{ca_key} r": "ENOENT"}
    # dom0 sees its own tree and nothing else of the sandbox
    listing = "import json, os; print(json.dumps([os.listdir(p) for p in {dirs!r}]))"
    dirs = [str(isolated.dir), str(isolated.dir / "vm")]
    assert probe(isolated, "dom0", listing.format(dirs=dirs)) == [["vm"], ["dom0"]]


def test_no_other_qube_can_read_or_write_dom0s_trusted_cache(isolated: Sandbox) -> None:
    paths = qube_paths(isolated, "dom0")
    if not any(paths.metadata_dir.glob("*")):
        r = manager(isolated, "refresh")
        assert r.returncode == 0, r.stderr
    trusted = sorted(p for p in paths.metadata_dir.rglob("*") if p.is_file())[0]
    planted = paths.metadata_dir / "planted.xml.zst"
    before = tree_snapshot(paths.cache_dir)
    code = OPEN.format(attempts=[("rb", str(trusted)), ("r+b", str(trusted)),
                                 ("wb", str(planted))])  # fmt: skip
    for qube in (q for q in QUBES if q != "dom0"):
        seen = probe(isolated, qube, code)
        # ENOENT: the path does not exist there; EROFS: nor can it be made
        assert set(seen.values()) <= {"ENOENT", "EROFS"}, (qube, seen)
        mkdir = f"import json, os\ntry: os.makedirs({str(paths.metadata_dir)!r})\n" \
                "except OSError as e: print(json.dumps(e.errno))"  # fmt: skip
        assert probe(isolated, qube, mkdir) == errno.EROFS, qube
    assert tree_snapshot(paths.cache_dir) == before
    assert not planted.exists()
    # dom0 itself still can
    mine = probe(isolated, "dom0", OPEN.format(attempts=[("rb", str(trusted))]))
    assert mine == {f"{trusted} rb": "opened"}


def test_a_qube_writes_only_its_own_tree_and_private_scratch(isolated: Sandbox) -> None:
    name = f"qfw-probe-{os.getpid()}"
    scratch = ["/tmp", "/var/tmp", "/dev/shm"]
    write = (
        "import errno, json\n"
        "out = []\n"
        "for d in {dirs!r}:\n"
        "    try:\n"
        f"        open(d + '/{name}', 'w').close()\n"
        "        out.append('written')\n"
        "    except OSError as e:\n"
        "        out.append(errno.errorcode[e.errno])\n"
        "print(json.dumps(out))"
    )
    # shared with every other qube, so read-only: the code they all run, /etc, /run
    shared = [str(Path(broker.__file__).parent), "/etc", "/run", str(isolated.dir)]
    assert probe(isolated, "dom0", write.format(dirs=shared)) == ["EROFS"] * 4
    own = str(isolated.root("dom0") / "tmp")
    assert probe(isolated, "dom0", write.format(dirs=[own, *scratch])) == ["written"] * 4
    assert (isolated.root("dom0") / "tmp" / name).exists()
    (isolated.root("dom0") / "tmp" / name).unlink()
    # dom0's scratch files are its own: neither another qube nor the host sees them
    look = f"import json, os; print(json.dumps([os.path.exists(d + '/{name}') for d in {{dirs}}]))"
    assert probe(isolated, "dom0", look.format(dirs=scratch)) == [True, True, True]
    assert probe(isolated, UPDATEVM, look.format(dirs=scratch)) == [False, False, False]
    assert [os.path.exists(f"{d}/{name}") for d in scratch] == [False, False, False]


# ---------------------------------------------------------------- sandboxes of their own
def needs_isolation() -> None:
    reason = sandbox_prerequisites()
    if reason:
        pytest.skip(reason)
    state = isolation_available(Sandbox(Path("/nonexistent")))
    if not state.on:
        pytest.skip(f"isolation: {state}")


@contextmanager
def own_directory(prefix: str) -> Iterator[Path]:
    directory = short_tmpdir(prefix)
    try:
        yield directory
    finally:
        sandbox_cli("down", "--dir", str(directory))
        if not mounts_under(directory):
            shutil.rmtree(directory, ignore_errors=True)


def assert_nothing_left(directory: Path, namespaces: set[str], netns_before: set[str]) -> None:
    assert netns_names() == netns_before, "ip netns list changed"
    assert mounts_under(directory) == []
    assert processes_mentioning(str(directory)) == []
    inside = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if set(ns_ids(int(pid)).values()) & namespaces:
                inside.append(pid)
        except OSError:
            continue
    assert inside == [], f"processes still in the sandbox's namespaces: {inside}"
    assert not (directory / "isolation").exists()


def test_down_leaves_no_namespace_mount_or_process() -> None:
    needs_isolation()
    netns_before = netns_names()
    with own_directory("qfwd") as directory:
        box = up(directory)
        namespaces = {i for pid in holders(box).values() for i in ns_ids(pid).values()}
        assert len(namespaces) == 2 * len(QUBES)
        # a process the PID table does not know of (a service in flight, say) goes too
        stray = Launcher(box).popen("sys-usb", ["sleep", "600"])
        r = sandbox_cli("down", "--dir", str(directory))
        assert r.returncode == 0, r.stderr
        assert f"sys-usb: stray {stray.pid}: stopped" in r.stdout
        assert stray.wait(5) == -signal.SIGTERM
        assert_nothing_left(directory, namespaces, netns_before)


def test_down_cleans_up_after_a_killed_up(tmp_path: Path) -> None:
    needs_isolation()
    netns_before = netns_names()
    with own_directory("qfwk") as directory, (tmp_path / "up.log").open("w+") as log:
        starting = subprocess.Popen(
            [sys.executable, "-m", "broker.sandbox.cli", "up", "--dir", str(directory)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        host = set(ns_ids(os.getpid()).values())

        def made() -> dict[str, int]:
            # a holder is recorded as soon as it exists, before it has made its namespaces:
            # read too early, they would be the host's own
            return {q: pid for q, pid in holders(Sandbox(directory)).items()
                    if not set(ns_ids(pid).values()) & host}  # fmt: skip

        while len(made()) < len(QUBES):
            if starting.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"up ended or hung before its qubes existed:\n{log.read()}")
            time.sleep(0.01)
        namespaces = {i for pid in made().values() for i in ns_ids(pid).values()}
        assert not namespaces & host
        starting.kill()  # mid-way: no chance to clean up after itself
        starting.wait()
        r = sandbox_cli("down", "--dir", str(directory))
        assert r.returncode == 0, r.stderr
        assert_nothing_left(directory, namespaces, netns_before)


def test_isolation_forced_off_runs_as_before() -> None:
    reason = sandbox_prerequisites()
    if reason:
        pytest.skip(reason)
    with own_directory("qfwo") as directory:
        r = sandbox_cli("up", "--dir", str(directory), env={ISOLATION_ENV: "off"})
        assert r.returncode == 0, r.stderr
        said = [line for line in r.stdout.splitlines() if "isolation" in line]
        assert said == [f"  isolation: off ({ISOLATION_ENV}=off): qubes share the host's "
                        "network and files"]  # fmt: skip
        status = sandbox_cli("status", "--dir", str(directory))
        assert f"isolation: off ({ISOLATION_ENV}=off)" in status.stdout
        assert HOLDER_ROLE not in status.stdout
        # one mirror, on the host's network, serves every qube: no second one
        assert TOR_MIRROR_ROLE not in status.stdout
        assert not tor_port_file(Sandbox(directory)).exists()
        box = Sandbox(directory)
        for e in ProcessTable(box.pids_file).entries():
            assert ns_ids(e.pid) == ns_ids(os.getpid()), e
        # the old behaviour, exactly: dom0 shares the host's network, mirror included
        for qube in ("dom0", TOR_GATEWAY):
            seen = probe(box, qube, CONNECT.format(port=mirror_port(box)))
            assert seen["result"] == "HTTP/1.0 200", (qube, seen)


def test_down_never_treats_the_hosts_namespaces_as_a_qubes(tmp_path: Path) -> None:
    """A table whose dom0 holder is a process in the host's own namespaces (as a holder read
    before it had made its own would be): down stops what the table records, refuses to
    look for strays there, says so, and signals nothing else of the host."""
    needs_isolation()
    directory = short_tmpdir("qfwh")
    box = Sandbox(directory)
    fake_holder = subprocess.Popen(["sleep", "300"])
    bystander = subprocess.Popen(["sleep", "300"])  # a host process nobody recorded
    try:
        box.isolation_file.write_text("on\n")
        ProcessTable(box.pids_file).record(HOLDER_ROLE, "dom0", fake_holder.pid)
        r = sandbox_cli("down", "--dir", str(directory))
        assert r.returncode == 0, r.stderr
        assert (f"qube dom0: its recorded process {fake_holder.pid} is in this host's own "
                "namespaces, not a qube's: refused") in r.stdout, r.stdout  # fmt: skip
        assert fake_holder.wait(timeout=10) is not None  # recorded: stopped
        assert bystander.poll() is None, "down signalled a host process it never recorded"
    finally:
        bystander.kill()
        bystander.wait()
        fake_holder.kill()
        fake_holder.wait()
        shutil.rmtree(directory, ignore_errors=True)
