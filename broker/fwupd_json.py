"""What ``fwupdmgr --json`` prints, rebuilt from fwupd's own D-Bus dictionaries.

Pure functions, no D-Bus and no I/O: they take one ``a{sv}`` of a device, a release or a
report as the daemon sends it (values unwrapped from their Variant, as dbus-next gives
them after ``{k: v.value}``; Variants left anywhere inside are unwrapped here too) and
return the object fwupdmgr 2.0.20 prints for it, with the same keys, in the same order,
with the same value types.

The rules are fwupd 2.0.20's (libfwupd): ``fwupd_{device,release,report}_from_key_value``
say how each D-Bus key is read, ``fwupd_{device,release,report}_add_json`` what is printed
and in which order. Behaviours that follow from them and are reproduced on purpose:

* list values are de-duplicated, first occurrence wins (``fwupd_device_add_guid`` & co.);
  "|"-joined ``VendorId``/``Protocol`` and ","-joined ``Checksum`` strings are split (an
  empty string gives no item, as ``g_strsplit`` does);
* a ``DeviceId``/``ParentDeviceId``/``CompositeId`` that is not 40 lowercase hex digits is
  dropped (fwupd logs a critical and keeps it unset), and so is a ``BatteryLevel`` or
  ``BatteryThreshold`` above 101; 101 itself means "invalid" and is not printed;
* flags are printed as the list of names of the bits set, lowest bit first, and a bit
  fwupd has no name for is printed as ``null`` (``None``), in its place;
* unsigned 64-bit numbers are printed as json-glib's signed 64-bit integers, so values
  from 2**63 up come out negative;
* ``UpdateState`` and ``Status`` stay numbers, ``VersionFormat`` becomes its name (and is
  left out when fwupd has no name for it); a release's ``Urgency`` is *not* printed at all
  by fwupdmgr 2.0.20 (``fwupd_release_add_json`` has no such member), so it is not here
  either: ``URGENCIES`` is there for callers that want to show it;
* release and report ``Metadata`` entries become top-level members after the others, in
  the iteration order of the GLib hash table fwupd keeps them in (reproduced below), and a
  metadata key equal to a member already printed replaces that member's value in place,
  as ``json_object_set_member`` does.

What fwupdmgr adds from more than one ``a{sv}`` is left to the caller, see
``device_json``'s ``releases``: ``get-devices`` nests the answer of ``GetReleases`` in
every device, ``get-updates`` the answer of ``GetUpgrades`` (see the docstring).

Input that a real daemon cannot send (a value of the wrong type, a number out of range,
a list holding non-strings) never raises: the value, or the bad items of a list, are
ignored. A real fwupd would assert on a mistyped GVariant; this data can come from a qube
we do not trust as JSON, so "print what can be printed" is the rule here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

FWUPD_VERSION: Final = "2.0.20"

_U32_MAX: Final = (1 << 32) - 1
_U64_MAX: Final = (1 << 64) - 1


def _table(names: Mapping[int, str]) -> Mapping[int, str]:
    return MappingProxyType(dict(names))


def _bits(names: Mapping[int, str]) -> Mapping[int, str]:
    """Bit number -> name, as flag value (1 << bit) -> name."""
    return _table({1 << bit: name for bit, name in names.items()})


# FwupdDeviceFlags (fwupd_device_flag_to_string); bits 2, 7, 11, 12, 15, 16, 19, 21, 23,
# 32-36, 38, 41 and 54-63 have no name in 2.0.20 (some did once and were retired)
DEVICE_FLAGS: Final = _bits(
    {
        0: "internal",
        1: "updatable",
        3: "require-ac",
        4: "locked",
        5: "supported",
        6: "needs-bootloader",
        8: "needs-reboot",
        9: "reported",
        10: "notified",
        13: "is-bootloader",
        14: "wait-for-replug",
        17: "needs-shutdown",
        18: "another-write-required",
        20: "needs-activation",
        22: "historical",
        24: "will-disappear",
        25: "can-verify",
        26: "can-verify-image",
        27: "dual-image",
        28: "self-recovery",
        29: "usable-during-update",
        30: "version-check-required",
        31: "install-all-releases",
        37: "updatable-hidden",
        39: "has-multiple-branches",
        40: "backup-before-install",
        42: "wildcard-install",
        43: "only-version-upgrade",
        44: "unreachable",
        45: "affects-fde",
        46: "end-of-life",
        47: "signed-payload",
        48: "unsigned-payload",
        49: "emulated",
        50: "emulation-tag",
        51: "only-explicit-updates",
        52: "can-emulation-tag",
        53: "install-skip-version-check",
    }
)

# FwupdDeviceProblem (fwupd_device_problem_to_string)
DEVICE_PROBLEMS: Final = _bits(
    {
        0: "system-power-too-low",
        1: "unreachable",
        2: "power-too-low",
        3: "update-pending",
        4: "require-ac-power",
        5: "lid-is-closed",
        6: "is-emulated",
        7: "missing-license",
        8: "system-inhibit",
        9: "update-in-progress",
        10: "in-use",
        11: "display-required",
        12: "lower-priority",
        13: "insecure-platform",
        14: "firmware-locked",
    }
)

# FwupdRequestFlags (fwupd_request_flag_to_string)
REQUEST_FLAGS: Final = _bits(
    {
        0: "allow-generic-message",
        1: "allow-generic-image",
        2: "non-generic-message",
        3: "non-generic-image",
    }
)

# FwupdReleaseFlags (fwupd_release_flag_to_string); on D-Bus they travel as "TrustFlags"
RELEASE_FLAGS: Final = _bits(
    {
        0: "trusted-payload",
        1: "trusted-metadata",
        2: "is-upgrade",
        3: "is-downgrade",
        4: "blocked-version",
        5: "blocked-approval",
        6: "is-alternate-branch",
        7: "is-community",
        8: "trusted-report",
    }
)

# FwupdReportFlags (fwupd_report_flag_to_string)
REPORT_FLAGS: Final = _bits({0: "from-oem", 1: "is-upgrade"})

# FwupdReleaseUrgency (fwupd_release_urgency_to_string); 0 is "unknown" and has no name
URGENCIES: Final = _table({1: "low", 2: "medium", 3: "high", 4: "critical"})

# FwupdVersionFormat (fwupd_version_format_to_string); 0 is "unknown", never printed
VERSION_FORMATS: Final = _table(
    {
        1: "plain",
        2: "number",
        3: "pair",
        4: "triplet",
        5: "quad",
        6: "bcd",
        7: "intel-me",
        8: "intel-me2",
        9: "surface-legacy",
        10: "surface",
        11: "dell-bios",
        12: "hex",
        13: "dell-bios-msb",
        14: "intel-csme19",
    }
)

# FwupdUpdateState and FwupdStatus: fwupdmgr --json prints these as numbers; the names
# are for callers (fwupd_update_state_to_string, fwupd_status_to_string)
UPDATE_STATES: Final = _table(
    {1: "pending", 2: "success", 3: "failed", 4: "needs-reboot", 5: "failed-transient"}
)
STATUSES: Final = _table(
    {
        1: "idle",
        2: "loading",
        3: "decompressing",
        4: "device-restart",
        5: "device-write",
        6: "device-verify",
        7: "scheduling",
        8: "downloading",
        9: "device-read",
        10: "device-erase",
        11: "waiting-for-auth",
        12: "device-busy",
        13: "shutdown",
        14: "waiting-for-user",
    }
)

# FwupdError: code -> the suffix of its D-Bus error name (org.freedesktop.fwupd.<suffix>)
ERROR_DOMAIN: Final = "FwupdError"  # g_quark_to_string(FWUPD_ERROR)
ERRORS: Final = _table(
    {
        0: "Internal",
        1: "VersionNewer",
        2: "VersionSame",
        3: "AlreadyPending",
        4: "AuthFailed",
        5: "Read",
        6: "Write",
        7: "InvalidFile",
        8: "NotFound",
        9: "NothingToDo",
        10: "NotSupported",
        11: "SignatureInvalid",
        12: "AcPowerRequired",
        13: "PermissionDenied",
        14: "BrokenSystem",
        15: "BatteryLevelTooLow",
        16: "NeedsUserAction",
        17: "AuthExpired",
        18: "InvalidData",
        19: "TimedOut",
        20: "Busy",
        21: "NotReachable",
    }
)
ERROR_LAST: Final = 22  # what fwupd_error_from_string gives an unknown fwupd error name
ERROR_INVALID_ARGS: Final = 23  # fwupdmgr's own (src/fu-util-common.h), e.g. "Command not found"
ERROR_CODES: Final[Mapping[str, int]] = MappingProxyType({n: c for c, n in ERRORS.items()})
_FWUPD_DBUS_ERROR_PREFIX: Final = "org.freedesktop.fwupd"

_BATTERY_LEVEL_INVALID: Final = 101  # FWUPD_BATTERY_LEVEL_INVALID, a device's default


def flag_names(value: int, table: Mapping[int, str]) -> list[str | None]:
    """The names of the bits set in ``value``, lowest first, ``None`` for a bit ``table``
    does not name: what fwupd prints as a JSON list (unnamed bits become ``null``)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MAX:
        return []
    return [table.get(1 << bit) for bit in range(64) if value >> bit & 1]


