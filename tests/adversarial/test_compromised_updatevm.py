"""A compromised UpdateVM during `qubes-fwupdmgr refresh`: its qubes.FwupdDownload reads
dom0's real request (with the real nonce) and pushes hostile frames to dom0's real
qubes.FwupdReceiveUpdates. Some of what it pushes is signed by the sandbox LVFS's
trusted key (as if that key were compromised): dom0's checks after the signature must
hold too.

Each case: the manager exits 1 with one line on stderr naming the cause, dom0's trusted
cache is unchanged, nothing is left in its untrusted, sessions or tmp dirs, no process is
left."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cabarchive
import pytest
import zstandard

from broker.jcat import BlobKind, build_jcat, parse_jcat
from broker.sandbox.launcher import Sandbox
from broker.sandbox.pki import create_pki, make_signer, sign_pkcs7
from broker.sandbox.pq import sign_pkcs7_at
from tests.adversarial.hostile import (
    RECEIVE,
    CompromisedUpdateVM,
    Signer,
    UntrustedGpg,
    assert_clean,
    assert_printable,
    baseline,
    frame,
    one_line,
    publish_real,
    publish_variant,
    restore_mirror,
    sign_bytes,
    sign_pkcs7_without_time,
    trusted_signer,
    untrusted_signer,
)
from tests.sandbox_helpers import call_from, manager, qube_paths

pytestmark = pytest.mark.sandbox

META = "firmware.xml.zst"
JCAT = "firmware.xml.zst.jcat"
MiB = 1024 * 1024
SHA256, PKCS7, GPG = BlobKind.SHA256, BlobKind.PKCS7, BlobKind.GPG


@dataclass
class Ctx:
    sandbox: Sandbox
    vm: CompromisedUpdateVM
    work: Path
    data: bytes  # the mirror's current, validly signed metadata
    jcat: bytes
    trusted: Signer
    evil: Signer
    evil_gpg: UntrustedGpg

    def push(self, data: bytes, jcat: bytes, *extra: dict[str, Any]) -> list[Any]:
        """One push of a metadata file and its jcat, both of the names dom0 asked for."""
        parts = [self.vm.add_file("data", data), self.vm.add_file("jcat", jcat), *extra]
        return [(frame([(META, len(data)), (JCAT, len(jcat))]), parts)]

    def signed(self, data: bytes) -> list[Any]:
        """``data`` pushed with a jcat that the trusted sandbox LVFS key signed."""
        signature = sign_bytes(self.trusted, data, self.work)
        sha = hashlib.sha256(data).hexdigest()
        return self.push(data, build_jcat({META: [(SHA256, sha), (PKCS7, signature)]}))

    def sha(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def path(self) -> Path:
        """The mirror's metadata as a file here (for the signing tools)."""
        path = self.work / "metadata"
        path.write_bytes(self.data)
        return path

    @property
    def firmware_signer(self) -> tuple[Path, Path]:
        ca = create_pki(self.sandbox.pki_dir)
        return make_signer(ca, self.work / "firmware-signer", "Sandbox firmware signer")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Signer, UntrustedGpg]]:
    evil_gpg = UntrustedGpg()
    try:
        yield untrusted_signer(tmp_path_factory.mktemp("evil-ca")), evil_gpg
    finally:
        evil_gpg.close()


@pytest.fixture
def ctx(sandbox: Sandbox, tmp_path: Path, keys: tuple[Signer, UntrustedGpg]) -> Iterator[Ctx]:
    with CompromisedUpdateVM(sandbox) as vm:
        yield Ctx(
            sandbox, vm, tmp_path,
            (sandbox.lvfs_dir / META).read_bytes(), (sandbox.lvfs_dir / JCAT).read_bytes(),
            trusted_signer(sandbox), keys[0], keys[1],
        )  # fmt: skip


def signed_at(c: Ctx, when: datetime) -> str:
    """The trusted sandbox LVFS key's PKCS#7 over the mirror's metadata, dated ``when``."""
    path = c.work / "dated"
    path.write_bytes(c.data)
    return sign_pkcs7_at(c.trusted.pem, c.trusted.key, path, when)


def real_payload_as_metadata() -> tuple[bytes, bytes]:
    """fwupd-tests' LVFS-signed payload and a jcat of its real blobs, item renamed."""
    cab = Path("/usr/share/installed-tests/fwupd/fakedevice124.cab")
    archive = cabarchive.CabArchive()
    archive.parse(cab.read_bytes())
    payload = bytes(archive["fakedevice124.bin"].buf)
    item = parse_jcat(bytes(archive["fakedevice124.jcat"].buf), 1 << 20, 4 << 20).item_for(
        "fakedevice124.bin"
    )
    return payload, build_jcat({META: [(BlobKind(b.kind), b.data) for b in item.blobs]})


