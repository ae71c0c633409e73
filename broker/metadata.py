"""Verified LVFS metadata: accepting it, storing it, and reading releases from it.

Rules, each enforced in one place below:
- verify before parse: the catalog is decompressed and parsed only after its jcat
  signature and checksum verified over the very fd that is stored (:func:`accept`);
- rollback: a remote's metadata must be signed later than what dom0 accepted before;
  the same file again is "nothing new" (:func:`check_rollback`);
- stale ("freeze"): metadata signed longer ago than the max age is flagged;
- decompression is capped in size and ratio while streaming (:func:`open_catalog`);
- no DOCTYPE, no entities, no network, no huge trees (:func:`parse_catalog`);
- download URLs come only from this verified catalog, built as fwupd builds them: the
  remote's FirmwareBaseURI plus the basename of the release's https location;
- one odd release is skipped with its reason (:class:`Skipped`), never offered, and never
  sinks the catalog; only structural faults refuse the whole file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import gzip
import io
import json
import lzma
import os
import re
import secrets
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import urlsplit, urlunsplit

import zstandard
from lxml import etree

from broker.config import Config, Limits, Paths, Remote, check_url
from broker.errors import (
    BrokerError,
    ConfigError,
    FormatError,
    LimitExceeded,
    NothingToDo,
    RollbackError,
    VerificationError,
)
from broker.jcat import BlobKind, JcatBlob, JcatItem, build_jcat, parse_jcat
from broker.signatures import TrustPolicy, TrustStore, Verified, sha256_fd, verify_file
from broker.transfer import (
    fsync_dir,
    install_file,
    is_file_name,
    read_small,
    sweep_temps,
    temp_name,
    write_atomic,
)

_GENERATION = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\.[0-9a-f]{12}")


@dataclass(frozen=True)
class Release:
    """One release of dom0's verified catalog: what may cross, and from where."""

    remote_id: str
    component_id: str
    name: str
    summary: str
    version: str
    guids: tuple[str, ...]
    url: str
    filename: str
    sha256: str
    size: int
    urgency: str
    description: str
    # the component's LVFS::VersionFormat ("" when it names none); fwupd's rules apply
    version_format: str = ""


@dataclass(frozen=True)
class Skipped:
    """A release dom0 will never offer, and why (one odd release never sinks a catalog)."""

    component_id: str
    version: str
    reason: str

    def __str__(self) -> str:
        return f"{self.component_id} {self.version}: {self.reason}"


@dataclass(frozen=True)
class Catalog:
    remote_id: str
    releases: tuple[Release, ...]
    skipped: tuple[Skipped, ...] = ()
    # the verified metadata file this was read from, and its signing time (ISO 8601):
    # what a reviewed plan is bound to (broker.plans); "" where no file is behind it
    metadata_sha256: str = ""
    signed_at: str = ""

    @functools.cached_property
    def by_sha256(self) -> dict[str, list[Release]]:
        """Releases by container sha256 (a cab may ship several components)."""
        index: dict[str, list[Release]] = {}
        for r in self.releases:
            index.setdefault(r.sha256, []).append(r)
        return index

    def find(self, sha256: str, guids: tuple[str, ...]) -> list[Release]:
        """The releases of the cab with this container sha256 for one of these GUIDs."""
        wanted = {g.lower() for g in guids}
        return [r for r in self.by_sha256.get(sha256, ()) if wanted & {g.lower() for g in r.guids}]


# --------------------------------------------------------------------------- decompression
class _CappedReader(io.RawIOBase):
    """Counts decompressed bytes and refuses past the size or ratio cap, while streaming."""

    def __init__(
        self, inner: IO[bytes], raw: IO[bytes], compressed_size: int, limits: Limits
    ) -> None:
        self.inner, self.raw = inner, raw
        self.total = 0
        self.cap = min(
            limits.metadata_xml_max_bytes, max(compressed_size, 4096) * limits.metadata_max_ratio
        )

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            data = self.inner.read(len(b))
        except (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError) as e:
            raise FormatError(f"metadata does not decompress: {e}") from e
        self.total += len(data)
        if self.total > self.cap:
            raise LimitExceeded(f"metadata decompresses to more than {self.cap} bytes")
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        # the decompressor, then the dup'd file (GzipFile and LZMAFile leave a file they
        # were handed open): closing the reader must not leave an fd for the GC to find
        if not self.closed:
            try:
                self.inner.close()
            finally:
                self.raw.close()
        super().close()


