"""dom0's cache filesystem full, and metadata signed a few minutes ahead of dom0's clock
(issue 21's faults).

The full disk is real: a 6 MiB tmpfs mounted over dom0's /var/cache/qubes-fwupd inside
dom0's own mount namespace (the host never sees it), holding a copy of the cache and a
filler file. A push must be refused before its first byte is written, with one line that
says so, and leave the cache as it was.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.jcat import BlobKind, build_jcat
from broker.sandbox import daemons
from broker.sandbox.launcher import Launcher, Sandbox
from broker.sandbox.pki import create_pki
from broker.sandbox.pq import sign_pkcs7_at
from broker.sandbox.processes import ProcessTable
from tests.adversarial.hostile import publish_real, publish_variant
from tests.adversarial.test_hostile_updatevm import one_line
from tests.conftest import own_sandbox
from tests.faults import Faults, ran
from tests.sandbox_helpers import manager, probe, qube_paths, webcam_version

pytestmark = pytest.mark.sandbox



def _in_dom0(sandbox: Sandbox, code: str) -> object:
    """Python as root in dom0's namespaces (where the tmpfs is), printing one JSON value."""
    return probe(sandbox, "dom0", "import json, os, subprocess\n" + code)


def _listing(sandbox: Sandbox) -> dict[str, list[str]]:
    """What dom0's own view of its cache holds (the tmpfs, not the host's dir)."""
    cache = qube_paths(sandbox, "dom0").cache_dir
    got = _in_dom0(sandbox, f"""
cache = {str(cache)!r}
out = {{}}
for sub in ("metadata", "cabs", "untrusted"):
    d = os.path.join(cache, sub)
    out[sub] = sorted(
        n + ("->" + os.readlink(os.path.join(d, n)) if os.path.islink(os.path.join(d, n)) else "")
        for n in os.listdir(d))
print(json.dumps(out))
""")
    assert isinstance(got, dict)
    return got


@contextmanager
def full_cache(sandbox: Sandbox, free: int) -> Iterator[None]:
    """dom0's cache on a tmpfs of its own with ``free`` bytes left."""
    paths = qube_paths(sandbox, "dom0")
    cache = str(paths.cache_dir)
    st = paths.cache_dir.stat()
    _in_dom0(sandbox, f"""
cache, copy = {cache!r}, "/tmp/qfw-cache-copy"
subprocess.run(["rm", "-rf", copy], check=True)
subprocess.run(["cp", "-a", cache, copy], check=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode={st.st_mode & 0o7777:o},"
                "uid={st.st_uid},gid={st.st_gid}", "qfw-full", cache], check=True)
subprocess.run(["cp", "-a", copy + "/.", cache], check=True)
s = os.statvfs(cache)
with open(os.path.join(cache, "filler"), "wb") as f:
    f.write(b"\\0" * (s.f_bavail * s.f_frsize - {free}))
print(json.dumps(os.statvfs(cache).f_bavail * s.f_frsize))
""")
    try:
        yield
    finally:
        _in_dom0(sandbox, f"""
subprocess.run(["umount", {cache!r}], check=True)
subprocess.run(["rm", "-rf", "/tmp/qfw-cache-copy"], check=True)
print(json.dumps(True))
""")


def test_a_full_cache_refuses_pushes_before_writing(faultbox: tuple[Sandbox, Faults]) -> None:
    sandbox, _ = faultbox
    publish_real(sandbox)
    assert ran(manager(sandbox, "refresh")) is None
    manager(sandbox, "clean")
    daemons.restart_fwupd(sandbox, Launcher(sandbox), ProcessTable(sandbox.pids_file),
                          "sys-usb")  # fmt: skip
    with full_cache(sandbox, free=0):
        before = _listing(sandbox)
        r = manager(sandbox, "update", "-y")
        assert r.returncode == 1, r.stdout + r.stderr
        line = one_line(r.stderr)
        assert "dom0's cache filesystem" in line and "nothing was stored" in line, line
        assert _listing(sandbox) == before
        assert webcam_version(sandbox, "sys-usb") == "1.2.2"

        publish_variant(sandbox, "full")
        r = manager(sandbox, "refresh")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "dom0's cache filesystem" in one_line(r.stderr)
        assert _listing(sandbox) == before
    # room again: the same runs go through
    assert ran(manager(sandbox, "refresh")) is None
    r = manager(sandbox, "update", "-y")
    assert "[sys-usb] 1.2.2 -> 1.2.4" in r.stdout, r.stdout + r.stderr


def test_metadata_signed_minutes_ahead_of_dom0s_clock_is_taken() -> None:
    """The LVFS's clock (or the UpdateVM's) a few minutes ahead of dom0's: within
    metadata_future_margin_hours the catalog is taken, by dom0 and by both daemons; the
    state records the signing time as signed. A sandbox of its own: afterwards, for those
    minutes, dom0 and both fwupd rightly refuse any honest catalog as older."""
    with own_sandbox("qfs") as sandbox:
        assert ran(manager(sandbox, "refresh")) is None
        _skewed_refresh(sandbox)


def _skewed_refresh(sandbox: Sandbox) -> None:
    publish_variant(sandbox, "skew")  # new bytes, signed now ...
    data = sandbox.lvfs_dir / "firmware.xml.zst"
    ahead = (datetime.now(UTC) + timedelta(minutes=7)).replace(microsecond=0)
    pki = create_pki(sandbox.pki_dir)
    jcat = build_jcat({data.name: [
        (BlobKind.SHA256, _sha256(data)),
        (BlobKind.PKCS7, sign_pkcs7_at(pki.signer_pem, pki.signer_key, data, ahead)),
    ]})  # fmt: skip
    (sandbox.lvfs_dir / f"{data.name}.jcat").write_bytes(jcat)  # ... and again, 7 min ahead
    r = manager(sandbox, "refresh")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"signed {ahead:%Y-%m-%d %H:%M}" in r.stdout, r.stdout
    assert "dom0 fwupd loaded" in r.stdout and "sys-usb fwupd loaded" in r.stdout
    state = json.loads(qube_paths(sandbox, "dom0").metadata_state_file.read_text())
    assert datetime.fromisoformat(state["lvfs"]["signed_at"]) == ahead


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
