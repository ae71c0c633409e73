"""The dom0 user model, exercised (issue 17). In Qubes, dom0's qrexec services run as the
login user (group qubes) and qubes-fwupdmgr as root, over dirs that are root:qubes 2770
(packaging/tmpfiles.d). The sandbox starts qubes.FwupdReceiveUpdates the same way, so
these hold on real processes: the service is not root, writes where it must and nowhere
else in dom0's tree, and the root manager reads what it wrote."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from broker.config import Paths
from broker.sandbox.launcher import UPDATEVM, Launcher, Sandbox, ServiceUser
from broker.service import log
from broker.transfer import write_atomic
from tests.sandbox_helpers import WEBCAM_ID, manager, probe, qube_paths, sandbox_cli

pytestmark = pytest.mark.sandbox

RECEIVE = "qubes.FwupdReceiveUpdates"
_NO_CAPS = "0" * 16

TRY_CREATE = """
import errno, json, os
out = {{}}
for d in {dirs!r}:
    path = os.path.join(d, ".qfw-user-probe")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(path)
        out[d] = "written"
    except OSError as e:
        out[d] = errno.errorcode[e.errno]
print(json.dumps(out))
"""

# opened for appending and closed at once: a success would change nothing
TRY_OPEN = """
import errno, json, os
out = {{}}
for path in {files!r}:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        out[path] = "opened"
    except OSError as e:
        out[path] = errno.errorcode[e.errno]
print(json.dumps(out))
"""


@pytest.fixture
def dropped(sandbox: Sandbox) -> ServiceUser:
    user = Launcher(sandbox).service_user()
    if not user.dropped:
        pytest.skip(f"dom0's services run as {user}")
    return user


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _service_pid(sandbox: Sandbox, client: subprocess.Popen[bytes]) -> int:
    """The receive service once it is python running the entry point (not yet setpriv
    or env on the way there)."""
    script = str(sandbox.rpc_dir("dom0") / RECEIVE).encode()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and client.poll() is None:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if args[0].endswith(b"python3") and args[1:2] == [script]:
                    return int(pid)
        time.sleep(0.05)
    pytest.fail(f"no {RECEIVE} seen running (client exit {client.poll()})")


def test_the_receive_service_runs_as_the_login_user_the_manager_as_root(
    sandbox: Sandbox, dropped: ServiceUser
) -> None:
    # a push from the UpdateVM that never sends its header: the service waits on it
    client = Launcher(sandbox).popen(
        UPDATEVM, [sys.executable, "-m", "broker.sandbox.qrexec_client", "dom0", RECEIVE],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        seen = _status(_service_pid(sandbox, client))
    finally:
        client.communicate(b"", timeout=60)
    assert seen["Uid"].split() == [str(dropped.uid)] * 4
    assert seen["Gid"].split() == [str(dropped.gid)] * 4
    assert seen["Groups"].split() == [str(dropped.qubes_gid)]
    caps = {k: seen[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    assert set(caps.values()) == {_NO_CAPS}, caps
    assert seen["NoNewPrivs"] == "1"
    assert client.returncode != 0  # no header: refused, and nothing more
    # qubes-fwupdmgr keeps root: it starts in dom0 as probe() starts code there
    who = "import json, os; print(json.dumps([os.geteuid(), os.getegid()]))"
    assert probe(sandbox, "dom0", who) == [0, 0]
    assert probe(sandbox, "dom0", who, as_service=True) == [dropped.uid, dropped.gid]


def test_up_makes_dom0s_dirs_as_the_tmpfiles_snippet_does(
    sandbox: Sandbox, dropped: ServiceUser
) -> None:
    paths = qube_paths(sandbox, "dom0")
    for d in paths.dom0_dirs:
        st = d.stat()
        mode = "0o3770" if d in (paths.state_dir, paths.cache_dir) else "0o2770"
        assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)) == (0, dropped.qubes_gid,
                                                                   mode), d  # fmt: skip
    st = paths.manager_dir.stat()
    assert (st.st_uid, oct(st.st_mode & 0o7777)) == (0, "0o700")
    status = sandbox_cli("status", "--dir", str(sandbox.dir))
    assert f"dom0's qrexec services run as {dropped}" in status.stdout.splitlines()


def test_the_service_user_writes_in_dom0s_dirs(sandbox: Sandbox, dropped: ServiceUser) -> None:
    dirs = [str(d) for d in qube_paths(sandbox, "dom0").dom0_dirs]
    seen = probe(sandbox, "dom0", TRY_CREATE.format(dirs=dirs), as_service=True)
    assert seen == dict.fromkeys(dirs, "written")


@contextlib.contextmanager
def _managers_files(sandbox: Sandbox) -> Iterator[Paths]:
    """remotes.json as the manager writes it, and, if no install made them yet, history
    and pending reboots with the manager's own writer and mode (removed afterwards)."""
    for verb in ("disable-remote", "enable-remote"):
        r = manager(sandbox, verb, "lvfs")
        assert r.returncode == 0, r.stderr
    paths = Launcher(sandbox).paths("dom0")
    made = []
    for name, empty in (("history.jsonl", b""), ("history.lock", b""),
                        ("pending-reboot.json", b"[]")):  # fmt: skip
        path = paths.manager_dir / name
        if not path.exists():
            write_atomic(path, empty)
            made.append(path)
    try:
        yield paths
    finally:
        for path in made:
            path.unlink(missing_ok=True)