def genuine_pkcs7(c: Ctx) -> str:
    """The mirror's own, valid classic PKCS#7 over the metadata it serves."""
    (item,) = parse_jcat(c.jcat, 1 << 20, 4 << 20).items
    return item.of_kind(PKCS7)[0].data


def flipped(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def zstd_bomb() -> bytes:
    """A valid catalog start, then 64 MiB of whitespace: a few KB compressed."""
    c = zstandard.ZstdCompressor(level=3).compressobj()
    out = c.compress(b"<?xml version='1.0' encoding='UTF-8'?>\n<components origin='lvfs'>")
    for _ in range(64):
        out += c.compress(b" " * MiB)
    return out + c.compress(b"</components>\n") + c.flush()


def zst(xml: str) -> bytes:
    return bytes(zstandard.ZstdCompressor(level=3).compress(xml.encode()))


LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE components [\n <!ENTITY lol "lol">\n'
    + "".join(
        f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n'
        for i in range(1, 10)
    )
    + ']>\n<components origin="lvfs"><component><id>&lol9;</id></component></components>\n'
)
XXE = (
    '<?xml version="1.0"?>\n<!DOCTYPE components [<!ENTITY xxe SYSTEM "file:///etc/shadow">]>\n'
    '<components origin="lvfs"><component type="firmware"><id>&xxe;</id></component>'
    "</components>\n"
)
EXTERNAL_DTD = (
    '<?xml version="1.0"?>\n<!DOCTYPE components SYSTEM "file:///dev/zero">\n'
    '<components origin="lvfs"/>\n'
)
LOCAL_FILE_LOCATION = """<?xml version="1.0"?>
<components origin="lvfs"><component type="firmware"><id>org.fwupd.fakedevice.firmware</id>
<provides><firmware type="flashed">b585990a-003e-5270-89d5-3705a17f9a43</firmware></provides>
<releases><release version="9.9.9">
<location>file:///etc/shadow</location>
<checksum type="sha1" target="container">{sha1}</checksum>
<checksum type="sha256" target="container">{sha}</checksum><size type="download">1</size>
</release></releases></component></components>
""".format(sha="0" * 64, sha1="0" * 40)

Plan = Callable[[Ctx], list[Any]]

# (id, the pushes the UpdateVM makes, what dom0's refusal must name)
CASES: list[tuple[str, Plan, str]] = [
    # bad or missing signature
    ("jcat-checksum-only", lambda c: c.push(c.data, build_jcat({META: [(SHA256, c.sha())]})),
     "firmware.xml.zst: no signature"),
    ("jcat-not-gzip", lambda c: c.push(c.data, b"not a jcat at all"), "jcat is not valid gzip"),
    ("jcat-not-json", lambda c: c.push(c.data, gzip.compress(b"\xff{[")),
     "does not hold valid JSON"),
    ("jcat-items-for-other-files", lambda c: c.push(c.data, build_jcat(
        {"a.xml": [(SHA256, c.sha())], "b.xml": [(SHA256, c.sha())]})),
     "jcat has 2 items and none for firmware.xml.zst"),
    ("pkcs7-garbage", lambda c: c.push(c.data, build_jcat({META: [(SHA256, c.sha()),
        (PKCS7, "-----BEGIN PKCS7-----\nMIIBAAAA\n-----END PKCS7-----\n")]})),
     "not a PKCS#7 signature openssl can read"),
    # openssl reads the first block labelled CMS or PKCS7, libjcat the first labelled
    # PKCS7: the genuine signature for dom0, the attacker's for fwupd's parser
    ("pkcs7-genuine-relabelled-cms-then-an-attackers-block", lambda c: c.push(c.data, build_jcat(
        {META: [(SHA256, c.sha()), (PKCS7, genuine_pkcs7(c).replace("PKCS7-----", "CMS-----")
                                    + sign_bytes(c.evil, c.data, c.work))]})),
     "pkcs7: not exactly one PEM block labelled PKCS7 (or CMS)"),
    # a firmware signer the sandbox CA also anchors: it chains, but it is not the signer
    # the remote names for its metadata (the LVFS CA anchors both kinds too)
    ("pkcs7-by-a-firmware-signer-of-the-trusted-ca", lambda c: c.push(c.data, build_jcat(
        {META: [(SHA256, c.sha()), (PKCS7, sign_pkcs7(*c.firmware_signer, c.path()))]})),
     "not a signer named for this purpose"),
    # the LVFS's own payload signatures (fwupd-tests' fakedevice124.bin, PKCS#7 by the 2018
    # instance certificate and GPG by 3FC6B804, both anchored in pki/fwupd-metadata) over a
    # payload pushed as the catalog: genuine, and not metadata signatures
    ("lvfs-payload-signatures-as-metadata", lambda c: c.push(*real_payload_as_metadata()),
     "not a signer named for this purpose"),
    # ~32 MiB of RAM per MiB of such XML, were it parsed: refused while libxml2 builds it
    ("catalog-of-tiny-elements", lambda c: c.signed(zst(
        "<components><component><id>x</id><releases>" + "<a/>" * 200_000
        + "</releases></component></components>")),
     "a metadata component has more than 20000 elements"),
    # a signing time in the future would freeze every later refresh until that date
    ("pkcs7-signed-in-2049", lambda c: c.push(c.data, build_jcat({META: [(SHA256, c.sha()),
        (PKCS7, signed_at(c, datetime(2049, 1, 1, tzinfo=UTC)))]})),
     "metadata signed 2049-01-01 00:00:00 is more than 24 hours ahead of dom0's clock"),
    ("gpg-garbage", lambda c: c.push(c.data, build_jcat({META: [(SHA256, c.sha()),
        (GPG, "trust me, I am a signature")]})), "not one armored PGP signature"),
    # untrusted CA or key
    ("pkcs7-untrusted-ca", lambda c: c.push(c.data, build_jcat({META: [(SHA256, c.sha()),
        (PKCS7, sign_bytes(c.evil, c.data, c.work))]})), "not signed by a trusted CA"),
    ("gpg-untrusted-key", lambda c: c.push(c.data, build_jcat({META: [(SHA256, c.sha()),
        (GPG, c.evil_gpg.sign(c.data))]})), "key not in the trust store"),
    # a good signature over other bytes
    ("pkcs7-over-other-bytes", lambda c: c.push(c.data, build_jcat({META: [(SHA256, c.sha()),
        (PKCS7, sign_bytes(c.trusted, b"other bytes", c.work))]})),
     "signature does not match the file"),
    ("data-one-bit-flipped", lambda c: c.push(flipped(c.data), c.jcat),
     "sha256 checksum does not match the file"),
    ("gz-metadata-renamed-zst", lambda c: c.push(
        (c.sandbox.lvfs_dir / "firmware.xml.gz").read_bytes(),
        (c.sandbox.lvfs_dir / "firmware.xml.gz.jcat").read_bytes()),
     "metadata does not decompress"),
    # rollback: a trusted signature that carries no time to order it by
    ("pkcs7-without-signing-time", lambda c: c.push(c.data, build_jcat({META: [
        (SHA256, c.sha()), (PKCS7, sign_pkcs7_without_time(c.trusted, c.data, c.work))]})),
     "metadata signature carries no signing time"),
    # signed by the trusted key, hostile inside: dom0's parser must hold after the signature
    ("catalog-zstd-bomb", lambda c: c.signed(zstd_bomb()), "metadata decompresses to more than"),
    ("catalog-xxe", lambda c: c.signed(zst(XXE)), "metadata has a DOCTYPE"),
    ("catalog-billion-laughs", lambda c: c.signed(zst(LAUGHS)), "metadata has a DOCTYPE"),
    ("catalog-external-dtd-dev-zero", lambda c: c.signed(zst(EXTERNAL_DTD)),
     "metadata has a DOCTYPE"),
    ("catalog-not-xml", lambda c: c.signed(zst("<components><component>")),
     "metadata is not well-formed XML"),
    ("catalog-nested-10000-deep", lambda c: c.signed(zst(
        "<components>" + "<a>" * 10000 + "</a>" * 10000 + "</components>")),
     "metadata is not well-formed XML"),
    ("jcat-gzip-bomb", lambda c: c.push(c.data, gzip.compress(b" " * (64 * MiB))),
     "jcat decompresses to more than"),
    # framing with the right nonce: names, counts and sizes are dom0's, not the UpdateVM's
    ("file-not-asked-for", lambda c: [(frame([("evil.sh", 3)]), [{"data": "rm "}])],
     "pushed files do not match what dom0 asked for"),
    ("jcat-missing", lambda c: [(frame([(META, len(c.data))]), [c.vm.add_file("d", c.data)])],
     "pushed files do not match what dom0 asked for"),
    ("third-file", lambda c: [(frame([(META, 1), (JCAT, 1), ("firmware.xml", 1)]),
                               [{"data": "abc"}])], "pushed files do not match"),
    ("metadata-over-cap", lambda c: [(frame([(META, 64 * MiB + 1), (JCAT, 1)]), [])],
     "firmware.xml.zst is 67108865 bytes, more than the cap 67108864"),
    ("jcat-over-cap", lambda c: [(frame([(META, 1), (JCAT, MiB + 1)]), [])],
     "firmware.xml.zst.jcat is 1048577 bytes, more than the cap 1048576"),
    ("endless-stream", lambda c: [(frame([(META, 64 * MiB), (JCAT, 16)]), [{"endless": 1}])],
     "unexpected bytes after the last file"),
    ("truncated-stream", lambda c: [(frame([(META, len(c.data)), (JCAT, len(c.jcat))]),
                                     [c.vm.add_file("d", c.data[:100])])],
     "stream ended after 100 of {0} bytes"),
    ("bytes-after-last-file", lambda c: c.push(c.data, c.jcat, {"data": "\0"}),
     "unexpected bytes after the last file"),
    # wrong nonce
    ("nonce-of-no-session", lambda c: [(frame([(META, 1), (JCAT, 1)], nonce="ab" * 16),
                                        [{"data": "xy"}])], "no pending dom0 session"),
    ("nonce-uppercased", lambda c: [(frame([(META, 1), (JCAT, 1)], nonce="@NONCE_UPPER@"),
                                     [{"data": "xy"}])], "malformed session nonce"),
]  # fmt: skip


@pytest.mark.parametrize(("plan", "cause"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refresh_refuses_what_a_compromised_updatevm_pushes(
    sandbox: Sandbox, ctx: Ctx, plan: Plan, cause: str
) -> None:
    if "{0}" in cause:
        cause = cause.format(len(ctx.data))
    ctx.vm.plan(plan(ctx))
    before = baseline(sandbox)
    r = manager(sandbox, "refresh")
    assert r.returncode == 1, r.stdout + r.stderr
    line = one_line(r.stderr)
    assert line.startswith("qubes-fwupdmgr: "), line
    assert cause in line, line
    assert_printable(r.stdout, r.stderr)
    assert_clean(sandbox, before)
    # the refusal is dom0's own, from its receive service
    assert ctx.vm.results()[-1]["stderr"].startswith(f"{RECEIVE}: ")


def test_a_release_at_a_local_file_is_skipped_and_its_offer_refused(
    sandbox: Sandbox, ctx: Ctx
) -> None:
    """A trusted-signed catalog whose one release lives at file:///etc/shadow: dom0 takes
    the catalog (one odd release never sinks it) but never holds that release; fwupd, given
    the catalog, offers it, and dom0 refuses the offer with one line, fetching nothing."""
    try:
        ctx.vm.plan(ctx.signed(zst(LOCAL_FILE_LOCATION)))
        r = manager(sandbox, "refresh")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "0 releases (1 skipped)" in r.stdout, r.stdout
        log = (qube_paths(sandbox, "dom0").log_file).read_text()
        assert "org.fwupd.fakedevice.firmware 9.9.9: no https location (only file)" in log
        before = baseline(sandbox)
        for verb in (["get-updates"], ["update", "-y"]):
            r = manager(sandbox, *verb)
            assert r.returncode == 1, r.stdout + r.stderr
            line = one_line(r.stderr)
            assert "offered org.fwupd.fakedevice.firmware 9.9.9, refused: dom0's verified " in line
            assert "holds no release with sha256 0000000000000000" in line
            assert_printable(r.stdout, r.stderr)
            assert_clean(sandbox, before)
    finally:
        with ctx.vm.honest():
            restore_mirror(sandbox)


def test_a_state_poisoned_by_a_future_signing_time_recovers_with_refresh_force(
    sandbox: Sandbox, ctx: Ctx
) -> None:
    """Metadata accepted (before this check existed, or through a clock set back) with a
    signing time years ahead refuses every honest refresh; `refresh --force` compares with
    the signing time accepted before it instead, and still refuses anything older."""
    state_file = qube_paths(sandbox, "dom0").metadata_state_file
    try:
        with ctx.vm.honest():
            publish_variant(sandbox, "before-poison")
            r = manager(sandbox, "refresh")
            assert r.returncode == 0, r.stdout + r.stderr
            state = json.loads(state_file.read_text())
            sane = datetime.fromisoformat(state["lvfs"]["signed_at"])
            # the poison, as a dom0 without the check would have stored it
            state["lvfs"] |= {"signed_at": "2049-01-01T00:00:00+00:00",
                              "previous_signed_at": sane.isoformat()}  # fmt: skip
            state_file.write_text(json.dumps(state))
            publish_variant(sandbox, "honest")
            before = baseline(sandbox)
            r = manager(sandbox, "refresh")
            assert r.returncode == 1, r.stdout + r.stderr
            line = one_line(r.stderr)
            assert "is not newer than the accepted 2049-01-01 00:00:00" in line, line
            assert line.endswith("(rollback refused; see refresh --force)"), line
            assert_clean(sandbox, before)
            r = manager(sandbox, "refresh", "--force")
            assert r.returncode == 0, r.stdout + r.stderr
            after = json.loads(state_file.read_text())["lvfs"]
            assert (
                sane
                < datetime.fromisoformat(after["signed_at"])
                < datetime.now(UTC) + (timedelta(minutes=5))
            )
            assert after["previous_signed_at"] == sane.isoformat()
    finally:
        with ctx.vm.honest():
            publish_real(sandbox)


def test_second_push_with_the_same_nonce_is_refused(sandbox: Sandbox, ctx: Ctx) -> None:
    """The nonce is good for one push: a second one, whatever it carries, is refused."""
    bad = ctx.push(flipped(ctx.data), ctx.jcat)
    good = ctx.push(ctx.data, ctx.jcat)
    ctx.vm.plan([*bad, *good])
    before = baseline(sandbox)
    r = manager(sandbox, "refresh")
    assert r.returncode == 1
    assert "sha256 checksum does not match the file" in one_line(r.stderr)
    second = ctx.vm.results()[-1]
    assert second["code"] == 1
    assert one_line(second["stderr"]) == f"{RECEIVE}: no pending dom0 session for this nonce"
    assert_clean(sandbox, before)


def test_nonce_replayed_after_the_session_closed_is_refused(sandbox: Sandbox, ctx: Ctx) -> None:
    ctx.vm.plan(ctx.push(flipped(ctx.data), ctx.jcat))
    r = manager(sandbox, "refresh")
    assert r.returncode == 1
    nonce = ctx.vm.request()["nonce"]
    before = baseline(sandbox)
    # later, the same valid files under the nonce that dom0 once issued
    data = frame([(META, len(ctx.data)), (JCAT, len(ctx.jcat))], nonce=nonce)
    r2 = call_from(sandbox, "sys-firewall", "dom0", RECEIVE, data + ctx.data + ctx.jcat)
    assert r2.returncode == 1
    assert one_line(r2.stderr) == f"{RECEIVE}: no pending dom0 session for this nonce"
    assert_clean(sandbox, before)


def test_updatevm_that_pushes_nothing_but_claims_success(sandbox: Sandbox, ctx: Ctx) -> None:
    ctx.vm.plan([], exit_code=0)
    before = baseline(sandbox)
    r = manager(sandbox, "refresh")
    assert r.returncode == 1
    assert one_line(r.stderr) == (
        "qubes-fwupdmgr: sys-firewall reported success but pushed nothing to dom0"
    )
    assert_clean(sandbox, before)


def test_updatevm_error_line_with_escape_sequences_is_made_printable(
    sandbox: Sandbox, ctx: Ctx
) -> None:
    ctx.vm.plan([], exit_code=1, stderr="\x1b]0;pwned\x07\x1b[2J\x9b31mdownload failed\u202e\n")
    before = baseline(sandbox)
    r = manager(sandbox, "refresh")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert line.startswith("qubes-fwupdmgr: sys-firewall: qubes.FwupdDownload failed: "), line
    assert "download failed" in line
    assert_printable(r.stdout, r.stderr)
    assert_clean(sandbox, before)


def test_replayed_older_metadata_is_refused_as_rollback(sandbox: Sandbox, ctx: Ctx) -> None:
    """The UpdateVM withholds new metadata and replays an older pair, validly signed."""
    old_data, old_jcat = ctx.data, ctx.jcat
    try:
        publish_variant(sandbox, "newer")  # newer metadata ...
        with ctx.vm.honest():  # ... that dom0 takes through the honest UpdateVM
            r = manager(sandbox, "refresh")
        assert r.returncode == 0, r.stdout + r.stderr
        ctx.vm.plan(ctx.push(old_data, old_jcat))
        before = baseline(sandbox)
        r = manager(sandbox, "refresh")
        assert r.returncode == 1
        line = one_line(r.stderr)
        assert "is not newer than the accepted" in line and "(rollback refused)" in line, line
        assert_clean(sandbox, before)
    finally:
        # the mirror ahead of dom0 again, as after `up`; never old files on the mirror
        publish_real(sandbox)
