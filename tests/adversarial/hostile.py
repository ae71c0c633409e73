"""The attackers of the adversarial suite, each acting through the sandbox's real services:

- a compromised UpdateVM: its qubes.FwupdDownload replaced by a script that reads dom0's
  real request (with the real nonce) and pushes whatever frame a test planned to dom0's
  qubes.FwupdReceiveUpdates, through the qube's own qrexec client;
- a hostile mirror (or a compromised LVFS signing key): cabs and catalogs built here,
  signed with the sandbox's trusted keys or with keys nobody trusts;
- a malicious sys-usb: its qubes.FwupdUsbvm replaced by a script that answers GetDevices
  with whatever bytes a test planned.

And the checks every case ends with (:func:`assert_clean`): dom0's trusted cache unchanged,
nothing left in its untrusted dir, its sessions dir or its tmp dir, no process left.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import gnupg
import zstandard
from lxml import etree

from broker.cabinet import ExpectedRelease
from broker.jcat import BlobKind, build_jcat
from broker.sandbox import lvfs
from broker.sandbox.cli import DEFAULT_CABS
from broker.sandbox.launcher import Sandbox
from broker.sandbox.pki import SandboxPki, create_pki, make_ca, sign_pkcs7, stop_gpg_agent
from broker.session import ExpectedFile, Outcome, Sessions
from tests.adversarial.test_hostile_updatevm import assert_nothing_left, trusted_state
from tests.adversarial.test_hostile_updatevm import one_line as one_line
from tests.sandbox_helpers import WEBCAM_GUID, call_from, manager, qube_paths

FAKE_ID = "org.fwupd.fakedevice.firmware"
RECEIVE = "qubes.FwupdReceiveUpdates"


# --------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Baseline:
    trusted: dict[str, bytes]
    sessions: frozenset[str]
    dom0_tmp: frozenset[str]
    processes: frozenset[tuple[int, str]]


def _names(directory: Path) -> frozenset[str]:
    return frozenset(p.name for p in directory.iterdir()) if directory.exists() else frozenset()


def sandbox_processes(sandbox: Sandbox) -> dict[tuple[int, str], str]:
    """Live processes whose command line or environment names the sandbox's directory
    (every process of a qube does, through its environment): (pid, start time) -> argv."""
    found = {}
    mark = str(sandbox.dir).encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            blob = cmdline + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if fields[0] != "Z" and mark in blob:
            found[(int(pid), fields[19])] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def baseline(sandbox: Sandbox) -> Baseline:
    paths = qube_paths(sandbox, "dom0")
    return Baseline(
        trusted_state(sandbox),
        _names(paths.sessions_dir),
        _names(sandbox.root("dom0") / "tmp"),
        frozenset(sandbox_processes(sandbox)),
    )


def assert_clean(sandbox: Sandbox, before: Baseline) -> None:
    """dom0's trusted cache unchanged; nothing left in its untrusted dir, sessions dir or
    tmp dir; no process started since the baseline left (a qrexec client, a service, a
    hostile script, an openssl or gpg of a check), given a moment to be reaped."""
    assert_nothing_left(sandbox, before.trusted)
    paths = qube_paths(sandbox, "dom0")
    assert _names(paths.sessions_dir) == before.sessions, "files left in dom0's sessions dir"
    assert _names(sandbox.root("dom0") / "tmp") == before.dom0_tmp, "files left in dom0's tmp"
    deadline = time.monotonic() + 5
    while True:
        left = {k: v for k, v in sandbox_processes(sandbox).items() if k not in before.processes}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"processes left: {left}"


_ALLOWED_CONTROLS = {"\n"}


def assert_printable(*texts: str) -> None:
    """No control, format (bidi, zero-width) or other invisible character anywhere."""
    for text in texts:
        bad = [
            (i, hex(ord(c)))
            for i, c in enumerate(text)
            if c not in _ALLOWED_CONTROLS
            and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
        ]
        assert not bad, f"unsafe characters {bad[:5]} in {text!r}"


# --------------------------------------------------------------------------- frames
NONCE = "@NONCE@"  # the compromised UpdateVM puts dom0's real nonce here


def frame(
    entries: Sequence[tuple[str, Any]] | None = None,
    nonce: Any = NONCE,
    version: Any = 1,
    **extra: Any,
) -> bytes:
    """A header line as the wire format has it (the values as given, however wrong)."""
    doc: dict[str, Any] = {"version": version}
    if nonce is not None:
        doc["nonce"] = nonce
    if entries is not None:
        doc["files"] = [{"name": n, "size": s} for n, s in entries]
    doc.update(extra)
    return json.dumps(doc).encode() + b"\n"


# --------------------------------------------------------------------------- UpdateVM
_UPDATEVM_SCRIPT = """#!{python}
# qubes.FwupdDownload of a compromised UpdateVM (tests/adversarial/hostile.py wrote it)
import json, subprocess, sys
from pathlib import Path

