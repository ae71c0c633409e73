"""A deterministic stand-in for the real LVFS catalog (firmware.xml), shaped as the LVFS
serves it, with a manifest saying what a correct dom0 parser must conclude per release.

Shape, as read from the LVFS's own generator and from real catalog excerpts (see
/work/shared/DEPENDENCIES.md, "The real LVFS catalog"):

- ``<components origin="lvfs" version="0.9">``, components sorted by id, indented by two
  spaces as lxml's ``pretty_print`` writes it (the LVFS's ``_generate_metadata_kind``);
- per component: id, name, summary, description, provides, homepage, licenses,
  developer_name, categories, custom values, releases (newest first), requires, keywords;
- per release: the legacy ``<location>`` and ``<checksum target="container">`` tags *and*
  ``<artifacts><artifact type="binary">`` with its own locations (https, sometimes
  ``ipfs://Qm...``), filename, checksums and sizes (fwupd 2.0 reads the artifact first);
- ``<requires>`` in the syntax fwupd 2.0.20 parses (``src/fu-engine-requirements.c``).

Each release gets a *shape* (:data:`SHAPES`); most are ``both_agree``. The manifest's
verdict follows the dom0 rule: the first binary artifact (ignored when its <filename> is
not a .cab, as fwupd does), legacy tags as fallback; every container sha256 given must
agree; the first https location (artifact's in order, else legacy) gives the file name;
no sha256, or no https location, means the release is skipped.

Nothing here is trusted input for dom0: this module only *writes* catalogs, for tests,
the sandbox LVFS and benchmarks.
"""

# ruff: noqa: S311  seeded, reproducible test data: nothing here is a secret

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from lxml import etree

# ---------------------------------------------------------------------------- shapes
SHAPES: tuple[str, ...] = (
    "both_agree",  # legacy tags and the binary artifact, same sha256: ACCEPT
    "legacy_only",  # the pre-artifact LVFS: <location> + <checksum target=container>: ACCEPT
    "artifact_only",  # only <artifacts>: ACCEPT
    "both_disagree",  # artifact sha256 != legacy container sha256: SKIP
    "ipfs_first",  # artifact lists ipfs:// before https://: ACCEPT (https one)
    "ipfs_only",  # artifact has only ipfs://, no legacy <location>: SKIP
    "sha1_only",  # no sha256 anywhere (legacy, or legacy + artifact): SKIP
    "long_name_200",  # a 200-character cab name: ACCEPT
    "unknown_version_format",  # the component's LVFS::VersionFormat is unknown: ACCEPT
    "source_artifact_too",  # also an <artifact type="source"> (first, half the time): ACCEPT
    "artifact_not_cab",  # the binary artifact names a non-.cab file: fwupd ignores it,
    # the legacy tags count: ACCEPT
)
ACCEPTED_SHAPES: frozenset[str] = frozenset(SHAPES) - {"both_disagree", "ipfs_only", "sha1_only"}

# per-release odds (per mille); on top of these every shape is placed at least once in
# every catalog (_forced_shapes), and unknown_version_format is drawn per component
_RELEASE_WEIGHTS: tuple[tuple[str, int], ...] = (
    ("both_agree", 835),
    ("legacy_only", 40),
    ("artifact_only", 30),
    ("both_disagree", 10),
    ("ipfs_first", 10),
    ("ipfs_only", 5),
    ("sha1_only", 10),
    ("long_name_200", 5),
    ("source_artifact_too", 40),
    ("artifact_not_cab", 15),
)
_UNKNOWN_FORMAT_ODDS = 0.01
# 88 of 2,595 releases in the 2022 catalog had an ipfs:// location after the https one
_IPFS_SECOND_ODDS = 0.034
# about 2 releases per component; the LVFS kept the newest 5, some have many more today
_RELEASES_PER_COMPONENT: tuple[tuple[int, int], ...] = (
    (1, 640), (2, 220), (3, 65), (4, 30), (5, 22), (8, 13), (12, 6), (25, 3),
)  # fmt: skip
_REQUIRES_ODDS = 0.70  # 923 of 1,317 components in 2022

NAME_MAX = 187  # the longest cab name in the real catalog; long_name_200 goes past it
LONG_NAME = 200
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")

DEFAULT_LOCATION_BASE = "https://fwupd.org/downloads"

