"""broker.config: the configuration file, qube names and the URLs dom0 hands out."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import (
    _URL_CHARS,
    LVFS_METADATA_SIGNERS,
    LVFS_PAYLOAD_ANCHORS,
    Config,
    Limits,
    Paths,
    Remote,
    check_qube_name,
    check_url,
)
from broker.errors import ConfigError


def _paths(tmp_path: Path, text: str | None) -> Paths:
    paths = Paths(tmp_path)
    if text is not None:
        paths.config_dir.mkdir(parents=True)
        paths.config_file.write_text(text, encoding="utf-8")
    return paths


def _load(tmp_path: Path, text: str) -> Config:
    return Config.load(_paths(tmp_path, text))


FULL = """
[qubes-fwupd]
updatevm = sys-whonix
usbvm = sys-usb2
metadata_max_age_days = 14

[remote lvfs]
metadata_url = https://cdn.fwupd.org/downloads/firmware.xml.zst

[remote mirror.local]
metadata_url = http://mirror.example:8080/lvfs/firmware.xml.xz
firmware_base_uri = https://mirror.example/cabs/
allow_plain_http = yes
metadata_signers =
    sha256:0A:0B:0C:0D:0E:0F:0A:0B:0C:0D:0E:0F:0A:0B:0C:0D:0E:0F:0A:0B:0C:0D:0E:0F:0A:0B:0C:0D:0E:0F:0A:0B
    O=Example,CN=Example metadata signer
    3fc6 b804 410e d084 0d8f  2f97 48a6 d80e 4538 bac2
