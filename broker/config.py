"""Where things live and how big they may be.

:class:`Paths` is the only place that builds a filesystem path. It is rooted at ``/`` in a
real qube and at ``$SANDBOX/vm/<qube>`` in the sandbox (the launcher sets
``QUBES_FWUPD_ROOT``); the logic never asks which.
"""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import grp
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from broker.errors import BrokerError, ConfigError
from broker.signatures import TrustPolicy, TrustStore
from broker.transfer import read_small

MiB = 1024 * 1024

ROOT_ENV = "QUBES_FWUPD_ROOT"
# the group standing for ``qubes``: a name, or a bare gid where the host has no such group
# (the sandbox's dom0, whose services run as a uid it made up)
DOM0_GROUP_ENV = "QUBES_FWUPD_DOM0_GROUP"


@dataclass(frozen=True)
class Limits:
    """Every cap on input from another qube or a mirror, in one place."""

    metadata_max_bytes: int = 64 * MiB  # compressed catalog (LVFS 2022: ~1 MB zst)
    # decompressed catalog: the LVFS's was 7.4 MB in 2022 and is about 20 MB today
    metadata_xml_max_bytes: int = 128 * MiB
    # what libxml2 builds, counted while it parses (a component of many tiny elements costs
    # ~32 MiB of RAM per MiB of XML): an LVFS-scale catalog has ~270,000 elements, and its
    # largest component ~700 (one with ~30 releases)
    metadata_max_elements: int = 2_000_000
    metadata_max_component_elements: int = 20_000
    metadata_max_ratio: int = 200  # decompressed / compressed
    jcat_max_bytes: int = 1 * MiB
    jcat_json_max_bytes: int = 4 * MiB
    cab_max_bytes: int = 512 * MiB
    # cab contents, all decided from the cab's tables before anything is inflated
    # (broker.cabinet); LVFS cabs hold 3-10 members in one folder
    cab_max_members: int = 64
    cab_max_folders: int = 16
    # CFDATA blocks inflate to at most 32 KiB each: twice what 512 MiB of full blocks needs
    cab_max_data_blocks: int = 32768
    cab_max_member_bytes: int = 256 * MiB
    cab_max_uncompressed_bytes: int = 512 * MiB
    # declared uncompressed bytes / cab size; cabs under 64 KiB are judged as 64 KiB, since
    # a small firmware of 0xff padding deflates ~1000:1
    cab_max_ratio: int = 200
    # the metainfo is parsed in memory once its signature verified (LVFS: 2-20 KB)
    cab_max_metainfo_bytes: int = 1 * MiB
    header_max_bytes: int = 64 * 1024  # JSON request/header lines between qubes
    reply_max_bytes: int = 4 * MiB  # sys-usb JSON replies
    transfer_seconds: float = 900.0  # whole download or transfer, not per read
    min_rate_bytes_per_s: int = 1024  # slow-retrieval floor, after the first seconds
    min_rate_grace_seconds: float = 10.0  # before the floor applies (TLS set-up, slow start)
    stall_seconds: float = 30.0  # a download's read that gets nothing this long: timed out
    session_seconds: float = 1800.0  # a dom0 session (nonce) expires after this
    usbvm_seconds: float = 120.0  # sys-usb GetDevices / Refresh (Install gets transfer_seconds)
    max_devices: int = 1024
    # releases a daemon may offer for one device (the LVFS's largest component has ~80)
    max_offered_releases: int = 1024
    max_string_chars: int = 4096


# the group of dom0's login user, which runs dom0's qrexec services in Qubes
DOM0_GROUP = "qubes"
DOM0_DIR_MODE = 0o2770
# the state dir also holds the manager's own dir, the cache dir the trusted dirs: sticky,
# so that the service (which writes in both) cannot rename or delete what root made there
# (a metadata or untrusted dir swapped for a symlink would point root's sweeps elsewhere)
DOM0_STATE_DIR_MODE = 0o3770
MANAGER_DIR_MODE = 0o700


