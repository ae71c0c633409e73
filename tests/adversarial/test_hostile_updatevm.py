"""A compromised UpdateVM, or another qube posing as one, against dom0's receive service.

Each case asserts: non-zero exit, one line naming the cause, dom0's trusted cache
unchanged, nothing left in the untrusted dir."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.jcat import BlobKind, build_jcat
from broker.sandbox.launcher import Sandbox
from broker.sandbox.pki import make_ca, sign_pkcs7
from broker.session import ExpectedFile, Sessions
from tests.sandbox_helpers import call_from, manager, qube_paths, tree_snapshot

pytestmark = pytest.mark.sandbox


def trusted_state(sandbox: Sandbox) -> dict[str, bytes]:
    paths = qube_paths(sandbox, "dom0")
    state = tree_snapshot(paths.metadata_dir) | tree_snapshot(paths.cabs_dir)
    if paths.metadata_state_file.exists():
        state["<state>"] = paths.metadata_state_file.read_bytes()
    return state


def assert_nothing_left(sandbox: Sandbox, before: dict[str, bytes]) -> None:
    paths = qube_paths(sandbox, "dom0")
    assert trusted_state(sandbox) == before, "dom0's trusted cache changed"
    leftovers = list(paths.untrusted_dir.glob("*")) if paths.untrusted_dir.exists() else []
    assert leftovers == [], f"files left in the untrusted dir: {leftovers}"


def one_line(stderr: str | bytes) -> str:
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got: {text!r}"
    return lines[0]


@pytest.fixture
def evil_signer(tmp_path: Path) -> tuple[Path, Path, Path]:
    signer, key = make_ca(tmp_path / "evil", "Evil mirror")
    return tmp_path / "evil/ca.pem", signer, key


@pytest.fixture
def mirror_backup(sandbox: Sandbox) -> Iterator[Path]:
    """Lets a test replace the mirror's metadata; puts the real files back afterwards."""
    backup = sandbox.dir / "lvfs-backup"
    names = ["firmware.xml.zst", "firmware.xml.zst.jcat"]
    backup.mkdir(exist_ok=True)
    for n in names:
        shutil.copy2(sandbox.lvfs_dir / n, backup / n)
    yield sandbox.lvfs_dir
    for n in names:
        shutil.copy2(backup / n, sandbox.lvfs_dir / n)


def test_untrusted_signature_refused_by_dom0_even_when_updatevm_accepts_it(
    sandbox: Sandbox, evil_signer: tuple[Path, Path, Path], mirror_backup: Path
) -> None:
    evil_ca, signer, key = evil_signer
    # the hostile mirror serves metadata signed by its own CA ...
    data = mirror_backup / "firmware.xml.zst"
    jcat = build_jcat(
        {
            data.name: [
                (BlobKind.SHA256, hashlib.sha256(data.read_bytes()).hexdigest()),
                (BlobKind.PKCS7, sign_pkcs7(signer, key, data)),
            ]
        }
    )
    (mirror_backup / "firmware.xml.zst.jcat").write_bytes(jcat)
    # ... and the compromised UpdateVM trusts that CA, so its own check passes
    updatevm_trust = sandbox.root("sys-firewall") / "etc/pki/fwupd-metadata/evil.pem"
    shutil.copy(evil_ca, updatevm_trust)
    before = trusted_state(sandbox)
    try:
        r = manager(sandbox, "refresh")
    finally:
        updatevm_trust.unlink()
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "dom0 refused what sys-firewall sent" in line
    assert "no trusted signature" in line
    assert_nothing_left(sandbox, before)


def test_push_from_a_qube_that_is_not_the_updatevm_is_refused_by_policy(
    sandbox: Sandbox,
) -> None:
    before = trusted_state(sandbox)
    for qube in ("work", "sys-usb"):
        r = call_from(sandbox, qube, "dom0", "qubes.FwupdReceiveUpdates", b"{}\n")
        assert r.returncode == 126, (qube, r.stderr)
        assert one_line(r.stderr) == "Request refused"
    assert_nothing_left(sandbox, before)


def test_push_from_wrong_qube_refused_by_dom0_even_if_policy_allows_it(sandbox: Sandbox) -> None:
    """An admin's over-broad policy is not enough: the service checks the caller itself."""
    loose = sandbox.policy_dir / "30-user.policy"
    loose.write_text("qubes.FwupdReceiveUpdates * work @adminvm allow\n")
    before = trusted_state(sandbox)
    paths = qube_paths(sandbox, "dom0")
    session = Sessions(paths.sessions_dir).open(
        "metadata", "lvfs", (ExpectedFile("firmware.xml.zst", 1 << 20),), 60
    )
    frame = json.dumps({"version": 1, "nonce": session.nonce, "files": []}).encode() + b"\n"
    try:
        r = call_from(sandbox, "work", "dom0", "qubes.FwupdReceiveUpdates", frame)
    finally:
        loose.unlink()
        Sessions(paths.sessions_dir).close(session.nonce)
    assert r.returncode == 1
    assert "work is not the configured UpdateVM" in one_line(r.stderr)
    assert_nothing_left(sandbox, before)


def test_push_with_unknown_nonce_is_refused(sandbox: Sandbox) -> None:
    before = trusted_state(sandbox)
    frame = json.dumps({"version": 1, "nonce": "ab" * 16, "files": []}).encode() + b"\n"
    r = call_from(sandbox, "sys-firewall", "dom0", "qubes.FwupdReceiveUpdates", frame)
    assert r.returncode == 1
    assert "no pending dom0 session" in one_line(r.stderr)
    assert_nothing_left(sandbox, before)
