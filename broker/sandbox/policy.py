"""Qubes qrexec policy (the R4.1+ ``/etc/qubes/policy.d`` format), parsed and evaluated as
dom0's policy daemon would, for the subset the sandbox needs (shared/QUBES.md §3).

The emulation asks :meth:`Policy.evaluate` whether a call *from a qube* may go ahead. Calls
made *by dom0* (``qvm-run --service``, qubesadmin) never reach the policy in real Qubes: they
go straight to the target's daemon and may name any user. Skipping the policy for them is
the emulation's job; this module only answers the question it is asked.

Loading is all or nothing, as in real Qubes: one syntax error in any file, or one badly named
``.policy`` file, makes :meth:`Policy.from_dir` / :meth:`Policy.from_string` raise
:class:`PolicyError`, and the caller must then refuse every call rather than run with the
rules that did parse.

Deliberately absent:

* directives (``!include``, ``!include-dir``, ``!include-service``, ``!compat-4.0``): our
  policy needs none of them, so they are refused as unsupported rather than half-emulated;
* disposables: the sandbox has none, so the ``@dispvm`` tokens parse (a real policy may
  hold them) but never match, and a call or redirect to one is denied;
* ``ask``: it needs a GUI qube to show the prompt; with none, real Qubes denies, and so do we;
* ``uuid:`` tokens: qubes here have no UUIDs, so only dom0's all-zero UUID means anything.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from broker.errors import ConfigError

POLICY_SUFFIX = ".policy"

# qrexec's RPCNAME_ALLOWED_CHARSET; spelled out because str.isalnum() accepts non-ASCII
_RPCNAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+-._")
_FILENAME_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyz_.-")

_DOM0_ALIASES = frozenset({"dom0", "@adminvm", "uuid:00000000-0000-0000-0000-000000000000"})
_DEFAULT = "@default"


class PolicyError(ConfigError):
    """The policy does not parse. Message: ``path:line: reason``. Every call must be denied."""


@dataclass(frozen=True)
class QubeInfo:
    name: str
    type: str = "AppVM"
    tags: frozenset[str] = frozenset()
    running: bool = True


@dataclass(frozen=True)
class Request:
    """One call as dom0 sees it.

    ``argument`` is the text after the ``+``, without it; ``""`` when the caller gave no
    argument, which rules match as ``+``. ``target`` is what the caller typed: a qube name,
    ``dom0``, ``@adminvm``, ``@default`` or ``""``.
    """

    service: str
    argument: str
    source: str
    target: str


@dataclass(frozen=True)
class Decision:
    allowed: bool
    target: str | None
    user: str | None
    autostart: bool
    reason: str


def _is_dom0(name: str) -> bool:
    return name in _DOM0_ALIASES


class _Kind(enum.Enum):
    WILDCARD = "*"
    ADMINVM = "@adminvm"
    ANYVM = "@anyvm"
    DEFAULT = "@default"
    DISPVM = "@dispvm"
    TYPE = "@type:"
    TAG = "@tag:"
    DISPVM_TEMPLATE = "@dispvm:"
    DISPVM_TAG = "@dispvm:@tag:"
    NAME = "name"


_EXACT = {
    k.value: k for k in (_Kind.WILDCARD, _Kind.ADMINVM, _Kind.ANYVM, _Kind.DEFAULT, _Kind.DISPVM)
}
# longest first, so that "@dispvm:@tag:x" is not read as a template named "@tag:x"
_PREFIXES = (_Kind.DISPVM_TAG, _Kind.DISPVM_TEMPLATE, _Kind.TYPE, _Kind.TAG)

# Which tokens each column accepts, as in qrexec's Source / Target / Redirect classes.
_SOURCE_KINDS = frozenset(
    {
        _Kind.WILDCARD,
        _Kind.ADMINVM,
        _Kind.ANYVM,
        _Kind.TYPE,
        _Kind.TAG,
        _Kind.DISPVM_TEMPLATE,
        _Kind.DISPVM_TAG,
        _Kind.NAME,
    }
)
_TARGET_KINDS = _SOURCE_KINDS | {_Kind.DEFAULT, _Kind.DISPVM}
_REDIRECT_KINDS = frozenset({_Kind.ADMINVM, _Kind.DISPVM, _Kind.DISPVM_TEMPLATE, _Kind.NAME})


@dataclass(frozen=True)
class _Token:
    kind: _Kind
    value: str  # the part after a prefix; the whole text for names and exact keywords

    def matches(self, other: str, system: Mapping[str, QubeInfo]) -> bool:
        """Whether this rule token covers *other*: a source qube name, or a requested target
        already normalised to a qube name, a dom0 alias or ``@default``."""
        kind = self.kind
        if kind is _Kind.WILDCARD:
            return True
        if kind is _Kind.ADMINVM:
            return _is_dom0(other)
        if kind is _Kind.ANYVM:
            # everything but dom0, the @default keyword included (as in real qrexec)
            return not _is_dom0(other)
        if kind is _Kind.DEFAULT:
            return other == _DEFAULT
        if kind is _Kind.TYPE:
            # Looked up by name, so the keyword @adminvm is no qube here while the name dom0
            # is: "@type:AdminVM" covers a call to "dom0" but not one to "@adminvm". Real
            # qrexec has the same asymmetry.
            info = system.get(other)
            return info is not None and info.type == self.value
        if kind is _Kind.TAG:
            info = system.get(other)
            return info is not None and self.value in info.tags
        if kind is _Kind.NAME:
            return self.value == other
        # @dispvm, @dispvm:NAME, @dispvm:@tag:T: the sandbox has no disposables
        return False


def _parse_token(text: str, allowed: frozenset[_Kind], column: str, where: str) -> _Token:
    if not text:
        raise PolicyError(f"{where}: invalid empty {column} token")
    if _is_dom0(text):
        return _Token(_Kind.ADMINVM, text)
    kind: _Kind | None = None
    value = text
    if text in _EXACT:
        kind = _EXACT[text]
    elif text.startswith("@"):
        for prefix in _PREFIXES:
            if text.startswith(prefix.value):
                value = text[len(prefix.value) :]
                if not value:
                    raise PolicyError(f"{where}: invalid empty {prefix.value} token: {text!r}")
                if value.startswith("@"):
                    raise PolicyError(f"{where}: invalid {column} token: {text!r}")
                kind = prefix
                break
    else:
        # qrexec does not check qube names here: one that names no qube simply never matches
        kind = _Kind.NAME
    if kind is None or kind not in allowed:
        raise PolicyError(f"{where}: invalid {column} token: {text!r}")
    return _Token(kind, value)


class _Action(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"


_PARAMS = {
    _Action.ALLOW: frozenset({"target", "user", "notify", "autostart"}),
    _Action.DENY: frozenset({"notify"}),
    _Action.ASK: frozenset({"target", "default_target", "user", "notify", "autostart"}),
}
_BOOLEAN_PARAMS = frozenset({"notify", "autostart"})


@dataclass(frozen=True)
class _Rule:
    where: str  # "path:line"
    service: str | None  # None: any
    argument: str | None  # None: any; else with its leading "+"
    source: _Token
    target: _Token
    action: _Action
    redirect: _Token | None
    user: str | None
    autostart: bool

    def matches(
        self, service: str, argument: str, source: str, target: str, system: Mapping[str, QubeInfo]
    ) -> bool:
        return (
            (self.service is None or self.service == service)
            and (self.argument is None or self.argument == argument)
            and self.source.matches(source, system)
            and self.target.matches(target, system)
        )


def _invalid_chars(text: str, allowed: frozenset[str]) -> list[str]:
    return sorted(set(text) - allowed)


def _parse_rule(line: str, where: str) -> _Rule:
    fields = line.split()
    if len(fields) < 5:
        raise PolicyError(f"{where}: wrong number of fields")
    service, argument, source, target, action_text, *params = fields

    if service != "*":
        bad = _invalid_chars(service, _RPCNAME_CHARS - {"+"})
        if bad:
            raise PolicyError(f"{where}: service {service!r} contains invalid characters {bad!r}")
    if argument != "*":
        bad = _invalid_chars(argument, _RPCNAME_CHARS)
        if bad:
            raise PolicyError(f"{where}: argument {argument!r} contains invalid characters {bad!r}")
        if not argument.startswith("+"):
            raise PolicyError(f"{where}: argument {argument!r} does not start with +")
        if service == "*":
            raise PolicyError(f"{where}: only * argument allowed for * service")

    source_token = _parse_token(source, _SOURCE_KINDS, "source", where)
    target_token = _parse_token(target, _TARGET_KINDS, "target", where)

    try:
        action = _Action(action_text)
    except ValueError:
        raise PolicyError(f"{where}: invalid action: {action_text!r}") from None

    values: dict[str, str] = {}
    for param in params:
        key, sep, value = param.partition("=")
        if not sep:
            raise PolicyError(f"{where}: invalid action parameter syntax: {param!r}")
        if key in values:
            raise PolicyError(f"{where}: parameter given twice: {key!r}")
        if key not in _PARAMS[action]:
            raise PolicyError(f"{where}: invalid parameter for action {action.value}: {key!r}")
        if key in _BOOLEAN_PARAMS and value not in ("yes", "no"):
            raise PolicyError(f"{where}: {key!r} is {value!r}, but can be only 'yes' or 'no'")
        values[key] = value

    redirect = None
    if "target" in values:
        redirect = _parse_token(values["target"], _REDIRECT_KINDS, "redirect", where)
    if "default_target" in values:
        # only validated: it preselects a choice in the ask dialog, which we never show
        _parse_token(values["default_target"], _REDIRECT_KINDS, "redirect", where)

    if action is _Action.ALLOW and target_token.kind is _Kind.DEFAULT and redirect is None:
        raise PolicyError(f"{where}: allow action for @default rule must specify target= option")

    return _Rule(
        where=where,
        service=None if service == "*" else service,
        argument=None if argument == "*" else argument,
        source=source_token,
        target=target_token,
        action=action,
        redirect=redirect,
        # qrexec sends an empty user= as DEFAULT, i.e. the qube's default user
        user=values.get("user") or None,
        autostart=values.get("autostart", "yes") == "yes",
    )


def _parse_lines(lines: Iterable[str], path: str) -> list[_Rule]:
    rules = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        if line.startswith("!"):
            directive = line.split()[0]
            if directive in ("!include", "!include-dir", "!include-service", "!compat-4.0"):
                raise PolicyError(f"{where}: unsupported directive {directive!r}")
            raise PolicyError(f"{where}: invalid directive {directive!r}")
        rules.append(_parse_rule(line, where))
    return rules


def _deny(reason: str) -> Decision:
    return Decision(allowed=False, target=None, user=None, autostart=False, reason=reason)


class Policy:
    """An ordered list of rules; the first rule that matches a call decides it."""

    def __init__(self, rules: Iterable[_Rule]) -> None:
        self._rules = tuple(rules)

    def __len__(self) -> int:
        return len(self._rules)

    @classmethod
    def from_string(cls, text: str, name: str = "<string>") -> Policy:
        """Parse one policy file's text; *name* stands for its path in error messages.

        Raises :class:`PolicyError` on any syntax error; the caller must then deny every call.
        """
        # only "\n" ends a line, as when qrexec reads a StringIO, so line numbers agree
        return cls(_parse_lines(text.split("\n"), name))

    @classmethod
    def from_dir(cls, directory: Path) -> Policy:
        """Load every ``*.policy`` file in *directory*, sorted by name in C order, as one list.

        Dot-files and other suffixes are ignored; a ``.policy`` file whose name uses anything
        but ``0-9a-z_.-`` is an error, as is any syntax error in any file. On
        :class:`PolicyError` the caller must deny every call, as real Qubes does.
        """
        try:
            names = os.listdir(directory)
        except OSError as e:
            raise PolicyError(f"{directory}: cannot list policy directory: {e.strerror}") from e
        paths = [
            directory / name
            for name in names
            if name.endswith(POLICY_SUFFIX)
            and not name.startswith(".")
            and (directory / name).is_file()
        ]
        # every name is checked before any file is read: one bad name voids the whole policy
        for path in paths:
            if not set(path.name) <= _FILENAME_CHARS:
                raise PolicyError(f"{path!s}: invalid policy file name {path.name!r}")
        # the names are now plain ASCII, so str order is C (byte) order
        paths.sort(key=lambda p: p.name)

        rules: list[_Rule] = []
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError as e:
                raise PolicyError(f"{path}: cannot read: {e.strerror}") from e
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                lineno = data.count(b"\n", 0, e.start) + 1
                raise PolicyError(f"{path}:{lineno}: not valid UTF-8") from e
            # a file read in text mode ends lines at \r\n and \r too
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            rules.extend(_parse_lines(text.split("\n"), str(path)))
        return cls(rules)

    def evaluate(self, request: Request, system: Mapping[str, QubeInfo]) -> Decision:
        """Decide one call from the qube ``request.source``; *system* maps every qube's name
        to its state. Never raises: anything malformed is a deny with its reason."""
        service, source = request.service, request.source
        if not service or _invalid_chars(service, _RPCNAME_CHARS - {"+"}):
            return _deny(f"invalid service name {service!r}")
        if _invalid_chars(request.argument, _RPCNAME_CHARS):
            return _deny(f"invalid argument {request.argument!r}")
        argument = "+" + request.argument
        if source not in system:
            return _deny(f"unknown source qube {source!r}")

        target = request.target or _DEFAULT
        if target.startswith("@dispvm"):
            return _deny("no disposable qubes in the sandbox")
        if target.startswith("@") and target not in (_DEFAULT, "@adminvm"):
            return _deny(f"invalid target {target!r}")
        if not _is_dom0(target) and target not in system:
            # real qrexec: a name that is no qube means "let the policy choose"
            target = _DEFAULT

        for rule in self._rules:
            if rule.matches(service, argument, source, target, system):
                return self._apply(rule, source, target, system)
        return _deny("no matching rule")

    @staticmethod
    def _apply(rule: _Rule, source: str, target: str, system: Mapping[str, QubeInfo]) -> Decision:
        where = rule.where
        if rule.action is _Action.DENY:
            return _deny(f"{where}: deny")
        if rule.action is _Action.ASK:
            return _deny(f"{where}: ask needs a GUI qube: denied")

        # the redirect replaces the target only now: no other rule is consulted for it
        if rule.redirect is not None:
            if rule.redirect.kind in (_Kind.DISPVM, _Kind.DISPVM_TEMPLATE):
                return _deny(f"{where}: allow to a disposable, but the sandbox has none")
            target = rule.redirect.value
        if _is_dom0(target):
            resolved = "dom0"
        elif target in system:
            resolved = target
        else:
            return _deny(f"{where}: allow, but no target is specified by caller or policy")

        if resolved == source:
            return _deny(f"{where}: allow, but a qube may not call itself")
        info = system.get(resolved)
        if not rule.autostart and resolved != "dom0" and (info is None or not info.running):
            return _deny(f"{where}: allow, but {resolved} is not running and autostart=no")
        return Decision(
            allowed=True,
            target=resolved,
            user=rule.user,
            autostart=rule.autostart,
            reason=f"{where}: allow",
        )