def open_catalog(fd: int, name: str, limits: Limits) -> IO[bytes]:
    """A capped, decompressing reader over a verified metadata fd (dup'd; caller closes)."""
    size = os.fstat(fd).st_size
    raw = os.fdopen(os.dup(fd), "rb")
    raw.seek(0)
    inner: IO[bytes]
    if name.endswith(".zst"):
        inner = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    elif name.endswith(".gz"):
        inner = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    elif name.endswith(".xz"):
        inner = lzma.LZMAFile(raw, mode="rb")  # noqa: SIM115  handed to the caller
    elif name.endswith(".xml"):
        inner = raw
    else:
        raw.close()
        raise ConfigError(f"{name}: unknown metadata compression")
    return io.BufferedReader(_CappedReader(inner, raw, size, limits), buffer_size=256 * 1024)


# --------------------------------------------------------------------------- parsing
_HEX = frozenset("0123456789abcdef")
_VERSION = re.compile(r"[A-Za-z0-9._+~-]{1,64}")


class _Skip(Exception):
    """This release is odd: skip it (with its reason), keep the catalog."""


def _text(el: etree._Element | None) -> str:
    return "".join(str(t) for t in el.itertext()).strip() if el is not None else ""


def _description(el: etree._Element | None) -> str:
    """AppStream's description markup as plain text: a line per paragraph, "• " per list
    item (what a person reads at the prompt; fwupd's own markup goes to --json)."""
    if el is None:
        return ""
    lines = []
    for child in el:
        if not isinstance(child.tag, str):
            continue  # comments, processing instructions
        if child.tag in ("ul", "ol"):
            lines += [f"• {' '.join(_text(li).split())}" for li in child if li.tag == "li"]
        else:
            lines.append(" ".join(_text(child).split()))
    return "\n".join(line for line in lines if line) or " ".join(_text(el).split())


def _one(values: list[str], what: str) -> str | None:
    distinct = set(values)
    if len(distinct) > 1:
        raise _Skip(f"{what} given {len(distinct)} different ways")
    return values[0] if values else None


def _sha256(value: str) -> str:
    value = value.strip().lower()
    if len(value) != 64 or not _HEX.issuperset(value):
        raise _Skip("malformed sha256")
    return value


def _size(value: str) -> int:
    value = value.strip()
    if not (value.isascii() and value.isdecimal()) or len(value) > 18:
        raise _Skip("malformed download size")
    return int(value)


@dataclass
class _Sources:
    """What one place (the binary artifact, or the legacy tags) says about the cab."""

    locations: list[str] = dataclasses.field(default_factory=list)
    sha256: list[str] = dataclasses.field(default_factory=list)
    sha1_only: bool = False
    sizes: list[str] = dataclasses.field(default_factory=list)

    def take(self, child: etree._Element) -> None:
        """A <location>, container <checksum> or <size> element; others say nothing."""
        tag, kind, text = child.tag, child.get("type"), child.text or ""
        if tag == "location":
            self.locations.append(text.strip())
        elif tag == "checksum" and kind == "sha256":
            self.sha256.append(_sha256(text))
        elif tag == "checksum" and kind == "sha1":
            self.sha1_only = True
        elif tag == "size" and kind == "download":
            self.sizes.append(text)


def _artifact_sources(rel: etree._Element) -> _Sources | None:
    """fwupd reads the first binary artifact, unless it names a file that is not a cab
    (src/fu-release.c: such artifacts carried content checksums, not the container's)."""
    for artifacts in rel.iterchildren("artifacts"):
        for artifact in artifacts.iterchildren("artifact"):
            if artifact.get("type") != "binary":
                continue
            src = _Sources()
            for child in artifact.iterchildren():
                tag = child.tag
                if tag == "filename":
                    if not (child.text or "").strip().lower().endswith(".cab"):
                        return None
                else:
                    src.take(child)
            return src
    return None


def _legacy_sources(rel: etree._Element) -> _Sources:
    src = _Sources()
    for child in rel.iterchildren("location", "checksum", "size"):
        # the release's own checksums also cover the payload inside (target="content")
        if child.tag != "checksum" or child.get("target") == "container":
            src.take(child)
    return src


