"""Fuzz target: a cab as dom0 inspects it, broker.cabinet.inspect_cab: the header-first
walk (walk_cab) into private copies, the payload jcat, the metainfo and every check
against the release dom0 expects.

Signatures and checksums are taken as good here (``verify_file`` is replaced by a stand-in
that only hashes the member): openssl and gpg stay out of the hot loop, and the fuzzer
reaches what runs after verification without having to forge a sha256. A cab that passes
is also handed to payload_of (update-heads' entry point). The metainfo member is parsed
unverified too (_parse_metainfo), so that XML from inside a cab meets the parser whatever
the jcat holds.
"""

from __future__ import annotations

import hashlib
import os

import harness

with harness.instrumented():
    import broker.cabinet
    from broker.cabinet import ExpectedRelease, _parse_metainfo, inspect_cab, payload_of, walk_cab
    from broker.config import Limits
    from broker.errors import BrokerError
    from broker.jcat import JcatItem
    from broker.signatures import TrustPolicy, TrustStore, Verified

LIMITS = Limits()
EXPECTED = ExpectedRelease(
    "org.fwupd.fakedevice.firmware", "1.2.4", ("b585990a-003e-5270-89d5-3705a17f9a43",)
)
TRUST = TrustStore((), ())
POLICY = TrustPolicy()
FD = os.memfd_create("fuzz-cab")
SCRATCH = harness.scratch("qfw-fuzz-cab-")


def _fake_verify(
    fd: int, item: JcatItem, trust: TrustStore, policy: TrustPolicy = POLICY, name: str = "file"
) -> Verified:
    """verify_file with every checksum and signature taken as good."""
    h, size, offset = hashlib.sha256(), 0, 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
        size += len(chunk)
    return Verified(h.hexdigest(), size, (), ())


broker.cabinet.verify_file = _fake_verify


def _metainfos_unverified() -> None:
    """Walk the cab into memfds and parse each *.metainfo.xml member as it is."""
    sinks: dict[str, int] = {}

    def sink(name: str, size: int) -> int:
        sinks[name] = os.memfd_create("fuzz-cab-member")
        return sinks[name]

    try:
        walk_cab(FD, LIMITS, sink)
        texts = [
            (name, os.pread(fd, LIMITS.cab_max_metainfo_bytes, 0))
            for name, fd in sinks.items()
            if name.lower().endswith(".metainfo.xml")
        ]
    finally:
        for fd in sinks.values():
            os.close(fd)
    for name, text in texts:
        _parse_metainfo(text, name)


def _inspect() -> None:
    inspect_cab(FD, EXPECTED, TRUST, LIMITS, SCRATCH, POLICY)
    _, kept = payload_of(FD, EXPECTED, TRUST, LIMITS, SCRATCH, POLICY)
    os.close(kept)


def one(data: bytes) -> None:
    os.ftruncate(FD, 0)
    os.pwrite(FD, data, 0)
    steps = [_inspect]
    if b".metainfo.xml" in data:
        steps.append(_metainfos_unverified)
    for step in steps:
        try:
            step()
        except BrokerError as e:
            harness.user_message(e)
        leftover = list(SCRATCH.iterdir())
        if leftover:
            raise AssertionError(f"inspect_cab left {len(leftover)} files in its scratch dir")


if __name__ == "__main__":
    harness.main(one)
