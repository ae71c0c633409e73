"""Fuzz target: the pure-Python parts of signature checking that meet a jcat blob before
openssl or gpg do (broker.signatures): the PKCS#7 PEM block (_pem_block_der), the PGP
armor and its packet framing (_dearmor_signature, then dom0's own re-armor), and the DER
walk to each signer's signingTime and algorithms (_signer_infos, which runs on openssl's
re-encoding; its _DerError is caught by its one caller, verify_pkcs7).

The first byte picks the parser; the rest is the blob (text decoded as JSON strings can
be: lone surrogates included) or the DER.
"""

from __future__ import annotations

import contextlib

import harness

with harness.instrumented():
    from broker.signatures import (
        _armor_signature,
        _dearmor_signature,
        _DerError,
        _pem_block_der,
        _signer_infos,
    )


def one(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    if mode == 0:
        _pem_block_der(body.decode("utf-8", "surrogateescape"))
    elif mode == 1:
        packets = _dearmor_signature(body.decode("utf-8", "surrogateescape"))
        if _dearmor_signature(_armor_signature(packets)) != packets:
            raise AssertionError("dom0's re-armor does not read back as the packets")
    else:
        with contextlib.suppress(_DerError):  # verify_pkcs7 makes it a VerificationError
            _signer_infos(body)


if __name__ == "__main__":
    harness.main(one)
