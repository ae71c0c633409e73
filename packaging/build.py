"""`make packages`: the rpms (rpmbuild, which Debian ships too) and the VM debs
(dpkg-buildpackage) from this checkout, with what each holds and what rpmlint and lintian
say about it. tests/packaging runs it and compares the lists with packaging/expected-files.

    python3 packaging/build.py --out DIR

Writes DIR/*.rpm, DIR/*.deb, DIR/files.txt ("rpm|deb package mode path", sorted) and
DIR/lint.txt; prints one line per package. rpmbuild runs with --nodeps: on Debian, rpm's
database knows none of the Fedora BuildRequires (which the spec still names for Fedora).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1]
# what the source tarball holds: what `make install` reads, and the docs the specs ship
TARBALL = ("Makefile", "pyproject.toml", "README.md", "COPYING", "broker", "qrexec",
           "policies", "packaging", "docs")  # fmt: skip
SPECS = ("qubes-fwupd-dom0.spec", "qubes-fwupd-vm.spec")


@dataclass(frozen=True)
class Lint:
    tool: str
    errors: tuple[str, ...]
    warnings: tuple[str, ...]


def version() -> str:
    text = (SOURCE / "broker/__init__.py").read_text()
    found = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    if not found:
        raise SystemExit("broker/__init__.py: no __version__")
    return found.group(1)


def _skip(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    name = Path(info.name).name
    if name == "__pycache__" or name.endswith((".pyc", ".egg-info")):
        return None
    # reproducible, and no build host's user in the tarball
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def source_tarball(out: Path) -> Path:
    top = f"qubes-fwupd-{version()}"
    path = out / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in TARBALL:
            tar.add(SOURCE / name, f"{top}/{name}", filter=_skip)
    return path


def _run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise SystemExit(f"{argv[0]} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def build_rpms(tarball: Path, out: Path, work: Path) -> list[Path]:
    top = work / "rpmbuild"
    (top / "SOURCES").mkdir(parents=True)
    shutil.copy(tarball, top / "SOURCES")
    for spec in SPECS:
        _run(["rpmbuild", "-bb", "--nodeps", "--define", f"_topdir {top}",
              str(SOURCE / "packaging/rpm" / spec)])  # fmt: skip
    built = sorted((top / "RPMS").rglob("*.rpm"))
    for rpm in built:
        shutil.copy(rpm, out)
    return [out / rpm.name for rpm in built]


def build_debs(tarball: Path, out: Path, work: Path) -> list[Path]:
    deb_work = work / "deb"
    deb_work.mkdir()
    # tar(1): Debian 12's python 3.11.2 has no extraction filters (3.11.4 has)
    _run(["tar", "-xzf", str(tarball), "-C", str(deb_work)])
    (tree,) = deb_work.iterdir()
    shutil.copytree(tree / "packaging/debian", tree / "debian")
    _run(["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=tree)
    built = sorted(deb_work.glob("*.deb"))
    for deb in built:
        shutil.copy(deb, out)
    return [out / deb.name for deb in built]


def rpm_files(rpm: Path) -> list[str]:
    name = _run(["rpm", "-qp", "--qf", "%{NAME}", str(rpm)])
    listing = _run(["rpm", "-qp", "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]", str(rpm)])
    return [f"rpm {name} {line}" for line in listing.splitlines() if line]


def deb_files(deb: Path) -> list[str]:
    """Files and links only: a deb lists every parent dir, which says nothing we own."""
    name = _run(["dpkg-deb", "-f", str(deb), "Package"]).strip()
    lines = []
    for line in _run(["dpkg-deb", "-c", str(deb)]).splitlines():
        perms, *_, path = line.split(None, 5)
        if perms.startswith("d"):
            continue
        lines.append(f"deb {name} {perms} {path.removeprefix('.').split(' -> ')[0]}")
    return lines


def _lint(tool: str, argv: list[str]) -> Lint:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    if tool == "rpmlint":
        errors = [line for line in lines if ": E: " in line]
        warnings = [line for line in lines if ": W: " in line]
    else:
        errors = [line for line in lines if line.startswith("E: ")]
        warnings = [line for line in lines if line.startswith("W: ")]
    return Lint(tool, tuple(errors), tuple(warnings))


def lint(rpms: list[Path], debs: list[Path]) -> list[Lint]:
    specs = [str(SOURCE / "packaging/rpm" / s) for s in SPECS]
    return [
        _lint("rpmlint", ["rpmlint", "--config", str(SOURCE / "packaging/rpm/rpmlint.toml"),
                          *specs, *map(str, rpms)]),
        # as root, lintian would refuse to unpack without this
        _lint("lintian", ["lintian", "--allow-root", "--tag-display-limit", "0",
                          *map(str, debs)]),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-lint", action="store_true")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qfw-pkg-") as tmp:
        work = Path(tmp)
        tarball = source_tarball(work)
        rpms = build_rpms(tarball, out, work)
        debs = build_debs(tarball, out, work)
    files = sorted([*(f for rpm in rpms for f in rpm_files(rpm)),
                    *(f for deb in debs for f in deb_files(deb))])  # fmt: skip
    (out / "files.txt").write_text("".join(f"{line}\n" for line in files))
    report = [] if args.no_lint else lint(rpms, debs)
    lines = [f"{r.tool}: {line}\n" for r in report for line in (*r.errors, *r.warnings)]
    (out / "lint.txt").write_text("".join(lines))
    for package in [*rpms, *debs]:
        print(package.name)
    print(f"what they hold ({out / 'files.txt'}):")
    print("".join(f"  {line}\n" for line in files), end="")
    expected = (SOURCE / "packaging/expected-files.txt").read_text().splitlines()
    if files != expected:
        print("  differs from packaging/expected-files.txt")
    for result in report:
        print(f"{result.tool}: {len(result.errors)} errors, {len(result.warnings)} warnings")
    return 1 if files != expected or any(result.errors for result in report) else 0


if __name__ == "__main__":
    sys.exit(main())
