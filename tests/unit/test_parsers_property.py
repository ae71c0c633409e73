"""Property tests for the parsers not covered beside their modules: whatever bytes arrive,
only the project's own errors come out (never a crash, a hang or a stray exception)."""

from __future__ import annotations

import gzip
import lzma
import os
import tempfile
from pathlib import Path

import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.config import Limits, Remote
from broker.errors import BrokerError
from broker.jcat import BlobKind, JcatBlob, JcatItem
from broker.metadata import open_catalog, parse_catalog
from broker.session import DownloadRequest
from broker.signatures import TrustStore, verify_file
from tests.properties import assert_user_message, expect_only_our_errors

REMOTE = Remote("lvfs", "https://cdn.example/firmware.xml.zst")
SMALL = Limits(metadata_xml_max_bytes=1 << 20)
COMPRESS = {
    "firmware.xml.zst": lambda b: zstandard.ZstdCompressor().compress(b),
    "firmware.xml.gz": gzip.compress,
    "firmware.xml.xz": lzma.compress,
    "firmware.xml": lambda b: b,
}
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

_xmlish = st.lists(
    st.sampled_from(
        [b"<components>", b"</components>", b"<component>", b"</component>", b"<id>x</id>",
         b"<releases>", b"</releases>", b'<release version="1.0">', b"</release>",
         b"<location>https://h/f.cab</location>", b"<location>file:///etc/passwd</location>",
         b'<checksum type="sha256" target="container">', b"</checksum>", b"0" * 64,
         b'<size type="download">', b"</size>", b"-1", b"12", b"<!DOCTYPE a>", b"&e;",
         b"<![CDATA[x]]>", b"<?pi x?>", b"<!-- c -->", b"\x00", b"\xff", b"<", b">"]
    ),
    max_size=40,
).map(b"".join)  # fmt: skip


def _fd(data: bytes) -> int:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    os.write(fd, data)
    return fd


def _parse(name: str, raw: bytes) -> None:
    fd = _fd(raw)
    try:
        with open_catalog(fd, name, SMALL) as stream:
            parse_catalog(stream, REMOTE, Limits())
    except BrokerError as e:
        assert_user_message(e)
    finally:
        os.close(fd)


@PROPERTY
@given(name=st.sampled_from(sorted(COMPRESS)), data=st.binary(max_size=2048))
def test_catalog_from_arbitrary_bytes_raises_only_our_errors(name: str, data: bytes) -> None:
    _parse(name, data)


@PROPERTY
@given(name=st.sampled_from(sorted(COMPRESS)), doc=_xmlish)
def test_catalog_from_xmlish_documents_raises_only_our_errors(name: str, doc: bytes) -> None:
    _parse(name, COMPRESS[name](doc))


@PROPERTY
@given(st.binary(max_size=1024) | st.text(max_size=512).map(str.encode))
def test_download_request_raises_only_our_errors(line: bytes) -> None:
    with expect_only_our_errors():
        DownloadRequest.from_json(line)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    kind=st.sampled_from([BlobKind.PKCS7, BlobKind.GPG]),
    data=st.text(max_size=400)
    | st.binary(max_size=300).map(
        lambda b: "-----BEGIN PKCS7-----\n" + b.hex() + "\n-----END PKCS7-----\n"
    )
    | st.binary(max_size=300).map(
        lambda b: "-----BEGIN PGP SIGNATURE-----\n\n" + b.hex() + "\n-----END PGP SIGNATURE-----\n"
    ),
)
def test_signature_blobs_from_arbitrary_text_raise_only_our_errors(
    kind: BlobKind, data: str
) -> None:
    """openssl and gpg see these blobs; whatever they make of them, the answer is ours."""
    fd = _fd(b"content")
    sha = "ed7002b439e9ac845f22357d822bac1444730fbdb6016d3ec9432297b9ec9f73"
    item = JcatItem("f", (JcatBlob(int(BlobKind.SHA256), sha), JcatBlob(int(kind), data)))
    try:
        verify_file(fd, item, TrustStore.from_dirs([Path("/etc/pki/fwupd")]), name="f")
    except BrokerError as e:
        assert_user_message(e)
    finally:
        os.close(fd)