def flags_value(names: Iterable[str | None], table: Mapping[int, str]) -> int:
    """The inverse of ``flag_names`` for named bits; unknown names and None are ignored."""
    by_name = {name: bit for bit, name in table.items()}
    value = 0
    for name in names:
        if name is not None:
            value |= by_name.get(name, 0)
    return value


def urgency_name(raw: Mapping[str, Any]) -> str | None:
    """A release's ``Urgency`` as fwupd names it, or None (fwupdmgr --json omits it)."""
    value = _u32(dict(_items(raw)).get("Urgency"))
    return None if value is None else URGENCIES.get(value)


def device_id_is_valid(device_id: object) -> bool:
    """fwupd_device_id_is_valid: exactly 40 lowercase hex digits (a SHA-1)."""
    return (
        isinstance(device_id, str)
        and len(device_id) == 40
        and all(c in "0123456789abcdef" for c in device_id)
    )


def error_json(domain: str, code: int, message: str) -> dict[str, Any]:
    """What fwupdmgr --json prints (on stdout) when a command fails
    (fu_util_print_error_as_json), e.g. ``error_json("FwupdError", 8, "failed to find x")``."""
    return {"Error": {"Domain": domain, "Code": code, "Message": message}}


def error_json_from_dbus(name: str, message: str) -> dict[str, Any]:
    """``error_json`` for a D-Bus error reply, mapped as fwupd's client maps it
    (fwupd_client_fixup_dbus_error): org.freedesktop.fwupd.* names -> their code (an
    unknown one -> ERROR_LAST), ServiceUnknown -> NotSupported, anything else -> Internal.
    ``message`` is the error text without the ``GDBus.Error:NAME:`` prefix (dbus-next's
    ``DBusError.text``)."""
    if name.startswith(_FWUPD_DBUS_ERROR_PREFIX):
        prefix = _FWUPD_DBUS_ERROR_PREFIX + "."
        suffix = name[len(prefix) :] if name.startswith(prefix) else None
        code = ERROR_CODES.get(suffix, ERROR_LAST) if suffix is not None else ERROR_LAST
    elif name == "org.freedesktop.DBus.Error.ServiceUnknown":
        code = 10  # NotSupported
    else:
        code = 0  # Internal
    return error_json(ERROR_DOMAIN, code, message)