# ---------------------------------------------------------------------------- vocabulary
# (reverse-DNS, developer_name, name token in cab file names, families)
_VENDORS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("com.lenovo", "Lenovo Ltd.", "Lenovo",
     ("ThinkPad", "ThinkCentre", "ThinkStation", "Legion", "IdeaPad", "ThinkPadDock")),
    ("com.dell", "Dell Inc.", "Dell",
     ("Latitude", "Precision", "OptiPlex", "XPS", "WD19", "PowerEdge")),
    ("com.hp", "HP Inc.", "HP", ("EliteBook", "ZBook", "ProBook", "EliteDesk", "Thunderbolt-Dock")),
    ("com.logitech", "Logitech", "Logitech", ("Unifying", "Bolt", "MX-Keys", "Rally", "Brio")),
    ("com.hughski", "Hughski Limited", "hughski", ("ColorHug", "ColorHug2", "ColorHugALS")),
    ("com.8bitdo", "8BitDo", "8Bitdo", ("SFC30", "NES30", "SN30-Pro", "Ultimate")),
    ("com.intel", "Intel Corporation", "Intel", ("NUC", "Thunderbolt", "ME", "Retimer")),
    ("com.synaptics", "Synaptics", "Synaptics", ("Prometheus", "MST-Panamera", "Cayenne", "RMI")),
    ("com.realtek", "Realtek", "Realtek", ("RTS5423", "RTD2142", "RTL8153")),
    ("com.wacom", "Wacom", "Wacom", ("Intuos", "Cintiq", "AES")),
    ("work.frame", "Framework", "Framework", ("Laptop13", "Laptop16", "Chromebook")),
    ("com.system76", "System76", "system76", ("Lemur", "Galago", "Oryx", "Launch")),
    ("com.nitrokey", "Nitrokey", "Nitrokey", ("Nitrokey3", "NitroPad", "NitroPC")),
    ("com.3mdeb", "3mdeb", "Dasharo", ("MSI-PRO", "NovaCustom", "ProtectliVault")),
    ("com.starlabs", "Star Labs", "StarLabs", ("StarLite", "StarBook", "Byte")),
    ("com.purism", "Purism", "Purism", ("Librem14", "LibremMini", "Librem5")),
    ("com.google", "Google", "Google", ("Hammer", "Servo", "Voxel")),
    ("com.microsoft", "Microsoft", "Microsoft", ("SurfacePro", "SurfaceLaptop", "SurfaceDock")),
    ("com.jabra", "GN Audio A/S", "Jabra", ("Evolve2", "Speak2", "PanaCast")),
    ("com.genesys", "Genesys Logic", "Genesys", ("GL3523", "GL3590", "GL9750")),
    ("com.via", "VIA Labs", "VLI", ("VL817", "VL822", "VL830")),
    ("com.elan", "ELAN Microelectronics", "Elan", ("Touchpad", "Fingerprint", "Haptic")),
    ("com.goodix", "Goodix", "Goodix", ("MOC", "Touch")),
    ("com.phison", "Phison", "Phison", ("E16", "E18", "PS5021")),
    ("com.samsung", "Samsung Electronics", "Samsung", ("PM9A1", "980Pro", "990Pro")),
    ("com.kingston", "Kingston", "Kingston", ("NV2", "KC3000")),
    ("com.asus", "ASUSTeK", "ASUS", ("ROG", "ZenBook", "ExpertBook")),
    ("com.corsair", "Corsair", "Corsair", ("K70", "Dark-Core")),
    ("com.pixart", "PixArt", "PixArt", ("PAW3395", "RF")),
    ("com.parade", "Parade Technologies", "Parade", ("PS175", "PS8815")),
    ("com.cypress", "Infineon", "Cypress", ("CCGX", "FX3")),
    ("com.steelseries", "SteelSeries", "SteelSeries", ("Rival", "Aerox")),
)  # fmt: skip
_KINDS: tuple[tuple[str, str, str], ...] = (
    # (display name, cab token, protocol)
    ("System Firmware", "SystemFirmware", "org.uefi.capsule"),
    ("Embedded Controller", "EmbeddedController", "org.uefi.capsule"),
    ("Intel Management Engine", "ME", "org.uefi.capsule"),
    ("Thunderbolt Controller", "Thunderbolt", "com.intel.thunderbolt"),
    ("USB-C Dock", "Dock", "com.dell.dock"),
    ("Touchpad", "Touchpad", "com.synaptics.rmi"),
    ("Fingerprint Reader", "Fingerprint", "com.synaptics.prometheus"),
    ("NVMe SSD", "NVMe", "org.nvmexpress"),
    ("ATA Drive", "SATA", "org.t13.ata"),
    ("Wireless Receiver", "Receiver", "com.logitech.unifyingsigned"),
    ("Keyboard", "Keyboard", "org.usb.dfu"),
    ("Webcam", "Camera", "com.logitech.hidpp"),
    ("USB Hub", "Hub", "com.vli.usbhub"),
    ("Display MST Hub", "MST", "com.synaptics.mst"),
    ("PD Controller", "PD", "com.cypress.ccgx"),
    ("Retimer", "Retimer", "com.intel.thunderbolt"),
    ("Game Controller", "Controller", "com.8bitdo"),
    ("Colorimeter", "Colorimeter", "com.hughski.colorhug"),
    ("Security Key", "Key", "com.nitrokey"),
    ("Headset", "Headset", "com.jabra"),
)  # fmt: skip
_CATEGORIES: Mapping[str, str] = {
    "SystemFirmware": "X-System",
    "EmbeddedController": "X-EmbeddedController",
    "ME": "X-ManagementEngine",
    "Thunderbolt": "X-ThunderboltController",
    "Dock": "X-Dock",
    "Touchpad": "X-Touchpad",
    "Fingerprint": "X-FingerprintReader",
    "NVMe": "X-SolidStateDrive",
    "SATA": "X-Drive",
    "Receiver": "X-Device",
    "Keyboard": "X-Keyboard",
    "Camera": "X-Camera",
    "Hub": "X-UsbHub",
    "MST": "X-GraphicsTablet",
    "PD": "X-Controller",
    "Retimer": "X-UsbReceiver",
    "Controller": "X-Gamepad",
    "Colorimeter": "X-Device",
    "Key": "X-Device",
    "Headset": "X-Headset",
}
# (LVFS::VersionFormat or "" for none, weight); fwupd 2.0.20 libfwupd/fwupd-enums.c names
_FORMATS: tuple[tuple[str, int], ...] = (
    ("triplet", 270), ("quad", 140), ("pair", 130), ("plain", 100), ("number", 50),
    ("bcd", 50), ("intel-me", 40), ("intel-me2", 20), ("intel-csme19", 5), ("hex", 40),
    ("dell-bios", 40), ("dell-bios-msb", 10), ("surface", 10), ("surface-legacy", 10),
    ("", 85),
)  # fmt: skip
_UNKNOWN_FORMATS = ("weird-format", "sextuplet")
_URGENCIES = (("low", 20), ("medium", 45), ("high", 25), ("critical", 10))
_LICENSES = ("LicenseRef-proprietary", "GPL-2.0+", "GPL-2.0-only", "BSD-2-Clause", "MIT")
_FWUPD_VERSIONS = (
    "1.0.3", "1.1.0", "1.2.6", "1.3.3", "1.4.0", "1.5.0", "1.5.6", "1.6.1", "1.7.6",
    "1.8.5", "1.9.7", "1.9.16", "2.0.0", "2.0.7",
)  # fmt: skip
_CLIENT_FEATURES = ("detach-action", "update-action", "requests", "show-problems")
_VENDOR_IDS = (
    "USB:0x046D", "USB:0x273F", "PCI:0x8086", "USB:0x17EF", "USB:0x413C",
    "DMI:LENOVO", "DMI:Dell Inc.", "USB:0x2DC8", "NVME:0x144D", "USB:0x06CB",
)  # fmt: skip
_SENTENCES = (
    "This release fixes a security vulnerability.",
    "Improves the stability of the Bluetooth pairing.",
    "Updates the Intel microcode to address speculative execution issues.",
    "Fixes an issue where the system could hang on resume from suspend.",
    "Adds support for new displays when connected through the dock.",
    "Improves battery life when the device is idle.",
    "Fixes the keyboard backlight not turning on after reboot.",
    "Enhanced power delivery negotiation with third-party chargers.",
    "Updates the embedded controller firmware.",
    "Fixes a rare data corruption issue under heavy write load.",
    "Improves the performance of the fingerprint sensor.",
    "Addresses an issue where USB-C devices were not detected after hot plug.",
    "Updates the Secure Boot forbidden signature database.",
    "Fixes incorrect fan speed reporting in the BIOS setup menu.",
    "Adds an option to disable the camera in the setup menu.",
    "Improves compatibility with Linux distributions using fwupd.",
)
_DETAILS_URLS = (
    "https://pcsupport.lenovo.com/downloads/{code}",
    "https://www.dell.com/support/home/drivers/driversdetails?driverid={code}",
    "https://support.hp.com/us-en/drivers/{code}",
    "https://github.com/{vendor}/{family}-firmware/releases/tag/{version}",
)
_SOURCE_URL = "https://github.com/{vendor}/{family}-firmware/tree/{version}"
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_EPOCH_FIRST = 1420070400  # 2015-01-01
_EPOCH_LAST = 1764547200  # 2025-12-01
_DAY = 86400


