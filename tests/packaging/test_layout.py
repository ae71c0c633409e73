"""What `make install` lays out, checked against the code: each package carries the modules
its entry points import, one version everywhere, and the shipped config is the defaults."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import broker
from broker.config import _MAIN_KEYS, _REMOTE_KEYS, Config, Paths

REPO = Path(__file__).resolve().parents[2]


def _install_module() -> ModuleType:
    path = REPO / "packaging/install.py"
    spec = importlib.util.spec_from_file_location("packaging_install", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


install = _install_module()


def _imported(*entry_modules: str) -> set[str]:
    """The broker modules a fresh interpreter loads for these entry points."""
    code = (
        f"import sys\nimport {', '.join(entry_modules)}\n"
        "print(' '.join(m for m in sys.modules if m == 'broker' or m.startswith('broker.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return {"__init__" if m == "broker" else m.removeprefix("broker.") for m in out.split()}


def test_each_package_carries_exactly_what_its_entry_points_import() -> None:
    for component, entries in (("dom0", ("dom0",)), ("vm-common", ("updatevm", "usbvm"))):
        modules = {m for e in entries for _, _, m in install.ENTRIES[e]}
        assert set(install.MODULES[component]) == _imported(*modules), component


def test_no_package_carries_the_sandbox_or_dom0_code_in_a_vm() -> None:
    everything = {m for modules in install.MODULES.values() for m in modules}
    assert not any(m.startswith("sandbox") for m in everything)
    # the UpdateVM and sys-usb never run dom0's manager, receive service or history
    assert not {"cli", "manager", "receive", "history", "routing"} & set(
        install.MODULES["vm-common"]
    )


def test_dom0_does_not_need_requests_nor_the_updatevm() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, broker.cli, broker.receive; "
         "print('requests' in sys.modules, 'broker.updatevm' in sys.modules)"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert out == ["False", "False"]


def test_one_version_in_the_code_the_specs_and_debian() -> None:
    version = broker.__version__
    for spec in sorted((REPO / "packaging/rpm").glob("*.spec")):
        text = spec.read_text()
        (found,) = re.findall(r"^Version:\s+(\S+)$", text, re.MULTILINE)
        assert found == version, spec.name
        # the newest changelog entry is for this version
        (first,) = re.findall(r"^\* .* - (\S+)-\d+$", text, re.MULTILINE)[:1]
        assert first == version, spec.name
    changelog = (REPO / "packaging/debian/changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"qubes-fwupd ({version}) "), changelog


def test_the_shipped_config_is_the_defaults_as_shipped_and_uncommented(tmp_path: Path) -> None:
    shipped = (REPO / "packaging/qubes-fwupd.conf").read_text()
    paths = Paths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    paths.config_file.write_text(shipped)
    assert Config.load(paths) == Config()
    # every key is shown, with its default: uncommented, the file means the same
    uncommented = re.sub(r"^#(?=\[|[a-z_]+ =|    )", "", shipped, flags=re.MULTILINE)
    keys = set(re.findall(r"^([a-z_]+) =", uncommented, re.MULTILINE))
    assert keys == _MAIN_KEYS | _REMOTE_KEYS
    paths.config_file.write_text(uncommented)
    loaded = Config.load(paths)
    assert loaded.warnings == ()
    assert loaded == Config()


def test_installed_entry_points_find_their_code_from_their_own_path(tmp_path: Path) -> None:
    layout = install.Layout(tmp_path, "/usr", "/etc", "/usr/bin/python3")
    for component in ("dom0", "updatevm", "usbvm"):
        for source, template, module in install.ENTRIES[component]:
            text = install.entry_point(source, layout.path(template), layout)
            assert text.startswith("#!/usr/bin/python3 -I\n")
            # from /usr/bin or /etc/qubes-rpc, the relative path lands on /usr/share/...
            rel = re.search(r"realpath\(__file__\)\), '([^']+)'\)\)", text)
            assert rel is not None
            here = Path(layout.path(template)).parent
            assert (here / rel.group(1)).resolve() == Path("/usr/share/qubes-fwupd")
            assert f"from {module} import main" in text
