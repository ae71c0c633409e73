"""dom0's dirs as the package's tmpfiles snippet makes them: the code that makes them on
first use and the snippet name the same dirs with the same owner group and mode."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

import pytest

from broker.config import (
    DOM0_GROUP,
    DOM0_GROUP_ENV,
    MANAGER_DIR_MODE,
    ROOT_ENV,
    Paths,
)
from broker.errors import ConfigError

SNIPPET = Path(__file__).parents[2] / "packaging/tmpfiles.d/qubes-fwupd-dom0.conf"


def test_the_tmpfiles_snippet_and_the_code_agree() -> None:
    rows = [line.split() for line in SNIPPET.read_text().splitlines()
            if line.strip() and not line.startswith("#")]  # fmt: skip
    root = Paths(Path("/"))
    assert [Path(r[1]) for r in rows] == [*root.dom0_dirs, root.manager_dir]
    assert [(r[0], int(r[2], 8), r[3], r[4]) for r in rows] == [
        *(("d", root.dom0_dir_mode(d), "root", DOM0_GROUP) for d in root.dom0_dirs),
        ("d", MANAGER_DIR_MODE, "root", "root"),
    ]


def test_first_use_makes_them_2770_in_the_group_and_repairs_modes(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name  # a group that exists here, for "qubes"
    paths = Paths(tmp_path, group)
    paths.state_dir.mkdir(parents=True, mode=0o755)  # as an older version left it
    paths.make_dom0_dirs()
    for d in paths.dom0_dirs:
        st = d.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (paths.dom0_dir_mode(d),
                                                          os.getgid()), d  # fmt: skip
    st = paths.manager_dir.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, os.geteuid())


def test_a_missing_group_leaves_the_group_alone(tmp_path: Path) -> None:
    Paths(tmp_path, "no-such-group-here").make_dom0_dirs()
    assert stat.S_IMODE(Paths(tmp_path).cabs_dir.stat().st_mode) == 0o2770


def test_a_symlink_in_place_of_a_dir_is_refused(tmp_path: Path) -> None:
    paths = Paths(tmp_path, "no-such-group-here")
    paths.cache_dir.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    paths.cabs_dir.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="cabs: not a directory"):
        paths.make_dom0_dirs()


def test_a_gid_serves_where_the_host_has_no_such_group(tmp_path: Path) -> None:
    Paths(tmp_path, os.getgid()).make_dom0_dirs()
    assert Paths(tmp_path).sessions_dir.stat().st_gid == os.getgid()


def test_the_group_comes_from_the_environment_name_or_gid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    monkeypatch.delenv(DOM0_GROUP_ENV, raising=False)
    assert Paths.from_env() == Paths(tmp_path, DOM0_GROUP)
    monkeypatch.setenv(DOM0_GROUP_ENV, "89100")
    assert Paths.from_env() == Paths(tmp_path, 89100)
    monkeypatch.setenv(DOM0_GROUP_ENV, "wheel")
    assert Paths.from_env() == Paths(tmp_path, "wheel")


def test_parents_it_makes_are_0755_whatever_the_umask(tmp_path: Path) -> None:
    """As systemd-tmpfiles makes them, so the service user can pass through; parents that
    were there already are left as they are."""
    root = tmp_path / "root"
    (root / "var/log").mkdir(parents=True, mode=0o700)
    old = os.umask(0o077)
    try:
        Paths(root, "no-such-group-here").make_dom0_dirs()
    finally:
        os.umask(old)
    for made in ("var/lib", "var/cache"):
        assert stat.S_IMODE((root / made).stat().st_mode) == 0o755, made
    assert stat.S_IMODE((root / "var/log").stat().st_mode) == 0o700
    for d in Paths(root).dom0_dirs:
        assert stat.S_IMODE(d.stat().st_mode) == Paths(root).dom0_dir_mode(d), d


def test_a_manager_dir_not_of_this_user_is_refused(tmp_path: Path) -> None:
    """One the service made first (or put in the place of the real one) must never hold
    what the manager reads as its own history or remote switches."""
    paths = Paths(tmp_path, "no-such-group-here")
    paths.make_dom0_dirs()
    paths.manager_dir.rmdir()
    (tmp_path / "elsewhere").mkdir()
    paths.manager_dir.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="manager: not a dir of this user's"):
        paths.make_dom0_dirs()
    paths.manager_dir.unlink()
    paths.manager_dir.mkdir(mode=0o777)
    os.chown(paths.manager_dir, 4242, -1)  # root here: a dir of another user's
    with pytest.raises(ConfigError, match=r"owner uid 4242\): refusing"):
        paths.make_dom0_dirs()
    os.chown(paths.manager_dir, os.geteuid(), -1)
    paths.make_dom0_dirs()  # its own again, with a wrong mode: put back to 0700
    assert stat.S_IMODE(paths.manager_dir.stat().st_mode) == MANAGER_DIR_MODE