# ---------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class GeneratedRelease:
    """One generated release and what a correct dom0 parser must conclude about it."""

    component_id: str
    version: str
    guids: tuple[str, ...]
    shape: str
    # the release notes as a correct parser gives them to a person (Description.text)
    description: str
    # the container sha256 a correct parser takes; None when it takes none (skipped)
    sha256: str | None
    # basename of the chosen https location; None when skipped
    filename: str | None
    # the download size; None when skipped
    size: int | None
    accepted: bool
    # the https location the parser takes (None when skipped)
    location: str | None = None
    # <release id="..">, the LVFS's numeric id
    release_id: int = 0
    # the component's LVFS::VersionFormat ("" when it names none)
    version_format: str = ""
    # every container sha256 the XML carries for this release (artifact, then legacy)
    sha256_seen: tuple[str, ...] = ()


@dataclass(frozen=True)
class GeneratedCatalog:
    xml: bytes
    releases: tuple[GeneratedRelease, ...]
    # counts of what was written (generated components only, not extra_components):
    # components, releases, artifacts:binary, artifacts:source, locations:ipfs,
    # locations:https, requires:components, requires:<kind>, verfmt:<format or "">,
    # shape:<shape>
    stats: Mapping[str, int] = field(default_factory=dict)

    def accepted(self) -> tuple[GeneratedRelease, ...]:
        return tuple(r for r in self.releases if r.accepted)


# ---------------------------------------------------------------------------- parts
@dataclass
class _Artifact:
    locations: list[str]
    filename: str | None
    sha1: str | None
    sha256: str | None
    size_download: int | None
    size_installed: int | None


@dataclass
class _Release:
    """Everything one <release> says, before it is written out."""

    shape: str
    version: str
    release_id: int
    timestamp: int
    urgency: str
    name: str  # the cab's file name as the LVFS stores it: <hash>-<upload name>
    legacy_location: str | None
    legacy_sha1: str | None
    legacy_sha256: str | None
    legacy_size_download: int | None
    size_installed: int | None
    content_name: str
    content_sha1: str
    content_sha256: str
    description: Description
    details_url: str | None
    source_url: str | None
    issues: list[str]
    artifact: _Artifact | None
    source_artifact: _Artifact | None = None
    source_first: bool = False
    install_duration: int | None = None


def _verdict(rel: _Release) -> tuple[bool, str | None, str | None, int | None, str | None]:
    """(accepted, sha256, filename, size, location) by the dom0 rule, over the parts."""
    art = rel.artifact
    if art is not None and art.filename is not None and not art.filename.lower().endswith(".cab"):
        art = None  # fwupd: "ignoring non-binary artifact entry"
    shas = ([art.sha256] if art and art.sha256 else []) + (
        [rel.legacy_sha256] if rel.legacy_sha256 else []
    )
    if not shas or len(set(shas)) != 1:
        return False, None, None, None, None
    if art is not None and art.locations:
        locations = art.locations
    else:
        locations = [rel.legacy_location] if rel.legacy_location else []
    https = next((loc for loc in locations if loc.startswith("https://")), None)
    sizes = [s for s in ((art.size_download if art else None), rel.legacy_size_download) if s]
    if https is None or not sizes or len(set(sizes)) != 1:
        return False, None, None, None, None
    return True, shas[0], urlsplit(https).path.rsplit("/", 1)[-1], sizes[0], https


