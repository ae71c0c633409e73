"""The Salt states (packaging/salt/): rendered as Salt renders them (Jinja, then YAML), with
no pillar and with pillar.example, they name only packages, files and units the packages
install and tags the policy knows, and the files they write load as our config does.
Debian 12 has no Salt (salt-call is not in its archive): this is the parse test."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from broker.config import LVFS_METADATA_SIGNERS, Config, Paths
from broker.unattended import UnattendedPolicy

REPO = Path(__file__).resolve().parents[2]
SALT = REPO / "packaging/salt"
EXAMPLE = yaml.safe_load((SALT / "pillar.example").read_text())
PILLARS = {"none": {}, "example": EXAMPLE}


def _expected() -> list[tuple[str, str, str]]:
    """(kind, package, path) of every file the packages install."""
    out = []
    for line in (REPO / "packaging/expected-files.txt").read_text().splitlines():
        kind, package, _mode, path = line.split(maxsplit=3)
        out.append((kind, package, path))
    return out


def _render(path: Path, pillar: dict[str, Any]) -> Any:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)  # noqa: S701  YAML, not HTML
    salt = {"pillar.get": lambda key, default=None: pillar.get(key, default)}
    return yaml.safe_load(env.from_string(path.read_text()).render(salt=salt, pillar=pillar))


def _states(pillar: dict[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    states: dict[str, Any] = {}
    for sls in sorted((SALT / "qubes-fwupd").glob("*.sls")):
        rendered = _render(sls, pillar)
        assert isinstance(rendered, dict), sls
        assert not set(rendered) & set(states), f"{sls}: a state id used twice"
        states.update(rendered)
    return states


def _args(state: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """The one ``module.function`` of a state and its arguments as a dict."""
    ((function, args),) = state.items()
    assert re.fullmatch(r"[a-z]+\.[a-z_]+", function), function
    merged: dict[str, Any] = {}
    for arg in args:
        ((key, value),) = arg.items()
        merged[key] = value
    return function, merged


@pytest.mark.parametrize("pillar", PILLARS.values(), ids=PILLARS.keys())
def test_every_state_names_only_what_the_packages_install(pillar: dict[str, Any]) -> None:
    expected = _expected()
    packages = {package for _, package, _ in expected}
    files = {path for _, package, path in expected if package == "qubes-fwupd-dom0"}
    policy = (REPO / "policies/85-qubes-fwupd.policy").read_text()
    seen = set()
    for state_id, state in _states(pillar).items():
        function, args = _args(state)
        seen.add(function)
        if function == "pkg.installed":
            assert args["name"] in packages, state_id
        elif function == "file.managed":
            assert args["name"] in files, f"{state_id}: {args['name']} is no file of dom0's"
        elif function == "service.enabled":
            assert f"/usr/lib/systemd/system/{args['name']}" in files, state_id
        elif function == "qvm.tags":
            for tag in args["add"]:
                assert f"@tag:{tag}" in policy, f"{state_id}: the policy knows no tag {tag}"
        else:
            pytest.fail(f"{state_id}: {function} is not checked here")
    assert {"pkg.installed", "file.managed", "qvm.tags"} <= seen


@pytest.mark.parametrize("pillar", PILLARS.values(), ids=PILLARS.keys())
def test_the_files_written_load_as_the_pillar_says(
    pillar: dict[str, Any], tmp_path: Path
) -> None:
    states = _states(pillar)
    paths = Paths(tmp_path)
    for state in states.values():
        function, args = _args(state)
        if function == "file.managed":
            target = tmp_path / args["name"].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(args["contents"])
    # the organisation's CAs, which a state of its own puts in fwupd's store
    for remote in pillar.get("qubes-fwupd", {}).get("remotes", {}).values():
        for name in remote.get("payload_anchors", []):
            paths.pki_firmware_dirs[0].mkdir(parents=True, exist_ok=True)
            (paths.pki_firmware_dirs[0] / name).write_text("a CA\n")
    config = Config.load(paths)
    policy = UnattendedPolicy.load(paths.unattended_file)
    assert not config.warnings and not policy.warnings
    fw = pillar.get("qubes-fwupd", {})
    assert config.updatevm == fw.get("updatevm", "sys-firewall")
    for remote_id, remote in fw.get("remotes", {}).items():
        got = config.remote(remote_id)
        assert got.metadata_url == remote["metadata_url"]
        assert got.metadata_signers == frozenset(remote["metadata_signers"])
        assert got.payload_anchors == tuple(remote["payload_anchors"])
        assert got.payload_signers == (frozenset(remote["payload_signers"])
                                       if "payload_signers" in remote else None)  # fmt: skip
        assert got.updatevm == remote.get("updatevm")
        assert got.heads_components == tuple(remote.get("heads_components", ()))
    assert [r.id for r in config.remotes] == ["lvfs", *fw.get("remotes", {})]
    # the LVFS kept beside the pillar's remotes, with its built-in pins
    assert config.remote("lvfs").metadata_signers == LVFS_METADATA_SIGNERS
    assert policy.qubes == frozenset(fw.get("unattended", {}).get("qubes", []))
    assert policy.min_urgency == fw.get("unattended", {}).get("min_urgency", "")
    timer = [s for s in states.values() if _args(s)[0] == "service.enabled"]
    assert bool(timer) == bool(fw.get("timer"))


def test_the_top_file_targets_dom0_and_the_templates_the_pillar_names() -> None:
    assert _render(SALT / "qubes-fwupd.top", {}) == {"base": {"dom0": ["qubes-fwupd.dom0"]}}
    top = _render(SALT / "qubes-fwupd.top", EXAMPLE)["base"]
    assert top == {"dom0": ["qubes-fwupd.dom0"], "fedora-41": ["qubes-fwupd.updatevm",
                                                                "qubes-fwupd.usbvm"]}  # fmt: skip