here = Path({dir!r})
plan = json.loads((here / "plan.json").read_text())
request = sys.stdin.buffer.readline()
(here / "request.json").write_bytes(request)
nonce = json.loads(request)["nonce"]
results = []
for push in plan["pushes"]:
    header = push["header"].replace("@NONCE@", nonce).replace("@NONCE_UPPER@", nonce.upper())
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.sandbox.qrexec_client", "dom0", "{service}"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        proc.stdin.write(header.encode("latin-1"))
        for part in push["parts"]:
            if "file" in part:
                proc.stdin.write((here / part["file"]).read_bytes())
            elif "data" in part:
                proc.stdin.write(part["data"].encode("latin-1"))
            elif "endless" in part:
                chunk = b"\\0" * 65536
                for _ in range(16384):  # 1 GiB at most: dom0 must stop us well before
                    proc.stdin.write(chunk)
        proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        results.append("stdin closed by dom0")
    err = proc.stderr.read()
    code = proc.wait(timeout=60)
    results.append({{"code": code, "stderr": err.decode("utf-8", "replace")}})
    sys.stderr.buffer.write(err)
    sys.stderr.flush()
(here / "results.json").write_text(json.dumps(results))
if plan.get("stderr"):
    sys.stderr.write(plan["stderr"])
last = [r for r in results if isinstance(r, dict)]
sys.exit(plan["exit"] if plan.get("exit") is not None else (last[-1]["code"] if last else 0))
"""


class _SwappedService:
    """A qube's qrexec service replaced by our script for the duration of a `with`: the
    symlink in its qubes-rpc dir points at the script, and back at the real entry point
    afterwards, whatever happened."""

    def __init__(self, sandbox: Sandbox, qube: str, service: str, script: str) -> None:
        self.sandbox = sandbox
        self.dir = sandbox.root(qube) / "hostile"
        self.entry = sandbox.rpc_dir(qube) / service
        self.script = self.dir / script
        self._original = ""

    def _script_text(self) -> str:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._original = os.readlink(self.entry)
        self.dir.mkdir(exist_ok=True)
        self.script.write_text(self._script_text())
        self.script.chmod(0o755)
        self.entry.unlink()
        self.entry.symlink_to(self.script)
        return self

    def __exit__(self, *exc: object) -> None:
        self.entry.unlink(missing_ok=True)
        self.entry.symlink_to(self._original)
        shutil.rmtree(self.dir, ignore_errors=True)


class CompromisedUpdateVM(_SwappedService):
    """sys-firewall's qubes.FwupdDownload replaced by a script that follows a plan: a list
    of pushes (header template + parts), then an exit status. Restored on exit."""

    def __init__(self, sandbox: Sandbox, qube: str = "sys-firewall") -> None:
        # another qube: one an offline import reads from (--from-qube), as compromised
        super().__init__(sandbox, qube, "qubes.FwupdDownload", "download")
        self._files = 0

    def _script_text(self) -> str:
        return _UPDATEVM_SCRIPT.format(python=sys.executable, dir=str(self.dir), service=RECEIVE)

    @contextmanager
    def honest(self) -> Iterator[None]:
        """The real service for a while (dom0 fetching what the mirror really serves)."""
        self.entry.unlink()
        self.entry.symlink_to(self._original)
        try:
            yield
        finally:
            self.entry.unlink()
            self.entry.symlink_to(self.script)

    def add_file(self, name: str, data: bytes) -> dict[str, str]:
        """A part of a push: these bytes, kept beside the script until it runs."""
        self._files += 1
        unique = f"{self._files}-{name}"
        (self.dir / unique).write_bytes(data)
        return {"file": unique}

    def plan(
        self,
        pushes: Sequence[tuple[bytes, Sequence[dict[str, Any]]]],
        exit_code: int | None = None,
        stderr: str = "",
    ) -> None:
        for name in ("request.json", "results.json"):
            (self.dir / name).unlink(missing_ok=True)
        doc = {
            "pushes": [
                {"header": header.decode("latin-1"), "parts": list(parts)}
                for header, parts in pushes
            ],
            "exit": exit_code,
            "stderr": stderr,
        }
        (self.dir / "plan.json").write_text(json.dumps(doc))

    def request(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.dir / "request.json").read_bytes())
        return doc

    def results(self) -> list[Any]:
        doc: list[Any] = json.loads((self.dir / "results.json").read_text())
        return doc


# --------------------------------------------------------------------------- sys-usb
_USBVM_SCRIPT = """#!{python}
# qubes.FwupdUsbvm of a malicious sys-usb (tests/adversarial/hostile.py wrote it)
import json, os, sys
from pathlib import Path