# ---------------------------------------------------------------------------- helpers
def _hex(seed: int, serial: int, what: str, n: int = 64) -> str:
    digest = hashlib.sha256(f"lvfs-catalog:{seed}:{serial}:{what}".encode()).hexdigest()
    return digest[:n]


def _ipfs_cid(seed: int, serial: int) -> str:
    """A CIDv0 as the LVFS lists them: base58btc of a sha2-256 multihash ("Qm" + 44)."""
    digest = hashlib.sha256(f"lvfs-catalog:{seed}:{serial}:ipfs".encode()).digest()
    n = int.from_bytes(b"\x12\x20" + digest, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    return "".join(reversed(out))


def _guid(rng: random.Random) -> str:
    b = bytearray(rng.randbytes(16))
    b[6] = (b[6] & 0x0F) | 0x50  # name-based (v5), as fwupd derives GUIDs from instance ids
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _weighted(rng: random.Random, table: Sequence[tuple[str, int]]) -> str:
    return rng.choices([k for k, _ in table], weights=[w for _, w in table])[0]


def _code(rng: random.Random) -> str:
    letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
    return f"{rng.choice(letters)}{rng.randint(1, 9)}{''.join(rng.choices(letters, k=3))}"


def _versions(fmt: str, n: int, rng: random.Random) -> list[str]:
    """n distinct versions in the component's format, newest first."""
    out: list[str] = []
    if fmt == "plain":
        if rng.random() < 0.5:
            code = _code(rng)
            start = rng.randint(10, 60)
            out = [f"{code}{start + i:02d}W" for i in range(n)]
        else:
            start = rng.randint(100, 5000)
            out = [str(start + 3 * i) for i in range(n)]
    elif fmt == "number":
        start = rng.randint(1, 70000)
        out = [str(start + rng.randint(1, 9) + 10 * i) for i in range(n)]
    elif fmt == "hex":
        start = rng.randint(1, 0x400)
        out = [f"0x{start + 4 * i:08x}" for i in range(n)]
    elif fmt in ("intel-me", "intel-me2", "intel-csme19"):
        major = 19 if fmt == "intel-csme19" else rng.randint(11, 16)
        minor, build = rng.randint(0, 1), rng.randint(1000, 2500)
        out = [f"{major}.{minor}.{20 + 5 * i}.{build + 37 * i}" for i in range(n)]
    else:
        parts = {"pair": 2, "bcd": 2, "quad": 4}.get(fmt, 3)
        value = [rng.randint(0, 5), rng.randint(0, 30), rng.randint(0, 60), rng.randint(0, 300)]
        value = value[:parts]
        for _ in range(n):
            out.append(".".join(str(v) for v in value))
            value[-1] += rng.randint(1, 4)
            if fmt == "bcd" and value[-1] > 99:
                value[-2] += 1
                value[-1] = 0
    return list(reversed(out))


def _name_token(text: str) -> str:
    return "".join(c if c in _NAME_CHARS else "_" for c in text)


def _pad_model(model: str, extra: int, rng: random.Random) -> str:
    """Longer upload names, as vendors write them (SFC30_NES30_SFC30_SNES30...)."""
    words = ("Update", "Firmware", "Capsule", "Signed", "Production", "Release", "x64",
             "Rev", "MP", "Gen2", "Refresh", "AllModels", "Win10", "Linux")  # fmt: skip
    while extra > 0:
        word = rng.choice(words)
        model += rng.choice("_-") + word
        extra -= len(word) + 1
    return model


def _cab_name(
    prefix: str, vendor: str, model: str, version: str, target: int | None, rng: random.Random
) -> str:
    ver = _name_token(version if rng.random() < 0.7 else "v" + version.replace(".", "_"))
    name = f"{prefix}-{vendor}-{model}-{ver}.cab"
    if target is not None and len(name) < target:
        model = _pad_model(model, target - len(name), rng)
        name = f"{prefix}-{vendor}-{model}-{ver}.cab"
    limit = LONG_NAME if target == LONG_NAME else NAME_MAX
    if len(name) > limit:  # trim the model, keep hash, vendor and version readable
        cut = len(name) - limit
        model = model[: len(model) - cut].rstrip("_-") or "fw"
        name = f"{prefix}-{vendor}-{model}-{ver}.cab"
    if target == LONG_NAME and len(name) < LONG_NAME:
        model += "x" * (LONG_NAME - len(name))
        name = f"{prefix}-{vendor}-{model}-{ver}.cab"
    return name


class Description(NamedTuple):
    """An AppStream description body, and the text a correct reader makes of it (a line
    per paragraph, "• " per list item): known here from the sentences, not re-parsed."""

    markup: str
    text: str


def _description(rng: random.Random, lo: int, hi: int) -> Description:
    """<p>s and sometimes a <ul> of <li>s."""
    first = rng.choice(_SENTENCES)
    parts, lines = [f"<p>{escape(first)}</p>"], [first]
    if rng.random() < 0.4:
        items = rng.sample(_SENTENCES, rng.randint(lo, hi))
        parts.append("<ul>" + "".join(f"<li>{escape(s)}</li>" for s in items) + "</ul>")
        lines += [f"• {s}" for s in items]
    if rng.random() < 0.2:
        last = rng.choice(_SENTENCES)
        parts.append(f"<p>{escape(last)}</p>")
        lines.append(last)
    return Description("".join(parts), "\n".join(lines))


# ---------------------------------------------------------------------------- components
@dataclass
class _Component:
    cid: str
    name: str
    summary: str
    description: Description
    guids: tuple[str, ...]
    homepage: str
    license: str
    developer: str
    category: str
    verfmt: str
    protocol: str
    integrity: str | None
    update_message: str | None
    keywords: tuple[str, ...]
    requires: list[tuple[str, str]]  # (kind, xml)
    releases: list[_Release]
    screenshot: str | None = None
    name_variant_suffix: str | None = None


def _req(tag: str, text: str | None, **attrs: str) -> str:
    """One requirement element as fwupd 2.0.20 reads it (src/fu-engine-requirements.c)."""
    attr = "".join(f' {k}="{escape(v)}"' for k, v in attrs.items())
    return f"<{tag}{attr}/>" if text is None else f"<{tag}{attr}>{escape(text)}</{tag}>"


_FWUPD_ID = "org.freedesktop.fwupd"


def _requirements(rng: random.Random, verfmt: str) -> list[tuple[str, str]]:
    """(kind, xml) pairs. The kinds: id (fwupd version, sometimes the 2.0 glob form with
    its mandatory client feature), vendor-id, firmware-version (the device's own),
    bootloader, other-firmware (by GUID), parent-firmware (depth), hardware (CHIDs),
    not_hardware, client (feature flags)."""
    reqs: list[tuple[str, str]] = []
    glob = rng.random() < 0.02
    if glob:
        reqs.append(("client", _req("client", "id-requirement-glob")))
        globbed = "1.9.*=1.9.7|2.0.*=2.0.7|2.0.7"
        reqs.append(("id", _req("id", _FWUPD_ID, compare="ge", version=globbed)))
    elif rng.random() < 0.85:
        v = rng.choice(_FWUPD_VERSIONS)
        reqs.append(("id", _req("id", _FWUPD_ID, compare="ge", version=v)))
    if rng.random() < 0.45:
        ids = rng.sample(_VENDOR_IDS, rng.choice((1, 1, 1, 2, 3)))
        if rng.random() < 0.04:  # a vendor with no restrictions set on the LVFS
            ids = ["XXX:NEVER_GOING_TO_MATCH"]
        compare = "eq" if len(ids) == 1 else "regex"
        reqs.append(
            ("vendor-id", _req("firmware", "vendor-id", compare=compare, version="|".join(ids)))
        )
    if rng.random() < 0.12:
        low = _versions(verfmt if verfmt in ("pair", "triplet", "quad") else "triplet", 1, rng)[0]
        reqs.append(("firmware-version", _req("firmware", None, compare="ge", version=low)))
    if rng.random() < 0.06:
        low = f"0.{rng.randint(1, 9)}.{rng.randint(0, 9)}"
        reqs.append(("bootloader", _req("firmware", "bootloader", compare="ge", version=low)))
    if rng.random() < 0.08:
        other = "|".join(_guid(rng) for _ in range(rng.choice((1, 1, 2))))
        low = f"1.{rng.randint(0, 20)}.{rng.randint(0, 9)}"
        reqs.append(("other-firmware", _req("firmware", other, compare="ge", version=low)))
    if rng.random() < 0.04:
        reqs.append(("parent-firmware", _req("firmware", _guid(rng), depth="1")))
    if rng.random() < 0.16:
        hwids = "|".join(_guid(rng) for _ in range(rng.choice((1, 1, 2, 3, 6))))
        reqs.append(("hardware", _req("hardware", hwids)))
    elif rng.random() < 0.01:
        reqs.append(("not_hardware", _req("not_hardware", _guid(rng))))
    if not glob and rng.random() < 0.03:
        reqs.append(("client", _req("client", rng.choice(_CLIENT_FEATURES))))
    if not reqs:
        v = rng.choice(_FWUPD_VERSIONS)
        reqs.append(("id", _req("id", _FWUPD_ID, compare="ge", version=v)))
    return reqs


class _Builder:
    def __init__(self, seed: int, location_base: str) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.base = location_base.rstrip("/")
        self.serial = 0
        self.ids: set[str] = set()

    def component(self, forced: str | None) -> _Component:
        rng = self.rng
        domain, developer, vendor_tok, families = rng.choice(_VENDORS)
        kind_name, kind_tok, protocol = rng.choice(_KINDS)
        family = rng.choice(families)
        suffix = rng.choice(("", "", "s", "e", "Gen2"))
        model = f"{rng.choice('ABCEGKLMNPRSTVWXZ')}{rng.randint(1, 999)}{suffix}"
        code = _code(rng)
        cid = f"{domain}.{_name_token(family).replace('-', '')}{code}.firmware"
        while cid in self.ids:
            cid = f"{domain}.{_name_token(family).replace('-', '')}{_code(rng)}.firmware"
        self.ids.add(cid)
        unknown = forced == "unknown_version_format" or (
            forced is None and rng.random() < _UNKNOWN_FORMAT_ODDS
        )
        verfmt = rng.choice(_UNKNOWN_FORMATS) if unknown else _weighted(rng, _FORMATS)
        guids = tuple(_guid(rng) for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))))
        display = f"{family.replace('-', ' ')} {model}"
        words = (kind_tok, family, vendor_tok, "firmware", "bios", "uefi")
        keywords = tuple(w.lower() for w in rng.sample(words, 2))
        comp = _Component(
            cid=cid,
            name=f"{display} {kind_name}",
            summary=f"Firmware for the {developer.split()[0]} {display} {kind_name.lower()}",
            description=_description(rng, 1, 3),
            guids=guids,
            homepage=f"https://www.{domain.split('.', 1)[1]}.{domain.split('.')[0]}/",
            license=rng.choice(_LICENSES),
            developer=developer,
            category=_CATEGORIES[kind_tok],
            verfmt=verfmt,
            protocol=protocol,
            integrity=rng.choice(("signed", "unsigned")) if rng.random() < 0.5 else None,
            update_message=(
                "The device will restart once the update is complete."
                if rng.random() < 0.03
                else None
            ),
            keywords=keywords if rng.random() < 0.3 else (),
            requires=_requirements(rng, verfmt) if rng.random() < _REQUIRES_ODDS else [],
            releases=[],
            screenshot=(f"https://fwupd.org/static/img/{cid}.png" if rng.random() < 0.01 else None),
            name_variant_suffix=rng.choice(("Refurbished", "Rev B", "32GB"))
            if rng.random() < 0.02
            else None,
        )
        n = int(_weighted(rng, [(str(k), w) for k, w in _RELEASES_PER_COMPONENT]))
        if n >= 8:
            n = rng.randint(n - 2, n + 6)
        versions = _versions("triplet" if unknown else verfmt, n, rng)
        stamp = rng.randint(min(_EPOCH_FIRST + _DAY * 120 * n, _EPOCH_LAST), _EPOCH_LAST)
        upload_model = f"{_name_token(family)}-{model}-{kind_tok}"
        for i, version in enumerate(versions):
            if unknown:
                shape = "unknown_version_format"
            elif i == 0 and forced is not None:
                shape = forced
            else:
                shape = _weighted(rng, _RELEASE_WEIGHTS)
            comp.releases.append(
                self.release(shape, version, stamp, vendor_tok, upload_model, family, code)
            )
            stamp -= rng.randint(_DAY * 7, _DAY * 120)
        return comp

    def release(
        self, shape: str, version: str, stamp: int, vendor: str, model: str, family: str, code: str
    ) -> _Release:
        rng = self.rng
        seed, serial = self.seed, self.serial
        self.serial += 1
        # the LVFS names a cab <sha1-or-sha256 of the upload>-<uploaded name>: sha1 on
        # older uploads, sha256 on newer ones
        prefix = _hex(
            seed, serial, "upload", 64 if stamp > 1577836800 and rng.random() < 0.8 else 40
        )
        target: int | None = None
        if shape == "long_name_200":
            target = LONG_NAME
        elif rng.random() < 0.03:
            target = rng.randint(140, NAME_MAX)
        name = _cab_name(prefix, vendor, model, version, target, rng)
        location = f"{self.base}/{name}"
        sha1 = _hex(seed, serial, "container-sha1", 40)
        sha256 = _hex(seed, serial, "container-sha256")
        download = int(2 ** rng.uniform(13, 26))
        installed = max(16, int(download * rng.uniform(0.8, 1.3)))
        content_name = rng.choice(
            ("firmware.bin", "firmware.cap", f"{code}.bin", "fw.hex", "payload.bin", "firmware.rom")
        )
        details = None
        if rng.random() < 0.6:
            details = rng.choice(_DETAILS_URLS).format(
                code=code,
                vendor=vendor.lower(),
                family=_name_token(family).lower(),
                version=version,
            )
        source = None
        if rng.random() < 0.1:
            source = _SOURCE_URL.format(
                vendor=vendor.lower(), family=_name_token(family).lower(), version=version
            )
        issues = []
        if rng.random() < 0.15:
            issues = [
                f"CVE-{rng.randint(2017, 2025)}-{rng.randint(1000, 49999)}"
                for _ in range(rng.choice((1, 1, 2, 4, 9)))
            ]
        rel = _Release(
            shape=shape,
            version=version,
            release_id=65546 + serial,  # renumbered by upload time in generate()
            timestamp=stamp,
            urgency=_weighted(rng, _URGENCIES),
            name=name,
            legacy_location=location,
            legacy_sha1=sha1,
            legacy_sha256=sha256,
            legacy_size_download=download,
            size_installed=installed,
            content_name=content_name,
            content_sha1=_hex(seed, serial, "content-sha1", 40),
            content_sha256=_hex(seed, serial, "content-sha256"),
            description=_description(rng, 1, 4),
            details_url=details,
            source_url=source,
            issues=issues,
            artifact=None,
            install_duration=rng.choice((15, 30, 60, 120, 300)) if rng.random() < 0.1 else None,
        )
        # the artifact's <filename>: the stored name, sometimes the uploaded name only
        art_filename = name if rng.random() < 0.8 else name.split("-", 1)[1]
        locations = [location]
        if rng.random() < _IPFS_SECOND_ODDS:
            locations.append(f"ipfs://{_ipfs_cid(seed, serial)}")
        art = _Artifact(locations, art_filename, sha1, sha256, download, installed)
        if shape == "legacy_only":
            pass
        elif shape == "artifact_only":
            rel.artifact = art
            rel.legacy_location = rel.legacy_sha1 = rel.legacy_sha256 = None
            rel.legacy_size_download = None
        elif shape == "both_disagree":
            rel.artifact = art
            rel.legacy_sha256 = _hex(seed, serial, "container-sha256-other")
        elif shape == "ipfs_first":
            art.locations = [f"ipfs://{_ipfs_cid(seed, serial)}", location]
            rel.artifact = art
        elif shape == "ipfs_only":
            art.locations = [f"ipfs://{_ipfs_cid(seed, serial)}"]
            rel.artifact = art
            rel.legacy_location = None
        elif shape == "sha1_only":
            rel.legacy_sha256 = None
            if serial % 2:  # also an artifact, itself with sha1 only
                art.sha256 = None
                rel.artifact = art
        elif shape == "source_artifact_too":
            rel.artifact = art
            tarball = f"{_name_token(family).lower()}-firmware-{_name_token(version)}.tar.gz"
            rel.source_artifact = _Artifact(
                [
                    f"https://github.com/{vendor.lower()}/{_name_token(family).lower()}-firmware/archive/{tarball}"
                ],
                tarball,
                _hex(seed, serial, "source-sha1", 40),
                _hex(seed, serial, "source-sha256"),
                int(download * 1.7),
                None,
            )
            rel.source_first = serial % 2 == 0
        elif shape == "artifact_not_cab":
            # content checksums in a binary artifact, as some early uploads were signed
            rel.artifact = _Artifact(
                [], content_name, rel.content_sha1, rel.content_sha256, None, installed
            )
        else:  # both_agree, long_name_200, unknown_version_format
            rel.artifact = art
        return rel


