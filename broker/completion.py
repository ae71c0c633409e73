"""bash completion for qubes-fwupdmgr, written from the same argparse parser as --help:
the verbs, the flags accepted anywhere, and each verb's own flags.

    python -m broker.completion > qubes-fwupdmgr     (installed to
    /usr/share/bash-completion/completions/ by the package)

Device ids are not completed: listing them means asking both daemons (and the USB qube
over qrexec) as root, too slow and too privileged for a keypress.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from broker.manpage import _subcommands


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [
        o
        for a in parser._actions
        if a.help != argparse.SUPPRESS
        for o in a.option_strings
        if o.startswith("--") or len(o) == 2
    ]


def _taking_values(parser: argparse.ArgumentParser) -> list[str]:
    """Flags whose next word is their value, not a verb (--filter FLAGS)."""
    return [o for a in parser._actions if a.nargs != 0 for o in a.option_strings]


def render(parser: argparse.ArgumentParser) -> str:
    prog = parser.prog
    func = "_" + prog.replace("-", "_")
    verbs = _subcommands(parser).choices
    global_flags = _flags(parser)
    valued = "|".join(_taking_values(parser)) or "--"
    cases = "\n".join(
        f"        {shlex.quote(name)}) extra={shlex.quote(' '.join(_flags(sub)))} ;;"
        for name, sub in verbs.items()
    )
    return f"""# bash completion for {prog}: written by python -m broker.completion
{func}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" verb="" extra="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            {valued}) ((i++)) ;;
            -*) ;;
            *) verb="${{COMP_WORDS[i]}}"; break ;;
        esac
    done
    case "$verb" in
{cases}
    esac
    if [[ -z "$verb" && "$cur" != -* ]]; then
        COMPREPLY=($(compgen -W {shlex.quote(" ".join(verbs))} -- "$cur"))
    elif [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "{" ".join(global_flags)} $extra" -- "$cur"))
    fi
}}
complete -F {func} {prog}
"""


def main() -> int:
    from broker.cli import build_parser

    sys.stdout.write(render(build_parser()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
