"""The rpms and debs, built from this checkout as `make packages` builds them: what they hold,
what rpmlint and lintian say, and that what they install is what runs (the dom0 rpm
unpacked; the VM debs unpacked by dpkg into the sandbox's qubes, serving a refresh)."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.sandbox.cli import install_services
from broker.sandbox.launcher import Sandbox
from tests.sandbox_helpers import manager

REPO = Path(__file__).resolve().parents[2]
BUILD_TOOLS = ("rpmbuild", "rpm2cpio", "cpio", "rpmlint", "dpkg-buildpackage", "lintian", "dpkg")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    # tools/system-deps.sh installs them: missing here is a set-up fault, not a skip
    assert not missing, f"not installed: {missing} (run tools/system-deps.sh as root)"
    out = tmp_path_factory.mktemp("packages")
    r = subprocess.run([sys.executable, str(REPO / "packaging/build.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert (out / "files.txt").exists(), r.stdout + r.stderr
    return out


def _one(built: Path, pattern: str) -> Path:
    (found,) = built.glob(pattern)
    return found


def test_the_packages_hold_exactly_the_expected_files(built: Path) -> None:
    expected = (REPO / "packaging/expected-files.txt").read_text().splitlines()
    actual = (built / "files.txt").read_text().splitlines()
    diff = "\n".join(difflib.unified_diff(expected, actual, "expected-files.txt", "built",
                                          lineterm=""))  # fmt: skip
    assert actual == expected, diff
    # a template carries only what its qubes run
    names = {line.split()[1] for line in actual}
    assert names == {"qubes-fwupd-dom0", "qubes-fwupd-vm-common", "qubes-fwupd-updatevm",
                     "qubes-fwupd-usbvm"}  # fmt: skip
    for line in actual:
        _kind, package, _mode, path = line.split()
        assert "sandbox" not in path and "/tests/" not in path, line
        if path.endswith("qubes.FwupdDownload"):
            assert package == "qubes-fwupd-updatevm", line
        if path.endswith(("qubes.FwupdUsbvm",)):
            assert package == "qubes-fwupd-usbvm", line


def test_rpmlint_and_lintian_report_no_errors_and_the_readme_explains_each_warning(
    built: Path,
) -> None:
    report = (built / "lint.txt").read_text().splitlines()
    assert report, "no lint report"  # both ran: an rpm without warnings is unheard of
    errors = [line for line in report if re.search(r"(^|: )E: ", line.split(": ", 1)[1])]
    assert not errors, "\n".join(errors)
    readme = (REPO / "README.md").read_text()
    tags = {re.split(r"[: ]W: ", line)[1].split()[0] for line in report}
    unexplained = sorted(tag for tag in tags if f"`{tag}`" not in readme)
    assert not unexplained, f"warnings the README does not explain: {unexplained}"


def test_the_unpacked_dom0_rpm_runs_its_own_qubes_fwupdmgr(built: Path, tmp_path: Path) -> None:
    rpm = _one(built, "qubes-fwupd-dom0-*.noarch.rpm")
    tree = tmp_path / "root"
    tree.mkdir()
    cpio = subprocess.run(f"rpm2cpio {rpm} | cpio -idm --quiet", shell=True, cwd=tree,  # noqa: S602
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert cpio.returncode == 0, cpio.stderr
    tool = tree / "usr/bin/qubes-fwupdmgr"
    # nothing of ours in the environment: the script's own #! python and its own tree
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    version = subprocess.run([str(tool), "--version"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert (version.returncode, version.stdout.strip()) == (0, "qubes-fwupdmgr 0.1.0"), version
    usage = subprocess.run([str(tool), "--help"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.startswith("usage: qubes-fwupdmgr")
    for verb in ("get-devices", "refresh", "update", "local-install", "get-history"):
        assert verb in usage.stdout
    # the code that ran is the unpacked tree's: python left its bytecode there
    cache = tree / "usr/share/qubes-fwupd/broker/__pycache__"
    assert any(p.name.startswith("cli.") for p in cache.iterdir())
    # the installed receive service and policy are the checkout's
    assert (tree / "etc/qubes/policy.d/85-qubes-fwupd.policy").read_bytes() == (
        REPO / "policies/85-qubes-fwupd.policy"
    ).read_bytes()
    assert (tree / "etc/qubes-rpc/qubes.FwupdReceiveUpdates").stat().st_mode & 0o777 == 0o755
    # the installed one has no sandbox: pointed at one, it refuses rather than act on dom0
    aimed = subprocess.run([str(tool), "get-devices"], env={**env, "QUBES_FWUPD_SANDBOX": "/x"},
                           cwd=tmp_path, capture_output=True, text=True, check=False)  # fmt: skip
    assert aimed.returncode == 1 and "has no sandbox" in aimed.stderr, aimed
    # without its code (a removed package's leftover), one line, and no other broker is
    # taken from the environment (-I), not even the checkout's
    shutil.rmtree(tree / "usr/share/qubes-fwupd")
    gone = subprocess.run([str(tool), "--version"], env={**env, "PYTHONPATH": str(REPO)},
                          cwd=tmp_path, capture_output=True, text=True, check=False)  # fmt: skip
    assert gone.returncode == 1, gone
    assert gone.stderr == f"qubes-fwupdmgr: {tree}/usr/share/qubes-fwupd/broker is missing " \
        "(is qubes-fwupd installed?)\n"


def _dpkg_install(built: Path, root: Path, *packages: str) -> None:
    """dpkg -i into the qube's root, as into a template that has nothing installed. Its
    dependencies are the host's (--force-depends: dpkg's database in the root is empty);
    the maintainer scripts run unchrooted (the root has no shell), where dh_python3's
    py3compile finds no /usr/share/qubes-fwupd and compiles nothing."""
    for sub in ("var/lib/dpkg/info", "var/lib/dpkg/updates"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name in ("status", "available"):
        (root / "var/lib/dpkg" / name).touch()
    debs = [str(_one(built, f"{p}_*_all.deb")) for p in packages]
    r = subprocess.run(["dpkg", f"--root={root}", "--force-depends",
                        "--force-script-chrootless", "--install", *debs],
                       capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    status = (root / "var/lib/dpkg/status").read_text()
    for package in packages:
        assert f"Package: {package}\nStatus: install ok installed\n" in status, status


def _dpkg_remove_all(root: Path) -> None:
    """What dpkg installed in the root goes, by its own lists (not rm -r: the qube's
    daemons have state there too), then dpkg's database."""
    dpkg = root / "var/lib/dpkg"
    listed = {Path(line) for f in (dpkg / "info").glob("*.list")
              for line in f.read_text().splitlines() if line not in ("", "/.")}  # fmt: skip
    for path in sorted(listed, key=lambda p: len(p.parts), reverse=True):
        target = root / path.relative_to("/")
        if target.is_dir() and not target.is_symlink():
            if not any(target.iterdir()):
                target.rmdir()
        else:
            target.unlink(missing_ok=True)
    shutil.rmtree(dpkg)