# ---------------------------------------------------------------------------- writing
def _artifact_xml(art: _Artifact, kind: str, out: list[str]) -> None:
    out.append(f'          <artifact type="{kind}">\n')
    for loc in art.locations:
        out.append(f"            <location>{escape(loc)}</location>\n")
    if art.filename is not None:
        out.append(f"            <filename>{escape(art.filename)}</filename>\n")
    if art.sha1:
        out.append(f'            <checksum type="sha1">{art.sha1}</checksum>\n')
    if art.sha256:
        out.append(f'            <checksum type="sha256">{art.sha256}</checksum>\n')
    if art.size_download:
        out.append(f'            <size type="download">{art.size_download}</size>\n')
    if art.size_installed:
        out.append(f'            <size type="installed">{art.size_installed}</size>\n')
    out.append("          </artifact>\n")


def _release_text(rel: _Release) -> str:
    out: list[str] = []
    date = datetime.fromtimestamp(rel.timestamp, UTC).strftime("%Y-%m-%d")
    extra = f' install_duration="{rel.install_duration}"' if rel.install_duration else ""
    out.append(
        f'      <release version="{escape(rel.version)}" timestamp="{rel.timestamp}" '
        f'date="{date}" urgency="{rel.urgency}" id="{rel.release_id}"{extra}>\n'
    )
    name = escape(rel.name)
    if rel.legacy_location:
        out.append(f"        <location>{escape(rel.legacy_location)}</location>\n")
    content = escape(rel.content_name)
    for kind, value, filename, target in (
        ("sha1", rel.legacy_sha1, name, "container"),
        ("sha256", rel.legacy_sha256, name, "container"),
        ("sha1", rel.content_sha1, content, "content"),
        ("sha256", rel.content_sha256, content, "content"),
    ):
        if value:
            out.append(
                f'        <checksum type="{kind}" filename="{filename}" target="{target}">'
                f"{value}</checksum>\n"
            )
    out.append(f"        <description>{rel.description.markup}</description>\n")
    if rel.details_url:
        out.append(f'        <url type="details">{escape(rel.details_url)}</url>\n')
    if rel.source_url:
        out.append(f'        <url type="source">{escape(rel.source_url)}</url>\n')
    if rel.size_installed and rel.shape != "artifact_only":
        out.append(f'        <size type="installed">{rel.size_installed}</size>\n')
    if rel.legacy_size_download:
        out.append(f'        <size type="download">{rel.legacy_size_download}</size>\n')
    if rel.issues:
        out.append("        <issues>\n")
        out.extend(f'          <issue type="cve">{i}</issue>\n' for i in rel.issues)
        out.append("        </issues>\n")
    if rel.artifact or rel.source_artifact:
        out.append("        <artifacts>\n")
        if rel.source_artifact and rel.source_first:
            _artifact_xml(rel.source_artifact, "source", out)
        if rel.artifact:
            _artifact_xml(rel.artifact, "binary", out)
        if rel.source_artifact and not rel.source_first:
            _artifact_xml(rel.source_artifact, "source", out)
        out.append("        </artifacts>\n")
    out.append("      </release>\n")
    return "".join(out)


