"""The man page and the bash completion come from the parser --help comes from: every verb
and flag is in each, `man -l` renders the page, and bash completes the verbs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from broker import completion, manpage
from broker.cli import build_parser
from broker.errors import EXIT_MEANINGS
from broker.manpage import _subcommands

PARSER = build_parser()
VERBS = list(_subcommands(PARSER).choices)
GLOBAL_FLAGS = [o for a in PARSER._actions for o in a.option_strings if o.startswith("--")]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The page as man -l shows it (plain text, no pager, a fixed width)."""
    page = tmp_path_factory.mktemp("man") / "qubes-fwupdmgr.1"
    page.write_text(manpage.render(PARSER, "1.2.3"))
    if shutil.which("man") is None:
        pytest.fail("man is missing: tools/system-deps.sh installs man-db")
    r = subprocess.run(
        ["man", "-l", str(page)],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "250",
             "LANG": "C.UTF-8"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr
    return r.stdout


def test_the_page_renders_with_every_section(rendered: str) -> None:
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "EXIT STATUS",
                    "FILES", "SEE ALSO"):  # fmt: skip
        assert f"\n{section}\n" in rendered, section
    assert "qubes-fwupdmgr 1.2.3" in rendered


def test_every_verb_flag_and_exit_code_is_on_the_page(rendered: str) -> None:
    text = " ".join(rendered.split())
    for verb in VERBS:
        assert f"\n       {verb}" in rendered, verb
    for flag in GLOBAL_FLAGS:
        assert flag in text, flag
    assert "--force" in text  # refresh's own flag, under refresh
    for code, meaning in EXIT_MEANINGS:
        # a short tag shares its line with the text: "0      done ..."
        assert re.search(rf"^ +{code} +{re.escape(meaning)}$", rendered, re.M), code


def test_the_help_epilog_names_the_same_exit_codes() -> None:
    epilog = " ".join((PARSER.epilog or "").split())
    for code, _ in EXIT_MEANINGS:
        assert f"{code} " in epilog, code


def test_roff_escapes_what_would_be_a_request() -> None:
    assert manpage._roff(".TH evil\n'x\\y") == "\\&.TH evil\n\\&'x\\ey"


def _complete(script: Path, *words: str) -> list[str]:
    """What bash offers after typing ``words`` (the last one is being completed)."""
    line = " ".join(["qubes-fwupdmgr", *words])
    program = f"""
source {script}
COMP_WORDS=(qubes-fwupdmgr {" ".join(repr(w) for w in words)})
COMP_CWORD={len(words)}
COMP_LINE={line!r}
_qubes_fwupdmgr
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    r = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True,
                       check=True, timeout=30)  # fmt: skip
    return [w for w in r.stdout.splitlines() if w]


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "qubes-fwupdmgr"
    path.write_text(completion.render(PARSER))
    return path


def test_completion_lists_the_verbs(script: Path) -> None:
    assert _complete(script, "") == VERBS
    assert set(_complete(script, "get-")) == {v for v in VERBS if v.startswith("get-")}
    assert _complete(script, "--json", "ref") == ["refresh"]  # after a global flag too


def test_completion_offers_the_global_flags_before_and_after_any_verb(script: Path) -> None:
    assert set(GLOBAL_FLAGS) <= set(_complete(script, "--"))
    for verb in ("refresh", "get-devices", "update"):
        assert set(GLOBAL_FLAGS) <= set(_complete(script, verb, "--")), verb
    assert _complete(script, "--updatevm", "sys-whonix", "--filter", "updatable", "get-up") == [
        "get-updates", "get-upgrades",
    ]  # fmt: skip