payload_anchors = lvfs
"""


# --------------------------------------------------------------------------- load
def test_no_file_means_defaults(tmp_path: Path) -> None:
    config = Config.load(_paths(tmp_path, None))
    assert config == Config()
    assert config.updatevm == "sys-firewall"
    assert config.usbvm == "sys-usb"
    # fwupd's own lvfs.conf, FirmwareBaseURI included, and the LVFS's metadata signer
    assert config.remotes == (
        Remote(
            "lvfs",
            "https://cdn.fwupd.org/downloads/firmware.xml.zst",
            "https://fwupd.org/downloads",
            metadata_signers=LVFS_METADATA_SIGNERS,
            payload_anchors=LVFS_PAYLOAD_ANCHORS,
        ),
    )
    assert config.limits == Limits()
    assert config.metadata_max_age_days == 30


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert _load(tmp_path, "") == Config()


def test_full_file(tmp_path: Path) -> None:
    config = _load(tmp_path, FULL)
    assert config.updatevm == "sys-whonix"
    assert config.usbvm == "sys-usb2"
    assert config.metadata_max_age_days == 14
    assert config.remotes == (
        Remote(
            "lvfs",
            "https://cdn.fwupd.org/downloads/firmware.xml.zst",
            # a configured lvfs remote is pinned to the LVFS's own metadata signer
            metadata_signers=LVFS_METADATA_SIGNERS,
            payload_anchors=LVFS_PAYLOAD_ANCHORS,
        ),
        Remote(
            "mirror.local",
            "http://mirror.example:8080/lvfs/firmware.xml.xz",
            "https://mirror.example/cabs/",
            allow_plain_http=True,
            metadata_signers=frozenset(
                {
                    "0A0B0C0D0E0F" * 5 + "0A0B",
                    "O=Example,CN=Example metadata signer",
                    "3FC6B804410ED0840D8F2F9748A6D80E4538BAC2",
                }
            ),
            payload_anchors=LVFS_PAYLOAD_ANCHORS,
        ),
    )
    mirror = config.remote("mirror.local")
    assert mirror.metadata_name == "firmware.xml.xz"
    assert mirror.jcat_name == "firmware.xml.xz.jcat"
    with pytest.raises(ConfigError, match="no remote 'nope' configured"):
        config.remote("nope")


@pytest.mark.parametrize(
    "lines",
    [
        "metadata_url = http://mirror.example/firmware.xml.zst",
        "metadata_url = https://mirror.example/firmware.xml.zst\n"
        "firmware_base_uri = http://mirror.example/cabs",
    ],
)
def test_plain_http_needs_the_remote_to_opt_out_by_name(tmp_path: Path, lines: str) -> None:
    lines += f"\nmetadata_signers = {'B' * 64}\npayload_anchors = lvfs"
    with pytest.raises(ConfigError, match=r"is plain http \(set allow_plain_http = yes"):
        _load(tmp_path, f"[remote m]\n{lines}\n")
    config = _load(tmp_path / "opted-out", f"[remote m]\n{lines}\nallow_plain_http = yes\n")
    assert config.remote("m").allow_plain_http


def test_allow_plain_http_is_yes_or_no(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allow_plain_http must be yes or no"):
        _load(tmp_path, "[remote m]\nmetadata_url = https://m.example/f.xml.zst\n"
                        "allow_plain_http = true\n")  # fmt: skip


def test_a_remote_other_than_lvfs_must_name_its_metadata_signers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="remote m needs metadata_signers"):
        _load(tmp_path, "[remote m]\nmetadata_url = https://m.example/f.xml.zst\n")


@pytest.mark.parametrize(
    ("value", "cause"),
    [
        ("", "names no signer"),
        ("ABCD", "neither a fingerprint nor a subject"),
        ("A" * 63, "neither a fingerprint nor a subject"),
        ("CN=\u00e9vil", "neither a fingerprint nor a subject"),
    ],
)
def test_malformed_metadata_signers_are_refused(tmp_path: Path, value: str, cause: str) -> None:
    with pytest.raises(ConfigError, match=cause):
        _load(
            tmp_path,
            f"[remote m]\nmetadata_url = https://m.example/f.xml.zst\nmetadata_signers = {value}\n",
        )


def test_other_sections_are_ignored(tmp_path: Path) -> None:
    config = _load(tmp_path, "[something else]\nupdatevm = 1bad\n")
    assert config == Config()


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_usbvm_means_none(tmp_path: Path, value: str) -> None:
    config = _load(tmp_path, f"[qubes-fwupd]\nusbvm ={value}\n")
    assert config.usbvm is None
    assert config.updatevm == "sys-firewall"


@pytest.mark.parametrize("key", ["updatevm", "usbvm"])
@pytest.mark.parametrize(
    "name",
    ["1bad", "-bad", "bad-", "bad.", "a" * 32, "sys/usb", "sys usb", "dom0;reboot", "s\u00fcs"],
)
def test_invalid_qube_names_are_refused(tmp_path: Path, key: str, name: str) -> None:
    with pytest.raises(ConfigError, match=f"{key}: .* is not a valid qube name"):
        _load(tmp_path, f"[qubes-fwupd]\n{key} = {name}\n")


@pytest.mark.parametrize("name", ["sys-usb", "a", "a" * 31, "Work_VM.2", "disp1234"])
def test_valid_qube_names(name: str) -> None:
    assert check_qube_name(name, "x") == name


@pytest.mark.parametrize(
    "url",
    [
        "ftp://x/firmware.xml.zst",
        "https://user:pw@host/x",
        "https://user@host/x",
        "https://host/x#frag",
        "https://host/x y",
        "https://host/x\ty",
        "https://host/x\x7f",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "https:///no-host",
        "//host/x",
        "host/x",
        "",
    ],
)
def test_bad_metadata_urls_are_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match="remote lvfs metadata_url"):
        _load(tmp_path, f"[remote lvfs]\nmetadata_url = {url}\n")


def test_missing_metadata_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="remote lvfs metadata_url"):
        _load(tmp_path, "[remote lvfs]\nfirmware_base_uri = https://m/\n")


def test_bad_firmware_base_uri_is_refused(tmp_path: Path) -> None:
    text = "[remote lvfs]\nmetadata_url = https://h/f.xml.zst\nfirmware_base_uri = file:///tmp\n"
    with pytest.raises(ConfigError, match="remote lvfs firmware_base_uri"):
        _load(tmp_path, text)


@pytest.mark.parametrize("rid", ["LVFS", "../x", "-x", "x/y", "a" * 65, "l v", ""])
def test_invalid_remote_ids_are_refused(tmp_path: Path, rid: str) -> None:
    with pytest.raises(ConfigError, match=r"remote id .* is not valid"):
        _load(tmp_path, f"[remote {rid}]\nmetadata_url = https://h/f.xml.zst\n")


@pytest.mark.parametrize("value", ["ten", "1.5", ""])
def test_invalid_max_age_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="metadata_max_age_days must be a whole number"):
        _load(tmp_path, f"[qubes-fwupd]\nmetadata_max_age_days = {value}\n")


@pytest.mark.parametrize(
    "text",
    [
        "updatevm = x\n",  # no section header
        "[qubes-fwupd]\n[qubes-fwupd]\n",  # duplicate section
        "[qubes-fwupd]\nupdatevm = a\nupdatevm = b\n",  # duplicate option
    ],
)
def test_unparsable_file_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=r"qubes-fwupd\.conf"):
        _load(tmp_path, text)


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    paths = _paths(tmp_path, None)
    paths.config_dir.mkdir(parents=True)
    paths.config_file.write_bytes(b"[qubes-fwupd]\nupdatevm = \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"qubes-fwupd\.conf"):
        Config.load(paths)


# --------------------------------------------------------------------------- check_url
@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.fwupd.org/downloads/firmware.xml.zst",
        "http://127.0.0.1:8080/firmware.xml.gz",
        "https://[::1]/x",
        "https://host/path?query=1",
    ],
)
def test_check_url_accepts(url: str) -> None:
    assert check_url(url, "what") == url


def test_check_url_names_what_and_why() -> None:
    with pytest.raises(ConfigError, match=r"release 1\.0 location: .* not an http"):
        check_url("ftp://x/y", "release 1.0 location")
    with pytest.raises(ConfigError, match=r"thing: .* credentials or a fragment"):
        check_url("https://u:p@h/x", "thing")
    with pytest.raises(ConfigError, match="thing: URL contains spaces, control or non-ASCII"):
        check_url("https://h/a b", "thing")


def test_check_url_refuses_a_broken_ipv6_host(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="remote lvfs metadata_url"):
        _load(tmp_path, "[remote lvfs]\nmetadata_url = https://[::1/firmware.xml.zst\n")


@pytest.mark.parametrize("url", ["https://h/a\x9b2Jb", "https://h/a\x85b"])
def test_check_url_refuses_c1_controls(url: str) -> None:
    with pytest.raises(ConfigError, match="control or non-ASCII characters"):
        check_url(url, "thing")


# --------------------------------------------------------------------------- Remote
def test_remote_names() -> None:
    r = Remote("lvfs", "https://cdn.fwupd.org/downloads/firmware.xml.zst/")
    assert r.metadata_name == "firmware.xml.zst"
    assert r.jcat_name == "firmware.xml.zst.jcat"
    assert r.firmware_base_uri is None


def test_paths_are_rooted(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    for p in (
        paths.config_file,
        paths.sessions_dir,
        paths.metadata_state_file,
        paths.metadata_dir,
        paths.cabs_dir,
        paths.untrusted_dir,
        paths.log_file,
        *paths.pki_firmware_dirs,
        *paths.pki_metadata_dirs,
    ):
        assert p.is_relative_to(tmp_path)
    # the untrusted dir shares the cache's filesystem (atomic rename into the cache)
    assert paths.untrusted_dir.parent == paths.metadata_dir.parent == paths.cabs_dir.parent


def test_paths_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUBES_FWUPD_ROOT", str(tmp_path))
    assert Paths.from_env().root == tmp_path
    monkeypatch.delenv("QUBES_FWUPD_ROOT")
    assert Paths.from_env().root == Path("/")


def test_signature_kinds_default_to_pkcs7_and_gpg(tmp_path: Path) -> None:
    config = _load(tmp_path, "[qubes-fwupd]\nupdatevm = sys-whonix\n")
    assert config.trust.accepted == frozenset({"pkcs7", "gpg"})
    assert config.trust.require_sha256


def test_signature_kinds_can_be_narrowed(tmp_path: Path) -> None:
    config = _load(tmp_path, "[qubes-fwupd]\nsignature_kinds = pkcs7\n")
    assert config.trust.accepted == frozenset({"pkcs7"})


@pytest.mark.parametrize("value", ["", "sha1", "pkcs7 md5", "none"])
def test_signature_kinds_refuses_unknown_kinds(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="signature_kinds must name"):
        _load(tmp_path, f"[qubes-fwupd]\nsignature_kinds = {value}\n")


@pytest.mark.parametrize(
    ("text", "said"),
    [("[main\nupdatevm = x\n",
      "line 1: no [section] before it (the file starts with [qubes-fwupd])"),
     ("[qubes-fwupd]\nupdatevm\n", "line 2: not KEY = VALUE"),
     ("[qubes-fwupd]\na = 1\na = 2\n", "line 3: key 'a' in [qubes-fwupd] given twice"),
     ("[qubes-fwupd]\n[qubes-fwupd]\n", "line 2: section [qubes-fwupd] given twice")],
)  # fmt: skip
def test_a_config_that_does_not_parse_names_the_line_without_python_reprs(
    tmp_path: Path, text: str, said: str
) -> None:
    paths = Paths(tmp_path)
    paths.config_file.parent.mkdir(parents=True)
    paths.config_file.write_text(text)
    with pytest.raises(ConfigError) as e:
        Config.load(paths)
    assert str(e.value) == f"{paths.config_file}: {said}"


# --------------------------------------------------------------------------- per-remote trust
CORP = (
    "[remote corp]\nmetadata_url = https://fw.corp.example/firmware.xml.zst\n"
    f"metadata_signers = {'C' * 64}\n"
)


def test_a_remote_other_than_lvfs_must_name_its_payload_anchors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="remote corp needs payload_anchors"):
        _load(tmp_path, CORP)


def test_payload_anchors_name_files_and_lvfs_stands_for_the_lvfs_own(tmp_path: Path) -> None:
    config = _load(tmp_path, CORP + "payload_anchors = corp-CA.pem, lvfs\n"
                   "payload_signers = CN=Corp firmware signer\n"
                   "updatevm = sys-corp-vpn\n")  # fmt: skip
    corp = config.remote("corp")
    assert corp.payload_anchors == ("corp-CA.pem", *LVFS_PAYLOAD_ANCHORS)
    assert corp.payload_signers == frozenset({"CN=Corp firmware signer"})
    assert corp.updatevm == "sys-corp-vpn"
    # the built-in lvfs: the LVFS's anchors, anyone under them (vendors' certificates)
    assert Config().remote("lvfs").payload_anchors == LVFS_PAYLOAD_ANCHORS
    assert Config().remote("lvfs").payload_signers is None


@pytest.mark.parametrize(
    ("value", "cause"),
    [
        ("", "names no trust anchor"),
        ("../etc/shadow", "not a file name in /etc/pki/fwupd"),
        ("/etc/pki/fwupd/corp-CA.pem", "not a file name"),
        ("corp-CA.crt", "not a file name"),
        (".pem", "not a file name"),
    ],
)
def test_malformed_payload_anchors_are_refused(tmp_path: Path, value: str, cause: str) -> None:
    with pytest.raises(ConfigError, match=f"remote corp payload_anchors.*{cause}"):
        _load(tmp_path, CORP + f"payload_anchors = {value}\n")


def test_a_remotes_updatevm_is_a_qube_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="remote corp updatevm"):
        _load(tmp_path, CORP + "payload_anchors = lvfs\nupdatevm = ../dom0\n")


def test_payload_trust_is_the_remotes_anchors_only(tmp_path: Path) -> None:
    store = tmp_path / "etc/pki/fwupd"
    store.mkdir(parents=True)
    for name in ("LVFS-CA.pem", "GPG-KEY-Linux-Vendor-Firmware-Service", "corp-CA.pem",
                 "GPG-KEY-corp"):  # fmt: skip
        (store / name).write_text("x")
    config = _load(tmp_path, CORP + "payload_anchors = corp-CA.pem GPG-KEY-corp\n"
                   "payload_signers = CN=Corp firmware signer\n")  # fmt: skip
    anchors, policy = config.payload_trust("corp", (store,))
    assert anchors.ca_files == (store / "corp-CA.pem",)
    assert anchors.gpg_key_files == (store / "GPG-KEY-corp",)
    assert policy.signers == frozenset({"CN=Corp firmware signer"})
    assert policy.accepted == config.trust.accepted
    anchors, policy = Config().payload_trust("lvfs", (store,))
    assert anchors.ca_files == (store / "LVFS-CA.pem",)
    assert anchors.gpg_key_files == (store / "GPG-KEY-Linux-Vendor-Firmware-Service",)
    assert policy.signers is None
    # anchors named but none present: the admin's mistake, said as such
    (store / "corp-CA.pem").unlink()
    (store / "GPG-KEY-corp").unlink()
    with pytest.raises(ConfigError, match="none of its payload_anchors is in"):
        config.payload_trust("corp", (store,))


# --------------------------------------------------------------------------- fwupd's remotes.d
LVFS_CONF = """[fwupd Remote]