@dataclass(frozen=True)
class Paths:
    root: Path
    # who may write dom0's dirs besides root: group name, or gid
    dom0_group: str | int = DOM0_GROUP

    @classmethod
    def from_env(cls) -> Paths:
        group = os.environ.get(DOM0_GROUP_ENV) or DOM0_GROUP
        gid = group.isascii() and group.isdigit()
        return cls(Path(os.environ.get(ROOT_ENV, "/")), int(group) if gid else group)

    @property
    def config_dir(self) -> Path:
        return self.root / "etc/qubes-fwupd"

    @property
    def config_file(self) -> Path:
        return self.config_dir / "qubes-fwupd.conf"

    @property
    def unattended_file(self) -> Path:
        """What `update --unattended` may install (broker.unattended); none by default."""
        return self.config_dir / "unattended.conf"

    @property
    def run_lock(self) -> Path:
        """One manager at a time: in a root-only dir of its own (not dom0's 2770 dirs,
        where the receive service could leave something in its place)."""
        return self.root / "run/qubes-fwupd/manager.lock"

    @property
    def manager_dir(self) -> Path:
        """The manager's own state (history, remote switches, pending reboots, refresh
        backoff, what waits): root's alone, 0700. The state dir around it is group qubes
        for the receive service's metadata state, and sticky, so the service can neither
        write in here nor move this dir aside."""
        return self.state_dir / "manager"

    @property
    def refresh_backoff(self) -> Path:
        return self.manager_dir / "refresh-backoff.json"

    @property
    def updates_waiting(self) -> Path:
        """What get-updates --notify last found waiting for a person (broker.notify)."""
        return self.manager_dir / "updates-waiting.json"

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/qubes-fwupd"

    @property
    def fwupd_remotes_dir(self) -> Path:
        """dom0's fwupd's own remotes: where a remote's URLs come from when our config
        names none (trust never does: signers and anchors are ours alone)."""
        return self.root / "etc/fwupd/remotes.d"

    @property
    def dmi_dir(self) -> Path:
        """The firmware's own word on the machine (SMBIOS, as the kernel shows it)."""
        return self.root / "sys/class/dmi/id"

    @property
    def boot_updates_dir(self) -> Path:
        """Where update-heads stages a ROM, one dir per version, for Heads at next boot."""
        return self.root / "boot/updates"

    @property
    def sessions_dir(self) -> Path:
        return self.state_dir / "sessions"

    @property
    def metadata_state_file(self) -> Path:
        """Signing time of the metadata accepted per remote (rollback protection)."""
        return self.state_dir / "metadata-state.json"

    @property
    def cache_dir(self) -> Path:
        return self.root / "var/cache/qubes-fwupd"

    @property
    def metadata_dir(self) -> Path:
        """Trusted: only complete, verified metadata and its jcat."""
        return self.cache_dir / "metadata"

    @property
    def cabs_dir(self) -> Path:
        """Trusted: only complete cabs whose sha256 verified metadata binds."""
        return self.cache_dir / "cabs"

    @property
    def untrusted_dir(self) -> Path:
        """Bytes from other qubes land here first; same filesystem as the cache for rename."""
        return self.cache_dir / "untrusted"

    @property
    def download_dir(self) -> Path:
        """UpdateVM side: where downloads are kept until pushed."""
        return self.root / "var/cache/qubes-fwupd/download"

    @property
    def pki_metadata_dirs(self) -> tuple[Path, ...]:
        """fwupd's metadata trust store. fwupd itself pools both dirs into one context; we
        keep them apart, so a firmware-only key cannot sign a catalog."""
        return (self.root / "etc/pki/fwupd-metadata",)

    @property
    def pki_firmware_dirs(self) -> tuple[Path, ...]:
        """fwupd's firmware (payload) trust store."""
        return (self.root / "etc/pki/fwupd",)

    @property
    def log_file(self) -> Path:
        return self.root / "var/log/qubes-fwupd/qubes-fwupd.log"

    @property
    def dom0_dirs(self) -> tuple[Path, ...]:
        """dom0's dirs, as packaging/tmpfiles.d makes them at boot (a test holds the two
        together): root:qubes 2770, so the receive service (the login user, group qubes)
        writes where it must and the root manager reads it."""
        return (self.state_dir, self.sessions_dir, self.cache_dir, self.metadata_dir,
                self.cabs_dir, self.untrusted_dir, self.log_file.parent)  # fmt: skip

    def dom0_dir_mode(self, path: Path) -> int:
        sticky = (self.state_dir, self.cache_dir)
        return DOM0_STATE_DIR_MODE if path in sticky else DOM0_DIR_MODE

    def make_dom0_dirs(self) -> None:
        """What systemd-tmpfiles does with the package's snippet, for a dom0 where it has
        not run yet (first use before a reboot, a checkout): each dir made or put back to
        2770, group :attr:`dom0_group` where that group exists (it does in Qubes' dom0)."""
        gid = self._dom0_gid()
        for path in self.dom0_dirs:
            try:
                _make_parents(path)
                path.mkdir(exist_ok=True)
                st = path.lstat()
                if not stat.S_ISDIR(st.st_mode):
                    raise ConfigError(f"{path}: not a directory")
                if gid not in (-1, st.st_gid):
                    os.chown(path, -1, gid, follow_symlinks=False)
                if stat.S_IMODE(st.st_mode) != self.dom0_dir_mode(path):
                    os.chmod(path, self.dom0_dir_mode(path), follow_symlinks=False)
            except PermissionError as e:
                raise ConfigError(f"{path}: {e.strerror} (qubes-fwupdmgr runs as root)") from e
        self._make_manager_dir()

    def _make_manager_dir(self) -> None:
        """The manager's own dir: made 0700, and used only while it is a real dir of this
        user's (one the service made first, or put in its place, is refused: a qube's
        words must never become the manager's history or remote switches)."""
        path = self.manager_dir
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=MANAGER_DIR_MODE)
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise ConfigError(
                f"{path}: not a dir of this user's (owner uid {st.st_uid}): refusing to keep "
                "the manager's state there; move it aside and run again"
            )
        if stat.S_IMODE(st.st_mode) != MANAGER_DIR_MODE:
            os.chmod(path, MANAGER_DIR_MODE, follow_symlinks=False)

    def _dom0_gid(self) -> int:
        if isinstance(self.dom0_group, int):
            return self.dom0_group
        try:
            return grp.getgrnam(self.dom0_group).gr_gid
        except KeyError:
            return -1


