"""pytest plugin for make mutation (tools/mutation.py): the costly fixtures made once.

mutmut runs the selected tests once in its own process, then forks one process per mutant,
and each fork starts a new pytest session: the unit tests' session and module fixtures (a
CA, GPG keys, an ML-DSA PKI) would be made again for every mutant, seconds each. Here the
first session's values are kept, in this module, which the forks inherit, and handed to
every later session. mutmut's own sessions (in its process) each get a base temp of their
own under $MUTATION_BASETEMP, which no later session rotates away or wipes; a mutant's
session takes pytest's usual one. Only unparametrized session and module fixtures that
were made without error are kept. The tests use them read-only, as they do within one session.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

_KEPT: dict[tuple[str, str], Any] = {}
_MUTMUT_PID = os.getpid()  # imported by mutmut's first pytest session, before any fork
_sessions = 0


def pytest_configure(config: pytest.Config) -> None:
    global _sessions
    root = os.environ.get("MUTATION_BASETEMP")
    if root and os.getpid() == _MUTMUT_PID:
        _sessions += 1
        config.option.basetemp = os.path.join(root, str(_sessions))


def _key(fixturedef: Any) -> tuple[str, str] | None:
    if fixturedef.scope not in ("session", "module") or fixturedef.params:
        return None
    return (fixturedef.baseid, fixturedef.argname)


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef: Any, request: pytest.FixtureRequest) -> Any:
    key = _key(fixturedef)
    if key is None or key not in _KEPT:
        return None
    value = _KEPT[key]
    fixturedef.cached_result = (value, fixturedef.cache_key(request), None)
    return value


@pytest.hookimpl(wrapper=True, specname="pytest_fixture_setup")
def _keep(fixturedef: Any, request: pytest.FixtureRequest) -> Any:
    value = yield
    key = _key(fixturedef)
    if key is not None and value is not None:
        _KEPT.setdefault(key, value)
    return value
