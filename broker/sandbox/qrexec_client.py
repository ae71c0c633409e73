"""The sandbox's qrexec-client-vm and qvm-run --service: hands our stdin, stdout and stderr
to the emulated qrexec daemon (the socket the launcher put in our environment) and exits
with the service's exit status, as the real clients do. `up` installs it under both names
in each qube's usr/bin (:func:`install_clients`), which the launcher puts first on PATH.

Also dom0's admin tools, qvm-check, qvm-start and qvm-shutdown (:func:`admin_main`): an
"admin" request to the same daemon, which acts on a qube's power state only when the
request comes in on dom0's socket (the socket is the caller's identity)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
from pathlib import Path

from broker.config import ROOT_ENV
from broker.errors import EXIT_QREXEC_PROBLEM

SANDBOX_SOCKET_ENV = "QUBES_FWUPD_QREXEC_SOCKET"
# what each qube calls with, as in Qubes (broker.qrexec.Transport)
CLIENTS = {"dom0": "qvm-run"}
VM_CLIENT = "qrexec-client-vm"
# dom0's admin tools (qubesadmin's, which go through qubesd): the admin request each makes
ADMIN_TOOLS = {"qvm-check": "check", "qvm-start": "start", "qvm-shutdown": "shutdown"}


def _write_tool(path: Path, call: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    function = call.partition("(")[0]
    path.write_text(
        f"#!{sys.executable}\n"
        f"# the sandbox's {path.name}: broker/sandbox/qrexec_client.py, written by `up`\n"
        "import sys\n\n"
        f"from broker.sandbox.qrexec_client import {function}\n\n"
        f"sys.exit({call})\n"
    )
    path.chmod(0o755)


def install_clients(root: Path, qube: str) -> None:
    """The qube's qrexec client, in its usr/bin: this module, run by our interpreter; in
    dom0, also its admin tools."""
    bin_dir = root / "usr/bin"
    _write_tool(bin_dir / CLIENTS.get(qube, VM_CLIENT), "main()")
    if qube == "dom0":
        for tool in ADMIN_TOOLS:
            _write_tool(bin_dir / tool, f"admin_main({tool!r})")
        _write_tool(bin_dir / "qubes-prefs", "prefs_main()")


def prefs_file(root: Path) -> Path:
    """dom0's global preferences in the sandbox, ``NAME VALUE`` a line (qubes.xml's, in
    Qubes): a test sets one as `qubes-prefs NAME VALUE` would."""
    return root / "var/lib/qubes/qubes-prefs"


def prefs_main(argv: list[str] | None = None) -> int:
    """qubes-prefs [--get] [--] NAME: the value, or an empty line when unset."""
    parser = argparse.ArgumentParser(prog="qubes-prefs", description="the sandbox's qubes-prefs")
    parser.add_argument("--get", action="store_true")
    parser.add_argument("name", metavar="PROPERTY")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    values = {}
    with contextlib.suppress(FileNotFoundError):
        for line in prefs_file(Path(os.environ.get(ROOT_ENV, "/"))).read_text().splitlines():
            name, _, value = line.partition(" ")
            values[name] = value.strip()
    print(values.get(args.name, ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # qvm-run --pass-io --no-gui --service -- TARGET SERVICE, qrexec-client-vm -- TARGET
    # SERVICE: what follows "--" (the options are the ones our Transport always gives)
    if "--" in args:
        args = args[args.index("--") + 1 :]
    if len(args) != 2:
        print("usage: qrexec_client [OPTIONS --] TARGET SERVICE[+ARG]", file=sys.stderr)
        return EXIT_QREXEC_PROBLEM
    target, service = args
    path = os.environ.get(SANDBOX_SOCKET_ENV, "")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        request = json.dumps({"target": target, "service": service}).encode()
        socket.send_fds(sock, [request], [0, 1, 2])
    except OSError as e:
        print(f"qrexec: cannot reach the sandbox qrexec daemon: {e}", file=sys.stderr)
        return EXIT_QREXEC_PROBLEM
    # the service now holds our stdin/stdout; ours must close, or our caller would wait
    # for an EOF that only comes when we exit
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    try:
        return int(json.loads(reply)["exit"])
    except (ValueError, KeyError, TypeError):
        return EXIT_QREXEC_PROBLEM


def _admin_parser(tool: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=tool, description=f"the sandbox's {tool}")
    if tool == "qvm-check":
        parser.add_argument("--quiet", "-q", action="store_true")
        parser.add_argument("--running", action="store_true", required=True)
    elif tool == "qvm-start":
        parser.add_argument("--skip-if-running", action="store_true")
    else:
        # a shutdown in the sandbox is done when its reply comes: --wait changes nothing
        parser.add_argument("--wait", action="store_true")
    parser.add_argument("qube", metavar="VMNAME")
    return parser


def admin_main(tool: str, argv: list[str] | None = None) -> int:
    """qvm-check --quiet --running NAME (0 running, 1 not), qvm-start --skip-if-running
    NAME and qvm-shutdown --wait NAME (0 when the qube is in that state afterwards, else
    one line on stderr and non-zero). Usage errors exit 2, as argparse's do in qubesadmin."""
    args = _admin_parser(tool).parse_args(sys.argv[1:] if argv is None else argv)
    request: dict[str, object] = {"admin": ADMIN_TOOLS[tool], "qube": args.qube}
    if tool == "qvm-start":
        request["skip_if_running"] = args.skip_if_running
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.environ.get(SANDBOX_SOCKET_ENV, ""))
        sock.sendall(json.dumps(request).encode())
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    except OSError as e:
        print(f"{tool}: error: cannot reach the sandbox qrexec daemon: {e}", file=sys.stderr)
        return EXIT_QREXEC_PROBLEM
    finally:
        sock.close()
    try:
        answer = json.loads(reply)
        code = int(answer["exit"])
        message = str(answer.get("error", ""))
        running = answer.get("running")
    except (ValueError, KeyError, TypeError):
        print(f"{tool}: error: no answer from the sandbox qrexec daemon", file=sys.stderr)
        return EXIT_QREXEC_PROBLEM
    if message:
        print(message, file=sys.stderr)
    elif tool == "qvm-check" and not args.quiet:
        print(f"{args.qube}: {'running' if running else 'not running'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
