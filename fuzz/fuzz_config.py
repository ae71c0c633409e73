"""Fuzz target: broker.config.Config.load, qubes-fwupd.conf as dom0 reads it, and beside
it dom0's fwupd's own remotes.d/<id>.conf, which Config.load reads for a remote that names
no metadata_url (the built-in lvfs, or a [remote vendor] section).

The input is the config file, then optionally SEPARATOR and the remotes.d file (written
as both lvfs.conf and vendor.conf). Both are written into a private Paths tree; an empty
config before SEPARATOR means no config file at all (the built-in remotes).
"""

from __future__ import annotations

import harness

with harness.instrumented():
    from broker.config import Config, Paths

SEPARATOR = b"\n%%remotes.d%%\n"
ROOT = harness.scratch("qfw-fuzz-config-")
PATHS = Paths(ROOT, dom0_group=0)
PATHS.config_dir.mkdir(parents=True)
PATHS.fwupd_remotes_dir.mkdir(parents=True)
REMOTE_FILES = [PATHS.fwupd_remotes_dir / f"{rid}.conf" for rid in ("lvfs", "vendor")]


def one(data: bytes) -> None:
    config, sep, remote = data.partition(SEPARATOR)
    if sep and not config:
        PATHS.config_file.unlink(missing_ok=True)
    else:
        PATHS.config_file.write_bytes(config)
    for path in REMOTE_FILES:
        if sep:
            path.write_bytes(remote)
        else:
            path.unlink(missing_ok=True)
    loaded = Config.load(PATHS)
    for r in loaded.remotes:
        loaded.remote(r.id)


if __name__ == "__main__":
    harness.main(one)
