"""Pushes straight at dom0's qubes.FwupdReceiveUpdates, and calls from qubes that have no
business calling: the framing, nonce and caller checks that come before any session.

Each case: the qrexec call exits non-zero with one line naming the cause, dom0's trusted
cache is unchanged, nothing is left in its untrusted, sessions or tmp dirs, no process is
left."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from broker.sandbox.launcher import Sandbox
from broker.session import ExpectedFile, Sessions
from tests.adversarial.hostile import RECEIVE, assert_clean, assert_printable, baseline, frame
from tests.adversarial.hostile import one_line as _one_line
from tests.sandbox_helpers import call_from, qube_paths

pytestmark = pytest.mark.sandbox

META = "firmware.xml.zst"
JCAT = "firmware.xml.zst.jcat"
ANY_NONCE = "0123456789abcdef" * 2  # well-formed, never issued by dom0


def one_line(stderr: bytes) -> str:
    line = _one_line(stderr)
    assert_printable(stderr.decode("utf-8", "replace"))
    return line


# (id, bytes pushed by the UpdateVM, what dom0's one line must name)
FRAMES = [
    ("empty-stream", b"", "stream ended before the header line was complete"),
    ("header-without-newline", b'{"version": 1, "files": []}', "stream ended before the header"),
    ("header-not-json", b"GET / HTTP/1.1\n", "header is not valid JSON"),
    ("header-not-utf8", b'{"version": 1, "nonce": "\xff\xfe"}\n', "header is not valid JSON"),
    ("header-nul-bytes", b"\0" * 100 + b"\n", "header is not valid JSON"),
    ("header-deeply-nested", b"[" * 60000 + b"\n", "header is not valid JSON"),
    ("header-too-long-no-newline", b"{" + b" " * 70000, "header line longer than 65536 bytes"),
    ("header-too-long-json", frame([], x="A" * 70000), "header line longer than 65536 bytes"),
    ("header-json-array", b"[1, 2, 3]\n", "header is not a version 1 object"),
    ("header-version-2", frame([], nonce=ANY_NONCE, version=2), "not a version 1 object"),
    ("header-version-string", frame([], nonce=ANY_NONCE, version="1"), "not a version 1 object"),
    ("header-version-bool", frame([], nonce=ANY_NONCE, version=True), "not a version 1 object"),
    ("files-not-a-list", frame(None, nonce=ANY_NONCE, files="all"), "needs a list of at most 8"),
    ("files-nine", frame([(f"f{i}", 1) for i in range(9)], ANY_NONCE), "at most 8 files"),
    ("file-entry-not-object", frame(None, ANY_NONCE, files=[META]), "entry is not an object"),
    ("file-name-traversal", frame([("../../etc/passwd", 1)], ANY_NONCE), "with a path"),
    ("file-name-absolute", frame([("/etc/shadow", 1)], ANY_NONCE), "with a path"),
    ("file-name-dotfile", frame([(".bashrc", 1)], ANY_NONCE), "with a path"),
    ("file-name-escape", frame([("\x1b]0;pwned\x07.zst", 1)], ANY_NONCE), "control or invalid"),
    ("file-name-nul", frame([("firmware.xml.zst\0.sh", 1)], ANY_NONCE), "control or invalid"),
    ("file-name-too-long", frame([("a" * 256, 1)], ANY_NONCE), "control or invalid"),
    ("file-name-not-string", frame(None, ANY_NONCE, files=[{"name": 7, "size": 1}]), "with a path"),
    ("file-size-negative", frame([(META, -1)], ANY_NONCE), "gives firmware.xml.zst an invalid"),
    ("file-size-string", frame([(META, "10")], ANY_NONCE), "gives firmware.xml.zst an invalid"),
    ("file-size-bool", frame([(META, True)], ANY_NONCE), "gives firmware.xml.zst an invalid"),
    ("file-size-float", frame([(META, 1.5)], ANY_NONCE), "gives firmware.xml.zst an invalid"),
    (
        "file-size-5000-digits",
        b'{"version": 1, "files": [{"name": "firmware.xml.zst", "size": ' + b"9" * 5000 + b"}]}\n",
        "header is not valid JSON",
    ),
    ("file-name-twice", frame([(META, 1), (META, 1)], ANY_NONCE), "names firmware.xml.zst twice"),
    ("nonce-missing", frame([(META, 1)], nonce=None), "malformed session nonce"),
    ("nonce-traversal", frame([], nonce="../../var/lib/qubes-fwupd/x"), "malformed session nonce"),
    ("nonce-uppercase", frame([], nonce=ANY_NONCE.upper()), "malformed session nonce"),
    ("nonce-short", frame([], nonce=ANY_NONCE[:-1]), "malformed session nonce"),
    ("nonce-number", frame([], nonce=1234), "malformed session nonce"),
    ("nonce-list", frame([], nonce=[ANY_NONCE]), "malformed session nonce"),
    ("nonce-unknown", frame([(META, 1), (JCAT, 1)], ANY_NONCE) + b"ab", "no pending dom0 session"),
]


@pytest.mark.parametrize(("data", "cause"), [c[1:] for c in FRAMES], ids=[c[0] for c in FRAMES])
def test_malformed_push_is_refused(sandbox: Sandbox, data: bytes, cause: str) -> None:
    before = baseline(sandbox)
    r = call_from(sandbox, "sys-firewall", "dom0", RECEIVE, data)
    assert r.returncode == 1, r.stderr
    line = one_line(r.stderr)
    assert line.startswith(f"{RECEIVE}: "), line
    assert cause in line, line
    assert_clean(sandbox, before)


@pytest.fixture
def pending_session(sandbox: Sandbox) -> Iterator[str]:
    """A metadata session as dom0's manager opens it: a caller holding its nonce still
    has to be the UpdateVM."""
    sessions = Sessions(qube_paths(sandbox, "dom0").sessions_dir)
    session = sessions.open("metadata", "lvfs", (ExpectedFile(META, 1 << 20),), 120)
    try:
        yield session.nonce
    finally:
        sessions.close(session.nonce)


def test_push_for_an_expired_session_is_refused(sandbox: Sandbox) -> None:
    """A nonce that dom0 did issue, pushed after its session expired (a manager killed
    long ago): refused, and used up."""
    sessions = Sessions(qube_paths(sandbox, "dom0").sessions_dir)
    before = baseline(sandbox)
    session = sessions.open("metadata", "lvfs", (ExpectedFile(META, 1 << 20),), -1)
    try:
        r = call_from(sandbox, "sys-firewall", "dom0", RECEIVE,
                      frame([(META, 3)], nonce=session.nonce) + b"abc")  # fmt: skip
        assert r.returncode == 1
        assert one_line(r.stderr) == f"{RECEIVE}: dom0 session expired"
        assert not (sessions.dir / f"{session.nonce}.pending").exists()
    finally:
        sessions.close(session.nonce)
    assert_clean(sandbox, before)


# (id, caller, target, service, what the caller sends, loose policy line or "", exit, cause)
CALLERS = [
    ("work-pushes-to-dom0", "work", "dom0", RECEIVE, "push", "", 126, "Request refused"),
    ("usbvm-pushes-to-dom0", "sys-usb", "dom0", RECEIVE, "push", "", 126, "Request refused"),
    (
        "work-calls-download",
        "work",
        "sys-firewall",
        "qubes.FwupdDownload",
        "request",
        "",
        126,
        "Request refused",
    ),
    (
        "usbvm-calls-download",
        "sys-usb",
        "sys-firewall",
        "qubes.FwupdDownload",
        "request",
        "",
        126,
        "Request refused",
    ),
    (
        "work-calls-usbvm",
        "work",
        "sys-usb",
        "qubes.FwupdUsbvm+GetDevices",
        "",
        "",
        126,
        "Request refused",
    ),
    (
        "updatevm-installs-on-usbvm",
        "sys-firewall",
        "sys-usb",
        "qubes.FwupdUsbvm+Install",
        "",
        "",
        126,
        "Request refused",
    ),
    # an admin's over-broad policy is not enough: each service checks its caller itself
    (
        "loose-policy-work-pushes",
        "work",
        "dom0",
        RECEIVE,
        "push",
        f"{RECEIVE} * work @adminvm allow",
        1,
        "qube work is not the configured UpdateVM",
    ),
    (
        "loose-policy-usbvm-pushes",
        "sys-usb",
        "dom0",
        RECEIVE,
        "push",
        f"{RECEIVE} * sys-usb @adminvm allow",
        1,
        "qube sys-usb is not the configured UpdateVM",
    ),
    (
        "loose-policy-work-calls-download",
        "work",
        "sys-firewall",
        "qubes.FwupdDownload",
        "request",
        "qubes.FwupdDownload * work sys-firewall allow",
        1,
        "only dom0 may ask for downloads",
    ),
    (
        "loose-policy-work-calls-usbvm",
        "work",
        "sys-usb",
        "qubes.FwupdUsbvm+GetDevices",
        "",
        "qubes.FwupdUsbvm * work sys-usb allow",
        1,
        "only dom0 may drive the sys-usb agent",
    ),
    (
        "loose-policy-updatevm-refreshes-usbvm",
        "sys-firewall",
        "sys-usb",
        "qubes.FwupdUsbvm+Refresh",
        "",
        "qubes.FwupdUsbvm * sys-firewall sys-usb allow",
        1,
        "only dom0 may drive the sys-usb agent",
    ),
]


@pytest.mark.parametrize(
    ("caller", "target", "service", "sends", "policy", "code", "cause"),
    [c[1:] for c in CALLERS],
    ids=[c[0] for c in CALLERS],
)
def test_wrong_caller_is_refused(
    sandbox: Sandbox,
    pending_session: str,
    caller: str,
    target: str,
    service: str,
    sends: str,
    policy: str,
    code: int,
    cause: str,
) -> None:
    data = b""
    if sends == "push":  # the right nonce and the right files: only the caller is wrong
        data = frame([(META, 3)], nonce=pending_session) + b"abc"
    elif sends == "request":
        url = "http://127.0.0.1:1/firmware.xml.zst"
        data = json.dumps({"version": 1, "nonce": pending_session, "kind": "metadata",
                           "remote": "lvfs", "files": [{"name": META, "url": url,
                           "max_size": 1 << 20}]}).encode() + b"\n"  # fmt: skip
    loose = sandbox.policy_dir / "30-user.policy"
    assert not loose.exists()
    before = baseline(sandbox)
    if policy:
        loose.write_text(policy + "\n")
    try:
        r = call_from(sandbox, caller, target, service, data)
    finally:
        loose.unlink(missing_ok=True)
    assert r.returncode == code, r.stderr
    line = one_line(r.stderr)
    assert cause in line, line
    # the session is still pending: a wrong caller cannot even use it up
    assert (qube_paths(sandbox, "dom0").sessions_dir / f"{pending_session}.pending").exists()
    assert_clean(sandbox, before)


def test_a_session_counts_only_for_the_qube_dom0_asked(sandbox: Sandbox) -> None:
    """qubes-fwupdmgr --updatevm work opens its session for work: the configured UpdateVM,
    holding the nonce, is refused for it (without using it up); work itself gets past the
    caller checks (its bytes are then refused as metadata, by the signature check)."""
    sessions = Sessions(qube_paths(sandbox, "dom0").sessions_dir)
    before = baseline(sandbox)
    session = sessions.open("metadata", "lvfs", (ExpectedFile(META, 1 << 20),), 120,
                            updatevm="work")  # fmt: skip
    try:
        r = call_from(sandbox, "sys-firewall", "dom0", RECEIVE,
                      frame([(META, 3)], nonce=session.nonce) + b"abc")  # fmt: skip
        assert r.returncode == 1
        assert one_line(r.stderr) == (
            f"{RECEIVE}: qube sys-firewall pushed for a download dom0 asked of work; refused"
        )
        # refused before it is claimed: the wrong caller cannot use it up for work
        assert (sessions.dir / f"{session.nonce}.pending").exists()
    finally:
        sessions.close(session.nonce)

    both = (ExpectedFile(META, 1 << 20), ExpectedFile(f"{META}.jcat", 1 << 20))
    session = sessions.open("metadata", "lvfs", both, 120, updatevm="work")
    loose = sandbox.policy_dir / "30-user.policy"
    loose.write_text(f"{RECEIVE} * work @adminvm allow\n")  # as the admin tags work
    try:
        pushed = frame([(META, 3), (f"{META}.jcat", 3)], nonce=session.nonce) + b"abcxyz"
        r = call_from(sandbox, "work", "dom0", RECEIVE, pushed)
        assert r.returncode == 1
        line = one_line(r.stderr)
        assert "UpdateVM" not in line and "asked of" not in line, line
        assert "jcat" in line or "signature" in line, line
    finally:
        loose.unlink(missing_ok=True)
        sessions.close(session.nonce)
    assert_clean(sandbox, before)