@pytest.fixture
def debs_in_the_qubes(built: Path, sandbox: Sandbox) -> Iterator[Sandbox]:
    """The UpdateVM and sys-usb run the VM debs' services, installed in their trees;
    afterwards what dpkg installed goes, and the checkout's entry points come back."""
    qubes = {"sys-firewall": "qubes-fwupd-updatevm", "sys-usb": "qubes-fwupd-usbvm"}
    try:
        for qube, package in qubes.items():
            # a template has no service until the package brings it (the sandbox links
            # the checkout's at `up`; a conffile found in place would be left alone)
            for service in sandbox.rpc_dir(qube).iterdir():
                service.unlink()
            _dpkg_install(built, sandbox.root(qube), "qubes-fwupd-vm-common", package)
        yield sandbox
    finally:
        for qube in qubes:
            if (sandbox.root(qube) / "var/lib/dpkg").is_dir():
                _dpkg_remove_all(sandbox.root(qube))
            install_services(sandbox, qube)


def test_the_vm_debs_installed_in_the_qubes_serve_a_refresh(debs_in_the_qubes: Sandbox) -> None:
    sandbox = debs_in_the_qubes
    for qube, service in (("sys-firewall", "qubes.FwupdDownload"), ("sys-usb", "qubes.FwupdUsbvm")):
        installed = sandbox.rpc_dir(qube) / service
        assert not installed.is_symlink() and installed.read_text().startswith(
            "#!/usr/bin/python3 -I\n"
        )  # fmt: skip
        # the deb's code is the checkout's, byte for byte
        code = sandbox.root(qube) / "usr/share/qubes-fwupd/broker"
        for module in code.glob("*.py"):
            assert module.read_bytes() == (REPO / "broker" / module.name).read_bytes()
    log_file = sandbox.log_dir / "qrexec.log"
    seen = len(log_file.read_text()) if log_file.exists() else 0
    # 2: the mirror's metadata was current already (earlier tests refreshed): it was
    # still downloaded, checked and pushed by the installed service
    r = manager(sandbox, "refresh", "--force")
    assert r.returncode in (0, 2), r.stdout + r.stderr
    r = manager(sandbox, "get-devices")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[sys-usb]" in r.stdout
    # what ran in each qube was its installed tree (Debian's /usr/bin/python3 left its
    # bytecode there), not the checkout: the services' own modules were imported from it
    for qube, module in (("sys-firewall", "updatevm"), ("sys-usb", "usbvm")):
        cache = sandbox.root(qube) / "usr/share/qubes-fwupd/broker/__pycache__"
        assert any(p.name.startswith(f"{module}.") for p in cache.iterdir()), qube
    log = log_file.read_text()[seen:]
    assert re.search(r"done dom0 -> sys-firewall qubes\.FwupdDownload\+\S*: exit 0", log), log
    assert re.search(r"done sys-firewall -> dom0 qubes\.FwupdReceiveUpdates\S*: exit 0", log), log
    assert re.search(r"done dom0 -> sys-usb qubes\.FwupdUsbvm\+\S*: exit 0", log), log
    assert os.access(sandbox.rpc_dir("sys-firewall") / "qubes.FwupdDownload", os.X_OK)