here = Path({dir!r})
argument = os.environ.get("QREXEC_SERVICE_ARGUMENT", "")
plans = json.loads((here / "plan.json").read_text())
if argument not in plans:
    os.execv({original!r}, [{original!r}, *sys.argv[1:]])
plan = plans[argument]
(here / f"{{argument}}.request").write_bytes(sys.stdin.buffer.read())
out = (here / f"{{argument}}.reply").read_bytes()
view = memoryview(out)
try:
    while view:
        view = view[os.write(1, view):]
except BrokenPipeError:
    pass
if plan["stderr"]:
    sys.stderr.write(plan["stderr"])
sys.exit(plan["exit"])
"""


class MaliciousUsbvm(_SwappedService):
    """sys-usb's qubes.FwupdUsbvm answering planned arguments (GetDevices, GetUpgrades...)
    with planned bytes; other arguments go to the real service. Restored on exit."""

    def __init__(self, sandbox: Sandbox) -> None:
        super().__init__(sandbox, "sys-usb", "qubes.FwupdUsbvm", "usbvm")

    def _script_text(self) -> str:
        # _original is read in __enter__ before the script is written
        return _USBVM_SCRIPT.format(
            python=sys.executable, dir=str(self.dir), original=self._original
        )

    def answer(
        self, reply: bytes, exit_code: int = 0, stderr: str = "", argument: str = "GetDevices"
    ) -> None:
        """From now on, ``argument`` gets ``reply`` (earlier plans for others stay)."""
        plan_file = self.dir / "plan.json"
        plans = json.loads(plan_file.read_text()) if plan_file.exists() else {}
        plans[argument] = {"exit": exit_code, "stderr": stderr}
        (self.dir / f"{argument}.reply").write_bytes(reply)
        plan_file.write_text(json.dumps(plans))

    def request(self, argument: str) -> bytes:
        """What dom0 sent with its last call of ``argument``."""
        return (self.dir / f"{argument}.request").read_bytes()


# --------------------------------------------------------------------------- cabs
def _mszip_blocks(stream: bytes) -> list[tuple[bytes, int]]:
    """MSZIP: "CK" + raw deflate per 32 KiB block, each window primed with the last."""
    blocks, previous = [], b""
    for i in range(0, len(stream), 32768):
        chunk = stream[i : i + 32768]
        if previous:
            z = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=previous)
        else:
            z = zlib.compressobj(9, zlib.DEFLATED, -15)
        blocks.append((b"CK" + z.compress(chunk) + z.flush(), len(chunk)))
        previous = chunk
    return blocks


def write_cab(
    members: Sequence[tuple[str | bytes, bytes]],
    compress: bool = True,
    declared: dict[int, int] | None = None,
) -> bytes:
    """A single-folder cab with exactly these member names (any bytes: nothing is
    checked here) and contents; ``declared`` overrides the size a member's entry states."""
    stream = b"".join(data for _, data in members)
    if compress:
        blocks = _mszip_blocks(stream)
    else:
        blocks = [(stream[i : i + 32768], len(stream[i : i + 32768]))
                  for i in range(0, len(stream), 32768)]  # fmt: skip
    files, offset = b"", 0
    for i, (name, data) in enumerate(members):
        raw = name.encode() if isinstance(name, str) else name
        size = (declared or {}).get(i, len(data))
        attribs = 0 if raw.isascii() else 0x80
        files += struct.pack("<IIHHHH", size, offset, 0, 0x5821, 0x6000, attribs) + raw + b"\0"
        offset += len(data)
    head, folder = 36, 8
    data_start = head + folder + len(files)
    data = b"".join(struct.pack("<IHH", 0, len(p), u) + p for p, u in blocks)
    total = data_start + len(data)
    header = struct.pack(
        "<4sIIIIIBBHHHHH", b"MSCF", 0, total, 0, head + folder, 0, 3, 1, 1, len(members), 0, 0, 0
    )
    folder_entry = struct.pack("<IHH", data_start, len(blocks), 1 if compress else 0)
    return header + folder_entry + files + data


