"""Whether a qube runs, and starting and shutting it down, and dom0's global preferences:
Qubes' admin tools in dom0 (qvm-check, qvm-start, qvm-shutdown, qubes-prefs, which go
through qubesd's admin API). The sandbox puts stand-ins of the same names on dom0's PATH,
as it does for qvm-run.

The manager starts a halted UpdateVM itself, rather than leaving it to qvm-run's
autostart, so that it knows it did, says so, and shuts it down again when the run ends:
a qube the admin had halted is never left running by us.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from broker.errors import QrexecError
from broker.sanitize import printable

_SECONDS = 120  # a qube's start or shutdown; qvm-start's own wait for qrexec is 60 s


@dataclass(frozen=True)
class AdminTools:
    """dom0's qvm-* commands: argv only, never a shell."""

    timeout: float = _SECONDS

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=self.timeout, check=False)  # fmt: skip
        except FileNotFoundError as e:
            raise QrexecError(f"{argv[0]} not found: is this dom0?") from e
        except subprocess.TimeoutExpired as e:
            raise QrexecError(f"{' '.join(argv[:-1])} {argv[-1]} took more than "
                              f"{self.timeout:.0f} s") from e  # fmt: skip

    def qubes_pref(self, name: str) -> str:
        """A global preference of dom0's (qubes-prefs NAME): its value, "" when unset."""
        r = self._run(["qubes-prefs", "--", name])
        if r.returncode != 0:
            raise QrexecError(f"qubes-prefs {name}: {_why(r)}")
        value = r.stdout.decode("utf-8", "replace").strip()
        return "" if value in ("", "None") else value

    def is_running(self, qube: str) -> bool:
        return self._run(["qvm-check", "--quiet", "--running", qube]).returncode == 0

    def start(self, qube: str) -> None:
        r = self._run(["qvm-start", "--skip-if-running", qube])
        if r.returncode != 0:
            raise QrexecError(f"{qube} is not running and could not be started: {_why(r)}")

    def shutdown(self, qube: str) -> None:
        r = self._run(["qvm-shutdown", "--wait", qube])
        if r.returncode != 0:
            raise QrexecError(f"{qube} could not be shut down: {_why(r)}")


def _why(r: subprocess.CompletedProcess[bytes]) -> str:
    lines = [ln for ln in r.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    return printable(lines[-1], 200) if lines else f"exit {r.returncode}"