def _make_parents(path: Path) -> None:
    """The missing parents of one of dom0's dirs, 0755 whatever the umask, as
    systemd-tmpfiles makes them: the service user must pass through them (a root umask
    of 077 would otherwise lock it out of /var/cache on a fresh tree)."""
    missing = []
    for parent in path.parents:
        if parent.is_dir():
            break
        missing.append(parent)
    for parent in reversed(missing):
        try:
            parent.mkdir(mode=0o755)
        except FileExistsError:
            continue  # a concurrent run made it: its modes are its own
        os.chmod(parent, 0o755)  # noqa: S103  /var/lib and /var/cache are 0755 everywhere


_QUBE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")
_SIGNATURE_KINDS = frozenset({"pkcs7", "gpg"})
_REMOTE_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def check_qube_name(name: str, what: str) -> str:
    if not _QUBE_NAME.fullmatch(name) or name.endswith((".", "-")):
        raise ConfigError(f"{what}: {name!r} is not a valid qube name")
    return name


# visible ASCII: one regex match, not a generator per character (it runs for every
# location of an LVFS-scale catalog)
_URL_CHARS = re.compile(r"[\x21-\x7e]*")


def check_url(url: str, what: str, https_only: bool = False) -> str:
    """A URL we may hand to the UpdateVM: https (or http where allowed), a host, no
    credentials, no fragment."""
    # ASCII printable only: no C0/C1 controls, no spaces, no look-alike characters (IDNs
    # belong in punycode); checked before urlsplit sees it
    if not _URL_CHARS.fullmatch(url):
        raise ConfigError(f"{what}: URL contains spaces, control or non-ASCII characters")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError as e:
        raise ConfigError(f"{what}: URL does not parse: {e}") from e
    if parts.scheme not in ("https", "http") or not hostname:
        raise ConfigError(f"{what}: {url!r} is not an http(s) URL with a host")
    if https_only and parts.scheme != "https":
        raise ConfigError(
            f"{what}: {url!r} is plain http (set allow_plain_http = yes for this remote "
            "only if a signed catalog over http is what you want)"
        )
    if parts.username or parts.password or parts.fragment:
        raise ConfigError(f"{what}: {url!r} must not carry credentials or a fragment")
    return url


