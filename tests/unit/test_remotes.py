"""broker.remotes: the admin's enable/disable choices and get-remotes' fwupd shape."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.config import Config, Paths, Remote
from broker.errors import ConfigError, NotFound
from broker.remotes import RemoteState, RemoteSwitches, enabled, remote_json

LVFS = Remote("lvfs", "https://cdn.fwupd.org/downloads/firmware.xml.zst")
ORG = Remote("corp", "https://fw.example.org/firmware.xml.zst", "https://fw.example.org/cabs")
CONFIG = Config(remotes=(LVFS, ORG))


def test_switches_persist_and_only_name_configured_remotes(tmp_path: Path) -> None:
    switches = RemoteSwitches(Paths(tmp_path))
    assert enabled(CONFIG, switches) == (LVFS, ORG)
    assert switches.set_enabled(CONFIG, "lvfs", False) is True
    assert switches.set_enabled(CONFIG, "lvfs", False) is False  # already so
    assert enabled(CONFIG, RemoteSwitches(Paths(tmp_path))) == (ORG,)
    assert switches.set_enabled(CONFIG, "lvfs", True) is True
    assert enabled(CONFIG, switches) == (LVFS, ORG)
    with pytest.raises(NotFound, match=r"no remote 'nope' \(configured: lvfs, corp\)"):
        switches.set_enabled(CONFIG, "nope", False)


@pytest.mark.parametrize("text", ["{", '{"disabled": "lvfs"}', '{"disabled": [1]}', "[]"])
def test_a_damaged_switch_file_is_an_error_not_all_enabled(tmp_path: Path, text: str) -> None:
    switches = RemoteSwitches(Paths(tmp_path))
    switches.file.parent.mkdir(parents=True)
    switches.file.write_text(text)
    with pytest.raises(ConfigError, match=r"remotes\.json"):
        enabled(CONFIG, switches)


def test_remote_json_has_fwupdmgrs_keys_and_types() -> None:
    signed = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    doc = remote_json(RemoteState(ORG, False, signed), 30 * 86400)
    assert doc == {
        "Id": "corp", "Kind": "download", "MetadataUri": ORG.metadata_url,
        "MetadataUriSig": ORG.metadata_url + ".jcat", "FirmwareBaseUri": ORG.firmware_base_uri,
        "Title": "corp", "Flags": 0, "Enabled": False, "ApprovalRequired": False,
        "AutomaticReports": False, "AutomaticSecurityReports": False, "Priority": 0,
        "Mtime": int(signed.timestamp()), "RefreshInterval": 30 * 86400,
    }  # fmt: skip
    assert remote_json(RemoteState(LVFS, True, None), 1)["Mtime"] == -1