def _component_text(comp: _Component, release_texts: Sequence[str]) -> str:
    out = ['  <component type="firmware">\n', f"    <id>{comp.cid}</id>\n"]
    out.append(f"    <name>{escape(comp.name)}</name>\n")
    if comp.name_variant_suffix:
        out.append(
            f"    <name_variant_suffix>{escape(comp.name_variant_suffix)}</name_variant_suffix>\n"
        )
    out.append(f"    <summary>{escape(comp.summary)}</summary>\n")
    out.append(f"    <description>{comp.description.markup}</description>\n")
    out.append("    <provides>\n")
    out.extend(f'      <firmware type="flashed">{g}</firmware>\n' for g in sorted(comp.guids))
    out.append("    </provides>\n")
    out.append(f'    <url type="homepage">{escape(comp.homepage)}</url>\n')
    out.append("    <metadata_license>CC0-1.0</metadata_license>\n")
    out.append(f"    <project_license>{comp.license}</project_license>\n")
    out.append(f"    <developer_name>{escape(comp.developer)}</developer_name>\n")
    if comp.screenshot:
        out.append('    <screenshots>\n      <screenshot type="default">\n')
        caption = "Unplug the device, then hold the button while reconnecting it."
        out.append(f"        <caption>{caption}</caption>\n")
        out.append(f"        <image>{escape(comp.screenshot)}</image>\n")
        out.append("      </screenshot>\n    </screenshots>\n")
    out.append(f"    <categories>\n      <category>{comp.category}</category>\n    </categories>\n")
    out.append("    <custom>\n")
    if comp.verfmt:
        out.append(f'      <value key="LVFS::VersionFormat">{comp.verfmt}</value>\n')
    out.append(f'      <value key="LVFS::UpdateProtocol">{comp.protocol}</value>\n')
    if comp.integrity:
        out.append(f'      <value key="LVFS::DeviceIntegrity">{comp.integrity}</value>\n')
    if comp.update_message:
        out.append(
            f'      <value key="LVFS::UpdateMessage">{escape(comp.update_message)}</value>\n'
        )
    out.append("    </custom>\n")
    out.append("    <releases>\n")
    out.extend(release_texts)
    out.append("    </releases>\n")
    if comp.requires:
        out.append("    <requires>\n")
        out.extend(f"      {xml}\n" for _, xml in comp.requires)
        out.append("    </requires>\n")
    if comp.keywords:
        out.append("    <keywords>\n")
        out.extend(f"      <keyword>{escape(k)}</keyword>\n" for k in comp.keywords)
        out.append("    </keywords>\n")
    out.append("  </component>\n")
    return "".join(out)