@dataclass(frozen=True)
class Remote:
    """A metadata source. ``id`` is also the fwupd remote that the metadata is loaded into."""

    id: str
    metadata_url: str
    # mirrors: cab locations in metadata are rebased onto this (FirmwareBaseURI in fwupd)
    firmware_base_uri: str | None = None
    # "jcat" (LVFS) or "asc": a legacy detached GPG signature beside the metadata
    signature: str = "jcat"
    # TLS is the default for metadata and cabs; a remote must opt out by name (a local
    # mirror, the sandbox's on 127.0.0.1): signatures still bind every byte, but a plain
    # connection shows the network which firmware this machine fetches
    allow_plain_http: bool = False
    # who may sign this remote's metadata (TrustPolicy.signers); None only for the
    # UpdateVM's and sys-usb's own checks, which never stand in for dom0's
    metadata_signers: frozenset[str] | None = None
    # which of fwupd's firmware trust anchors (file names in /etc/pki/fwupd) this remote's
    # payloads may chain to, and who under them may sign (None: anyone they anchor). fwupd
    # pools every anchor for every remote; dom0 does not, so an organisation's CA there
    # signs nothing for lvfs. None: the whole pool (the UpdateVM's and sys-usb's checks)
    payload_anchors: tuple[str, ...] | None = None
    payload_signers: frozenset[str] | None = None
    # the qube this remote's files come through, unless the run names one (--updatevm)
    updatevm: str | None = None
    # component id prefixes under which this remote may carry Heads ROMs (update-heads):
    # boot firmware that Heads flashes is trusted from no remote unless it says so
    heads_components: tuple[str, ...] = ()

    @property
    def metadata_name(self) -> str:
        return self.metadata_url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def signature_name(self) -> str:
        """The signature file as the remote serves it."""
        return f"{self.metadata_name}.{self.signature}"

    @property
    def jcat_name(self) -> str:
        """The jcat dom0 stores and hands to fwupd: always ours, whatever was served."""
        return self.metadata_name + ".jcat"


# The LVFS service's own certificate, which signs its metadata jcat (and, the LVFS being
# one service, also firmware: a residual the README's threat model names). Issued by
# LVFS-CA.pem, valid 2025-01-16 to 2035-01-16; its subject stays valid for a re-issue.
_MAIN_KEYS = frozenset(
    {
        "updatevm", "usbvm", "metadata_max_age_days", "metadata_future_margin_hours",
        "cab_cache_max_mib", "update_max_devices", "signature_kinds", "lock_wait_seconds",
        "inhibit_files", "transfer_seconds", "min_rate_bytes_per_s", "stall_seconds",
    }
)  # fmt: skip
# the [qubes-fwupd] keys that set a Limits field: (smallest, largest) allowed
_LIMIT_KEYS = {
    "transfer_seconds": (1.0, 86400.0),
    "min_rate_bytes_per_s": (1, 1 << 30),
    "stall_seconds": (1.0, 3600.0),
}
_REMOTE_KEYS = frozenset(
    {
        "metadata_url", "firmware_base_uri", "signature", "allow_plain_http", "metadata_signers",
        "payload_anchors", "payload_signers", "updatevm", "heads_components",
    }
)  # fmt: skip
LVFS_METADATA_SIGNERS = frozenset(
    {"1AE8CBE206091736DEC0C8A722575FF883DFFB4C1C342175514C3FE5721B202F", "CN=fwupd.org 2025"}
)
# what fwupd ships in /etc/pki/fwupd: the LVFS's CAs and firmware GPG keys. The CA also
# issues vendors' and developers' signing certificates (fwupd-tests' cabs are signed by a
# personal one), so the lvfs remote pins its anchors, not its signers
LVFS_PAYLOAD_ANCHORS = (
    "LVFS-CA.pem", "LVFS-CA-2025PQ.pem",
    "GPG-KEY-Linux-Vendor-Firmware-Service", "GPG-KEY-Linux-Foundation-Firmware",
)  # fmt: skip
_ANCHOR_NAME = re.compile(
    r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,100}\.pem|GPG-KEY-[A-Za-z0-9._-]{1,100})"
)
_HEX = re.compile(r"(?:[0-9A-F]{40}|[0-9A-F]{64})")


