"""dom0 sessions: what dom0 has asked the UpdateVM for, keyed by a random nonce.

The manager opens a session before it calls the UpdateVM; the receive service accepts a
push only for a pending, unexpired session, takes it once (atomic rename), and writes its
verdict back for the manager. Names, sizes and checksums that dom0 expects come from here
(i.e. from dom0's config and verified metadata), never from the pushed stream.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from broker.cabinet import ExpectedRelease
from broker.config import check_url
from broker.errors import FormatError, TransferError
from broker.sanitize import printable
from broker.transfer import FRAME_VERSION, is_file_name, sweep_temps, write_atomic

_NONCE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class ExpectedFile:
    name: str
    max_size: int
    sha256: str | None = None  # set for cabs: from dom0's verified metadata
    size: int | None = None  # exact size when known from verified metadata


@dataclass(frozen=True)
class Session:
    nonce: str
    kind: str  # "metadata" | "cab"
    remote_id: str
    files: tuple[ExpectedFile, ...]
    expires: float
    # for cabs: what the cab's own metainfo must say, from dom0's verified metadata
    release: ExpectedRelease | None = None
    # for metadata: the admin's refresh --force (see metadata.check_rollback)
    force: bool = False
    # the qube dom0 asked (the configured UpdateVM, or --updatevm for this run): the only
    # caller whose push counts for this session
    updatevm: str = ""


@dataclass(frozen=True)
class Outcome:
    """dom0's own verdict on a push, written by the receive service for the manager."""

    ok: bool
    message: str
    stored: tuple[str, ...] = ()
    nothing_new: bool = False


def check_nonce(untrusted_nonce: object) -> str:
    if not isinstance(untrusted_nonce, str) or not _NONCE.fullmatch(untrusted_nonce):
        raise TransferError("malformed session nonce")
    return untrusted_nonce


# what dom0 sends qubes.FwupdDownload: the wire form of a session (the UpdateVM parses it)
@dataclass(frozen=True)
class Wanted:
    name: str
    url: str
    max_size: int
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class DownloadRequest:
    nonce: str
    kind: str
    remote: str
    files: tuple[Wanted, ...]
    # an offline import (--from-qube QUBE --dir DIR): the qube reads each file by name from
    # this dir instead of downloading it; what it pushes is checked as a download is
    source_dir: str | None = None

    def to_json(self) -> bytes:
        doc = {
            "version": FRAME_VERSION,
            "nonce": self.nonce,
            "kind": self.kind,
            "remote": self.remote,
            "files": [w.__dict__ for w in self.files],
        }
        if self.source_dir is not None:
            doc["dir"] = self.source_dir
        return json.dumps(doc).encode() + b"\n"

    @classmethod
    def from_json(cls, line: bytes) -> DownloadRequest:
        try:
            doc = json.loads(line)
            files = tuple(
                Wanted(
                    name=_file_name(f["name"]),
                    url=check_url(str(f["url"]), "download URL"),
                    max_size=int(f["max_size"]),
                    sha256=f.get("sha256"),
                    size=f.get("size"),
                )
                for f in doc["files"]
            )
            source_dir = doc.get("dir")
            if source_dir is not None:
                source_dir = check_source_dir(source_dir)
            return cls(check_nonce(doc["nonce"]), str(doc["kind"]), str(doc["remote"]), files,
                       source_dir)  # fmt: skip
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError("malformed download request") from e


def check_source_dir(value: object) -> str:
    """An import's dir: absolute, printable, no more than PATH_MAX."""
    if (not isinstance(value, str) or not value.startswith("/") or len(value) > 4096
            or not value.isprintable()):  # fmt: skip
        raise FormatError("the import dir must be an absolute path of printable characters")
    return value


def _file_name(value: object) -> str:
    if not isinstance(value, str) or not is_file_name(value):
        raise FormatError("download request names an invalid file")
    return value


