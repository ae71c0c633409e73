"""One error hierarchy. ``str(error)`` is the single line the user reads.

Every refusal of hostile input raises a subclass of :class:`BrokerError`; any other
exception is a bug and is allowed to show a traceback (``--verbose``) or reach the log.
Exit codes are mapped here and nowhere else.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_NOTHING_TO_DO = 2  # as fwupdmgr: nothing to update / already current / declined
EXIT_NOT_FOUND = 3  # as fwupdmgr: no such device, release or remote
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
EXIT_TERMINATED = 143  # SIGTERM (systemctl stop), as a shell reports it
# check-unattended only: unattended.conf does not load. systemd skips a unit whose
# ExecCondition exits 1-254 without failing it; 255 fails it, so the admin sees it
EXIT_CONDITION_BROKEN = 255
# qrexec's own codes, as real qrexec reports them to a caller (shared/QUBES.md)
EXIT_QREXEC_PROBLEM = 125
EXIT_QREXEC_REFUSED = 126
EXIT_QREXEC_NO_SERVICE = 127
# what qubes-fwupdmgr's codes mean: --help's epilog and the man page's EXIT STATUS
EXIT_MEANINGS = (
    (EXIT_OK, "done (an install that waits for a reboot says so, and is done for now)"),
    (EXIT_FAILURE, "failure, or a usage error: one line on stderr names the qube and the cause"),
    (EXIT_NOTHING_TO_DO, "nothing to do: no update, metadata already current, declined, or "
     "held by an inhibit file"),
    (EXIT_NOT_FOUND, "no device, release or remote matches what was named"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
    (EXIT_TERMINATED, "terminated (SIGTERM, as systemctl stop sends it)"),
)


class BrokerError(Exception):
    """Base of every error the user is meant to read."""

    exit_code = EXIT_FAILURE

    def __str__(self) -> str:
        # one line, whatever a message was built from
        return " ".join(super().__str__().split())


class ConfigError(BrokerError):
    """Configuration missing or invalid."""


class FormatError(BrokerError):
    """Input does not have the expected structure."""


class LimitExceeded(BrokerError):
    """Input is larger (or deeper, or more numerous) than a configured cap."""


class VerificationError(BrokerError):
    """A checksum or signature did not verify against the trust store."""


class RollbackError(VerificationError):
    """Verified input is older than what was already accepted."""


class TransferError(BrokerError):
    """A transfer between qubes was refused (caller, nonce, framing)."""


class QrexecError(BrokerError):
    """A qrexec call failed: refused by policy, no such service, or the service failed."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


class DaemonError(BrokerError):
    """A fwupd daemon was absent or refused an operation."""


class NothingToDo(BrokerError):
    """Nothing to update, or metadata already current."""

    exit_code = EXIT_NOTHING_TO_DO


class Inhibited(NothingToDo):
    """An inhibit file of the config's exists: nothing is refreshed or installed. For a
    timer that is the admin's choice, not a failure: exit 2, as for nothing to do."""


class NoMetadata(BrokerError):
    """No verified metadata yet: nothing can be said about updates until a refresh."""


class Busy(BrokerError):
    """Another qubes-fwupdmgr holds the run lock (broker.runlock)."""


class NotFound(BrokerError):
    """No device, release or remote matches what the user named."""

    exit_code = EXIT_NOT_FOUND


def exit_code_for(error: BaseException) -> int:
    """The process exit status for an error that reached the top of a command."""
    if isinstance(error, BrokerError):
        return error.exit_code
    return EXIT_FAILURE