def metainfo(
    version: str = "9.9.1",
    component_id: str = FAKE_ID,
    guid: str = WEBCAM_GUID,
    payload: bytes = b"hostile firmware\n",
    payload_name: str = "firmware.bin",
    doctype: str = "",
    name: str = "FakeDevice",
) -> bytes:
    digest = hashlib.sha256(payload).hexdigest()
    return f"""<?xml version="1.0" encoding="UTF-8"?>
{doctype}<component type="firmware">
  <id>{component_id}</id>
  <name>{name}</name>
  <summary>Firmware for the ACME Corp Integrated Webcam</summary>
  <provides><firmware type="flashed">{guid}</firmware></provides>
  <releases>
    <release version="{version}" urgency="critical">
      <checksum type="sha256" filename="{payload_name}" target="content">{digest}</checksum>
    </release>
  </releases>
</component>
""".encode()


@dataclass(frozen=True)
class Signer:
    pem: Path
    key: Path


def sign_bytes(signer: Signer, data: bytes, workdir: Path) -> str:
    """A detached PKCS#7 (with a signingTime) over ``data``, as the LVFS makes them."""
    path = workdir / f"content-{hashlib.sha256(data).hexdigest()[:12]}"
    path.write_bytes(data)
    try:
        return sign_pkcs7(signer.pem, signer.key, path)
    finally:
        path.unlink()


