"""Qubes policy parsing and evaluation (broker.sandbox.policy), table-driven in the manner of
qrexec's own StringPolicy tests: a small policy text, then rows of
(service, argument, source, target) -> (allowed, resolved target)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from broker.errors import ConfigError
from broker.sandbox.policy import Decision, Policy, PolicyError, QubeInfo, Request

SYSTEM = {
    "dom0": QubeInfo("dom0", type="AdminVM"),
    "sys-firewall": QubeInfo("sys-firewall", tags=frozenset({"fwupd-updatevm"})),
    "sys-usb": QubeInfo("sys-usb", tags=frozenset({"usbvm"})),
    "work": QubeInfo("work", tags=frozenset({"trusted"})),
    "vault": QubeInfo("vault", running=False),
    "fedora": QubeInfo("fedora", type="TemplateVM", running=False),
}


def decide(policy: Policy, service: str, arg: str, source: str, target: str) -> Decision:
    return policy.evaluate(Request(service, arg, source, target), SYSTEM)


# --- tokens ---------------------------------------------------------------------------

TOKENS = """\
# one service per token, so that each row exercises exactly one rule
t.Wild       *  *                 *                 allow
t.Any        *  @anyvm            @anyvm            allow
t.AdminTgt   *  @anyvm            @adminvm          allow
t.Dom0Tgt    *  @anyvm            dom0              allow
t.AdminSrc   *  @adminvm          *                 allow
t.Tag        *  @tag:trusted      @tag:usbvm        allow
t.Type       *  @type:AppVM       @type:TemplateVM  allow
t.TypeAdmin  *  @anyvm            @type:AdminVM     allow
t.Name       *  work              sys-usb           allow
t.Default    *  work              @default          allow target=sys-usb
t.AnyDef     *  work              @anyvm            allow target=vault
t.Disp       *  @dispvm:fedora    @dispvm           allow
t.DispTag    *  @dispvm:@tag:x    @dispvm:@tag:x    allow
t.DispTpl    *  @anyvm            @dispvm:fedora    allow
"""


@pytest.mark.parametrize(
    ("service", "source", "target", "allowed", "resolved"),
    [
        # * covers every qube, dom0 included, and @default
        ("t.Wild", "work", "sys-usb", True, "sys-usb"),
        ("t.Wild", "work", "dom0", True, "dom0"),
        ("t.Wild", "dom0", "work", True, "work"),
        ("t.Wild", "work", "", False, None),  # matched, but nothing to resolve @default to
        # @anyvm: everything but dom0
        ("t.Any", "work", "sys-usb", True, "sys-usb"),
        ("t.Any", "work", "dom0", False, None),
        ("t.Any", "work", "@adminvm", False, None),
        ("t.Any", "dom0", "work", False, None),
        # @adminvm and dom0 are one qube, whichever way the rule or the caller spells it
        ("t.AdminTgt", "work", "dom0", True, "dom0"),
        ("t.AdminTgt", "work", "@adminvm", True, "dom0"),
        ("t.AdminTgt", "work", "sys-usb", False, None),
        ("t.Dom0Tgt", "work", "dom0", True, "dom0"),
        ("t.Dom0Tgt", "work", "@adminvm", True, "dom0"),
        ("t.AdminSrc", "dom0", "work", True, "work"),
        ("t.AdminSrc", "work", "sys-usb", False, None),
        # @tag:T on both sides
        ("t.Tag", "work", "sys-usb", True, "sys-usb"),
        ("t.Tag", "sys-usb", "work", False, None),
        ("t.Tag", "sys-firewall", "sys-usb", False, None),
        # @type:T on both sides; a halted target is started (autostart defaults to yes)
        ("t.Type", "work", "fedora", True, "fedora"),
        ("t.Type", "work", "vault", False, None),
        ("t.Type", "fedora", "fedora", False, None),
        # @type:AdminVM looks up the name: it covers "dom0" but not the keyword (as qrexec)
        ("t.TypeAdmin", "work", "dom0", True, "dom0"),
        ("t.TypeAdmin", "work", "@adminvm", False, None),
        # a qube name
        ("t.Name", "work", "sys-usb", True, "sys-usb"),
        ("t.Name", "sys-firewall", "sys-usb", False, None),
        ("t.Name", "work", "sys-firewall", False, None),
        # @default: no target, "@default", or a qube that does not exist
        ("t.Default", "work", "", True, "sys-usb"),
        ("t.Default", "work", "@default", True, "sys-usb"),
        ("t.Default", "work", "no-such-qube", True, "sys-usb"),
        ("t.Default", "work", "sys-usb", False, None),
        # @anyvm as a target also covers the @default keyword
        ("t.AnyDef", "work", "", True, "vault"),
        ("t.AnyDef", "work", "sys-usb", True, "vault"),
        # @dispvm tokens parse but match nothing: the sandbox has no disposables
        ("t.Disp", "work", "@dispvm", False, None),
        ("t.DispTag", "work", "@dispvm:@tag:x", False, None),
        ("t.DispTpl", "work", "@dispvm:fedora", False, None),
        ("t.DispTpl", "work", "fedora", False, None),
    ],
)
def test_tokens(
    service: str, source: str, target: str, allowed: bool, resolved: str | None
) -> None:
    d = decide(Policy.from_string(TOKENS), service, "", source, target)
    assert (d.allowed, d.target) == (allowed, resolved), d.reason


# --- service and argument columns, first match wins -----------------------------------

ARGS = """\
s.Exact  +one  @anyvm  @anyvm  allow target=sys-usb
s.Exact  +     @anyvm  @anyvm  allow target=vault
s.Exact  *     @anyvm  @anyvm  deny
s.Any    *     @anyvm  @anyvm  allow target=sys-usb
s.First  *     work    @anyvm  allow target=sys-usb
s.First  *     work    @anyvm  allow target=vault
s.First  *     @anyvm  @anyvm  deny
s.First  *     work    @anyvm  allow target=fedora
*        *     work    @anyvm  allow target=fedora
"""


@pytest.mark.parametrize(
    ("service", "arg", "source", "allowed", "resolved"),
    [
        ("s.Exact", "one", "work", True, "sys-usb"),
        ("s.Exact", "", "work", True, "vault"),  # no argument is matched as "+"
        ("s.Exact", "two", "work", False, None),
        ("s.Exact", "one2", "work", False, None),  # exact, never a prefix
        ("s.Exact", "On", "work", False, None),
        ("s.Any", "", "work", True, "sys-usb"),
        ("s.Any", "x.y-z_1+2", "work", True, "sys-usb"),
        ("s.First", "", "work", True, "sys-usb"),
        ("s.First", "", "sys-firewall", False, None),  # the deny comes before the last allow
        ("s.Other", "", "work", True, "fedora"),  # * service
        ("s.Other", "arg", "work", True, "fedora"),
        ("s.Other", "", "sys-firewall", False, None),
        ("s.exact", "one", "sys-firewall", False, None),  # service names are case-sensitive
    ],
)
def test_service_argument_and_order(
    service: str, arg: str, source: str, allowed: bool, resolved: str | None
) -> None:
    d = decide(Policy.from_string(ARGS), service, arg, source, "work")
    assert (d.allowed, d.target) == (allowed, resolved), d.reason


def test_no_matching_rule() -> None:
    d = decide(Policy.from_string(ARGS), "s.Exact", "one", "dom0", "work")
    assert d == Decision(False, None, None, False, "no matching rule")
    assert decide(Policy.from_string(""), "a.B", "", "work", "vault").reason == ("no matching rule")


# --- actions and their parameters -----------------------------------------------------

ACTIONS = """\
a.Allow     *  @anyvm  @anyvm  allow user=root notify=yes
a.Redirect  *  work    @anyvm  allow target=sys-usb
a.ToDom0    *  work    @anyvm  allow target=@adminvm
a.ToGone    *  work    @anyvm  allow target=no-such-qube
a.ToDisp    *  work    @anyvm  allow target=@dispvm:fedora
a.NoStart   *  work    @anyvm  allow autostart=no
a.NoStart2  *  work    @anyvm  allow target=dom0 autostart=no
a.Ask       *  work    @anyvm  ask default_target=sys-usb
a.AskTo     *  work    @anyvm  ask target=sys-usb user=root notify=no autostart=yes
a.Deny      *  work    @anyvm  deny notify=no
a.Self      *  work    @anyvm  allow target=work
"""


@pytest.mark.parametrize(
    ("service", "target", "allowed", "resolved"),
    [
        ("a.Allow", "sys-usb", True, "sys-usb"),
        ("a.Allow", "work", False, None),  # a qube may not call itself
        ("a.Redirect", "vault", True, "sys-usb"),  # target= replaces what the caller named
        ("a.Redirect", "", True, "sys-usb"),
        ("a.Redirect", "sys-usb", True, "sys-usb"),
        ("a.ToDom0", "vault", True, "dom0"),
        ("a.ToGone", "vault", False, None),  # redirect to no qube: nothing to call
        ("a.ToDisp", "vault", False, None),
        ("a.NoStart", "sys-usb", True, "sys-usb"),  # running
        ("a.NoStart", "vault", False, None),  # halted and autostart=no
        ("a.NoStart", "fedora", False, None),
        ("a.NoStart2", "vault", True, "dom0"),  # dom0 always runs
        ("a.Ask", "sys-usb", False, None),
        ("a.AskTo", "sys-usb", False, None),
        ("a.Deny", "sys-usb", False, None),
        ("a.Self", "vault", False, None),  # the redirect lands on the caller
        ("a.Allow", "@anyvm", False, None),  # a keyword a caller may not give
        ("a.Allow", "*", False, None),
        ("a.Allow", "@dispvm", False, None),
    ],
)
def test_actions(service: str, target: str, allowed: bool, resolved: str | None) -> None:
    d = decide(Policy.from_string(ACTIONS, "/p/30-user.policy"), service, "", "work", target)
    assert (d.allowed, d.target) == (allowed, resolved), d.reason


def test_decision_details() -> None:
    policy = Policy.from_string(ACTIONS, "/p/30-user.policy")
    assert decide(policy, "a.Allow", "", "work", "vault") == Decision(
        True, "vault", "root", True, "/p/30-user.policy:1: allow"
    )
    assert decide(policy, "a.Redirect", "", "work", "vault") == Decision(
        True, "sys-usb", None, True, "/p/30-user.policy:2: allow"
    )
    assert decide(policy, "a.NoStart2", "", "work", "").autostart is False
    ask = decide(policy, "a.Ask", "", "work", "sys-usb")
    assert ask.reason == "/p/30-user.policy:8: ask needs a GUI qube: denied"
    assert decide(policy, "a.Deny", "", "work", "sys-usb").reason == ("/p/30-user.policy:10: deny")
    assert "/p/30-user.policy:6:" in decide(policy, "a.NoStart", "", "work", "vault").reason
    assert "itself" in decide(policy, "a.Allow", "", "work", "work").reason


@pytest.mark.parametrize(
    ("service", "arg", "source"),
    [
        ("a.Allow", "", "no-such-qube"),  # dom0's daemon only ever names real qubes
        ("", "", "work"),
        ("a.Allow+x", "", "work"),
        ("a/Allow", "", "work"),
        ("a.Allow", "a b", "work"),
        ("a.Allow", "é", "work"),
    ],
)
def test_malformed_request_denied(service: str, arg: str, source: str) -> None:
    assert not decide(Policy.from_string("* * * * allow"), service, arg, source, "sys-usb").allowed


# --- syntax errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("a.B * @anyvm @anyvm", "wrong number of fields"),
        ("a.B", "wrong number of fields"),
        ("a+B * @anyvm @anyvm allow", "service"),
        ("a/B * @anyvm @anyvm allow", "service"),
        ("a.B +x/y @anyvm @anyvm allow", "argument"),
        ("a.B x @anyvm @anyvm allow", "does not start with +"),
        ("* +x @anyvm @anyvm allow", "only * argument allowed for * service"),
        ("a.B * @default @anyvm allow", "invalid source token"),
        ("a.B * @dispvm @anyvm allow", "invalid source token"),
        ("a.B * @foo @anyvm allow", "invalid source token"),
        ("a.B * @anyvm @foo allow", "invalid target token"),
        ("a.B * @anyvm @tag: allow", "invalid empty @tag: token"),
        ("a.B * @type: @anyvm allow", "invalid empty @type: token"),
        ("a.B * @anyvm @dispvm: allow", "invalid empty @dispvm: token"),
        ("a.B * @anyvm @dispvm:@tag: allow", "invalid empty @dispvm:@tag: token"),
        ("a.B * @anyvm @dispvm:@foo allow", "invalid target token"),
        ("a.B * @tag:@x @anyvm allow", "invalid source token"),
        ("a.B * @anyvm @anyvm permit", "invalid action"),
        ("a.B * @anyvm @anyvm Allow", "invalid action"),
        ("a.B * @anyvm @anyvm allow user", "invalid action parameter syntax"),
        ("a.B * @anyvm @anyvm allow user=a user=b", "parameter given twice"),
        ("a.B * @anyvm @anyvm allow colour=red", "invalid parameter for action allow"),
        ("a.B * @anyvm @anyvm allow default_target=work", "invalid parameter"),
        ("a.B * @anyvm @anyvm deny target=work", "invalid parameter for action deny"),
        ("a.B * @anyvm @anyvm deny user=root", "invalid parameter"),
        ("a.B * @anyvm @anyvm deny autostart=no", "invalid parameter"),
        ("a.B * @anyvm @anyvm ask colour=red", "invalid parameter for action ask"),
        ("a.B * @anyvm @anyvm allow notify=true", "'notify' is 'true'"),
        ("a.B * @anyvm @anyvm allow autostart=1", "'autostart' is '1'"),
        ("a.B * @anyvm @anyvm ask autostart=", "'autostart' is ''"),
        ("a.B * @anyvm @anyvm allow target=@anyvm", "invalid redirect token"),
        ("a.B * @anyvm @anyvm allow target=@default", "invalid redirect token"),
        ("a.B * @anyvm @anyvm allow target=@tag:x", "invalid redirect token"),
        ("a.B * @anyvm @anyvm allow target=*", "invalid redirect token"),
        ("a.B * @anyvm @anyvm allow target=", "invalid empty redirect token"),
        ("a.B * @anyvm @anyvm ask default_target=@anyvm", "invalid redirect token"),
        ("a.B * @anyvm @default allow", "must specify target="),
        ("!include 30-user.policy", "unsupported directive"),
        ("!include-dir include", "unsupported directive"),
        ("!include-service a.B * include/x", "unsupported directive"),
        ("!compat-4.0", "unsupported directive"),
        ("!frobnicate", "invalid directive"),
        ("a.B * @anyvm @anyvm allow # no inline comments", "invalid action parameter syntax"),
    ],
)
def test_syntax_errors(line: str, reason: str) -> None:
    text = f"# a comment\n\n  a.Fine * @anyvm @anyvm deny\n{line}\n"
    with pytest.raises(PolicyError) as info:
        Policy.from_string(text, "/etc/qubes/policy.d/30-user.policy")
    message = str(info.value)
    assert message.startswith("/etc/qubes/policy.d/30-user.policy:4: "), message
    assert reason in message
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize(
    "line",
    [
        "   # indented comment",
        "\t",
        "a.B\t*\t@anyvm\t@anyvm\tallow",
        "a.B * @anyvm @default ask",  # only allow needs target= with @default
        "a.B * @anyvm @default allow target=dom0",
        "a.B * @anyvm @anyvm allow target=@dispvm",
        "a.B * @anyvm @anyvm allow target=@dispvm:fedora user= notify=no autostart=yes",
        "a.B * @anyvm @anyvm ask target=work default_target=work user=root",
        "a.B * @anyvm @anyvm deny notify=yes",
        "a.B * uuid:00000000-0000-0000-0000-000000000000 dom0 allow",
        "a.B +with.chars-_+ not-a-qube also_not deny",
    ],
)
def test_valid_lines(line: str) -> None:
    assert len(Policy.from_string(line)) in (0, 1)


def test_empty_user_means_default_user() -> None:
    policy = Policy.from_string("a.B * @anyvm @anyvm allow user=")
    assert decide(policy, "a.B", "", "work", "vault").user is None


# --- loading a directory --------------------------------------------------------------


def test_from_dir_order_and_filtering(tmp_path: Path) -> None:
    (tmp_path / "90-default.policy").write_text("d.S * @anyvm @anyvm deny\n")
    (tmp_path / "30-user.policy").write_text("\n# first\nd.S * work @anyvm allow\n")
    (tmp_path / "50-config.policy").write_text("d.S * @anyvm @anyvm allow target=vault\n")
    (tmp_path / "31-Bad.txt").write_text("not policy at all")  # other suffix: ignored
    (tmp_path / ".hidden.policy").write_text("not policy at all")  # dot-file: ignored
    (tmp_path / "sub.policy").mkdir()  # not a file: ignored
    policy = Policy.from_dir(tmp_path)
    assert len(policy) == 3
    d = decide(policy, "d.S", "", "work", "sys-usb")
    assert (d.allowed, d.target, d.reason) == (
        True,
        "sys-usb",
        f"{tmp_path}/30-user.policy:3: allow",
    )
    d = decide(policy, "d.S", "", "sys-usb", "work")
    assert (d.allowed, d.target) == (True, "vault")


def test_from_dir_c_order(tmp_path: Path) -> None:
    # "-" (0x2d) < "." < digits < "_" (0x5f) < letters
    (tmp_path / "a_.policy").write_text("d.S * @anyvm @anyvm allow target=fedora\n")
    (tmp_path / "a-.policy").write_text("d.S * @anyvm @anyvm allow target=vault\n")
    (tmp_path / "a0.policy").write_text("d.S * @anyvm @anyvm allow target=dom0\n")
    assert decide(Policy.from_dir(tmp_path), "d.S", "", "work", "").target == "vault"
    (tmp_path / "a-.policy").unlink()
    assert decide(Policy.from_dir(tmp_path), "d.S", "", "work", "").target == "dom0"


@pytest.mark.parametrize("name", ["30-User.policy", "30 user.policy", "30+user.policy", "é.policy"])
def test_from_dir_bad_name_voids_everything(tmp_path: Path, name: str) -> None:
    (tmp_path / "10-fine.policy").write_text("d.S * @anyvm @anyvm allow\n")
    (tmp_path / name).write_text("d.S * @anyvm @anyvm allow\n")
    with pytest.raises(PolicyError, match="invalid policy file name"):
        Policy.from_dir(tmp_path)


def test_from_dir_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "10-fine.policy").write_text("d.S * @anyvm @anyvm allow\n")
    (tmp_path / "20-broken.policy").write_text("# ok\r\nd.S * @anyvm @anyvm maybe\n")
    with pytest.raises(PolicyError, match=r"20-broken\.policy:2: invalid action"):
        Policy.from_dir(tmp_path)


def test_from_dir_undecodable_file(tmp_path: Path) -> None:
    (tmp_path / "20-broken.policy").write_bytes(b"# ok\n# \xff\n")
    with pytest.raises(PolicyError, match=r"20-broken\.policy:2: not valid UTF-8"):
        Policy.from_dir(tmp_path)


def test_from_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot list"):
        Policy.from_dir(tmp_path / "absent")


# --- the shipped policy ---------------------------------------------------------------

SHIPPED_SYSTEM = {
    "dom0": QubeInfo("dom0", type="AdminVM"),
    "sys-firewall": QubeInfo("sys-firewall", tags=frozenset({"fwupd-updatevm"})),
    "sys-usb": QubeInfo("sys-usb"),
    "work": QubeInfo("work"),
}


@pytest.fixture(scope="module")
def shipped() -> Policy:
    return Policy.from_dir(Path(__file__).parents[2] / "policies")


@pytest.mark.parametrize(
    ("service", "arg", "source", "target", "allowed", "resolved"),
    [
        ("qubes.FwupdReceiveUpdates", "", "sys-firewall", "dom0", True, "dom0"),
        ("qubes.FwupdReceiveUpdates", "", "sys-firewall", "@adminvm", True, "dom0"),
        ("qubes.FwupdReceiveUpdates", "metadata", "sys-firewall", "dom0", True, "dom0"),
        ("qubes.FwupdReceiveUpdates", "", "sys-firewall", "work", False, None),
        ("qubes.FwupdReceiveUpdates", "", "sys-firewall", "", False, None),
        ("qubes.FwupdReceiveUpdates", "", "work", "dom0", False, None),
        ("qubes.FwupdReceiveUpdates", "", "work", "@adminvm", False, None),
        ("qubes.FwupdReceiveUpdates", "", "sys-usb", "dom0", False, None),
        ("qubes.FwupdUsbvm", "Install", "sys-firewall", "sys-usb", False, None),
        ("qubes.FwupdUsbvm", "", "work", "sys-usb", False, None),
        ("qubes.FwupdDownload", "", "work", "sys-firewall", False, None),
        ("qubes.FwupdDownload", "", "sys-usb", "sys-firewall", False, None),
        ("qubes.Unrelated", "", "work", "sys-firewall", False, None),
    ],
)
def test_shipped_policy(
    shipped: Policy,
    service: str,
    arg: str,
    source: str,
    target: str,
    allowed: bool,
    resolved: str | None,
) -> None:
    d = shipped.evaluate(Request(service, arg, source, target), SHIPPED_SYSTEM)
    assert (d.allowed, d.target) == (allowed, resolved), d.reason


def test_shipped_policy_reasons(shipped: Policy) -> None:
    ok = shipped.evaluate(
        Request("qubes.FwupdReceiveUpdates", "", "sys-firewall", "dom0"), SHIPPED_SYSTEM
    )
    assert ok.reason.endswith("85-qubes-fwupd.policy:8: allow")
    assert (ok.user, ok.autostart) == (None, True)
    denied = shipped.evaluate(
        Request("qubes.FwupdDownload", "", "work", "sys-firewall"), SHIPPED_SYSTEM
    )
    assert denied.reason.endswith("85-qubes-fwupd.policy:19: deny")
    # other callers of the dom0 service meet an explicit deny, not "no matching rule", so
    # a later policy file cannot allow them
    pushed = shipped.evaluate(
        Request("qubes.FwupdReceiveUpdates", "", "work", "dom0"), SHIPPED_SYSTEM
    )
    assert pushed.reason.endswith("85-qubes-fwupd.policy:14: deny")
    # an offline import's qube, once tagged by the admin
    tagged = {**SHIPPED_SYSTEM, "work": QubeInfo("work", tags=frozenset({"fwupd-import"}))}
    imported = shipped.evaluate(Request("qubes.FwupdReceiveUpdates", "", "work", "dom0"), tagged)
    assert imported.allowed and imported.reason.endswith("85-qubes-fwupd.policy:12: allow")
    other = shipped.evaluate(Request("qubes.Unrelated", "", "work", "dom0"), SHIPPED_SYSTEM)
    assert other.reason == "no matching rule"


# --- properties -----------------------------------------------------------------------

_WORDS = st.sampled_from(
    [
        "*",
        "+",
        "+x",
        "x",
        "a.B",
        "@anyvm",
        "@adminvm",
        "dom0",
        "@default",
        "@dispvm",
        "@dispvm:fedora",
        "@dispvm:@tag:t",
        "@tag:t",
        "@type:AppVM",
        "@tag:",
        "@foo",
        "work",
        "vault",
        "allow",
        "deny",
        "ask",
        "target=vault",
        "target=dom0",
        "target=@anyvm",
        "user=root",
        "notify=yes",
        "autostart=no",
        "autostart=maybe",
        "default_target=work",
        "#",
        "!include",
        "!compat-4.0",
        "=",
        "",
        "é",
        "\x00",
    ]
)
_LINES = st.one_of(
    st.text(max_size=60),
    st.lists(_WORDS, max_size=8).map(" ".join),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINES, max_size=6).map("\n".join))
def test_arbitrary_text_parses_or_raises_policy_error(text: str) -> None:
    try:
        Policy.from_string(text, "fuzz.policy")
    except PolicyError as e:
        assert str(e).startswith("fuzz.policy:")


_RULE_WORDS = {
    "service": st.sampled_from(["*", "a.B", "c.D"]),
    "arg": st.sampled_from(["*", "+", "+x"]),
    "source": st.sampled_from(
        [
            "*",
            "@anyvm",
            "@adminvm",
            "dom0",
            "@tag:trusted",
            "@type:AppVM",
            "work",
            "sys-usb",
            "@dispvm:fedora",
        ]
    ),
    "target": st.sampled_from(
        [
            "*",
            "@anyvm",
            "@adminvm",
            "dom0",
            "@tag:usbvm",
            "@type:AdminVM",
            "vault",
            "sys-usb",
            "@dispvm",
            "@default",
            "gone",
        ]
    ),
    "action": st.sampled_from(
        [
            "allow target=sys-usb",
            "allow target=work autostart=no",
            "allow target=dom0",
            "allow target=@dispvm:fedora",
            "deny",
            "ask",
            "allow user=root autostart=no",
        ]
    ),
}


@settings(max_examples=300, deadline=None)
@given(
    rules=st.lists(st.fixed_dictionaries(_RULE_WORDS), max_size=6),
    service=st.sampled_from(["a.B", "c.D", "e.F"]),
    arg=st.sampled_from(["", "x", "y"]),
    source=st.sampled_from(sorted(SYSTEM)),
    target=st.sampled_from(["", "@default", "@adminvm", "gone", "@dispvm", *sorted(SYSTEM)]),
)
def test_evaluation_is_total_and_consistent(
    rules: list[dict[str, str]], service: str, arg: str, source: str, target: str
) -> None:
    columns = ("service", "arg", "source", "target", "action")
    text = "\n".join(" ".join(r[c] for c in columns) for r in rules)
    try:
        policy = Policy.from_string(text)
    except PolicyError:
        # e.g. "* +x" or "@default ... allow" without target=; the syntax tests cover them
        assume(False)
        raise
    d = decide(policy, service, arg, source, target)
    if d.allowed:
        assert d.target in SYSTEM
        assert d.target != source
        assert d.autostart or d.target == "dom0" or SYSTEM[d.target].running
        assert d.reason.endswith(": allow")
    else:
        assert (d.target, d.user) == (None, None)