def test_the_service_user_writes_nowhere_else_in_dom0(
    refreshed: Sandbox, dropped: ServiceUser
) -> None:
    with _managers_files(refreshed) as paths:
        pki = [*paths.pki_metadata_dirs, *paths.pki_firmware_dirs]
        dirs = [paths.config_dir, refreshed.rpc_dir("dom0"), *pki, paths.root / "etc",
                paths.root / "home", paths.root / "var/lib", paths.root / "var/cache",
                paths.manager_dir]  # fmt: skip
        managers = ("remotes.json", "history.jsonl", "history.lock", "pending-reboot.json")
        files = [paths.config_file, *(sorted(d.iterdir())[0] for d in pki),
                 *(paths.manager_dir / name for name in managers)]  # fmt: skip
        assert all(f.is_file() for f in files), files
        created = probe(refreshed, "dom0", TRY_CREATE.format(dirs=[str(d) for d in dirs]),
                        as_service=True)  # fmt: skip
        opened = probe(refreshed, "dom0", TRY_OPEN.format(files=[str(f) for f in files]),
                       as_service=True)  # fmt: skip
    assert created == {str(d): "EACCES" for d in dirs}
    assert opened == {str(f): "EACCES" for f in files}
    # and root (the manager) may: the refusals above are the user's, not the tree's
    assert probe(refreshed, "dom0", TRY_CREATE.format(dirs=[str(paths.config_dir)])) == {
        str(paths.config_dir): "written"
    }


# run as the service user: each attempt's errno name, or "done"
_ATTEMPT = """
import errno, json, os
def attempt(fn):
    try:
        fn()
        return "done"
    except OSError as e:
        return errno.errorcode[e.errno]
"""

ATTEMPTS = _ATTEMPT + """
target, manager_dir, state_dir = {target!r}, {manager_dir!r}, {state_dir!r}
mine = os.path.join(state_dir, "qfw-mine.json")
with open(mine, "w") as f:
    f.write('{{"disabled": []}}')
print(json.dumps({{
    "replace": attempt(lambda: os.replace(mine, target)),
    "unlink": attempt(lambda: os.unlink(target)),
    "create": attempt(lambda: open(os.path.join(manager_dir, "x"), "w")),
    "move dir aside": attempt(lambda: os.rename(manager_dir, manager_dir + ".old")),
    "rmdir": attempt(lambda: os.rmdir(manager_dir)),
}}))
os.unlink(mine)
"""


