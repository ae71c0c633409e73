"""Client for one fwupd daemon over D-Bus (dbus-next). All D-Bus code lives here, so a
swap to dbus-fast stays one file.

The bus is the system bus of the qube we run in: in the sandbox the launcher points
DBUS_SYSTEM_BUS_ADDRESS at that qube's private bus, and nothing here knows it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from broker.errors import DaemonError, NothingToDo
from broker.fwupd_json import STATUSES
from broker.sanitize import printable


def _dbus() -> Any:
    """dbus_next (and asyncio under it), imported on first use: ~35 ms that --help and
    the verbs that ask no daemon need not pay on every start."""
    import dbus_next.aio.message_bus
    import dbus_next.constants
    import dbus_next.errors
    import dbus_next.signature

    return dbus_next


BUS_NAME = IFACE = "org.freedesktop.fwupd"
T = TypeVar("T")

# FwupdDeviceFlags (libfwupd/fwupd-enums.h)
FLAG_INTERNAL = 1 << 0
FLAG_UPDATABLE = 1 << 1
FLAG_SUPPORTED = 1 << 5  # the daemon holds metadata with a release for it
FLAG_NEEDS_REBOOT = 1 << 8
FLAG_UPDATABLE_HIDDEN = 1 << 37
# FwupdInstallFlags
INSTALL_ALLOW_REINSTALL = 1 << 1
INSTALL_ALLOW_OLDER = 1 << 2


@dataclass(frozen=True)
class Device:
    device_id: str
    name: str
    version: str
    guids: tuple[str, ...]
    vendor: str
    vendor_ids: tuple[str, ...]
    plugin: str
    protocols: tuple[str, ...]
    flags: int
    # the daemon's whole a{sv}, for rendering fwupdmgr's --json only (broker.fwupd_json):
    # from sys-usb it is unchecked beyond the reply's size cap, so nothing decides on it
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def updatable(self) -> bool:
        return bool(self.flags & FLAG_UPDATABLE)

    @property
    def has_updates_to_ask_for(self) -> bool:
        """The devices fwupdmgr get-updates asks about (src/fu-util.c): updatable, even if
        hidden, and supported by the metadata its daemon holds."""
        return bool(self.flags & (FLAG_UPDATABLE | FLAG_UPDATABLE_HIDDEN)) and bool(
            self.flags & FLAG_SUPPORTED
        )

    @property
    def needs_reboot(self) -> bool:
        return bool(self.flags & FLAG_NEEDS_REBOOT)

    def _checked(self, separator: str) -> dict[str, Any]:
        """The fields dom0 checks, with lists joined as the wire in question joins them
        (fwupd's D-Bus: "|"; our agent's JSON: ",")."""
        return {
            "DeviceId": self.device_id,
            "Name": self.name,
            "Version": self.version,
            "Guid": list(self.guids),
            "Vendor": self.vendor,
            "VendorId": separator.join(self.vendor_ids),
            "Plugin": self.plugin,
            "Protocol": separator.join(self.protocols),
            "Flags": self.flags,
        }

    def to_json(self) -> dict[str, Any]:
        """The agent's wire form: the checked fields, and the a{sv} as plain JSON."""
        return {**self._checked(","), "Raw": dict(self.raw)}

    def dbus_form(self) -> dict[str, Any]:
        """The a{sv}, with every field dom0 checked put back in fwupd's own form over
        whatever the raw dict said: what broker.fwupd_json renders. Releases nested in it
        are dropped (GetDevices sends none): the releases shown are those dom0 binds."""
        return {**{k: v for k, v in self.raw.items() if k != "Release"}, **self._checked("|")}


def plain(value: Any, depth: int = 0) -> Any:
    """A D-Bus value as plain JSON-able data: Variants unwrapped, byte arrays dropped (no
    device or release key fwupdmgr prints is one), nesting cut at D-Bus's own limit."""
    if depth > 64:
        return None
    if isinstance(value, _dbus().signature.Variant):
        return plain(value.value, depth + 1)
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):
        return None
    return value


def _split_ids(value: object) -> tuple[str, ...]:
    # fwupd joins vendor ids and protocols with "|" on D-Bus; our agent's wire uses ","
    return tuple(v for v in str(value).replace("|", ",").split(",") if v)


