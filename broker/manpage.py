"""qubes-fwupdmgr(1), written from the same argparse parser as --help, so the two cannot
drift: every verb, argument and flag, and the exit codes from broker.errors.

    python -m broker.manpage > qubes-fwupdmgr.1     (packaging runs this at build time)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from broker.config import Paths
from broker.errors import EXIT_MEANINGS

_SEE_ALSO = "fwupdmgr(1), fwupd(8), qvm-tags(1), qubes-dom0-update(1)"


def _files() -> tuple[tuple[Path, str], ...]:
    paths = Paths(Path("/"))  # where they are in Qubes: the one Paths object says
    return (
        (paths.config_file, "configuration: remotes, limits, the UpdateVM, the USB qube; an "
         "unknown key is named in a warning"),
        (paths.pki_metadata_dirs[0], "who may sign metadata (with each remote's "
         "metadata_signers)"),
        (paths.pki_firmware_dirs[0], "who may sign firmware payloads (each remote's "
         "payload_anchors name the files it may use)"),
        (paths.boot_updates_dir, "update-heads: a Heads ROM per version, for Heads to "
         "check and flash at the next boot"),
        (paths.cache_dir, "verified metadata generations, and cabs named by sha256"),
        (paths.state_dir, "accepted signing times, sessions"),
        (paths.manager_dir, "the manager's own: history, remote switches, pending reboots"),
    )  # fmt: skip


def _roff(text: str) -> str:
    """Text as roff reads it literally: backslashes escaped, no line starting a request."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in out.split("\n")
    )


def _subcommands(
    parser: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise ValueError("the parser has no verbs")


def _metavar(action: argparse.Action) -> str:
    return action.metavar if isinstance(action.metavar, str) else action.dest.upper()


def _option_line(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    return f"{names} \\fI{_roff(_metavar(action))}\\fR"


def _options(parser: argparse.ArgumentParser, skip: set[str]) -> Iterator[str]:
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if set(action.option_strings) & skip:
            continue
        yield ".TP"
        yield _option_line(action)
        yield _roff(action.help or "")


def render(parser: argparse.ArgumentParser, version: str) -> str:
    prog = parser.prog
    verbs = _subcommands(parser)
    helps = {a.dest: a.help or "" for a in verbs._choices_actions}
    lines = [
        f'.TH {prog.upper()} 1 "" "{_roff(prog)} {_roff(version)}" "Qubes OS"',
        ".SH NAME",
        f"{_roff(prog)} \\- {_roff(parser.description or '')}",
        ".SH SYNOPSIS",
        f"\\fB{_roff(prog)}\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGUMENTS\\fR]",
        ".SH DESCRIPTION",
        _roff(
            "fwupdmgr's verbs for a Qubes OS machine. The metadata and firmware are downloaded "
            "by the UpdateVM, checked again in dom0 with dom0's own trust store, and each "
            "update goes to the fwupd daemon that owns the device: dom0's for internal "
            "devices, the USB qube's for USB peripherals, which checks it a third time."
        ),
        ".SH COMMANDS",
    ]
    global_flags = {o for a in parser._actions for o in a.option_strings}
    for name, sub in verbs.choices.items():
        args = " ".join(
            f"\\fI{_roff(_metavar(a))}\\fR"
            if a.nargs not in ("?", "*")
            else f"[\\fI{_roff(_metavar(a))}\\fR]"
            for a in sub._actions
            if not a.option_strings
        )
        lines += [".TP", f"\\fB{_roff(name)}\\fR {args}".rstrip(), _roff(helps.get(name, ""))]
        for a in sub._actions:
            if not a.option_strings and a.help:
                lines += [".RS", f"\\fI{_roff(_metavar(a))}\\fR: {_roff(a.help)}", ".RE"]
        own = list(_options(sub, skip=global_flags | {"-h", "--help"}))
        if own:
            lines += [".RS", *own, ".RE"]
    lines += [".SH OPTIONS", _roff("Accepted anywhere on the line, before or after the command."),
              *_options(parser, skip=set())]  # fmt: skip
    lines.append(".SH EXIT STATUS")
    for code, meaning in EXIT_MEANINGS:
        lines += [".TP", f"\\fB{code}\\fR", _roff(meaning)]
    lines.append(".SH FILES")
    for path, what in _files():
        lines += [".TP", f"\\fI{_roff(str(path))}\\fR", _roff(what)]
    lines += [".SH SEE ALSO", _roff(_SEE_ALSO)]
    return "\n".join(lines) + "\n"


def main() -> int:
    import broker
    from broker.cli import build_parser

    sys.stdout.write(render(build_parser(), broker.__version__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