def test_the_service_user_cannot_replace_the_managers_files(
    sandbox: Sandbox, dropped: ServiceUser
) -> None:
    """The manager's own state is in a root-only dir inside the sticky state dir: the
    service can neither write in it, nor rename over, delete or move aside what is there."""
    # a stand-in with the owner, mode and dir of remotes.json: the real one stays intact
    paths = Launcher(sandbox).paths("dom0")
    target = paths.manager_dir / "qfw-stand-in-remotes.json"
    write_atomic(target, b'{"disabled": ["lvfs"]}')
    try:
        seen = probe(sandbox, "dom0", ATTEMPTS.format(
            target=str(target), manager_dir=str(paths.manager_dir),
            state_dir=str(paths.state_dir)), as_service=True)  # fmt: skip
        assert target.read_bytes() == b'{"disabled": ["lvfs"]}'
    finally:
        target.unlink(missing_ok=True)
    assert seen == {"replace": "EACCES", "unlink": "EACCES", "create": "EACCES",
                    "move dir aside": "EPERM", "rmdir": "EPERM"}  # fmt: skip
    assert paths.manager_dir.is_dir()


MOVES = _ATTEMPT + """
out = {{}}
for d in {dirs!r}:
    out[os.path.basename(d)] = attempt(lambda: os.rename(d, d + ".old"))
print(json.dumps(out))
"""


def test_the_service_user_cannot_swap_the_trusted_dirs(
    sandbox: Sandbox, dropped: ServiceUser
) -> None:
    """The cache dir is sticky: the service writes in its metadata, cabs and untrusted
    dirs, but cannot move one aside and put a symlink in its place, where the root
    manager's sweeps (and its reads) would follow it out of dom0's dirs."""
    paths = Launcher(sandbox).paths("dom0")
    dirs = [str(d) for d in (paths.metadata_dir, paths.cabs_dir, paths.untrusted_dir)]
    seen = probe(sandbox, "dom0", MOVES.format(dirs=dirs), as_service=True)
    assert seen == {"metadata": "EPERM", "cabs": "EPERM", "untrusted": "EPERM"}
    assert all(Path(d).is_dir() and not Path(d).is_symlink() for d in dirs)


def test_the_root_manager_reads_what_the_service_wrote(
    refreshed: Sandbox, dropped: ServiceUser
) -> None:
    paths = qube_paths(refreshed, "dom0")
    generation = (paths.metadata_dir / "lvfs").resolve()
    for f in (paths.metadata_state_file, generation, *generation.iterdir()):
        st = f.stat()
        assert (st.st_uid, st.st_gid) == (dropped.uid, dropped.qubes_gid), f
    r = manager(refreshed, "get-remotes", "--json")
    assert r.returncode == 0, r.stderr
    (remote,) = json.loads(r.stdout)["Remotes"]
    signed_at = json.loads(paths.metadata_state_file.read_text())["lvfs"]["signed_at"]
    assert remote["Mtime"] == int(datetime.fromisoformat(signed_at).timestamp())
    # the catalog index the service wrote, read by the manager to filter fwupd's offers
    r = manager(refreshed, "get-releases", f"sys-usb:{WEBCAM_ID}", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["Releases"], r.stdout


def test_files_the_manager_makes_first_stay_the_services_to_use(
    refreshed: Sandbox, dropped: ServiceUser
) -> None:
    """The store's lock and the log, made by the root manager before any push: the
    service still takes the lock and still logs (a root 0644 log, or a lock opened for
    writing, would shut it out)."""
    paths = Launcher(refreshed).paths("dom0")
    (paths.state_dir / "metadata.lock").unlink()
    paths.log_file.unlink(missing_ok=True)
    log(paths, "made by the manager")  # the manager's own function, as root
    r = manager(refreshed, "get-releases", f"sys-usb:{WEBCAM_ID}")  # takes the lock, shared
    assert r.returncode == 0, r.stderr
    for made in (paths.state_dir / "metadata.lock", paths.log_file):
        assert made.stat().st_uid == 0, made
    r = manager(refreshed, "refresh")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    lines = paths.log_file.read_text().splitlines()
    assert "made by the manager" in lines[0], lines
    assert any(" receive metadata: " in line for line in lines[1:]), lines