def parse_signers(value: str, what: str) -> frozenset[str]:
    """One per line: a certificate SHA-256 fingerprint, a GPG key fingerprint (hex, colons
    and spaces allowed: as openssl and gpg print them), or a certificate subject
    as openssl -nameopt RFC2253 prints it (it holds a '=')."""
    signers = set()
    for raw in value.splitlines():
        token = raw.strip()
        if not token:
            continue
        hex_form = token.removeprefix("sha256:").replace(":", "").replace(" ", "").upper()
        if _HEX.fullmatch(hex_form):
            signers.add(hex_form)
        elif "=" in token and token.isascii() and token.isprintable():
            signers.add(token)
        else:
            raise ConfigError(
                f"{what}: {token[:80]!r} is neither a fingerprint nor a subject (CN=...)"
            )
    if not signers:
        raise ConfigError(f"{what} names no signer")
    return frozenset(signers)


@dataclass(frozen=True)
class FwupdRemote:
    """What dom0's fwupd says of a remote in remotes.d/<id>.conf: its URLs only."""

    path: Path
    metadata_uri: str
    firmware_base_uri: str | None


_FWUPD_REMOTE_MAX_BYTES = 64 * 1024


def fwupd_remote(remotes_dir: Path, remote_id: str) -> FwupdRemote | None:
    """fwupd's ``remotes.d/<remote_id>.conf`` where it exists and names a MetadataURI."""
    path = remotes_dir / f"{remote_id}.conf"
    try:
        raw = read_small(path, _FWUPD_REMOTE_MAX_BYTES)
    except FileNotFoundError:
        return None
    except (OSError, BrokerError) as e:
        raise ConfigError(f"{path}: {getattr(e, 'strerror', None) or e}") from e
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(raw.decode("utf-8"), str(path))
    except (configparser.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {_parse_problem(e, '[fwupd Remote]')}") from e
    if not parser.has_section("fwupd Remote"):
        return None
    sec = parser["fwupd Remote"]
    uri = sec.get("MetadataURI", "").strip()
    if not uri:
        return None
    return FwupdRemote(path, uri, sec.get("FirmwareBaseURI", "").strip() or None)


_COMPONENT_PREFIX = re.compile(r"[a-z0-9][a-z0-9_-]*(?:\.[a-z0-9][a-z0-9_-]*)+")


def parse_component_prefixes(value: str, what: str) -> tuple[str, ...]:
    """Reverse-DNS component id prefixes (``org.example.heads``), space-separated."""
    out = []
    for token in value.replace(",", " ").split():
        low = token.lower()
        if not _COMPONENT_PREFIX.fullmatch(low) or len(low) > 128:
            raise ConfigError(f"{what}: {token[:80]!r} is not a component id prefix "
                              "(org.example.heads)")  # fmt: skip
        out.append(low)
    return tuple(dict.fromkeys(out))


def parse_anchors(value: str, what: str) -> tuple[str, ...]:
    """File names in fwupd's firmware trust store (``*.pem``, ``GPG-KEY-*``), one per line
    or space-separated; ``lvfs`` stands for the LVFS's own (:data:`LVFS_PAYLOAD_ANCHORS`)."""
    names: list[str] = []
    for token in value.replace(",", " ").split():
        if token == "lvfs":  # noqa: S105  a keyword, not a password
            names.extend(LVFS_PAYLOAD_ANCHORS)
        elif _ANCHOR_NAME.fullmatch(token):
            names.append(token)
        else:
            raise ConfigError(
                f"{what}: {token[:80]!r} is not a file name in /etc/pki/fwupd (*.pem, GPG-KEY-*)"
            )
    if not names:
        raise ConfigError(f"{what} names no trust anchor")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Config:
    updatevm: str = "sys-firewall"
    # who chose updatevm: "" nobody (dom0's own UpdateVM, qubes-prefs updatevm, is used
    # where one is set: Manager.updatevm), "config", or "run" (--updatevm, --from-qube,
    # which also wins over a remote's own updatevm)
    updatevm_chosen_by: str = field(default="", compare=False)
    usbvm: str | None = "sys-usb"
    remotes: tuple[Remote, ...] = (
        # fwupd's own lvfs.conf: FirmwareBaseURI=https://fwupd.org/downloads
        Remote(
            "lvfs",
            "https://cdn.fwupd.org/downloads/firmware.xml.zst",
            "https://fwupd.org/downloads",
            metadata_signers=LVFS_METADATA_SIGNERS,
            payload_anchors=LVFS_PAYLOAD_ANCHORS,
        ),
    )
    limits: Limits = field(default_factory=Limits)
    # metadata signed longer ago than this is "stale": flagged, blocks unattended installs
    metadata_max_age_days: int = 30
    # metadata signed further ahead of dom0's clock is refused (an UpdateVM's skewed clock
    # is not the signer's; the LVFS's own clock is what signs)
    metadata_future_margin_hours: int = 24
    # dom0's cab cache: cabs are deleted once installed; what stays (a failed or declined
    # install) is pruned oldest first beyond this many MiB
    cab_cache_max_mib: int = 1024
    # one run installs on at most this many devices unless they are named (a hostile
    # sys-usb could claim a device per catalog component)
    update_max_devices: int = 8
    # a run that would change state waits this long for another one to finish (an admin's
    # install, a timer's refresh), then says who holds the lock
    lock_wait_seconds: int = 60
    # while one of these exists, nothing is refreshed or installed (an admin's hold: the
    # one under /run lasts until a reboot); absolute paths, read from dom0's root
    inhibit_files: tuple[str, ...] = ("/etc/qubes-fwupd/inhibit", "/run/qubes-fwupd/inhibit")
    # which signature kinds count; a file needs a matching sha256 and one trusted signature
    # of these kinds (a signature this machine cannot check never counts)
    trust: TrustPolicy = field(default_factory=TrustPolicy)

    # what the admin should fix but need not stop for (a misspelt key, read as absent)
    warnings: tuple[str, ...] = ()

    def remote(self, remote_id: str) -> Remote:
        for r in self.remotes:
            if r.id == remote_id:
                return r
        raise ConfigError(f"no remote {remote_id!r} configured")

    def payload_trust(
        self, remote_id: str, dirs: tuple[Path, ...]
    ) -> tuple[TrustStore, TrustPolicy]:
        """What may sign the firmware of ``remote_id``: its anchors in ``dirs`` (fwupd's
        firmware store), and the signature kinds and signers that count."""
        remote = self.remote(remote_id)
        store = TrustStore.from_dirs(dirs, only=remote.payload_anchors)
        if remote.payload_anchors is not None and not (store.ca_files or store.gpg_key_files):
            raise ConfigError(
                f"remote {remote_id}: none of its payload_anchors is in "
                f"{', '.join(str(d) for d in dirs)}"
            )
        return store, dataclasses.replace(self.trust, signers=remote.payload_signers)

    @classmethod
    def load(cls, paths: Paths) -> Config:
        """Read ``qubes-fwupd.conf``; a missing file means the defaults (the built-in lvfs
        at the URLs dom0's fwupd gives it, where it does)."""
        if not paths.config_file.exists():
            return cls(remotes=_builtin_remotes(paths))
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(paths.config_file, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError) as e:
            raise ConfigError(f"{paths.config_file}: {_parse_problem(e)}") from e
        main = parser["qubes-fwupd"] if parser.has_section("qubes-fwupd") else {}
        warnings = [
            f"{paths.config_file}: unknown key {key!r} in [{section}] (ignored)"
            for section in parser.sections()
            if section == "qubes-fwupd" or section.startswith("remote ")
            for key in parser[section]
            if key not in (_MAIN_KEYS if section == "qubes-fwupd" else _REMOTE_KEYS)
        ]
        updatevm = check_qube_name(main.get("updatevm", cls.updatevm), "updatevm")
        usbvm_raw = main.get("usbvm", "sys-usb").strip()
        usbvm = check_qube_name(usbvm_raw, "usbvm") if usbvm_raw else None
        remotes = []
        for section in parser.sections():
            if not section.startswith("remote "):
                continue
            rid = section.removeprefix("remote ").strip()
            if not _REMOTE_ID.fullmatch(rid):
                raise ConfigError(f"remote id {rid!r} is not valid")
            sec = parser[section]
            plain = sec.get("allow_plain_http", "no").strip().lower()
            if plain not in ("yes", "no"):
                raise ConfigError(f"remote {rid} allow_plain_http must be yes or no")
            https_only = plain == "no"
            # no URL of ours: fwupd's own remote of that id, where dom0's fwupd has one
            theirs = None if "metadata_url" in sec else fwupd_remote(paths.fwupd_remotes_dir, rid)
            if theirs is None:
                url = check_url(sec.get("metadata_url", ""), f"remote {rid} metadata_url",
                                https_only)  # fmt: skip
                base = None
            else:
                url, base = _fwupd_urls(theirs, rid, https_only)
            if ours := sec.get("firmware_base_uri", "").strip():
                base = check_url(ours, f"remote {rid} firmware_base_uri", https_only)
            signature = sec.get("signature", "jcat").strip()
            if signature not in ("jcat", "asc"):
                raise ConfigError(f"remote {rid} signature must be jcat or asc")
            if "metadata_signers" in sec:
                signers = parse_signers(sec["metadata_signers"], f"remote {rid} metadata_signers")
            elif rid == "lvfs":
                signers = LVFS_METADATA_SIGNERS
            else:
                raise ConfigError(f"remote {rid} needs metadata_signers: who may sign its metadata")
            if "payload_anchors" in sec:
                anchors = parse_anchors(sec["payload_anchors"], f"remote {rid} payload_anchors")
                # a misspelt anchor next to a right one would go unnoticed until it counts
                warnings += [
                    f"remote {rid} payload_anchors: no {name} in "
                    f"{', '.join(str(d) for d in paths.pki_firmware_dirs)}"
                    for name in anchors
                    if name not in LVFS_PAYLOAD_ANCHORS
                    and not any((d / name).is_file() for d in paths.pki_firmware_dirs)
                ]
            elif rid == "lvfs":
                anchors = LVFS_PAYLOAD_ANCHORS
            else:
                raise ConfigError(
                    f"remote {rid} needs payload_anchors: which CAs and keys in /etc/pki/fwupd"
                    " its firmware is signed under (lvfs for the LVFS's own)"
                )
            # "any": anyone the anchors anchor (the lvfs default: vendors' certificates)
            payload_signers = (
                parse_signers(sec["payload_signers"], f"remote {rid} payload_signers")
                if sec.get("payload_signers", "any").strip() != "any" else None
            )  # fmt: skip
            own_vm = sec.get("updatevm", "").strip()
            remotes.append(Remote(
                rid, url, base, signature, not https_only, signers, anchors, payload_signers,
                check_qube_name(own_vm, f"remote {rid} updatevm") if own_vm else None,
                parse_component_prefixes(sec.get("heads_components", ""),
                                         f"remote {rid} heads_components"),
            ))  # fmt: skip
        try:
            max_age = int(main.get("metadata_max_age_days", "30"))
        except ValueError as e:
            raise ConfigError("metadata_max_age_days must be a whole number") from e
        numbers = {}
        for key, default in (
            ("metadata_future_margin_hours", cls.metadata_future_margin_hours),
            ("cab_cache_max_mib", cls.cab_cache_max_mib),
            ("update_max_devices", cls.update_max_devices),
            ("lock_wait_seconds", cls.lock_wait_seconds),
        ):
            try:
                numbers[key] = int(main.get(key, str(default)))
            except ValueError as e:
                raise ConfigError(f"{key} must be a whole number") from e
            if numbers[key] < 0:
                raise ConfigError(f"{key} must not be negative")
        kinds = frozenset(main.get("signature_kinds", "pkcs7 gpg").replace(",", " ").split())
        if not kinds or not kinds <= _SIGNATURE_KINDS:
            raise ConfigError(
                f"signature_kinds must name one or more of {', '.join(sorted(_SIGNATURE_KINDS))}"
            )
        return cls(
            limits=_limits(main),
            updatevm=updatevm,
            updatevm_chosen_by="config" if "updatevm" in main else "",
            usbvm=usbvm,
            remotes=tuple(remotes) or _builtin_remotes(paths),
            warnings=tuple(warnings),
            metadata_max_age_days=max_age,
            metadata_future_margin_hours=numbers["metadata_future_margin_hours"],
            cab_cache_max_mib=numbers["cab_cache_max_mib"],
            update_max_devices=numbers["update_max_devices"],
            lock_wait_seconds=numbers["lock_wait_seconds"],
            inhibit_files=_inhibit_files(main.get("inhibit_files"), cls.inhibit_files),
            trust=TrustPolicy(accepted=kinds),
        )


def _limits(main: Mapping[str, str]) -> Limits:
    """The download limits an admin may set (a slow link, Tor: higher; a test: lower);
    the UpdateVM applies them to its downloads, dom0 to how long it waits for them."""
    values: dict[str, float | int] = {}
    for key, (low, high) in _LIMIT_KEYS.items():
        if key not in main:
            continue
        whole = isinstance(low, int)
        try:
            value = int(main[key]) if whole else float(main[key])
        except ValueError:
            value = float("nan")
        if not low <= value <= high:  # nan and inf fail too
            kind = "a whole number" if whole else "a number"
            raise ConfigError(f"{key} must be {kind} from {low:g} to {high:g}")
        values[key] = value
    return dataclasses.replace(Limits(), **values)  # type: ignore[arg-type]


def _inhibit_files(value: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    files = tuple(value.split())
    for f in files:
        if not f.startswith("/") or "\x00" in f or ".." in f.split("/"):
            raise ConfigError(f"inhibit_files: {f[:80]!r} is not an absolute path")
    return files


def _fwupd_urls(theirs: FwupdRemote, rid: str, https_only: bool) -> tuple[str, str | None]:
    """A fwupd remote's MetadataURI and FirmwareBaseURI, checked as ours are."""
    url = check_url(theirs.metadata_uri, f"remote {rid}: MetadataURI in {theirs.path}",
                    https_only)  # fmt: skip
    base = theirs.firmware_base_uri
    if base:
        check_url(base, f"remote {rid}: FirmwareBaseURI in {theirs.path}", https_only)
    return url, base


def _builtin_remotes(paths: Paths) -> tuple[Remote, ...]:
    """The built-in lvfs, at the URLs dom0's fwupd has for it (an admin who pointed
    fwupd's lvfs.conf at a mirror gets that mirror here too), its trust unchanged."""
    out = []
    for remote in Config.remotes:
        theirs = fwupd_remote(paths.fwupd_remotes_dir, remote.id)
        if theirs is not None:
            url, base = _fwupd_urls(theirs, remote.id, https_only=True)
            remote = dataclasses.replace(remote, metadata_url=url, firmware_base_uri=base)
        out.append(remote)
    return tuple(out)


def _parse_problem(e: Exception, first: str = "[qubes-fwupd]") -> str:
    """configparser's message without its Python reprs: the line and what is wrong."""
    if isinstance(e, configparser.MissingSectionHeaderError):
        return f"line {e.lineno}: no [section] before it (the file starts with {first})"
    if isinstance(e, configparser.ParsingError):
        lines = ", ".join(str(n) for n, _ in e.errors[:5])
        return f"line {lines}: not KEY = VALUE"
    if isinstance(e, configparser.DuplicateOptionError):
        return f"line {e.lineno}: key {e.option!r} in [{e.section}] given twice"
    if isinstance(e, configparser.DuplicateSectionError):
        return f"line {e.lineno}: section [{e.section}] given twice"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 (byte {e.start})"
    return type(e).__name__
