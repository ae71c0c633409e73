"""A qube's power state in the sandbox: dom0's qvm-check, qvm-start and qvm-shutdown
stand-ins (what the manager runs to start a halted UpdateVM and shut it down again), the
qrexec daemon starting a shut-down target for a call, as real qrexec does, and no one but
dom0 reaching the admin actions."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from broker.sandbox.launcher import UPDATEVM, Launcher, Sandbox
from broker.sandbox.qrexec_client import ADMIN_TOOLS

QUBE = UPDATEVM  # sys-firewall


def _run(
    sandbox: Sandbox, qube: str, argv: list[str], data: bytes = b""
) -> subprocess.CompletedProcess[str]:
    proc = Launcher(sandbox).popen(
        qube, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = proc.communicate(data, timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


def in_dom0(sandbox: Sandbox, *argv: str) -> subprocess.CompletedProcess[str]:
    """A command as dom0's admin types it: found on dom0's PATH, in dom0."""
    return _run(sandbox, "dom0", list(argv))


def admin_from(
    sandbox: Sandbox, qube: str, tool: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """The same admin request, made from another qube's own code (which has no qvm-*)."""
    code = (
        "import sys\nfrom broker.sandbox.qrexec_client import admin_main\n"
        f"sys.exit(admin_main({tool!r}, {list(args)!r}))\n"
    )
    return _run(sandbox, qube, [sys.executable, "-c", code])


def running(sandbox: Sandbox, qube: str = QUBE) -> int:
    r = in_dom0(sandbox, "qvm-check", "--quiet", "--running", qube)
    assert (r.stdout, r.stderr) == ("", ""), r
    return r.returncode


def log_lines(sandbox: Sandbox) -> list[str]:
    path = sandbox.log_dir / "qrexec.log"
    lines = path.read_text().splitlines() if path.exists() else []
    # drop the timestamp
    return [line.split(" ", 1)[1] for line in lines]


def new_log_lines(sandbox: Sandbox, before: list[str]) -> list[str]:
    return log_lines(sandbox)[len(before) :]


@contextmanager
def markers_cleaned(sandbox: Sandbox, qube: str = QUBE) -> Iterator[None]:
    """Whatever the test leaves, the qube is running again afterwards."""
    try:
        yield
    finally:
        sandbox.stopped_file(qube).unlink(missing_ok=True)
        sandbox.halted_file(qube).unlink(missing_ok=True)


@contextmanager
def extra_policy(sandbox: Sandbox, text: str) -> Iterator[Path]:
    """An extra policy file read before ours (first match wins), for this test only."""
    path = sandbox.policy_dir / "10-test-qube-power.policy"
    path.write_text(text)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def test_the_stand_ins_are_on_dom0_s_path_only(sandbox: Sandbox) -> None:
    for tool in ADMIN_TOOLS:
        assert (sandbox.root("dom0") / "usr/bin" / tool).exists()
        assert not (sandbox.root("work") / "usr/bin" / tool).exists()
        assert not (sandbox.root(QUBE) / "usr/bin" / tool).exists()


def test_shutdown_start_and_a_call_that_starts_the_qube(sandbox: Sandbox) -> None:
    stopped = sandbox.stopped_file(QUBE)
    with markers_cleaned(sandbox):
        assert running(sandbox) == 0
        assert running(sandbox, "dom0") == 0
        before = log_lines(sandbox)

        r = in_dom0(sandbox, "qvm-shutdown", "--wait", QUBE)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r
        assert stopped.exists()
        assert running(sandbox) == 1
        # shutting down a halted qube is no error, and changes nothing
        r = in_dom0(sandbox, "qvm-shutdown", "--wait", QUBE)
        assert (r.returncode, r.stderr) == (0, ""), r
        assert stopped.exists()

        # dom0's qrexec call starts it first, as qvm-run does
        r = in_dom0(sandbox, "qvm-run", "--pass-io", "--no-gui", "--service", "--",
                    QUBE, "qubes.FwupdDownload")  # fmt: skip
        # the service ran (and refused an empty request): not qrexec's halted or refused
        assert r.returncode == 1 and r.stderr.startswith("qubes.FwupdDownload: "), r
        assert not stopped.exists()
        assert running(sandbox) == 0
        log = new_log_lines(sandbox, before)
        assert f"admin dom0 shutdown {QUBE}: ok" in log, log
        assert f"admin dom0 check {QUBE}: not running" in log, log
        started = f"started {QUBE} for dom0 -> {QUBE} qubes.FwupdDownload+"
        assert started in log, log
        # started before the call went on to the service
        allow = [i for i, line in enumerate(log) if line.startswith(f"allow dom0 -> {QUBE} ")]
        assert allow and log.index(started) < allow[-1], log
        assert f"done dom0 -> {QUBE} qubes.FwupdDownload+: exit 1" in log, log

        # and qvm-start, after qvm-shutdown
        before = log_lines(sandbox)
        assert in_dom0(sandbox, "qvm-shutdown", "--wait", QUBE).returncode == 0
        assert running(sandbox) == 1
        r = in_dom0(sandbox, "qvm-start", "--skip-if-running", QUBE)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r
        assert not stopped.exists()
        assert running(sandbox) == 0
        # already running: fine with --skip-if-running, an error without
        r = in_dom0(sandbox, "qvm-start", "--skip-if-running", QUBE)
        assert (r.returncode, r.stderr) == (0, ""), r
        r = in_dom0(sandbox, "qvm-start", QUBE)
        assert r.returncode == 1 and r.stderr == f"{QUBE}: domain is already running\n", r
        log = new_log_lines(sandbox, before)
        assert f"admin dom0 start {QUBE}: ok" in log, log
        assert f"admin dom0 start {QUBE}: ok (already running)" in log, log
    assert not stopped.exists()