def _download_url(remote: Remote, locations: list[str]) -> tuple[str, str]:
    """(url, file name) as fwupd builds it: the remote's FirmwareBaseURI plus the basename
    of the location's path. Only https locations count (ipfs:// and others are for
    other clients); query and fragment never reach the URL."""
    for location in locations:
        if not location.lower().startswith("https://"):
            continue
        try:
            check_url(location, "location")
        except ConfigError as e:
            raise _Skip(str(e).removeprefix("location: ")) from e
        parts = urlsplit(location)
        directory, _, filename = parts.path.rpartition("/")
        if not is_file_name(filename):
            raise _Skip("location does not end in a plain file name")
        base = remote.firmware_base_uri or urlunsplit(
            (parts.scheme, parts.netloc, directory, "", "")
        )
        return check_url(base.rstrip("/") + "/" + filename, "release URL"), filename
    schemes = sorted({_scheme(loc) for loc in locations})
    raise _Skip("no https location" + (f" (only {', '.join(schemes)})" if schemes else ""))


def _scheme(location: str) -> str:
    scheme, sep, _ = location.partition(":")
    return scheme.lower() if sep and scheme.isascii() and scheme.isalnum() else "no scheme"


def _release_from(remote: Remote, comp: _Component, rel: etree._Element) -> Release:
    version = rel.get("version") or ""
    if not _VERSION.fullmatch(version):
        raise _Skip("version is missing or not a plain version string")
    artifact, legacy = _artifact_sources(rel), _legacy_sources(rel)
    # artifact first, legacy tags as fallback, as fwupd; both must agree where both speak
    sha256 = _one((artifact.sha256 if artifact else []) + legacy.sha256, "container sha256")
    if sha256 is None:
        if (artifact and artifact.sha1_only) or legacy.sha1_only:
            raise _Skip("sha1 only (no container sha256)")
        raise _Skip("no container sha256")
    size = _one(
        [s.strip() for s in (artifact.sizes if artifact else []) + legacy.sizes],
        "download size",
    )
    if size is None:
        raise _Skip("no download size")
    locations = artifact.locations if artifact and artifact.locations else legacy.locations
    url, filename = _download_url(remote, locations)
    return Release(
        remote_id=remote.id,
        component_id=comp.id,
        name=comp.name,
        summary=comp.summary,
        version=version,
        guids=comp.guids,
        url=url,
        filename=filename,
        sha256=sha256,
        size=_size(size),
        urgency=rel.get("urgency", ""),
        description=_description(rel.find("description")),
        version_format=comp.version_format,
    )


@dataclass(frozen=True)
class _Component:
    id: str
    name: str
    summary: str
    guids: tuple[str, ...]
    version_format: str

    @classmethod
    def of(cls, comp: etree._Element) -> _Component:
        fmt = ""
        for value in comp.iterfind("custom/value"):
            if value.get("key") == "LVFS::VersionFormat":
                fmt = (value.text or "").strip()
        return cls(
            id=comp.findtext("id", "").strip(),
            name=comp.findtext("name", "").strip(),
            summary=comp.findtext("summary", "").strip(),
            guids=tuple(
                _text(g) for g in comp.iterfind("provides/firmware[@type='flashed']") if _text(g)
            ),
            version_format=fmt,
        )


def safe_iterparse(source: Any, events: tuple[str, ...], **extra: Any) -> Any:
    """libxml2 as dom0 may use it: no entities, no DTD, no network, no huge trees, no
    comments or PIs. Callers still refuse any DOCTYPE outright (AppStream never has one)."""
    return etree.iterparse(
        source,
        events=events,
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
        **extra,
    )


class _NoDoctype:
    """The stream as libxml2 reads it, refused as soon as its prolog (what comes before
    the root element) holds a DOCTYPE or an ENTITY: the declarations never reach the
    parser. libxml2 2.14 stops an entity bomb itself, but in its own words and only past
    its amplification limit; the docinfo check in parse_catalog stays behind this one
    (for a prolog this byte scan cannot read, say UTF-16)."""

    _ROOT = re.compile(rb"<[A-Za-z_:]")
    _PROLOG_MAX = 64 * 1024

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._prolog: bytes | None = b""

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        if self._prolog is not None:
            self._prolog += data
            root = self._ROOT.search(self._prolog)
            head = self._prolog if root is None else self._prolog[: root.start()]
            if b"<!DOCTYPE" in head or b"<!ENTITY" in head:
                raise FormatError("metadata has a DOCTYPE or is not a components document")
            if root is not None:
                self._prolog = None
            elif len(head) > self._PROLOG_MAX:
                raise FormatError(
                    f"metadata has more than {self._PROLOG_MAX} bytes before its root element"
                )
        return data


