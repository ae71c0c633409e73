"""Hostile cabs at dom0's receive service: defence in depth behind the sha256 that
verified metadata gives for a cab. Each cab here is one that a compromised LVFS signing
key (or a hostile mirror whose catalog dom0 took) could make dom0 ask for: dom0 opens a
cab session for the release exactly as `update` does and the UpdateVM pushes the cab.
Most are signed by the sandbox LVFS's trusted key, so that the check under test is the
one that must refuse them.

Each case: the push exits 1 with one line naming the cause, dom0 records the refusal as
its verdict, its trusted cache is unchanged, nothing is left in its untrusted, sessions or
tmp dirs, no process is left. (test_hostile_mirror.py drives some of the same cabs
through a real mirror, refresh and `update -y`.)"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.cabinet import ExpectedRelease, inspect_cab
from broker.config import Limits
from broker.sandbox.launcher import Sandbox
from broker.signatures import TrustStore
from tests.adversarial.hostile import (
    FAKE_ID,
    RECEIVE,
    WEBCAM_GUID,
    Signer,
    assert_clean,
    assert_printable,
    baseline,
    cab_session_push,
    metainfo,
    one_line,
    signed_cab,
    trusted_signer,
    untrusted_signer,
    write_cab,
)
from tests.sandbox_helpers import qube_paths

pytestmark = pytest.mark.sandbox

RELEASE = ExpectedRelease(FAKE_ID, "9.9.1", (WEBCAM_GUID,))
OTHER_GUID = "d7b3a1ea-0000-5000-8000-000000000000"
MiB = 1024 * 1024

XXE = '<!DOCTYPE component [<!ENTITY xxe SYSTEM "file:///etc/shadow">]>\n'
LAUGHS = (
    '<!DOCTYPE component [<!ENTITY lol "lol">'
    + "".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'
        for i in range(1, 10)
    )
    + "]>\n"
)
EXTERNAL_DTD = '<!DOCTYPE component SYSTEM "file:///dev/zero">\n'


@dataclass
class Ctx:
    work: Path
    trusted: Signer
    evil: Signer

    def cab(self, meta: bytes | None = None, **kwargs: object) -> bytes:
        return signed_cab(self.work, metainfo() if meta is None else meta, self.trusted,
                          **kwargs)  # type: ignore[arg-type]  # fmt: skip


@pytest.fixture(scope="module")
def evil(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    return untrusted_signer(tmp_path_factory.mktemp("evil-ca"))


@pytest.fixture
def ctx(sandbox: Sandbox, tmp_path: Path, evil: Signer) -> Ctx:
    return Ctx(tmp_path, trusted_signer(sandbox), evil)


def _zeros_bomb() -> bytes:
    # 64 MiB of zeros in ~100 KB: the member sizes say so before anything inflates
    return write_cab([("firmware.bin", bytes(64 * MiB)), ("firmware.metainfo.xml", metainfo())])


Build = Callable[[Ctx], bytes]

# (id, the cab, what dom0's one line must name)
CABS: list[tuple[str, Build, str]] = [
    # path traversal and names that are not one plain file name
    ("member-path-traversal", lambda c: c.cab(members=[("../../etc/cron.d/evil", b"x")]),
     "holds a path separator"),
    ("member-windows-traversal", lambda c: c.cab(members=[("..\\..\\evil.exe", b"x")]),
     "holds a path separator"),
    ("member-absolute-path", lambda c: c.cab(members=[("/etc/passwd", b"x")]),
     "holds a path separator"),
    ("member-named-dotdot", lambda c: c.cab(members=[("..", b"x")]), "holds '..' or is '.'"),
    ("member-name-escape-sequence", lambda c: c.cab(members=[("\x1b]0;pwned\x07.bin", b"x")]),
     "holds control or format characters"),
    ("member-name-bidi-override", lambda c: c.cab(members=[("fw\u202enib.exe", b"x")]),
     "holds control or format characters"),
    ("member-name-not-utf8", lambda c: c.cab(members=[(b"fw\xff.bin", b"x")]),
     "is not valid UTF-8"),
    # duplicate members
    ("duplicate-member", lambda c: c.cab(members=[("firmware.bin", b"evil")]),
     "cab has two members named 'firmware.bin' and 'firmware.bin'"),
    ("duplicate-member-by-case", lambda c: c.cab(members=[("FIRMWARE.BIN", b"evil")]),
     "cab has two members named"),
    ("duplicate-member-by-nfkc", lambda c: c.cab(members=[("\uff46irmware.bin", b"evil")]),
     "cab has two members named"),
    ("two-metainfos", lambda c: c.cab(members=[("evil.metainfo.xml", metainfo())]),
     "cab holds 2 *.metainfo.xml members"),
    # compression bombs and declared sizes
    ("deflate-bomb", lambda c: _zeros_bomb(), "more than 200 times its size"),
    ("member-declares-300-mib", lambda c: write_cab(
        [("firmware.bin", b"x" * 1000), ("firmware.metainfo.xml", metainfo())],
        declared={0: 300 * MiB}), "declares 314572800 bytes, more than 268435456"),
    ("65-members", lambda c: write_cab([(f"m{i}.bin", b"x") for i in range(65)]),
     "cab has 65 members, more than 64"),
    ("trailing-bytes", lambda c: c.cab() + b"\0" * 64, "bytes after its declared end"),
    ("not-a-cab", lambda c: b"PK\x03\x04" + b"\0" * 100, "not a cabinet archive"),
    # XXE, billion laughs and other XML the metainfo parser must never meet
    ("metainfo-xxe", lambda c: c.cab(metainfo(doctype=XXE, name="&xxe;")),
     "has a DOCTYPE or entity declarations"),
    ("metainfo-billion-laughs", lambda c: c.cab(metainfo(doctype=LAUGHS, name="&lol9;")),
     "has a DOCTYPE or entity declarations"),
    ("metainfo-external-dtd", lambda c: c.cab(metainfo(doctype=EXTERNAL_DTD)),
     "has a DOCTYPE or entity declarations"),
    ("metainfo-utf16", lambda c: c.cab(metainfo().decode().replace(
        'encoding="UTF-8"', 'encoding="UTF-16"').encode("utf-16")), "is not UTF-8"),
    ("metainfo-not-xml", lambda c: c.cab(b"<component type='firmware'><id>"),
     "is not well-formed XML"),
    # missing, untrusted and misplaced signatures
    ("payload-unsigned", lambda c: c.cab(sign_payload=False),
     "firmware.bin: no signature for it in firmware.jcat"),
    ("payload-untrusted-ca", lambda c: c.cab(payload_signer=c.evil),
     "firmware.bin: no trusted signature (pkcs7: not signed by a trusted CA"),
    ("metainfo-untrusted-ca", lambda c: signed_cab(c.work, metainfo(), c.evil,
                                                   payload_signer=c.trusted),
     "firmware.metainfo.xml: no trusted signature (pkcs7: not signed by a trusted CA"),
    ("payload-signature-over-other-bytes", lambda c: c.cab(payload_signed_bytes=b"benign"),
     "firmware.bin: no trusted signature (pkcs7: signature does not match the file)"),
    ("metainfo-of-another-release", lambda c: signed_cab(
        c.work, metainfo(), c.trusted, meta_signed=metainfo(version="1.0.0")),
     "firmware.metainfo.xml: no trusted signature (pkcs7: signature does not match the file)"),
    # a signed cab that is not the release dom0's metadata promised
    ("wrong-component-id", lambda c: c.cab(metainfo(component_id="org.evil.firmware")),
     "component id 'org.evil.firmware' is not the expected org.fwupd.fakedevice.firmware"),
    ("wrong-version", lambda c: c.cab(metainfo(version="0.0.1")),
     "release version '0.0.1' is not the expected 9.9.1"),
    ("wrong-guid", lambda c: c.cab(metainfo(guid=OTHER_GUID)),
     "include none of the expected b585990a"),
    ("payload-named-but-absent", lambda c: c.cab(metainfo(payload_name="flash.bin")),
     "names payload 'flash.bin', not in the cab"),
    ("payload-checksum-mismatch", lambda c: c.cab(metainfo(payload=b"the signed one")),
     "firmware.bin: its sha256 is not the one firmware.metainfo.xml gives"),
]  # fmt: skip


def test_control_the_unmodified_cab_passes_dom0s_inspection(
    sandbox: Sandbox, ctx: Ctx, tmp_path: Path
) -> None:
    """Each case below changes one thing in this cab, so its refusal is that thing's."""
    cab = tmp_path / "good.cab"
    cab.write_bytes(ctx.cab())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    trust = TrustStore.from_dirs(qube_paths(sandbox, "dom0").pki_firmware_dirs)
    fd = os.open(cab, os.O_RDONLY)
    try:
        info = inspect_cab(fd, RELEASE, trust, Limits(), scratch)
    finally:
        os.close(fd)
    assert (info.component_id, info.version, info.payloads) == (FAKE_ID, "9.9.1",
                                                                ("firmware.bin",))  # fmt: skip


@pytest.mark.parametrize(("build", "cause"), [c[1:] for c in CABS], ids=[c[0] for c in CABS])
def test_dom0_refuses_hostile_cab(sandbox: Sandbox, ctx: Ctx, build: Build, cause: str) -> None:
    cab = build(ctx)
    before = baseline(sandbox)
    r, outcome = cab_session_push(sandbox, cab, RELEASE)
    assert r.returncode == 1, r.stderr
    line = one_line(r.stderr)
    assert line.startswith(f"{RECEIVE}: "), line
    assert cause in line, line
    assert_printable(r.stderr.decode())
    assert outcome is not None and not outcome.ok and cause in outcome.message
    assert_clean(sandbox, before)