def test_a_qube_that_cannot_start(sandbox: Sandbox) -> None:
    halted = sandbox.halted_file(QUBE)
    with markers_cleaned(sandbox):
        halted.parent.mkdir(exist_ok=True)
        halted.touch()
        assert running(sandbox) == 1
        r = in_dom0(sandbox, "qvm-start", "--skip-if-running", QUBE)
        assert r.returncode != 0, r
        assert r.stderr == f"{QUBE}: could not be started (sandbox: halted)\n", r
        assert r.stdout == ""
        # shut down as well: qvm-start still cannot start it
        assert in_dom0(sandbox, "qvm-shutdown", "--wait", QUBE).returncode == 0
        assert in_dom0(sandbox, "qvm-start", "--skip-if-running", QUBE).returncode != 0
        # and a call to it fails as before, without starting it
        r = in_dom0(sandbox, "qvm-run", "--pass-io", "--no-gui", "--service", "--",
                    QUBE, "qubes.FwupdDownload")  # fmt: skip
        assert r.returncode == 1 and "could not be started" in r.stderr, r
        assert running(sandbox) == 1
        assert f"admin dom0 start {QUBE}: failed (halted)" in log_lines(sandbox)
    assert running(sandbox) == 0


def test_unknown_qubes_and_dom0(sandbox: Sandbox) -> None:
    for argv in (["qvm-check", "--quiet", "--running", "no-such-qube"],
                 ["qvm-start", "--skip-if-running", "no-such-qube"],
                 ["qvm-shutdown", "--wait", "no-such-qube"]):  # fmt: skip
        r = in_dom0(sandbox, *argv)
        assert (r.returncode, r.stderr) == (1, "no-such-qube: no such domain\n"), r
    r = in_dom0(sandbox, "qvm-shutdown", "--wait", "dom0")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r
    assert in_dom0(sandbox, "qvm-start", "--skip-if-running", "dom0").returncode == 0
    assert not sandbox.stopped_file("dom0").exists()
    # not --quiet: it says so, as qvm-check does
    r = in_dom0(sandbox, "qvm-check", "--running", QUBE)
    assert (r.returncode, r.stdout) == (0, f"{QUBE}: running\n"), r
    # a usage error is argparse's, as in qubesadmin's tools
    r = in_dom0(sandbox, "qvm-check", "--quiet", QUBE)
    assert r.returncode == 2, r


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        ("qvm-shutdown", ["--wait", QUBE]),
        ("qvm-start", ["--skip-if-running", QUBE]),
        ("qvm-check", ["--quiet", "--running", QUBE]),
    ],
)
def test_only_dom0_may_use_the_admin_actions(sandbox: Sandbox, tool: str, args: list[str]) -> None:
    with markers_cleaned(sandbox):
        for qube in ("sys-usb", "work", QUBE):
            before = log_lines(sandbox)
            r = admin_from(sandbox, qube, tool, *args)
            assert (r.returncode, r.stdout, r.stderr) == (126, "", "Request refused\n"), r
            assert not sandbox.stopped_file(QUBE).exists()
            verb = {"qvm-shutdown": "shutdown", "qvm-start": "start", "qvm-check": "check"}[tool]
            assert new_log_lines(sandbox, before) == [
                f"deny admin {qube} {verb} {QUBE}: only dom0 may use the admin API"
            ]
        # a stopped qube is not started by another's request either
        assert in_dom0(sandbox, "qvm-shutdown", "--wait", QUBE).returncode == 0
        r = admin_from(sandbox, "sys-usb", "qvm-start", "--skip-if-running", QUBE)
        assert r.returncode == 126, r
        assert sandbox.stopped_file(QUBE).exists()
    assert running(sandbox) == 0


def test_a_vm_s_call_starts_its_target_unless_autostart_is_no(sandbox: Sandbox) -> None:
    stopped = sandbox.stopped_file(QUBE)
    call = [sys.executable, "-m", "broker.sandbox.qrexec_client", QUBE, "qubes.FwupdDownload"]
    with markers_cleaned(sandbox):
        assert in_dom0(sandbox, "qvm-shutdown", "--wait", QUBE).returncode == 0
        with extra_policy(sandbox, f"qubes.FwupdDownload * work {QUBE} allow autostart=no\n"):
            before = log_lines(sandbox)
            r = _run(sandbox, "work", call)
            assert (r.returncode, r.stderr) == (126, "Request refused\n"), r
            assert stopped.exists()
            log = new_log_lines(sandbox, before)
            assert any(
                line.startswith(f"deny work -> {QUBE} qubes.FwupdDownload+:")
                and "autostart=no" in line
                for line in log
            ), log
        with extra_policy(sandbox, f"qubes.FwupdDownload * work {QUBE} allow\n"):
            before = log_lines(sandbox)
            r = _run(sandbox, "work", call)
            assert r.returncode == 1 and r.stderr.startswith("qubes.FwupdDownload: "), r
            assert not stopped.exists()
            log = new_log_lines(sandbox, before)
            assert f"started {QUBE} for work -> {QUBE} qubes.FwupdDownload+" in log, log
        # a refused call never starts it
        assert in_dom0(sandbox, "qvm-shutdown", "--wait", QUBE).returncode == 0
        r = _run(sandbox, "work", call)
        assert (r.returncode, r.stderr) == (126, "Request refused\n"), r
        assert stopped.exists()
    assert running(sandbox) == 0