def parse_catalog(stream: IO[bytes], remote: Remote, limits: Limits) -> Catalog:
    """Releases from an AppStream catalog. Only ever call on verified bytes.

    Elements are counted as libxml2 builds them, in all and per component: bytes alone do
    not bound what a tree of many tiny elements costs."""
    releases: list[Release] = []
    skipped: list[Skipped] = []
    context = safe_iterparse(_NoDoctype(stream), ("start", "end"))
    seen_root = False
    total = in_component = 0
    try:
        for event, el in context:
            if not seen_root:
                seen_root = True
                if el.getroottree().docinfo.doctype or el.tag != "components":
                    raise FormatError("metadata has a DOCTYPE or is not a components document")
            if event == "start":
                total += 1
                in_component = 1 if el.tag == "component" else in_component + 1
                if total > limits.metadata_max_elements:
                    raise LimitExceeded(
                        f"metadata has more than {limits.metadata_max_elements} elements"
                    )
                if in_component > limits.metadata_max_component_elements:
                    raise LimitExceeded(
                        "a metadata component has more than "
                        f"{limits.metadata_max_component_elements} elements"
                    )
                continue
            if el.tag == "component":
                comp = _Component.of(el)
                for rel in el.iterfind("releases/release"):
                    try:
                        releases.append(_release_from(remote, comp, rel))
                    except _Skip as e:
                        skipped.append(Skipped(comp.id, rel.get("version") or "?", str(e)))
                el.clear()
                parent = el.getparent()
                if parent is not None:
                    parent.remove(el)
    except etree.XMLSyntaxError as e:
        raise FormatError(f"metadata is not well-formed XML: {e}") from e
    return Catalog(remote.id, tuple(releases), tuple(skipped))


# --------------------------------------------------------------------------- acceptance
_MAX_ASC_BYTES = 64 * 1024


def verify_metadata_files(
    data_fd: int, signature_fd: int, remote: Remote, paths: Paths, config: Config
) -> Verified:
    """The one way each qube checks metadata it holds as two open files: its own
    metadata trust store, the configured policy, the signature read under its cap."""
    signature = os.pread(signature_fd, config.limits.jcat_max_bytes + 1, 0)
    trust = TrustStore.from_dirs(paths.pki_metadata_dirs)
    return verify_metadata(data_fd, signature, remote, trust, config.limits, config.trust)


def verify_metadata(
    data_fd: int,
    signature_bytes: bytes,
    remote: Remote,
    trust: TrustStore,
    limits: Limits,
    policy: TrustPolicy,
) -> Verified:
    """The metadata behind data_fd, checked against its jcat or, for a legacy remote, its
    detached .asc (then: one trusted GPG signature; no sha256 is served to compare, and
    the signature binds the bytes anyway). Only the signers the remote names for its
    metadata count, however their certificates chain."""
    if remote.metadata_signers is not None:
        policy = dataclasses.replace(policy, signers=remote.metadata_signers)
    if remote.signature == "asc":
        if "gpg" not in policy.accepted:
            raise VerificationError(
                f"{remote.signature_name}: a GPG signature, and signature_kinds excludes gpg"
            )
        if len(signature_bytes) > _MAX_ASC_BYTES:
            raise LimitExceeded(f"{remote.signature_name} is larger than {_MAX_ASC_BYTES} bytes")
        if not signature_bytes.isascii():
            raise FormatError(f"{remote.signature_name} is not an ASCII-armored signature")
        item = JcatItem(
            remote.metadata_name, (JcatBlob(int(BlobKind.GPG), signature_bytes.decode()),)
        )
        gpg_only = dataclasses.replace(policy, require_sha256=False, accepted=frozenset({"gpg"}))
        return verify_file(data_fd, item, trust, gpg_only, name=remote.metadata_name)
    jcat = parse_jcat(signature_bytes, limits.jcat_max_bytes, limits.jcat_json_max_bytes)
    item = jcat.item_for(remote.metadata_name)
    return verify_file(data_fd, item, trust, policy, name=remote.metadata_name)