class Sessions:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def open(
        self,
        kind: str,
        remote_id: str,
        files: tuple[ExpectedFile, ...],
        ttl: float,
        release: ExpectedRelease | None = None,
        force: bool = False,
        updatevm: str = "",
    ) -> Session:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o770)
        self.sweep(ttl)
        session = Session(
            secrets.token_hex(16), kind, remote_id, files, time.time() + ttl, release, force,
            updatevm,
        )  # fmt: skip
        doc = asdict(session)
        write_atomic(self.dir / f"{session.nonce}.pending", json.dumps(doc).encode())
        return session

    def sweep(self, ttl: float) -> list[str]:
        """Drop what a killed manager or service left: sessions older than any can live.
        Returns the names removed."""
        cutoff = time.time() - ttl - 60
        removed = []
        for path in self.dir.iterdir():
            if path.suffix not in (".pending", ".taken", ".outcome"):
                continue
            # a concurrent run may close its session between our listing and our stat
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
        # a session write killed before its rename: no live one is a minute old
        return removed + sweep_temps(self.dir, older_than=60)

    def asked(self) -> set[str]:
        """The qubes unexpired pending sessions asked for a push (a run's --updatevm)."""
        qubes = set()
        now = time.time()
        for path in self.dir.glob("*.pending"):
            with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                doc = json.loads(path.read_text())
                if float(doc.get("expires", 0)) >= now:
                    qubes.add(str(doc.get("updatevm", "")))
        return qubes - {""}

    def take(self, untrusted_nonce: object, caller: str, updatevm: str) -> Session:
        """Claim a pending session exactly once; refuses unknown, used or expired nonces,
        and, before claiming it, a caller that is not the qube it asked (``updatevm``
        for a session that names none): that caller cannot use it up."""
        nonce = check_nonce(untrusted_nonce)
        pending, taken = self.dir / f"{nonce}.pending", self.dir / f"{nonce}.taken"
        try:
            # dom0 wrote this file; it names the qube dom0 asked
            asked = str(json.loads(pending.read_text()).get("updatevm") or updatevm)
        except FileNotFoundError:
            raise TransferError("no pending dom0 session for this nonce") from None
        except (ValueError, AttributeError) as e:
            raise TransferError("dom0's session file is damaged") from e
        if caller != asked:
            raise TransferError(
                f"qube {printable(caller, 64)} pushed for a download dom0 asked of {asked}; "
                "refused"
            )
        try:
            os.rename(pending, taken)  # atomic: a second push with the same nonce fails here
        except FileNotFoundError:
            raise TransferError("no pending dom0 session for this nonce") from None
        doc = json.loads(taken.read_text())
        session = Session(
            nonce=doc["nonce"],
            kind=doc["kind"],
            remote_id=doc["remote_id"],
            files=tuple(ExpectedFile(**f) for f in doc["files"]),
            expires=doc["expires"],
            release=(
                ExpectedRelease(
                    doc["release"]["component_id"],
                    doc["release"]["version"],
                    tuple(doc["release"]["guids"]),
                )
                if doc.get("release")
                else None
            ),
            force=doc.get("force") is True,
            updatevm=str(doc.get("updatevm", "")),
        )
        if time.time() > session.expires:
            raise TransferError("dom0 session expired")
        return session

    def finish(self, nonce: str, outcome: Outcome) -> None:
        write_atomic(self.dir / f"{nonce}.outcome", json.dumps(asdict(outcome)).encode())

    def outcome(self, nonce: str) -> Outcome | None:
        path = self.dir / f"{nonce}.outcome"
        if not path.exists():
            return None
        doc = json.loads(path.read_text())
        try:
            return Outcome(
                ok=bool(doc["ok"]),
                message=str(doc["message"]),
                stored=tuple(doc["stored"]),
                nothing_new=bool(doc.get("nothing_new", False)),
            )
        except (KeyError, TypeError) as e:
            raise FormatError("corrupt session outcome") from e

    def close(self, nonce: str) -> None:
        for suffix in ("pending", "taken", "outcome"):
            (self.dir / f"{nonce}.{suffix}").unlink(missing_ok=True)