def device_from_dbus(raw: dict[str, Any], whole: Mapping[str, Any] | None = None) -> Device:
    """From fwupd's a{sv} (values already unwrapped) or from our JSON, which uses the same
    keys. Only called on data from a daemon we trust or already validated JSON; ``whole``
    is the a{sv} to keep for rendering (raw itself when not given)."""
    return Device(
        device_id=str(raw.get("DeviceId", "")),
        name=str(raw.get("Name", "")),
        version=str(raw.get("Version", "")),
        guids=tuple(str(g) for g in raw.get("Guid", [])),
        vendor=str(raw.get("Vendor", "")),
        vendor_ids=_split_ids(raw.get("VendorId", "")),
        plugin=str(raw.get("Plugin", "")),
        protocols=_split_ids(raw.get("Protocol", "")),
        flags=int(raw.get("Flags", 0)),
        raw=raw if whole is None else whole,
    )


@dataclass(frozen=True)
class OfferedRelease:
    """A release a fwupd daemon offers for a device (GetUpgrades/GetDowngrades/GetReleases),
    after it applied the component's requirements, version format and device flags.

    It says *which* release fwupd would take, never where it comes from or what it is:
    dom0 looks it up in its own verified catalog by container sha256 (broker.offers)."""

    appstream_id: str
    version: str
    checksums: tuple[str, ...]  # lowercase hex, sha1 and sha256 as fwupd lists them
    remote_id: str
    # the daemon's a{sv}, for rendering --json only (unchecked when it comes from sys-usb)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def sha256s(self) -> tuple[str, ...]:
        return tuple(c for c in self.checksums if len(c) == 64)

    def to_json(self) -> dict[str, Any]:
        return {
            "AppstreamId": self.appstream_id,
            "Version": self.version,
            "Checksum": list(self.checksums),
            "RemoteId": self.remote_id,
            "Raw": dict(self.raw),
        }


def release_from_dbus(raw: dict[str, Any]) -> OfferedRelease:
    """From fwupd's a{sv} (values unwrapped): Checksum is one comma-joined string there."""
    checksums = raw.get("Checksum", "")
    if isinstance(checksums, str):
        checksums = checksums.split(",")
    return OfferedRelease(
        appstream_id=str(raw.get("AppstreamId", "")),
        version=str(raw.get("Version", "")),
        checksums=tuple(str(c).strip().lower() for c in checksums if str(c).strip()),
        remote_id=str(raw.get("RemoteId", "")),
        raw=raw,
    )


# what fwupdmgr calls them -> fwupd's D-Bus methods, each taking a device id
OFFER_KINDS = {
    "upgrades": "call_get_upgrades",
    "downgrades": "call_get_downgrades",
    "releases": "call_get_releases",
}


def _unwrap(d: dict[str, Any]) -> dict[str, Any]:
    return {str(k): plain(v) for k, v in d.items()}


# what the bus answers in fwupd's place when fwupd is gone before its reply
_DAEMON_GONE = frozenset({
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.Disconnected",
})  # fmt: skip