def check_rollback(
    verified: Verified,
    previous: dict[str, str] | None,
    now: datetime,
    future_margin: timedelta,
    force: bool = False,
) -> datetime | None:
    """Refuse metadata signed in the future (beyond ``future_margin`` of dom0's clock: it
    would refuse every honest refresh until that date), the same file again ("nothing
    new"), and anything not signed later than the accepted metadata (rollback).

    Returns the signing time it was compared with (the rollback baseline). ``force`` (an
    admin's ``refresh --force``) sets aside an accepted signing time that itself lies in
    the future, and compares with the one accepted before it instead: older signatures
    are still refused."""
    signed = verified.signed_at
    if signed is None:
        raise RollbackError("metadata signature carries no signing time")
    if signed > now + future_margin:
        raise VerificationError(
            f"metadata signed {signed:%Y-%m-%d %H:%M:%S} is more than "
            f"{_hours(future_margin)} ahead of dom0's clock ({now:%Y-%m-%d %H:%M:%S} UTC); "
            "refused (a signing time in the future would block every later refresh)"
        )
    if previous is None:
        return None
    if previous.get("sha256") == verified.sha256:
        raise NothingToDo("metadata is already current")
    baseline: datetime | None = datetime.fromisoformat(previous["signed_at"])
    if force and baseline is not None and baseline > now + future_margin:
        earlier = previous.get("previous_signed_at")
        baseline = datetime.fromisoformat(earlier) if earlier else None
    if baseline is not None and signed <= baseline:
        raise RollbackError(
            f"metadata signed {signed:%Y-%m-%d %H:%M:%S} is not newer than the "
            f"accepted {baseline:%Y-%m-%d %H:%M:%S} (rollback refused"
            + ("" if force or baseline <= now + future_margin else "; see refresh --force")
            + ")"
        )
    return baseline


def _hours(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:g} hour{'' if hours == 1 else 's'}"


def is_stale(signed_at: datetime, max_age_days: int, now: datetime) -> bool:
    return now - signed_at > timedelta(days=max_age_days)


def staleness(accepted: dict[str, str] | None, max_age_days: int, now: datetime) -> str | None:
    """Why this remote's metadata is too old to act on unattended, or None.

    An UpdateVM that withholds new metadata (a freeze attack) can only replay signed, older
    files; their signing time is what gives it away."""
    if accepted is None:
        return None
    signed_at = datetime.fromisoformat(accepted["signed_at"])
    if not is_stale(signed_at, max_age_days, now):
        return None
    days = (now - signed_at).days
    return f"metadata was signed {days} days ago, more than metadata_max_age_days={max_age_days}"


