# Every target does its own set-up on a fresh Debian 12 machine (apt-get when root, a venv, pip).
# Debian's python3 where there is one: the interpreter the packages' scripts name, and one
# that the sandbox's non-root dom0 service user can run (a pyenv under root's 0700 home
# it cannot reach, and its tests would then skip)
PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)
VENV   := .venv
PY     := $(VENV)/bin/python
# keep it short: unix socket paths under it are limited to 107 bytes
DEMO_DIR ?= /tmp/qfwupd-demo

.PHONY: all deps venv lint unit test demo bench load man install packages clean fuzz crash mutation

all: test

deps:
	@PYTHON=$(PYTHON) tools/system-deps.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check broker tests qrexec bench packaging fuzz tools
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q tests/unit

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

demo: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH tools/demo.sh $(DEMO_DIR)

# the man page and bash completion, written from the parser --help comes from (the
# packages install them; nothing generated is committed)
man: venv
	mkdir -p build
	$(PY) -m broker.manpage > build/qubes-fwupdmgr.1
	$(PY) -m broker.completion > build/qubes-fwupdmgr.bash-completion

# what the packages hold, laid out under DESTDIR (packaging/install.py; the rpm specs and
# debian/rules call this). COMPONENT: dom0, vm (vm-common, updatevm, usbvm) or all.
# PYTHON must import the CLI's modules (the man page is written from its parser);
# PKG_PYTHON is the interpreter the installed scripts name.
PREFIX     ?= /usr
SYSCONFDIR ?= /etc
COMPONENT  ?= all
PKG_PYTHON ?= /usr/bin/python3
install:
	$(PYTHON) packaging/install.py --destdir "$(DESTDIR)" --prefix "$(PREFIX)" \
	  --sysconfdir "$(SYSCONFDIR)" --python "$(PKG_PYTHON)" $(COMPONENT)

# the rpms (rpmbuild, also on Debian) and the VM debs (dpkg-buildpackage) into
# build/packages, each with its file list and rpmlint/lintian's report
packages: deps
	$(PYTHON) packaging/build.py --out build/packages

# every line of issue 20 against a baseline measured in the same run (catalog, refresh,
# cab receive at 1-256 MiB, CLI verbs), then peak memory of dom0's metadata path; reports
# PASS/FAIL per line and exits 0 (BENCH_ONLY=catalog,cab,cli,memory picks parts)
bench: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/run.py $(if $(BENCH_ONLY),--only $(BENCH_ONLY))

# issue 21: 20 devices (LOAD_DEVICES) and 50 refresh/update -y cycles (LOAD_CYCLES; each
# daemon restarted between them) on the sandbox; from cycle 5 on, per cycle: processes,
# fds, RSS, dom0's sessions/state/cache/tmp files, the manager's peak RSS. Prints metric,
# first, last, max, verdict; exits 1 on a leak, 2 if a cycle failed (bench/load.py)
load: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/load.py

# kill -9 at CRASH_POINTS (default 300) seeded side effects of refresh, cab transfer and
# install, then dom0's state checked and the next run made (make test runs 24 of them);
# prints each point and a count per scenario. CRASH_SEED=N replays another run's points.
crash: venv
	CRASH_POINTS=$(or $(CRASH_POINTS),300) $(VENV)/bin/pytest -q -s -p no:cacheprovider \
	  tests/integration/test_crash_consistency.py

# every parser of hostile input under atheris (libFuzzer) for FUZZ_SECONDS each (default
# 60), fuzz/regressions replayed first; prints executions, exec/s and findings per target
# and exits 0 unless FUZZ_STRICT=1 (fuzz/run.py names the other knobs)
fuzz: venv
	$(PY) -c 'import atheris' 2>/dev/null || $(VENV)/bin/pip install -q atheris
	$(PY) fuzz/run.py

# mutmut over the trust modules (signatures, jcat, metadata, cabinet, transfer, session,
# receive, usbvm's reply parsing), each against its own unit tests only, in a throwaway copy
# of the tree; prints mutants, killed, survived and the score per module, and the name of
# every survivor (docs/mutation.md lists the equivalent ones). MUTATION_ONLY=signatures,jcat
# picks modules; tools/mutation.py names the other knobs
mutation: venv
	$(PY) -c 'import mutmut' 2>/dev/null || $(VENV)/bin/pip install -q 'mutmut>=3.8,<4'
	$(PY) tools/mutation.py

clean:
	rm -rf $(VENV) *.egg-info .mypy_cache .ruff_cache .pytest_cache
