"""Copied as ``sitecustomize.py`` into the sandbox's faults dir (tests/faults.py): every
Python process started in a qube imports it before anything else.

It numbers the process's side effects, as Python's audit hooks see them: a file opened
for writing, a rename, an unlink, a mkdir, a chmod, a lock, a connect, a process start.
When ``plan.json`` names this process's role and a number, the process kills itself with
SIGKILL just before that side effect, as a crash or an admin's kill -9 would: a point
that the same plan hits again in the next run. A plan with ``swap`` changes a file there
instead, as another process would between a check and a use (the TOCTOU tests); one
with ``mark`` only says when the process got there (a test then acts: kills fwupd).
``killed`` says where it struck (written once, so only the first process of the role to
get there dies). With ``record/`` present, each process writes its numbered side effects
there instead.

Standard library only, and nothing that could fail loudly: a broken hook must never be
what a test measures.
"""

import json
import os
import signal
import sys
import time

_FAULTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROLES = {
    "qubes.FwupdReceiveUpdates": "receive",
    "qubes.FwupdDownload": "download",
    "qubes.FwupdUsbvm": "usbvm",
    "broker.cli": "manager",
}
_COUNTED = frozenset({
    "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
    "os.chown", "os.truncate", "shutil.rmtree", "shutil.copyfile", "shutil.move",
    "subprocess.Popen", "os.posix_spawn", "socket.connect", "fcntl.flock", "fcntl.lockf",
})  # fmt: skip
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _role() -> str:
    for arg in getattr(sys, "orig_argv", sys.argv)[1:4]:
        name = os.path.basename(arg)
        if name in _ROLES:
            return _ROLES[name]
    return ""


def _what(event: str, args: tuple[object, ...]) -> str | None:
    """A short name for a counted side effect, or None if it does not count."""
    if event == "open":
        path, _mode, flags = args
        if isinstance(path, int) or not (flags or 0) & _WRITING:
            return None
        text = os.fsdecode(path)  # type: ignore[arg-type]
        if "__pycache__" in text or text.startswith(_FAULTS):
            return None
        return f"open {os.path.basename(text)}"
    if event not in _COUNTED:
        return None
    first = args[0] if args else ""
    if isinstance(first, (str, bytes, os.PathLike)):
        return f"{event} {os.path.basename(os.fsdecode(first))}"
    if event == "subprocess.Popen" and args:
        argv = args[1]
        if isinstance(argv, (list, tuple)) and argv:
            return f"{event} {os.path.basename(os.fsdecode(argv[0]))}"
    return event


def _install() -> None:
    role = _role()
    if not role:
        return
    try:
        with open(os.path.join(_FAULTS, "plan.json")) as f:
            plan = json.load(f)
    except (OSError, ValueError):
        plan = {}
    kill_at = plan.get("at") if plan.get("role") == role else None
    swap = plan.get("swap")  # [target, source]: change target's bytes instead of a kill
    record = os.path.join(_FAULTS, "record")
    out = -1
    if os.path.isdir(record):
        name = os.path.join(record, f"{role}.{time.time_ns()}.{os.getpid()}")
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    if kill_at is None and out < 0:
        return
    state = {"n": 0, "busy": False}

    def hook(event: str, args: tuple[object, ...]) -> None:
        if state["busy"]:
            return
        state["busy"] = True
        try:
            what = _what(event, args)
            if what is None:
                return
            state["n"] += 1
            if out >= 0:
                os.write(out, f"{state['n']} {what}\n".encode())
            if state["n"] == kill_at:
                if swap:
                    _swap(role, kill_at, what, *swap)
                elif plan.get("mark"):
                    _mark(role, kill_at, what)  # only say when: the test acts
                else:
                    _kill(role, kill_at, what)
        finally:
            state["busy"] = False

    sys.addaudithook(hook)


def _swap(role: str, at: int, what: str, target: str, source: str) -> None:
    """Another process's two ways of changing a file the process has checked: the same
    inode written through another path, then another file renamed over the name."""
    if not _mark(role, at, what):
        return
    with open(source, "rb") as f:
        data = f.read()
    with open(target, "r+b") as f:
        f.write(data)
        f.truncate()
    swapped = target + ".swap"
    with open(swapped, "wb") as f:
        f.write(data)
    os.replace(swapped, target)


def _mark(role: str, at: int, what: str) -> bool:
    """Say where the plan struck, once: False if it struck already (another process)."""
    try:
        fd = os.open(os.path.join(_FAULTS, "killed"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError:
        return False
    os.write(fd, f"{role} {os.getpid()} {at} {what}\n".encode())
    os.close(fd)
    return True


def _kill(role: str, at: int, what: str) -> None:
    if _mark(role, at, what):
        os.kill(os.getpid(), signal.SIGKILL)


_install()
