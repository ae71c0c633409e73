"""sys-usb: the qubes.FwupdUsbvm agent (+GetDevices, +GetUpgrades, +GetDowngrades,
+GetReleases, +Refresh, +Install, +GetResults, +ClearResults) and dom0's side of it.

sys-usb faces malicious USB devices, so dom0 treats every reply as hostile: bounded in
size, schema-checked field by field, strings made printable. sys-usb in turn checks what
dom0 sends (metadata signatures against its own trust store, the cab's sha256) before its
fwupd sees it, and fwupd checks the cab's payload signature a third time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.cabinet import ExpectedRelease, inspect_cab
from broker.config import Limits, Remote
from broker.errors import FormatError, LimitExceeded, TransferError, VerificationError
from broker.fwupd import (
    Device,
    FwupdClient,
    OfferedRelease,
    device_from_dbus,
)
from broker.metadata import Release, verify_metadata_files
from broker.qrexec import Transport, call, check
from broker.sanitize import printable
from broker.service import ServiceContext, run_service
from broker.signatures import TrustStore
from broker.transfer import (
    ProgressLines,
    StreamReader,
    UntrustedFiles,
    parse_header,
    sweep_untrusted,
    write_all,
    write_frame,
)

SERVICE = "qubes.FwupdUsbvm"
_DEVICE_ID = re.compile(r"^[0-9a-f]{40}$")
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_VERSION = re.compile(r"^[A-Za-z0-9._+~-]{1,64}$")
_TOKEN = re.compile(r"^[A-Za-z0-9._:-]{0,128}$")
_REMOTE_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_APPSTREAM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")
_CHECKSUM = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64}|[0-9a-f]{128})$")
# qubes.FwupdUsbvm+<argument> -> what the agent asks its fwupd (OFFER_KINDS)
OFFER_ARGUMENTS = {"GetUpgrades": "upgrades", "GetDowngrades": "downgrades",
                   "GetReleases": "releases"}  # fmt: skip
_MAX_CHECKSUMS = 8


# --------------------------------------------------------------------------- dom0 side
def _string(untrusted: object, field: str, limit: int) -> str:
    if not isinstance(untrusted, str) or len(untrusted) > limit:
        raise FormatError(f"sys-usb reply: {field} is not a string of at most {limit} chars")
    return printable(untrusted, limit)


def _match(untrusted: object, pattern: re.Pattern[str], field: str) -> str:
    if not isinstance(untrusted, str) or not pattern.fullmatch(untrusted):
        raise FormatError(f"sys-usb reply: malformed {field}")
    return untrusted


def _load_reply(untrusted_reply: bytes, limits: Limits) -> object:
    """sys-usb's reply as JSON, within the size cap; what it holds is still unchecked."""
    if len(untrusted_reply) > limits.reply_max_bytes:
        raise LimitExceeded("sys-usb reply is too large")
    try:
        return json.loads(untrusted_reply.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError("sys-usb reply is not valid JSON") from e


def parse_devices_reply(untrusted_reply: bytes, limits: Limits) -> list[Device]:
    """Devices from sys-usb's JSON, or FormatError; never trusts a field unchecked."""
    untrusted_doc = _load_reply(untrusted_reply, limits)
    if not isinstance(untrusted_doc, dict) or not isinstance(untrusted_doc.get("devices"), list):
        raise FormatError("sys-usb reply is not an object with a devices list")
    untrusted_devices = untrusted_doc["devices"]
    if len(untrusted_devices) > limits.max_devices:
        raise LimitExceeded(f"sys-usb reports more than {limits.max_devices} devices")
    devices: list[Device] = []
    for untrusted_d in untrusted_devices:
        if not isinstance(untrusted_d, dict):
            raise FormatError("sys-usb reply: a device is not an object")
        untrusted_guids = untrusted_d.get("Guid", [])
        if not isinstance(untrusted_guids, list) or len(untrusted_guids) > 64:
            raise FormatError("sys-usb reply: Guid is not a short list")
        untrusted_flags = untrusted_d.get("Flags", 0)
        if (
            not isinstance(untrusted_flags, int)
            or isinstance(untrusted_flags, bool)
            or not 0 <= untrusted_flags < 2**64
        ):
            raise FormatError("sys-usb reply: Flags is not a 64-bit unsigned integer")
        checked: dict[str, Any] = {
            "DeviceId": _match(untrusted_d.get("DeviceId"), _DEVICE_ID, "DeviceId"),
            "Name": _string(untrusted_d.get("Name", ""), "Name", 256),
            "Version": _match(untrusted_d.get("Version"), _VERSION, "Version"),
            "Guid": [_match(g, _GUID, "Guid") for g in untrusted_guids],
            "Vendor": _string(untrusted_d.get("Vendor", ""), "Vendor", 256),
            "VendorId": ",".join(
                _match(v, _TOKEN, "VendorId")
                for v in _string(untrusted_d.get("VendorId", ""), "VendorId", 512).split(",")
            ),
            "Plugin": _match(untrusted_d.get("Plugin", ""), _TOKEN, "Plugin"),
            "Protocol": ",".join(
                _match(p, _TOKEN, "Protocol")
                for p in _string(untrusted_d.get("Protocol", ""), "Protocol", 512).split(",")
            ),
            "Flags": untrusted_flags,
        }
        if any(d.device_id == checked["DeviceId"] for d in devices):
            raise FormatError(f"sys-usb reply lists DeviceId {checked['DeviceId']} twice")
        devices.append(device_from_dbus(checked, _raw(untrusted_d)))
    return devices


def _raw(untrusted: dict[str, Any]) -> dict[str, Any]:
    """The a{sv} sys-usb relays beside the checked fields. Kept only to render --json as
    fwupdmgr would (broker.fwupd_json reads any shape without raising, and every string
    is made printable on the way out); no decision reads it."""
    untrusted_raw = untrusted.get("Raw", {})
    if not isinstance(untrusted_raw, dict):
        raise FormatError("sys-usb reply: Raw is not an object")
    return untrusted_raw


def _offered_release(untrusted: object) -> OfferedRelease:
    if not isinstance(untrusted, dict):
        raise FormatError("sys-usb reply: a release is not an object")
    untrusted_sums = untrusted.get("Checksum")
    if not isinstance(untrusted_sums, list) or len(untrusted_sums) > _MAX_CHECKSUMS:
        raise FormatError("sys-usb reply: Checksum is not a short list")
    return OfferedRelease(
        appstream_id=_match(untrusted.get("AppstreamId"), _APPSTREAM_ID, "AppstreamId"),
        version=_match(untrusted.get("Version"), _VERSION, "Version"),
        checksums=tuple(_match(c, _CHECKSUM, "Checksum") for c in untrusted_sums),
        remote_id=_match(untrusted.get("RemoteId"), _REMOTE_ID, "RemoteId"),
        raw=_raw(untrusted),
    )


def parse_offers_reply(
    untrusted_reply: bytes, asked: list[str], limits: Limits
) -> dict[str, list[OfferedRelease] | str]:
    """Per device id dom0 asked about: the releases sys-usb's fwupd offers, or its one-line
    error. Only ids dom0 asked about; every field checked; nothing else believed."""
    untrusted_doc = _load_reply(untrusted_reply, limits)
    untrusted_offers = untrusted_doc.get("offers") if isinstance(untrusted_doc, dict) else None
    if not isinstance(untrusted_offers, dict):
        raise FormatError("sys-usb reply is not an object with an offers object")
    if set(untrusted_offers) - set(asked):
        raise FormatError("sys-usb reply names a device dom0 did not ask about")
    out: dict[str, list[OfferedRelease] | str] = {}
    for device_id in asked:
        untrusted_entry = untrusted_offers.get(device_id)
        if untrusted_entry is None:
            out[device_id] = "sys-usb did not answer for this device"
            continue
        if not isinstance(untrusted_entry, dict) or len(untrusted_entry) != 1:
            raise FormatError("sys-usb reply: an offer entry is not {releases} or {error}")
        if "error" in untrusted_entry:
            out[device_id] = _string(untrusted_entry["error"], "error", 300)
            continue
        untrusted_releases = untrusted_entry.get("releases")
        if not isinstance(untrusted_releases, list):
            raise FormatError("sys-usb reply: releases is not a list")
        if len(untrusted_releases) > limits.max_offered_releases:
            raise LimitExceeded(
                f"sys-usb offers more than {limits.max_offered_releases} releases for a device"
            )
        out[device_id] = [_offered_release(r) for r in untrusted_releases]
    return out


def parse_results_reply(
    untrusted_reply: bytes, device_id: str, limits: Limits
) -> dict[str, Any] | None:
    """{"result": a{sv} or null} about the device dom0 asked for, or FormatError. What it
    holds is only rendered (broker.fwupd_json reads any shape, strings made printable)."""
    untrusted_doc = _load_reply(untrusted_reply, limits)
    if not isinstance(untrusted_doc, dict) or set(untrusted_doc) != {"result"}:
        raise FormatError("sys-usb reply is not an object with a result")
    untrusted_result = untrusted_doc["result"]
    if untrusted_result is None:
        return None
    if not isinstance(untrusted_result, dict):
        raise FormatError("sys-usb reply: result is not an object")
    if untrusted_result.get("DeviceId") != device_id:
        raise FormatError("sys-usb reply: the result is about another device")
    return untrusted_result


@dataclass(frozen=True)
class UsbvmClient:
    """dom0's handle on the sys-usb agent."""

    transport: Transport
    qube: str
    limits: Limits

    def get_devices(self) -> list[Device]:
        result = check(
            call(self.transport, self.qube, f"{SERVICE}+GetDevices",
                 max_stdout=self.limits.reply_max_bytes, timeout=self.limits.usbvm_seconds),
            self.qube, f"{SERVICE}+GetDevices",
        )  # fmt: skip
        return parse_devices_reply(result.stdout, self.limits)

    def offers(self, kind: str, device_ids: list[str]) -> dict[str, list[OfferedRelease] | str]:
        """What sys-usb's fwupd offers each device (kind: upgrades, downgrades, releases),
        in one call; validated as hostile input."""
        argument = next(a for a, k in OFFER_ARGUMENTS.items() if k == kind)
        service = f"{SERVICE}+{argument}"
        header = {"device_ids": device_ids}
        result = check(
            call(self.transport, self.qube, service,
                 feed=lambda out: write_frame(out, header, []),
                 max_stdout=self.limits.reply_max_bytes, timeout=self.limits.usbvm_seconds),
            self.qube, service,
        )  # fmt: skip
        return parse_offers_reply(result.stdout, device_ids, self.limits)

    def _ask(self, argument: str, device_id: str) -> bytes:
        service = f"{SERVICE}+{argument}"
        header = {"device_id": device_id}
        return check(
            call(self.transport, self.qube, service,
                 feed=lambda out: write_frame(out, header, []),
                 max_stdout=self.limits.reply_max_bytes, timeout=self.limits.usbvm_seconds),
            self.qube, service,
        ).stdout  # fmt: skip

    def results(self, device_id: str) -> dict[str, Any] | None:
        """sys-usb's fwupd's GetResults for one device: its a{sv}, checked to be about
        that device, for showing only (None: no results)."""
        return parse_results_reply(self._ask("GetResults", device_id), device_id, self.limits)

    def clear_results(self, device_id: str) -> None:
        self._ask("ClearResults", device_id)

    def refresh(self, remote: Remote, data_fd: int, jcat_fd: int) -> bool:
        """Push verified metadata; False when sys-usb's fwupd already had it."""
        header = {"remote": remote.id}
        files = [(remote.metadata_name, data_fd), (remote.jcat_name, jcat_fd)]
        result = check(
            call(self.transport, self.qube, f"{SERVICE}+Refresh",
                 feed=lambda out: write_frame(out, header, files), max_stdout=4096,
                 timeout=self.limits.usbvm_seconds),
            self.qube, f"{SERVICE}+Refresh",
        )  # fmt: skip
        return b'"nothing-to-do"' not in result.stdout

    def install(
        self,
        device_id: str,
        cab_fd: int,
        release: Release,
        expected: ExpectedRelease,
        allow_older: bool = False,
        allow_reinstall: bool = False,
        on_line: Callable[[bytes], None] | None = None,
    ) -> None:
        """The cab to sys-usb's agent; ``on_line`` gets its progress lines (its fwupd's
        Status and Percentage), shown by dom0 and never decided on."""
        header = {
            "device_id": device_id,
            "sha256": release.sha256,
            "component_id": expected.component_id,
            # not "version": that key is the frame format's own
            "release_version": expected.version,
            "guids": list(expected.guids),
            # only what the admin asked for (downgrade, reinstall): never a requirement skip
            "allow_older": allow_older,
            "allow_reinstall": allow_reinstall,
        }
        check(
            call(self.transport, self.qube, f"{SERVICE}+Install",
                 feed=lambda out: write_frame(out, header, [(release.filename, cab_fd)]),
                 max_stdout=4096, timeout=self.limits.transfer_seconds, on_line=on_line),
            self.qube, f"{SERVICE}+Install",
        )  # fmt: skip


# --------------------------------------------------------------------------- sys-usb side
def _expected_release(header: dict[str, Any]) -> ExpectedRelease:
    """What dom0 says the cab must be (dom0 is trusted by sys-usb; still well-formed)."""
    guids = header.get("guids")
    if not isinstance(guids, list) or not 0 < len(guids) <= 64:
        raise FormatError("Install header needs a list of GUIDs")
    version = header.get("release_version")
    component_id = header.get("component_id")
    if not isinstance(version, str) or not isinstance(component_id, str):
        raise FormatError("Install header needs a component id and a version")
    return ExpectedRelease(
        component_id,
        _match(version, _VERSION, "version"),
        tuple(_match(g, _GUID, "Guid") for g in guids),
    )


def _reply(ctx: ServiceContext, doc: dict[str, Any]) -> None:
    write_all(ctx.stdout_fd, json.dumps(doc).encode() + b"\n")


def agent(ctx: ServiceContext) -> int:
    if ctx.caller != "dom0":
        raise TransferError("only dom0 may drive the sys-usb agent")
    limits = ctx.config.limits
    client = FwupdClient()
    if ctx.argument == "GetDevices":
        _reply(ctx, {"devices": [d.to_json() for d in client.get_devices()]})
        return 0
    reader = StreamReader(ctx.stdin_fd, time.monotonic() + limits.transfer_seconds)
    header, files = parse_header(reader.readline(limits.header_max_bytes))
    if ctx.argument in ("GetResults", "ClearResults"):
        if files:
            raise FormatError(f"{ctx.argument} needs a device id and no files")
        reader.expect_eof()
        device_id = _match(header.get("device_id"), _DEVICE_ID, "device id")
        if ctx.argument == "ClearResults":
            client.clear_results(device_id)
            _reply(ctx, {"status": "cleared"})
        else:
            _reply(ctx, {"result": client.get_results(device_id)})
        return 0
    if ctx.argument in OFFER_ARGUMENTS:
        device_ids = header.get("device_ids")
        if files or not isinstance(device_ids, list) or len(device_ids) > limits.max_devices:
            raise FormatError(f"{ctx.argument} needs a list of device ids and no files")
        reader.expect_eof()
        ids = [_match(d, _DEVICE_ID, "device id") for d in device_ids]
        offers = client.offers(OFFER_ARGUMENTS[ctx.argument], ids)
        _reply(
            ctx,
            {
                "offers": {
                    device_id: (
                        {"error": found}
                        if isinstance(found, str)
                        else {"releases": [r.to_json() for r in found]}
                    )
                    for device_id, found in offers.items()
                }
            },
        )
        return 0
    # what an agent killed mid-transfer left here (no live transfer is this old)
    sweep_untrusted(ctx.paths.untrusted_dir, limits.transfer_seconds + 60)
    with UntrustedFiles(ctx.paths.untrusted_dir, f"usbvm{os.getpid()}") as untrusted:
        if ctx.argument == "Refresh":
            remote_id = _match(header.get("remote"), _REMOTE_ID, "remote id")
            if len(files) != 2 or not files[1].name == files[0].name + ".jcat":
                raise FormatError("Refresh needs a metadata file and its .jcat")
            data, jcat = files
            if data.size > limits.metadata_max_bytes or jcat.size > limits.jcat_max_bytes:
                raise LimitExceeded("metadata or jcat larger than the caps")
            for f in files:
                reader.copy_exact(untrusted.create(f.name), f.size)
            reader.expect_eof()
            remote = Remote(remote_id, f"https://dom0.invalid/{data.name}")
            data_fd, jcat_fd = untrusted.fds[data.name], untrusted.fds[jcat.name]
            verify_metadata_files(data_fd, jcat_fd, remote, ctx.paths, ctx.config)
            loaded = client.update_metadata(remote_id, data_fd, jcat_fd)
            _reply(ctx, {"status": "loaded" if loaded else "nothing-to-do"})
            return 0
        if ctx.argument == "Install":
            device_id = _match(header.get("device_id"), _DEVICE_ID, "device id")
            sha256 = _match(header.get("sha256"), _SHA256, "sha256")
            if len(files) != 1 or files[0].size > limits.cab_max_bytes:
                raise FormatError("Install needs exactly one cab within the size cap")
            (cab,) = files
            h = hashlib.sha256()
            fd = untrusted.create(cab.name)
            reader.copy_exact(fd, cab.size, h)
            reader.expect_eof()
            if h.hexdigest() != sha256:
                raise VerificationError(f"{cab.name}: sha256 does not match what dom0 verified")
            # the third check: sys-usb inspects the cab with its own trust store before its
            # fwupd (which checks the payload signature once more) sees it
            inspect_cab(
                fd,
                _expected_release(header),
                TrustStore.from_dirs(ctx.paths.pki_firmware_dirs),
                limits,
                ctx.paths.untrusted_dir,
                ctx.config.trust,
            )
            report = ProgressLines(ctx.stdout_fd, unit="%")
            client.install(
                device_id,
                fd,
                cab.name,
                allow_reinstall=header.get("allow_reinstall") is True,
                allow_older=header.get("allow_older") is True,
                progress=lambda status, percent: report(status, percent, 100, percent >= 100),
            )
            _reply(ctx, {"status": "installed"})
            return 0
    raise FormatError(f"unknown argument {printable(ctx.argument, 64)!r}")


def main() -> int:
    return run_service(SERVICE, agent)


if __name__ == "__main__":
    sys.exit(main())