def _manifest(comp: _Component, rel: _Release) -> GeneratedRelease:
    accepted, sha256, filename, size, location = _verdict(rel)
    seen = (
        [rel.artifact.sha256]
        if rel.artifact and rel.artifact.sha256 and rel.shape != "artifact_not_cab"
        else []
    ) + ([rel.legacy_sha256] if rel.legacy_sha256 else [])
    return GeneratedRelease(
        component_id=comp.cid,
        version=rel.version,
        guids=comp.guids,
        description=rel.description.text,
        shape=rel.shape,
        sha256=sha256,
        filename=filename,
        size=size,
        accepted=accepted,
        location=location,
        release_id=rel.release_id,
        version_format=comp.verfmt,
        sha256_seen=tuple(seen),
    )


def _count(stats: Counter[str], comp: _Component) -> None:
    stats["components"] += 1
    stats[f"verfmt:{comp.verfmt}"] += 1
    if comp.requires:
        stats["requires:components"] += 1
    for kind, _ in comp.requires:
        stats[f"requires:{kind}"] += 1
    for rel in comp.releases:
        stats["releases"] += 1
        stats[f"shape:{rel.shape}"] += 1
        for art, kind in ((rel.artifact, "binary"), (rel.source_artifact, "source")):
            if art is None:
                continue
            stats[f"artifacts:{kind}"] += 1
            for loc in art.locations:
                stats["locations:ipfs" if loc.startswith("ipfs://") else "locations:https"] += 1
        if rel.legacy_location:
            stats["locations:https"] += 1