# ------------------------------------------------------------------ value readers


def _plain(value: Any) -> Any:
    """Unwrap a dbus-next Variant (anything with .signature and .value), also a Variant in
    a Variant; a chain deeper than D-Bus allows (64) is given up on."""
    for _ in range(64):
        if not (hasattr(value, "signature") and hasattr(value, "value")):
            return value
        value = value.value
    return None


def _str(value: Any) -> str | None:
    value = _plain(value)
    return value if isinstance(value, str) else None


def _uint(value: Any, maximum: int) -> int | None:
    value = _plain(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        return None
    return value


def _u32(value: Any) -> int | None:
    return _uint(value, _U32_MAX)


def _u64(value: Any) -> int | None:
    return _uint(value, _U64_MAX)


def _strv(value: Any) -> list[str]:
    """An ``as``: the strings of a list or tuple, anything else ignored."""
    value = _plain(value)
    if not isinstance(value, list | tuple):
        return []
    return [s for s in (_plain(v) for v in value) if isinstance(s, str)]


def _split(value: Any, sep: str) -> list[str]:
    """A joined string as g_strsplit(value, sep, -1) splits it ("" -> nothing)."""
    text = _str(value)
    if not text:
        return []
    return text.split(sep)


def _unique(items: Iterable[str], into: list[str] | None = None) -> list[str]:
    """``into`` + the items not in it yet, in order (linear: lists can be long)."""
    out = [] if into is None else into
    seen = set(out)
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _dicts(value: Any) -> list[Mapping[str, Any]]:
    """An ``aa{sv}``: the mappings of a list or tuple, anything else ignored."""
    value = _plain(value)
    if not isinstance(value, list | tuple):
        return []
    return [d for d in (_plain(v) for v in value) if isinstance(d, Mapping)]


def _int64(value: int) -> int:
    """json_builder_add_int_value takes a gint64: guint64 values wrap to negative."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _items(raw: Any) -> list[tuple[str, Any]]:
    """The (key, value) pairs of an a{sv}, in order; string keys only."""
    raw = _plain(raw)
    if not isinstance(raw, Mapping):
        return []
    try:
        return [(k, v) for k, v in raw.items() if isinstance(k, str)]
    except Exception:  # a hostile Mapping whose iteration fails: nothing to print
        return []


# ------------------------------------------------------------------ GLib hash table order


@functools.cache
def _prime_mod(shift: int) -> int:
    """prime_mod[shift] of glib/ghash.c (2.74, what fwupd 2.0.20 runs on in Debian 12): the
    largest prime below 2**shift (1 and 2 for the two smallest sizes)."""
    if shift < 2:
        return shift + 1
    n = (1 << shift) - 1
    while any(n % d == 0 for d in range(3, math.isqrt(n) + 1, 2)):
        n -= 2
    return n


_MIN_SHIFT: Final = 3


def _g_str_hash(key: str) -> int:
    """g_str_hash: djb2 over the UTF-8 bytes taken as *signed* chars, in a guint32."""
    h = 5381
    for byte in key.encode("utf-8", "surrogatepass"):
        h = (h * 33 + (byte - 256 if byte >= 128 else byte)) & 0xFFFFFFFF
    return h


class _GHashOrder:
    """Just enough of a GHashTable (string keys, inserts only) to know the order in which
    g_hash_table_get_keys() returns its keys: open addressing with quadratic probing, the
    index is (hash * 11) % prime_mod[shift], the table grows in place when 15/16 full, and
    get_keys prepends while walking the buckets, so keys come out last bucket first."""

    def __init__(self) -> None:
        self.nnodes = 0
        self.noccupied = 0
        self._set_shift(_MIN_SHIFT)
        self.hashes = [0] * self.size
        self.keys: list[str | None] = [None] * self.size

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _prime_mod(shift)
        self.mask = self.size - 1

    def _index(self, key_hash: int) -> int:
        return ((key_hash * 11) & 0xFFFFFFFF) % self.mod

    def insert(self, key: str) -> None:
        key_hash = max(_g_str_hash(key), 2)  # 0 marks an empty bucket, 1 a tombstone
        index = self._index(key_hash)
        step = 0
        while self.hashes[index] != 0:
            if self.hashes[index] == key_hash and self.keys[index] == key:
                return  # g_hash_table_insert on an existing key keeps the old key in place
            step += 1
            index = (index + step) & self.mask
        self.hashes[index] = key_hash
        self.keys[index] = key
        self.nnodes += 1
        self.noccupied += 1
        if (self.size > self.nnodes * 4 and self.size > 1 << _MIN_SHIFT) or (
            self.size <= self.noccupied + self.noccupied // 16
        ):
            self._resize()

    def _resize(self) -> None:
        old_size = self.size
        wanted = int(self.nnodes * 1.333)
        self._set_shift(max(wanted.bit_length(), _MIN_SHIFT))
        if self.size > old_size:
            self.hashes += [0] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        moved = [False] * max(self.size, old_size)
        for i in range(old_size):
            node_hash = self.hashes[i]
            if node_hash <= 1:
                self.hashes[i] = 0
                continue
            if moved[i]:
                continue
            self.hashes[i] = 0
            key, self.keys[i] = self.keys[i], None
            while True:  # place it, evicting a not yet moved occupant, which goes next
                index = self._index(node_hash)
                step = 0
                while moved[index]:
                    step += 1
                    index = (index + step) & self.mask
                moved[index] = True
                replaced = self.hashes[index]
                self.hashes[index] = node_hash
                if replaced <= 1:
                    self.keys[index] = key
                    break
                node_hash = replaced
                key, self.keys[index] = self.keys[index], key
        del self.hashes[self.size :]
        del self.keys[self.size :]
        self.noccupied = self.nnodes

    def get_keys(self) -> list[str]:
        return [
            k
            for h, k in zip(reversed(self.hashes), reversed(self.keys), strict=True)
            if h > 1 and k is not None
        ]


# a release's Metadata has a handful of keys; the hash table order is quadratic in keys
# built to collide (make fuzz found 19,683 of them in one sys-usb reply: 20 s of dom0's
# CPU), so what sys-usb sends beyond this many is not shown
_MAX_METADATA_ENTRIES = 128


def _ghash_order(keys: Iterable[str]) -> list[str]:
    """The order g_hash_table_get_keys() gives for a g_str_hash table filled with ``keys``
    in this order (a repeated key keeps its first place)."""
    table = _GHashOrder()
    for key in keys:
        table.insert(key)
    return table.get_keys()


def _append_metadata(out: dict[str, Any], metadata: Any) -> None:
    """fwupd_variant_to_hash_kv then the add_json loop: each entry becomes a member, in
    hash table order; the value of a repeated key is the last one given."""
    values: dict[str, str] = {}
    for key, value in _items(metadata):
        text = _str(value)
        if text is not None and (key in values or len(values) < _MAX_METADATA_ENTRIES):
            values[key] = text
    for key in _ghash_order(values):
        out[key] = values[key]  # an existing member keeps its place, as in json-glib


# ------------------------------------------------------------------ devices


def _device_state(raw: Any) -> dict[str, Any]:
    """fwupd_device_from_key_value over every entry, into a plain dict of fields."""
    st: dict[str, Any] = {
        "BatteryLevel": _BATTERY_LEVEL_INVALID,
        "BatteryThreshold": _BATTERY_LEVEL_INVALID,
    }
    lists: dict[str, list[str]] = {}
    releases: list[Mapping[str, Any]] = []
    for key, value in _items(raw):
        if key == "Release":
            releases.extend(_dicts(value))
        elif key in ("DeviceId", "ParentDeviceId", "CompositeId"):
            text = _str(value)
            if device_id_is_valid(text):
                st[key] = text
        elif key in _DEVICE_STRINGS:
            text = _str(value)
            if text is not None:
                st[key] = text
        elif key in _DEVICE_U64:
            number = _u64(value)
            if number is not None:
                st[key] = number
        elif key in _DEVICE_U32:
            number = _u32(value)
            # fwupd_device_set_battery_{level,threshold} refuse anything above 101
            if number is not None and not (key.startswith("Battery") and number > 101):
                st[key] = number
        elif key in ("Guid", "InstanceIds", "Icon", "Issues"):
            lists[key] = _unique(_strv(value), lists.get(key))
        elif key in ("VendorId", "Protocol"):
            lists[key] = _unique(_split(value, "|"), lists.get(key))
        elif key == "Checksum":
            lists[key] = _unique(_split(value, ","), lists.get(key))
    st["_lists"] = lists
    st["_releases"] = releases
    return st


_DEVICE_STRINGS: Final = frozenset(
    (
        "Name",
        "Vendor",
        "Serial",
        "Summary",
        "Branch",
        "Plugin",
        "Version",
        "VersionLowest",
        "VersionBootloader",
        "UpdateError",
    )
)
_DEVICE_U64: Final = frozenset(
    (
        "Flags",
        "Problems",
        "RequestFlags",
        "Created",
        "Modified",
        "VersionBuildDate",
        "VersionRaw",
        "VersionLowestRaw",
        "VersionBootloaderRaw",
    )
)
_DEVICE_U32: Final = frozenset(
    (
        "FlashesLeft",
        "BatteryLevel",
        "BatteryThreshold",
        "InstallDuration",
        "UpdateState",
        "Status",
        "Percentage",
        "VersionFormat",
    )
)


def device_json(
    raw: Mapping[str, Any],
    *,
    releases: Sequence[Mapping[str, Any]] | None = None,
    trusted: bool = True,
    qube: str | None = None,
) -> dict[str, Any]:
    """One device of ``fwupdmgr --json get-devices``/``get-updates`` from its D-Bus a{sv}
    (GetDevices), without "Releases" unless releases are given.

    fwupdmgr fills "Releases" from other calls, per device (src/fu-util.c):
    ``get-devices`` asks GetReleases for every device listed (an error just leaves the
    key out), ``get-updates`` only asks GetUpgrades for devices with the ``supported``
    flag, leaves out the devices for which that fails (e.g. NothingToDo) and sorts the
    devices by flags first; both drop releases not matching ``--filter-release``. Pass
    those release a{sv}s, in the daemon's order, as ``releases``; an empty list prints
    no "Releases" member, as fwupd does. Releases inside ``raw`` (its "Release" key, which
    GetDevices does not send) come first, as fwupd would read them.

    ``trusted`` is FWUPD_CODEC_FLAG_TRUSTED, which every fwupdmgr device listing uses: it
    lets "InstanceIds" and "Serial" be printed (the daemon sends them to root only).
    ``qube`` adds a last member "Qube", which fwupdmgr does not have.
    """
    st = _device_state(raw)
    lists: dict[str, list[str]] = st["_lists"]
    out: dict[str, Any] = {}

    def put_str(key: str) -> None:
        if key in st:
            out[key] = st[key]

    def put_list(key: str, name: str) -> None:
        if lists.get(key):
            out[name] = list(lists[key])

    def put_flags(key: str, table: Mapping[int, str]) -> None:
        if st.get(key):
            out[key] = flag_names(st[key], table)

    def put_positive(key: str) -> None:
        if st.get(key, 0) > 0:
            out[key] = _int64(st[key])

    put_str("Name")
    put_str("DeviceId")
    put_str("ParentDeviceId")
    put_str("CompositeId")
    if trusted:
        put_list("InstanceIds", "InstanceIds")
    put_list("Guid", "Guid")
    if trusted:
        put_str("Serial")
    put_str("Summary")
    put_str("Branch")
    put_str("Plugin")
    put_list("Protocol", "Protocols")
    put_list("Issues", "Issues")
    put_flags("Flags", DEVICE_FLAGS)
    put_flags("RequestFlags", REQUEST_FLAGS)
    put_flags("Problems", DEVICE_PROBLEMS)
    put_list("Checksum", "Checksums")
    put_str("Vendor")
    put_list("VendorId", "VendorIds")
    put_str("Version")
    put_str("VersionLowest")
    put_str("VersionBootloader")
    version_format = VERSION_FORMATS.get(st.get("VersionFormat", 0))
    if version_format is not None:
        out["VersionFormat"] = version_format
    put_positive("FlashesLeft")
    for key in ("BatteryLevel", "BatteryThreshold"):
        if st[key] != _BATTERY_LEVEL_INVALID:
            out[key] = st[key]
    for key in ("VersionRaw", "VersionLowestRaw", "VersionBootloaderRaw", "VersionBuildDate"):
        put_positive(key)
    put_list("Icon", "Icons")
    for key in ("InstallDuration", "Created", "Modified", "UpdateState", "Status", "Percentage"):
        put_positive(key)
    put_str("UpdateError")
    nested = [*st["_releases"], *(releases or [])]
    if nested:
        out["Releases"] = [release_json(r) for r in nested]
    if qube is not None:
        out["Qube"] = qube
    return out


# ------------------------------------------------------------------ releases

_RELEASE_STRINGS: Final = frozenset(
    (
        "RemoteId",
        "AppstreamId",
        "ReleaseId",
        "DetachCaption",
        "DetachImage",
        "Filename",
        "Protocol",
        "License",
        "Name",
        "NameVariantSuffix",
        "Summary",
        "Branch",
        "Description",
        "Homepage",
        "DetailsUrl",
        "SourceUrl",
        "SbomUrl",
        "Version",
        "Vendor",
        "UpdateMessage",
        "UpdateImage",
    )
)


def release_json(raw: Mapping[str, Any]) -> dict[str, Any]:
    """One release as fwupdmgr --json prints it (``get-releases``, ``get-updates``,
    ``get-devices``' "Releases") from its D-Bus a{sv} (GetReleases, GetUpgrades,
    GetDowngrades). "Checksum" becomes a list, "Uri" and "Locations" both feed
    "Locations" (in the order met), "TrustFlags" becomes "Flags" (names; a "Flags" key is
    not read, as fwupd does not), "Urgency" is not printed (fwupdmgr 2.0.20 does not),
    "Metadata" entries become members, "Reports" a list of ``report_json``."""
    st: dict[str, Any] = {}
    lists: dict[str, list[str]] = {}
    metadata: Any = None
    reports: list[Mapping[str, Any]] = []
    for key, value in _items(raw):
        if key in _RELEASE_STRINGS:
            text = _str(value)
            if text is not None:
                st[key] = text
        elif key in ("Size", "Created", "TrustFlags"):
            number = _u64(value)
            if number is not None:
                st[key] = number
        elif key in ("Urgency", "InstallDuration"):
            number = _u32(value)
            if number is not None:
                st[key] = number
        elif key in ("Categories", "Issues", "Tags", "Locations"):
            lists[key] = _unique(_strv(value), lists.get(key))
        elif key == "Uri":
            text = _str(value)
            if text is not None:
                lists["Locations"] = _unique([text], lists.get("Locations"))
        elif key == "Checksum":
            lists[key] = _unique(_split(value, ","), lists.get(key))
        elif key == "Metadata":
            metadata = value
        elif key == "Reports":
            reports = _dicts(value)

    out: dict[str, Any] = {}

    def put(*keys: str) -> None:
        for key in keys:
            if key in st:
                out[key] = st[key]

    def put_list(*keys: str) -> None:
        for key in keys:
            if lists.get(key):
                out[key] = list(lists[key])

    put(
        "AppstreamId",
        "ReleaseId",
        "RemoteId",
        "Name",
        "NameVariantSuffix",
        "Summary",
        "Description",
        "Branch",
        "Version",
        "Filename",
        "Protocol",
    )
    put_list("Categories", "Issues", "Checksum", "Tags")
    put("License")
    for key in ("Size", "Created"):
        if st.get(key, 0) > 0:
            out[key] = _int64(st[key])
    put_list("Locations")
    put("Homepage", "DetailsUrl", "SourceUrl", "SbomUrl", "Vendor")
    if st.get("TrustFlags"):
        out["Flags"] = flag_names(st["TrustFlags"], RELEASE_FLAGS)
    if st.get("InstallDuration", 0) > 0:
        out["InstallDuration"] = st["InstallDuration"]
    put("DetachCaption", "DetachImage", "UpdateMessage", "UpdateImage")
    if metadata is not None:
        _append_metadata(out, metadata)
    if reports:
        out["Reports"] = [report_json(r) for r in reports]
    return out


# ------------------------------------------------------------------ reports

_REPORT_STRINGS: Final = frozenset(
    ("DistroId", "DistroVariant", "DistroVersion", "Vendor", "DeviceName", "VersionOld", "RemoteId")
)


def report_json(raw: Mapping[str, Any]) -> dict[str, Any]:
    """One entry of a release's "Reports" (fwupd_report_add_json); "Created" is read from
    D-Bus but fwupd does not print it."""
    st: dict[str, Any] = {}
    metadata: Any = None
    for key, value in _items(raw):
        if key in _REPORT_STRINGS:
            text = _str(value)
            if text is not None:
                st[key] = text
        elif key == "VendorId":
            number = _u32(value)
            if number is not None:
                st[key] = number
        elif key == "Flags":
            number = _u64(value)
            if number is not None:
                st[key] = number
        elif key == "Metadata":
            metadata = value
    out: dict[str, Any] = {}
    for key in (
        "DeviceName",
        "DistroId",
        "DistroVariant",
        "DistroVersion",
        "VersionOld",
        "Vendor",
        "RemoteId",
    ):
        if key in st:
            out[key] = st[key]
    if st.get("VendorId", 0) > 0:
        out["VendorId"] = st["VendorId"]
    if st.get("Flags"):
        out["Flags"] = flag_names(st["Flags"], REPORT_FLAGS)
    if metadata is not None:
        _append_metadata(out, metadata)
    return out
