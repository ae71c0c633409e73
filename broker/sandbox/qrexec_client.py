"""The sandbox's qrexec-client-vm and qvm-run --service: hands our stdin, stdout and stderr
to the emulated qrexec daemon (the socket the launcher put in our environment) and exits
with the service's exit status, as the real clients do. `up` installs it under both names
in each qube's usr/bin (:func:`install_clients`), which the launcher puts first on PATH."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from broker.errors import EXIT_QREXEC_PROBLEM

SANDBOX_SOCKET_ENV = "QUBES_FWUPD_QREXEC_SOCKET"
# what each qube calls with, as in Qubes (broker.qrexec.Transport)
CLIENTS = {"dom0": "qvm-run"}
VM_CLIENT = "qrexec-client-vm"


def install_clients(root: Path, qube: str) -> None:
    """The qube's qrexec client, in its usr/bin: this module, run by our interpreter."""
    name = CLIENTS.get(qube, VM_CLIENT)
    path = root / "usr/bin" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"#!{sys.executable}\n"
        f"# the sandbox's {name}: broker/sandbox/qrexec_client.py, written by `up`\n"
        "import sys\n\n"
        "from broker.sandbox.qrexec_client import main\n\n"
        "sys.exit(main())\n"
    )
    path.chmod(0o755)


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


if __name__ == "__main__":
    sys.exit(main())