class FwupdClient:
    """Synchronous facade: each call opens the bus, does one thing, closes it."""

    def __init__(self, bus_address: str | None = None, qube: str = "") -> None:
        self.bus_address = bus_address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
        # named in every error, so the admin knows whose fwupd (dom0's, or sys-usb's as
        # relayed) failed
        self.where = f"{qube}: " if qube else ""
        self._proxy: Any = None

    async def _with_fwupd(self, op: Callable[[Any], Awaitable[T]]) -> T:
        dbus = _dbus()
        DBusError = dbus.errors.DBusError  # the class, as if imported
        try:
            if self.bus_address:
                bus = dbus.aio.message_bus.MessageBus(
                    bus_address=self.bus_address, negotiate_unix_fd=True
                )
            else:
                bus = dbus.aio.message_bus.MessageBus(
                    bus_type=dbus.constants.BusType.SYSTEM, negotiate_unix_fd=True
                )
            await bus.connect()
        except (OSError, DBusError) as e:
            raise DaemonError(
                f"{self.where}cannot reach the system bus ({printable(str(e), 120)}): is "
                "dbus running?"
            ) from e
        try:
            try:
                intro = await bus.introspect(BUS_NAME, "/")
            except DBusError as e:
                raise DaemonError(
                    f"{self.where}fwupd is not running ({printable(e.text or '', 120)}): "
                    "systemctl start fwupd"
                ) from e
            proxy = bus.get_proxy_object(BUS_NAME, "/", intro)
            self._proxy = proxy  # for calls that also watch the daemon's properties
            fw = proxy.get_interface(IFACE)
            try:
                return await op(fw)
            except DBusError as e:
                text = printable(e.text or e.type, 300)
                if e.type.endswith(".NothingToDo"):
                    raise NothingToDo(text) from e
                if e.type in _DAEMON_GONE:
                    # the daemon died (crash, OOM, kill) mid-call: not a refusal, and an
                    # install it was doing may have stopped half-way
                    raise DaemonError(
                        f"{self.where}fwupd stopped before it answered ({text}): start it "
                        "again (systemctl restart fwupd) and run the same command again"
                    ) from e
                raise DaemonError(f"{self.where}fwupd refused: {text}") from e
        finally:
            bus.disconnect()

    def _run(self, op: Callable[[Any], Awaitable[T]]) -> T:
        import asyncio  # with dbus_next: on first use

        return asyncio.run(self._with_fwupd(op))

    def daemon_version(self) -> str:
        async def op(fw: Any) -> str:
            return str(await fw.get_daemon_version())

        return self._run(op)

    def get_devices(self) -> list[Device]:
        async def op(fw: Any) -> list[Device]:
            return [device_from_dbus(_unwrap(d)) for d in await fw.call_get_devices()]

        return self._run(op)

    def offers(self, kind: str, device_ids: list[str]) -> dict[str, list[OfferedRelease] | str]:
        """What this daemon offers each device (``kind``: upgrades, downgrades, releases),
        on one bus connection. fwupd's NothingToDo is an empty list; any other refusal is
        kept as that device's one-line error, so one odd device does not hide the rest."""
        method = OFFER_KINDS[kind]
        DBusError = _dbus().errors.DBusError  # the class, as if imported

        async def op(fw: Any) -> dict[str, list[OfferedRelease] | str]:
            out: dict[str, list[OfferedRelease] | str] = {}
            for device_id in device_ids:
                try:
                    raw = await getattr(fw, method)(device_id)
                except DBusError as e:
                    if e.type.endswith(".NothingToDo"):
                        out[device_id] = []
                    else:
                        out[device_id] = printable(e.text or e.type, 300)
                    continue
                out[device_id] = [release_from_dbus(_unwrap(r)) for r in raw]
            return out

        return self._run(op)

    def update_metadata(self, remote_id: str, data_fd: int, sig_fd: int) -> bool:
        """Load verified metadata; False when fwupd already has it (NothingToDo)."""
        os.lseek(data_fd, 0, os.SEEK_SET)
        os.lseek(sig_fd, 0, os.SEEK_SET)

        async def op(fw: Any) -> None:
            await fw.call_update_metadata(remote_id, data_fd, sig_fd)

        try:
            self._run(op)
        except NothingToDo:
            return False
        return True

    def install(
        self,
        device_id: str,
        cab_fd: int,
        filename: str,
        allow_reinstall: bool = False,
        allow_older: bool = False,
        progress: Callable[[str, int], None] | None = None,
    ) -> None:
        """Install the cab behind cab_fd (the fd that was verified, not a path);
        ``progress`` gets the daemon's Status (by name) and Percentage as they change."""
        os.lseek(cab_fd, 0, os.SEEK_SET)
        flags = (INSTALL_ALLOW_REINSTALL if allow_reinstall else 0) | (
            INSTALL_ALLOW_OLDER if allow_older else 0
        )
        options = {
            "reason": _dbus().signature.Variant("s", "user-action"),
            "filename": _dbus().signature.Variant("s", filename),
            "install-flags": _dbus().signature.Variant("t", flags),
        }

        async def op(fw: Any) -> None:
            if progress is not None:
                self._watch(progress)
            await fw.call_install(device_id, cab_fd, options)

        self._run(op)

    def _watch(self, progress: Callable[[str, int], None]) -> None:
        props: Any = self._proxy.get_interface("org.freedesktop.DBus.Properties")
        state = {"Status": 0, "Percentage": 0}

        def changed(interface: str, values: dict[str, Any], invalidated: list[str]) -> None:
            if interface != IFACE:
                return
            for key in state:
                if key in values and isinstance(values[key].value, int):
                    state[key] = values[key].value
            progress(STATUSES.get(state["Status"], "busy"), min(100, max(0, state["Percentage"])))

        props.on_properties_changed(changed)

    def get_results(self, device_id: str) -> dict[str, Any] | None:
        """The device with the result of its last update (GetResults), None if it has
        none (fwupd says NothingToDo)."""

        async def op(fw: Any) -> dict[str, Any]:
            return _unwrap(await fw.call_get_results(device_id))

        try:
            return self._run(op)
        except NothingToDo:
            return None

    def clear_results(self, device_id: str) -> None:
        async def op(fw: Any) -> None:
            await fw.call_clear_results(device_id)

        self._run(op)