# this remote provides metadata and firmware marked as 'stable' from the LVFS
Enabled=true
Title=Linux Vendor Firmware Service
MetadataURI={uri}
ReportURI=https://fwupd.org/lvfs/firmware/report
FirmwareBaseURI={base}
ApprovalRequired=false
"""


def _fwupd_remote(tmp_path: Path, rid: str, uri: str, base: str = "") -> None:
    d = Paths(tmp_path).fwupd_remotes_dir
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{rid}.conf").write_text(LVFS_CONF.format(uri=uri, base=base))


def test_the_builtin_lvfs_takes_the_urls_dom0s_fwupd_has_for_it(tmp_path: Path) -> None:
    _fwupd_remote(tmp_path, "lvfs", "https://lvfs-mirror.example/firmware.xml.zst",
                  "https://lvfs-mirror.example/cabs")  # fmt: skip
    for config in (Config.load(Paths(tmp_path)), _load(tmp_path, "[qubes-fwupd]\n")):
        lvfs = config.remote("lvfs")
        assert lvfs.metadata_url == "https://lvfs-mirror.example/firmware.xml.zst"
        assert lvfs.firmware_base_uri == "https://lvfs-mirror.example/cabs"
        # its trust is ours: fwupd's file names URLs, never who signs
        assert lvfs.metadata_signers == LVFS_METADATA_SIGNERS
        assert lvfs.payload_anchors == LVFS_PAYLOAD_ANCHORS


def test_fwupds_shipped_lvfs_conf_means_the_builtin_remote(tmp_path: Path) -> None:
    _fwupd_remote(tmp_path, "lvfs", "https://cdn.fwupd.org/downloads/firmware.xml.zst",
                  "https://fwupd.org/downloads")  # fmt: skip
    assert Config.load(Paths(tmp_path)) == Config()


def test_a_section_without_urls_takes_fwupds_and_ours_win(tmp_path: Path) -> None:
    _fwupd_remote(tmp_path, "corp", "https://fw.corp.example/firmware.xml.zst",
                  "https://fw.corp.example/cabs")  # fmt: skip
    conf = f"[remote corp]\nmetadata_signers = {'C' * 64}\npayload_anchors = corp-CA.pem\n"
    corp = _load(tmp_path, conf).remote("corp")
    assert (corp.metadata_url, corp.firmware_base_uri) == (
        "https://fw.corp.example/firmware.xml.zst", "https://fw.corp.example/cabs")
    ours = _load(tmp_path / "ours", conf + "metadata_url = https://ours.example/f.xml.zst\n")
    assert ours.remote("corp").metadata_url == "https://ours.example/f.xml.zst"
    assert ours.remote("corp").firmware_base_uri is None


def test_a_fwupd_remote_is_checked_as_ours_are(tmp_path: Path) -> None:
    _fwupd_remote(tmp_path, "lvfs", "file:///usr/share/fwupd/remotes.d/vendor/firmware")
    with pytest.raises(ConfigError, match=r"remote lvfs: MetadataURI in .*remotes.d/lvfs.conf"):
        Config.load(Paths(tmp_path))
    (Paths(tmp_path).fwupd_remotes_dir / "lvfs.conf").write_text("not ini\n")
    with pytest.raises(ConfigError, match=r"lvfs.conf: line 1: no \[section\]"):
        Config.load(Paths(tmp_path))
    (Paths(tmp_path).fwupd_remotes_dir / "lvfs.conf").write_text("[fwupd Remote]\nEnabled=true\n")
    assert Config.load(Paths(tmp_path)) == Config()  # no MetadataURI: nothing taken


def test_heads_components_are_component_prefixes(tmp_path: Path) -> None:
    base = CORP + "payload_anchors = lvfs\n"
    assert _load(tmp_path, base).remote("corp").heads_components == ()
    config = _load(tmp_path / "a", base + "heads_components = org.Corp.heads com.3mdeb.heads\n")
    assert config.remote("corp").heads_components == ("org.corp.heads", "com.3mdeb.heads")
    for i, bad in enumerate(("heads", "org.corp.", "org..heads", "org.corp/heads", "*.heads")):
        with pytest.raises(ConfigError, match="is not a component id prefix"):
            _load(tmp_path / f"bad{i}", base + f"heads_components = {bad}\n")


def test_check_urls_character_rule_is_the_one_it_replaced() -> None:
    """check_url's one-regex character test (_URL_CHARS) passes exactly what the
    per-character rule it replaced passed (ASCII, none below 0x21, no 0x7F), for every
    code point; the LVFS-scale catalog (tests/integration/test_lvfs_scale.py) runs
    check_url over real-shaped locations."""
    for cp in range(0x110000):
        c = f"a{chr(cp)}b"
        old = c.isascii() and not any(ord(x) < 0x21 or ord(x) == 0x7F for x in c)
        assert (_URL_CHARS.fullmatch(c) is not None) == old, hex(cp)
    with pytest.raises(ConfigError, match="spaces, control or non-ASCII"):
        check_url("https://fwupd.org/downloads/a\u00e9.cab", "x")


def test_download_limits_are_read_from_the_main_section(tmp_path: Path) -> None:
    limits = _load(tmp_path / "set", "[qubes-fwupd]\ntransfer_seconds = 1800\n"
                   "min_rate_bytes_per_s = 256\nstall_seconds = 2.5\n").limits  # fmt: skip
    assert (limits.transfer_seconds, limits.min_rate_bytes_per_s, limits.stall_seconds) == (
        1800.0, 256, 2.5,
    )  # fmt: skip
    assert _load(tmp_path / "unset", "[qubes-fwupd]\n").limits == Limits()


@pytest.mark.parametrize(
    ("line", "cause"),
    [
        ("transfer_seconds = 0", "transfer_seconds must be a number from 1 to 86400"),
        ("transfer_seconds = nan", "transfer_seconds must be a number from 1 to 86400"),
        ("transfer_seconds = inf", "transfer_seconds must be a number from 1 to 86400"),
        ("transfer_seconds = soon", "transfer_seconds must be a number from 1 to 86400"),
        ("min_rate_bytes_per_s = 1.5", "min_rate_bytes_per_s must be a whole number from 1 to"),
        ("min_rate_bytes_per_s = -1", "min_rate_bytes_per_s must be a whole number from 1 to"),
        ("stall_seconds = 7200", "stall_seconds must be a number from 1 to 3600"),
    ],
)
def test_bad_download_limits_are_refused(tmp_path: Path, line: str, cause: str) -> None:
    with pytest.raises(ConfigError, match=cause):
        _load(tmp_path, f"[qubes-fwupd]\n{line}\n")