class MetadataStore:
    """The trusted metadata cache: per remote, a generation directory holding the data and
    its jcat, published by an atomic symlink swap (old or new, never half)."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths

    def _state(self) -> dict[str, dict[str, str]]:
        try:
            doc = json.loads(self.paths.metadata_state_file.read_text())
        except FileNotFoundError:
            return {}
        return doc if isinstance(doc, dict) else {}

    def accepted(self, remote_id: str) -> dict[str, str] | None:
        """What was accepted last for this remote: its signing time, sha256 and when.

        Two records say it: the one inside the current generation (published with it by
        the same symlink swap, so it always describes the file beside it) and the state
        file (written just after the swap, and kept when the cache is wiped, as the
        rollback floor). A kill between the two leaves the state file one behind: the
        newer signing time of the two is the answer."""
        records = [self._state().get(remote_id), self._generation_record(remote_id)]
        found = [r for r in records if isinstance(r, dict) and "signed_at" in r]
        if not found:
            return None
        return max(found, key=lambda r: _signed_at_of(r))

    def _generation_record(self, remote_id: str) -> dict[str, str] | None:
        try:
            # a regular file of a few KiB, never a FIFO or a link left in its place
            raw = read_small(self.paths.metadata_dir / remote_id / ACCEPTED_NAME, 16384)
            doc = json.loads(raw)
        except (OSError, ValueError, BrokerError):
            return None
        return doc if isinstance(doc, dict) else None

    def current(self, remote: Remote) -> tuple[Path, Path] | None:
        link = self.paths.metadata_dir / remote.id
        data, jcat = link / remote.metadata_name, link / remote.jcat_name
        return (data, jcat) if data.exists() and jcat.exists() else None

    @contextlib.contextmanager
    def reading(self, remote: Remote) -> Iterator[tuple[int, int] | None]:
        """The current metadata and its jcat as two open fds of one generation (None if
        there is none yet), both opened relative to the one generation directory, and
        held under the store's shared lock for as long as the caller uses them: a push
        waits until the daemons have this generation, so it is never replaced (or
        deleted) mid-handover, and no older generation reaches a daemon after a newer."""
        with self.locked(shared=True):
            try:
                gen = os.open(self.paths.metadata_dir / remote.id, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                yield None
                return
            fds: list[int] = []
            try:
                try:
                    for name in (remote.metadata_name, remote.jcat_name):
                        fds.append(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=gen))
                except FileNotFoundError:
                    yield None
                    return
                finally:
                    os.close(gen)
                yield fds[0], fds[1]
            finally:
                for fd in fds:
                    os.close(fd)

    @contextlib.contextmanager
    def locked(self, shared: bool = False) -> Iterator[None]:
        """Serialises rollback check + store: two pushes for the same remote must not both
        pass the check against the same old state and then store in the wrong order.
        Readers handing a generation over take it shared."""
        self.paths.state_dir.mkdir(parents=True, exist_ok=True)
        # read-only is all flock needs, and the file may be the other side's: made by the
        # root manager (a reader) or the receive service, it is group-readable only; and
        # never a link the service left for root to follow
        flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.paths.state_dir / "metadata.lock", flags, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def store(
        self,
        remote: Remote,
        data: tuple[int, Path],
        verified: Verified,
        baseline: datetime | None = None,
        catalog: Catalog | None = None,
    ) -> Path:
        """Move the verified data into a new generation with a canonical jcat, switch to it.

        The jcat that fwupd later parses is ours, rebuilt from the checksum and the signature
        blobs that verified, never the bytes the UpdateVM sent. Call under :meth:`locked`."""
        base = self.paths.metadata_dir
        base.mkdir(parents=True, exist_ok=True)
        gen = base / f"{remote.id}.{secrets.token_hex(6)}"
        gen.mkdir(mode=0o755)
        try:
            install_file(data[0], data[1], gen / remote.metadata_name)
            jcat = build_jcat(
                {
                    remote.metadata_name: [
                        (BlobKind.SHA256, verified.sha256),
                        *((BlobKind(b.kind), b.data) for b in verified.verified_blobs),
                    ]
                }
            )
            write_atomic(gen / remote.jcat_name, jcat, mode=0o644)
            if catalog is not None:
                write_atomic(gen / INDEX_NAME, catalog_index(catalog, verified.sha256), 0o644)
            assert verified.signed_at is not None  # noqa: S101  check_rollback refused None
            record = {
                "signed_at": verified.signed_at.isoformat(),
                "sha256": verified.sha256,
                "accepted_at": datetime.now(UTC).isoformat(),
                # what refresh --force falls back on if this signing time proves poisoned
                **({"previous_signed_at": baseline.isoformat()} if baseline else {}),
            }
            write_atomic(gen / ACCEPTED_NAME, json.dumps(record).encode(), 0o644)
        except BaseException:
            shutil.rmtree(gen, ignore_errors=True)
            raise
        link, tmp_link = base / remote.id, temp_name(base / remote.id)
        old = os.readlink(link) if link.is_symlink() else None
        os.symlink(gen.name, tmp_link)
        try:
            os.replace(tmp_link, link)
        except BaseException:
            tmp_link.unlink(missing_ok=True)
            raise
        fsync_dir(base)
        state = self._state()
        state[remote.id] = record
        write_atomic(self.paths.metadata_state_file, json.dumps(state, indent=1).encode())
        # only ever a generation of ours: a direct child named <remote>.<12 hex>
        if old and old != gen.name and _GENERATION.fullmatch(old) and old.startswith(remote.id):
            shutil.rmtree(base / old, ignore_errors=True)
        return link

    def tidy(self) -> list[str]:
        """Remove what a store killed midway left (kill -9, power loss): generations no
        remote's link names, and temp files in the cache and state dirs. Holds the lock
        exclusively, so no store is under way and no reader is handing a generation over.
        Returns what was removed, one name each."""
        with self.locked():
            return self.tidy_locked()

    def tidy_locked(self) -> list[str]:
        """:meth:`tidy` for a caller that holds the lock already (the receive service,
        before its rollback check: a push that turns out to be nothing new tidies too)."""
        base = self.paths.metadata_dir
        removed = sweep_temps(base) + sweep_temps(self.paths.state_dir)
        if not base.is_dir():
            return removed
        entries = list(base.iterdir())
        current = {os.readlink(p) for p in entries if p.is_symlink()}
        for path in entries:
            if (_GENERATION.fullmatch(path.name) and path.name not in current
                    and not path.is_symlink() and path.is_dir()):  # fmt: skip
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    removed.append(path.name)
        return removed

    def catalog(self, remote: Remote, limits: Limits) -> Catalog | None:
        """The current catalog: from the index the receive service wrote when it accepted
        the metadata (bound to it by sha256), else parsed again from the verified file."""
        with self.reading(remote) as opened:
            if opened is None:
                return None
            data_fd = opened[0]
            sha256 = sha256_fd(data_fd)[0]
            # read under the same lock as the file: the state and the file agree
            accepted = self.accepted(remote.id) or {}
            signed_at = accepted.get("signed_at", "") if accepted.get("sha256") == sha256 else ""
            index = self._index(remote, limits)
            if index is not None and index[0] == sha256:
                return dataclasses.replace(index[1], metadata_sha256=sha256, signed_at=signed_at)
            with open_catalog(data_fd, remote.metadata_name, limits) as stream:
                parsed = parse_catalog(stream, remote, limits)
            return dataclasses.replace(parsed, metadata_sha256=sha256, signed_at=signed_at)

    def _index(self, remote: Remote, limits: Limits) -> tuple[str, Catalog] | None:
        path = self.paths.metadata_dir / remote.id / INDEX_NAME
        try:
            with open(path, "rb") as f:
                raw = f.read(limits.metadata_xml_max_bytes + 1)
        except FileNotFoundError:
            return None
        try:
            return read_catalog_index(raw, remote)
        except (ValueError, KeyError, TypeError):
            return None  # ours, but unreadable (an older format): parse the file again


def _signed_at_of(record: dict[str, str]) -> datetime:
    try:
        when = datetime.fromisoformat(str(record["signed_at"]))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


# what a generation says of itself: the record the state file also keeps (accepted())
ACCEPTED_NAME = "accepted.json"

# --------------------------------------------------------------------------- the index
INDEX_NAME = "catalog.json"
_INDEX_FORMAT = 1


def catalog_index(catalog: Catalog, metadata_sha256: str) -> bytes:
    """What parse_catalog found, as JSON, bound to the metadata file by its sha256: every
    manager command reads this instead of parsing the catalog again."""
    doc = {
        "format": _INDEX_FORMAT,
        "remote": catalog.remote_id,
        "metadata_sha256": metadata_sha256,
        "releases": [dataclasses.astuple(r) for r in catalog.releases],
        "skipped": [dataclasses.astuple(s) for s in catalog.skipped],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def read_catalog_index(raw: bytes, remote: Remote) -> tuple[str, Catalog]:
    """(metadata sha256, catalog) from an index dom0 wrote; ValueError if it is not one."""
    doc = json.loads(raw)
    if doc["format"] != _INDEX_FORMAT or doc["remote"] != remote.id:
        raise ValueError("not an index of this format and remote")
    releases = tuple(_release_of(fields) for fields in doc["releases"])
    skipped = tuple(Skipped(*fields) for fields in doc["skipped"])
    return str(doc["metadata_sha256"]), Catalog(remote.id, releases, skipped)


def _release_of(fields: list[Any]) -> Release:
    names = [f.name for f in dataclasses.fields(Release)]
    if len(fields) != len(names):
        raise ValueError("release fields")
    values = dict(zip(names, fields, strict=True))
    values["guids"] = tuple(values["guids"])
    return Release(**values)


def iter_catalogs(
    store: MetadataStore, remotes: tuple[Remote, ...], limits: Limits
) -> Iterator[Catalog]:
    for remote in remotes:
        cat = store.catalog(remote, limits)
        if cat is not None:
            yield cat
