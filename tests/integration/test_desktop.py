"""dom0's desktop session (broker.sandbox.desktop): a real notification daemon (dunst) on
the login user's session bus, whose notifications a test reads back."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from broker.sandbox.desktop import Desktop, Notification, missing_tools
from broker.sandbox.launcher import Launcher, Sandbox
from broker.sandbox.processes import ProcessTable
from tests.sandbox_helpers import (
    processes_mentioning,
    sandbox_cli,
    sandbox_prerequisites,
    short_tmpdir,
    up,
)

pytestmark = pytest.mark.sandbox

# what dom0's manager will do in a child that dropped to the user: Notify on the session bus
NOTIFY = """
import asyncio, sys
from dbus_next import Variant
from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message

async def main(address, summary, body, urgency):
    bus = await MessageBus(bus_address=address).connect()
    reply = await bus.call(Message(
        destination="org.freedesktop.Notifications", path="/org/freedesktop/Notifications",
        interface="org.freedesktop.Notifications", member="Notify", signature="susssasa{sv}i",
        body=["qubes-fwupd", 0, "", summary, body, [], {"urgency": Variant("y", urgency)}, -1]))
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    print(reply.body[0])

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""

SUMMARY = "Firmware updated"
# markup, an ampersand and a non-ASCII arrow: the body must come back exactly as sent
BODY = "Integrated Webcam™ 1.2.3 → <b>1.2.4</b> & a reboot is pending"


def notify(
    desktop: Desktop, summary: str, body: str, urgency: int, as_user: bool = True
) -> subprocess.CompletedProcess[str]:
    """Notify from a child in dom0, as the manager's child will: the desktop user and
    nothing more, or (not ``as_user``) root, as the manager itself runs. In dom0's
    namespaces, where the checkout is reachable for that user even when the host's path
    to it is not (a clone in mkdtemp's 0700 dir)."""
    prefix = desktop.user.setpriv() if as_user else []
    argv = [*prefix, sys.executable, "-c", NOTIFY, desktop.bus_address, summary, body,
            str(urgency)]  # fmt: skip
    proc = desktop.launcher.popen(
        "dom0", argv, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def notify_as_user(desktop: Desktop, summary: str, body: str, urgency: int) -> int:
    r = notify(desktop, summary, body, urgency)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def test_a_notification_reaches_dunst(desktop: Desktop) -> None:
    assert desktop.notifications() == []
    notify_as_user(desktop, SUMMARY, BODY, 2)
    assert desktop.notifications() == [Notification("qubes-fwupd", SUMMARY, BODY, "CRITICAL")]


def test_each_urgency_is_told_apart_in_order(desktop: Desktop) -> None:
    ids = [notify_as_user(desktop, f"summary {u}", f"body {u}", u) for u in (1, 0, 2, 0)]
    assert ids == sorted(set(ids)), ids
    assert desktop.notifications() == [
        Notification("qubes-fwupd", "summary 1", "body 1", "NORMAL"),
        Notification("qubes-fwupd", "summary 0", "body 0", "LOW"),
        Notification("qubes-fwupd", "summary 2", "body 2", "CRITICAL"),
        Notification("qubes-fwupd", "summary 0", "body 0", "LOW"),
    ]
    # read twice, nothing is lost or doubled: history keeps what close-all moved there
    assert len(desktop.notifications()) == 4


def test_only_the_user_may_use_the_session_bus(desktop: Desktop) -> None:
    """As on a real session bus: dom0's root manager must drop to the user to notify."""
    assert desktop.bus_socket.is_socket()
    st = desktop.runtime_dir.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (desktop.uid, 0o700)
    r = notify(desktop, SUMMARY, BODY, 1, as_user=False)
    assert r.returncode != 0 and "EOFError" in r.stderr, (r.stdout, r.stderr)
    assert desktop.notifications() == []


def _pgrep(uid: int, name: str) -> set[int]:
    r = subprocess.run(["pgrep", "-u", str(uid), "-x", name], capture_output=True, text=True,
                       check=False)  # fmt: skip
    return {int(pid) for pid in r.stdout.split()}


PROGRAMS = {"xvfb": "Xvfb", "session-bus": "dbus-daemon", "dunst": "dunst"}


def test_stop_leaves_nothing_running(sandbox: Sandbox) -> None:
    user = Launcher(sandbox).service_user()
    if not user.dropped or missing_tools():
        pytest.skip(f"no desktop here: {missing_tools() or user}")
    table = ProcessTable(sandbox.pids_file)
    others = [e for e in table.entries() if e.role not in PROGRAMS]
    desktop = Desktop(sandbox)
    desktop.start()
    try:
        ours = {e.role: e.pid for e in table.entries() if e.role in PROGRAMS}
        assert set(ours) == set(PROGRAMS)
        for role, pid in ours.items():
            assert pid in _pgrep(user.uid, PROGRAMS[role]), f"{role} {pid} is not running"
        assert processes_mentioning(str(desktop.bus_socket))
        with pytest.raises(RuntimeError, match="still running"):
            Desktop(sandbox).start()  # one desktop at a time
    finally:
        desktop.stop()
    for role, pid in ours.items():
        assert pid not in _pgrep(user.uid, PROGRAMS[role]), f"{role} {pid} still runs"
    assert processes_mentioning(str(desktop.bus_socket)) == []
    assert not desktop.runtime_dir.exists()
    # dom0's daemons and the rest of the sandbox go on
    assert table.entries() == others
    assert all(table.alive(e) for e in others)


def test_sandbox_down_stops_a_running_desktop() -> None:
    reason = sandbox_prerequisites() or missing_tools()
    if reason:
        pytest.skip(reason)
    directory = short_tmpdir("qfwk")
    try:
        sandbox = up(directory)
        if not Launcher(sandbox).service_user().dropped:
            pytest.skip(f"dom0's services run as {Launcher(sandbox).service_user()}")
        desktop = Desktop(sandbox)
        desktop.start()  # and left running
        pids = [e.pid for e in ProcessTable(sandbox.pids_file).entries() if e.role in PROGRAMS]
        assert len(pids) == 3
        r = sandbox_cli("down", "--dir", str(directory))
        assert r.returncode == 0, r.stderr
        for role in PROGRAMS:
            assert f"dom0: {role} " in r.stdout, r.stdout
        assert processes_mentioning(str(directory)) == []
        desktop.stop()  # reaps them: they were our children
    finally:
        sandbox_cli("down", "--dir", str(directory))
        shutil.rmtree(directory, ignore_errors=True)