def sign_pkcs7_without_time(signer: Signer, data: bytes, workdir: Path) -> str:
    """A detached PKCS#7 without signed attributes: no signingTime to order it by."""
    path = workdir / "content-noattr"
    path.write_bytes(data)
    try:
        der = subprocess.run(
            ["openssl", "cms", "-sign", "-binary", "-noattr", "-md", "sha256", "-in", str(path),
             "-signer", str(signer.pem), "-inkey", str(signer.key), "-outform", "DER"],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
    finally:
        path.unlink()
    return "-----BEGIN PKCS7-----\n" + base64.encodebytes(der).decode() + "-----END PKCS7-----\n"


class UntrustedGpg:
    """A GPG key that no trust store holds (ed25519: made in a blink)."""

    def __init__(self) -> None:
        # short homedir: gpg-agent's socket path has a length limit
        self.home = tempfile.mkdtemp(prefix="qfw-evil-")
        self.gpg = gnupg.GPG(gnupghome=self.home)
        key = self.gpg.gen_key(
            self.gpg.gen_key_input(
                key_type="EDDSA", key_curve="ed25519", name_real="evil mirror",
                name_email="evil@example.invalid", no_protection=True, expire_date=0,
            )
        )  # fmt: skip
        assert key.fingerprint, key.stderr
        self.fingerprint = str(key.fingerprint)

    def sign(self, data: bytes) -> str:
        sig = self.gpg.sign(data, keyid=self.fingerprint, detach=True, binary=False)
        assert sig.data, sig.stderr
        return str(sig.data.decode("ascii"))

    def close(self) -> None:
        stop_gpg_agent(Path(self.home))
        shutil.rmtree(self.home, ignore_errors=True)


def trusted_signer(sandbox: Sandbox) -> Signer:
    pki = create_pki(sandbox.pki_dir)
    return Signer(pki.signer_pem, pki.signer_key)


def untrusted_signer(directory: Path) -> Signer:
    """A CA and code-signing certificate made as the sandbox LVFS's are, trusted by no one."""
    return Signer(*make_ca(directory, "Evil mirror"))


def signed_cab(
    workdir: Path,
    meta: bytes,
    signer: Signer,
    payload: bytes = b"hostile firmware\n",
    payload_name: str = "firmware.bin",
    payload_signer: Signer | None = None,
    payload_signed_bytes: bytes | None = None,
    meta_signed: bytes | None = None,
    sign_payload: bool = True,
    members: Sequence[tuple[str | bytes, bytes]] = (),
) -> bytes:
    """A cab as the LVFS builds one (payload, metainfo, a jcat signing both), with every
    piece open to an attacker: who signs, over which bytes, and extra members."""
    meta_name = "firmware.metainfo.xml"
    items: dict[str, list[tuple[BlobKind, str]]] = {
        meta_name: [
            (BlobKind.SHA256, hashlib.sha256(meta).hexdigest()),
            (
                BlobKind.PKCS7,
                sign_bytes(signer, meta if meta_signed is None else meta_signed, workdir),
            ),
        ]
    }
    if sign_payload:
        signed = payload if payload_signed_bytes is None else payload_signed_bytes
        items[payload_name] = [
            (BlobKind.SHA256, hashlib.sha256(payload).hexdigest()),
            (BlobKind.PKCS7, sign_bytes(payload_signer or signer, signed, workdir)),
        ]
    return write_cab(
        [
            (payload_name, payload),
            ("firmware.jcat", build_jcat(items)),
            (meta_name, meta),
            *members,
        ]
    )


def cab_session_push(
    sandbox: Sandbox,
    cab: bytes,
    release: ExpectedRelease,
    name: str = "hostile.cab",
    remote: str = "lvfs",
) -> tuple[subprocess.CompletedProcess[bytes], Outcome | None]:
    """What `update` does once verified metadata names this cab (its sha256 and size):
    dom0 opens a cab session for the release, and the UpdateVM pushes the cab to dom0's
    real receive service. Returns the push and dom0's verdict; the session is closed."""
    sessions = Sessions(qube_paths(sandbox, "dom0").sessions_dir)
    sha256 = hashlib.sha256(cab).hexdigest()
    session = sessions.open(
        "cab", remote, (ExpectedFile(name, len(cab), sha256, len(cab)),), 120, release
    )
    try:
        data = frame([(name, len(cab))], nonce=session.nonce) + cab
        r = call_from(sandbox, "sys-firewall", "dom0", RECEIVE, data)
        return r, sessions.outcome(session.nonce)
    finally:
        sessions.close(session.nonce)


# --------------------------------------------------------------------------- the mirror
HOSTILE_PREFIX = "hostile-"


def _mirror_pki(sandbox: Sandbox) -> SandboxPki:
    return create_pki(sandbox.pki_dir)


def _sign_catalog(sandbox: Sandbox, xml: bytes) -> None:
    """The mirror's firmware.xml.zst + .jcat, signed by the sandbox LVFS (trusted)."""
    lvfs_dir = sandbox.lvfs_dir
    lvfs._wait_past_previous_signing(lvfs_dir)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "firmware.xml.zst"
        data.write_bytes(zstandard.ZstdCompressor(level=3).compress(xml))
        jcat = lvfs.sign_file(_mirror_pki(sandbox), data)
        lvfs._write_atomic(lvfs_dir / data.name, data.read_bytes())
        lvfs._write_atomic(lvfs_dir / f"{data.name}.jcat", jcat)


def _release(
    version: str, cab_name: str, cab: bytes, url: str, location: str | None = None
) -> etree._Element:
    rel = etree.Element("release", version=version, urgency="critical")
    rel.set("timestamp", str(int(time.time())))
    etree.SubElement(etree.SubElement(rel, "description"), "p").text = "Hostile release"
    digests = {
        "sha1": hashlib.sha1(cab, usedforsecurity=False).hexdigest(),
        "sha256": hashlib.sha256(cab).hexdigest(),
    }
    for kind, digest in digests.items():
        c = etree.SubElement(rel, "checksum", type=kind, filename=cab_name, target="container")
        c.text = digest
    etree.SubElement(rel, "size", type="download").text = str(len(cab))
    etree.SubElement(rel, "location").text = location or f"{url}/{cab_name}"
    return rel


def publish_catalog(
    sandbox: Sandbox,
    version: str,
    cab: bytes | None = None,
    cab_name: str = "fakedevice124.cab",
    component_id: str = FAKE_ID,
    summary: str | None = None,
    size: int | None = None,
    location: str | None = None,
) -> None:
    """The mirror serves the catalog of its real cabs plus one newer release for the
    webcam, signed with the trusted key: ``cab`` (written as hostile-*.cab) or an existing
    cab named ``cab_name``, announced as ``version`` of ``component_id``: the catalog
    decides what dom0 expects, the cab's own metainfo says what it is."""
    lvfs_dir = sandbox.lvfs_dir
    for old in lvfs_dir.glob(f"{HOSTILE_PREFIX}*.cab"):
        old.unlink()
    url = lvfs.LOCATION_BASE
    root = etree.fromstring(lvfs.catalog_xml(lvfs_dir))
    if cab is not None:
        cab_name = f"{HOSTILE_PREFIX}{hashlib.sha256(cab).hexdigest()[:12]}.cab"
        lvfs._write_atomic(lvfs_dir / cab_name, cab)
    else:
        cab = (lvfs_dir / cab_name).read_bytes()
    (real,) = [c for c in root.iterfind("component") if c.findtext("id") == FAKE_ID]
    component = real if component_id == FAKE_ID else deepcopy(real)
    if component is not real:
        component.find("id").text = component_id  # type: ignore[union-attr]
        releases = component.find("releases")
        assert releases is not None
        for r in list(releases):
            releases.remove(r)
        root.append(component)
    if summary is not None:
        component.find("summary").text = summary  # type: ignore[union-attr]
    releases = component.find("releases")
    assert releases is not None
    release = _release(version, cab_name, cab, url, location)
    if size is not None:
        release.find("size").text = str(size)  # type: ignore[union-attr]
    releases.insert(0, release)
    _sign_catalog(sandbox, etree.tostring(root, encoding="UTF-8", xml_declaration=True))


def publish_variant(sandbox: Sandbox, tag: str) -> None:
    """The mirror's real catalog with a comment in it: the same releases in other bytes.

    dom0 takes re-signed bytes it already holds as "already current"; these it takes as
    new (and a later re-publish of the real catalog is new again)."""
    for old in sandbox.lvfs_dir.glob(f"{HOSTILE_PREFIX}*.cab"):
        old.unlink()
    xml = lvfs.catalog_xml(sandbox.lvfs_dir)
    _sign_catalog(sandbox, xml + f"<!-- {tag} {time.time()} -->\n".encode())


def publish_real(sandbox: Sandbox) -> None:
    """The mirror's real catalog, freshly signed (lvfs.publish, as `up` does)."""
    for old in sandbox.lvfs_dir.glob(f"{HOSTILE_PREFIX}*.cab"):
        old.unlink()
    cabs = [c for c in DEFAULT_CABS if c.exists()]
    lvfs.publish(sandbox.lvfs_dir, cabs, _mirror_pki(sandbox))


def restore_mirror(sandbox: Sandbox) -> None:
    """Back to the state after `up`, as near as a state that only moves forward allows:
    dom0 and both fwupd hold the real releases (in a variant of the catalog), and the
    mirror serves the real catalog, signed later, which the next refresh takes as new."""
    publish_variant(sandbox, "restored")
    r = manager(sandbox, "refresh")
    assert r.returncode == 0, r.stdout + r.stderr
    publish_real(sandbox)


@contextmanager
def dom0_config(sandbox: Sandbox, **settings: str) -> Iterator[None]:
    """dom0's qubes-fwupd.conf with extra [qubes-fwupd] settings, put back afterwards."""
    conf = qube_paths(sandbox, "dom0").config_file
    original = conf.read_bytes()
    text = original.decode()
    extra = "".join(f"{k} = {v}\n" for k, v in settings.items())
    conf.write_text(text.replace("[qubes-fwupd]\n", f"[qubes-fwupd]\n{extra}", 1))
    try:
        yield
    finally:
        conf.write_bytes(original)