def _check_base(location_base: str) -> None:
    parts = urlsplit(location_base)
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"location_base must be an https URL with a host: {location_base!r}")


def _forced_shapes(components: int) -> dict[int, str]:
    """Each non-default shape once, spread over the catalog (so 11+ components hold all)."""
    rare = [s for s in SHAPES if s != "both_agree"]
    forced: dict[int, str] = {}
    for k, shape in enumerate(rare):
        forced.setdefault((2 * k + 1) * components // (2 * len(rare)), shape)
    return forced


def generate(
    components: int = 4400,
    seed: int = 0,
    *,
    extra_components: Sequence[etree._Element] = (),
    location_base: str = DEFAULT_LOCATION_BASE,
) -> GeneratedCatalog:
    """A catalog of ``components`` generated components (sorted by id, as the LVFS writes
    them) followed by ``extra_components`` verbatim. Same arguments, same bytes."""
    if components < 0:
        raise ValueError("components must be >= 0")
    _check_base(location_base)
    builder = _Builder(seed, location_base)
    forced = _forced_shapes(components)
    comps = [builder.component(forced.get(i)) for i in range(components)]
    comps.sort(key=lambda c: c.cid)
    # the LVFS's ids grow with upload time (older firmware, smaller id)
    ids = random.Random(f"{seed}:release-ids")
    next_id = 1000 + ids.randint(0, 500)
    for rel in sorted((r for c in comps for r in c.releases), key=lambda r: (r.timestamp, r.name)):
        rel.release_id = next_id
        next_id += ids.randint(1, 12)
    out = ["<?xml version='1.0' encoding='utf-8'?>\n", '<components origin="lvfs" version="0.9">\n']
    manifest: list[GeneratedRelease] = []
    stats: Counter[str] = Counter()
    for comp in comps:
        out.append(_component_text(comp, [_release_text(r) for r in comp.releases]))
        manifest.extend(_manifest(comp, r) for r in comp.releases)
        _count(stats, comp)
    for el in extra_components:
        out.append("  " + etree.tostring(el, encoding="unicode", with_tail=False) + "\n")
    out.append("</components>\n")
    return GeneratedCatalog(
        xml="".join(out).encode("utf-8"), releases=tuple(manifest), stats=dict(stats)
    )


def release_case(
    shape: str, *, seed: int = 0, index: int = 0, location_base: str = DEFAULT_LOCATION_BASE
) -> tuple[etree._Element, GeneratedRelease]:
    """One <release> of the given shape and its verdict, for table tests of a parser.
    The manifest names the component "org.example.Generated.firmware"."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    _check_base(location_base)
    builder = _Builder(seed, location_base)
    builder.rng.seed(f"{seed}:{shape}:{index}")
    builder.serial = 1_000_000 + index * 2
    fmt = _UNKNOWN_FORMATS[0] if shape == "unknown_version_format" else "triplet"
    version = _versions("triplet", 1, builder.rng)[0]
    rel = builder.release(
        shape, version, 1700000000, "Example", "Widget-X1-SystemFirmware", "Widget", "W1ABC"
    )
    comp = _Component(
        cid="org.example.Generated.firmware", name="Widget", summary="Widget firmware",
        description=Description("<p>Widget.</p>", "Widget."),
        guids=("b585990a-003e-5270-89d5-3705a17f9a43",),
        homepage="https://example.org/", license="GPL-2.0+", developer="Example",
        category="X-Device", verfmt=fmt, protocol="com.acme.test", integrity=None,
        update_message=None, keywords=(), requires=[], releases=[rel],
    )  # fmt: skip
    parser = etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=True)
    return etree.fromstring(_release_text(rel).encode(), parser), _manifest(comp, rel)


def release_xml(
    shape: str, *, seed: int = 0, index: int = 0, location_base: str = DEFAULT_LOCATION_BASE
) -> etree._Element:
    """One <release> element of the given shape (see :func:`release_case` for its verdict)."""
    return release_case(shape, seed=seed, index=index, location_base=location_base)[0]
