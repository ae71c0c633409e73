"""The sandbox's qrexec-client-vm / qvm-run --service: hands our stdin, stdout and stderr
to the emulated qrexec daemon (the socket the launcher put in our environment) and exits
with the service's exit status, as the real clients do."""

from __future__ import annotations

import json
import os
import socket
import sys

from broker.errors import EXIT_QREXEC_PROBLEM
from broker.qrexec import SANDBOX_SOCKET_ENV


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: qrexec_client TARGET SERVICE[+ARG]", file=sys.stderr)
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
