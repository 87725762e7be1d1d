"""Secrets from ``<VAR>_FILE`` and systemd credentials; the journal in ``$STATE_DIRECTORY``."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.api.auth import Principal, Role, TokenConfigError, TokenStore
from controller.config import ApiConfig, ConfigError, SecretError, env_secret, load_site
from tests.sites import write_small_site

VARS = (
    "FLOORHAND_MQTT_USERNAME",
    "FLOORHAND_MQTT_PASSWORD",
    "FLOORHAND_MQTT_PASSWORD_FILE",
    "CREDENTIALS_DIRECTORY",
    "STATE_DIRECTORY",
    "FLOORHAND_JOURNAL",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in VARS:
        monkeypatch.delenv(var, raising=False)


def test_the_variable_then_its_file_then_the_credentials_directory(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "PW").write_text("from-systemd")
    assert env_secret("PW", {"PW": "plain", "PW_FILE": str(secret)}) == "plain"
    assert env_secret("PW", {"PW_FILE": str(secret), "CREDENTIALS_DIRECTORY": str(creds)}) == (
        "s3cret"
    )
    assert env_secret("PW", {"CREDENTIALS_DIRECTORY": str(creds)}) == "from-systemd"
    assert env_secret("OTHER", {"CREDENTIALS_DIRECTORY": str(creds)}) is None
    assert env_secret(None, {"PW": "x"}) is None
    with pytest.raises(SecretError, match="PW: cannot read the secret file"):
        env_secret("PW", {"PW_FILE": str(tmp_path / "missing")})


def test_mqtt_credentials_from_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = load_site(write_small_site(tmp_path, mqtt_port=1883))
    assert site.mqtt.credentials() == (None, None)
    secret = tmp_path / "mqtt-password"
    secret.write_text("pw-from-file\n")
    monkeypatch.setenv("FLOORHAND_MQTT_USERNAME", "floorhand")
    monkeypatch.setenv("FLOORHAND_MQTT_PASSWORD_FILE", str(secret))
    assert site.mqtt.credentials() == ("floorhand", "pw-from-file")


def test_an_unreadable_secret_file_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_small_site(tmp_path, mqtt_port=1883)
    monkeypatch.setenv("FLOORHAND_MQTT_PASSWORD_FILE", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"mqtt\.password_env: FLOORHAND_MQTT_PASSWORD"):
        load_site(path)


def test_a_relative_journal_path_lives_in_the_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    site_file = write_small_site(tmp_path, mqtt_port=1883)
    lines = site_file.read_text().splitlines()
    site_file.write_text("\n".join(x for x in lines if "journal.sqlite" not in x) + "\n")
    monkeypatch.setenv("STATE_DIRECTORY", f"{state}:{tmp_path / 'second'}")
    assert load_site(site_file).journal.path == state / "journal.sqlite"  # no path in the file
    monkeypatch.setenv("FLOORHAND_JOURNAL", "data/j.sqlite")
    assert load_site(site_file).journal.path == state / "data" / "j.sqlite"
    monkeypatch.setenv("FLOORHAND_JOURNAL", str(tmp_path / "abs.sqlite"))
    assert load_site(site_file).journal.path == tmp_path / "abs.sqlite"  # absolute: as given
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("FLOORHAND_JOURNAL", "data/j.sqlite")
    assert load_site(site_file).journal.path == Path("data/j.sqlite")  # the working directory


def test_api_tokens_from_files_and_the_credentials_directory(tmp_path: Path) -> None:
    """``FLOORHAND_TOKEN_<NAME>`` also from ``<VAR>_FILE`` and from a systemd credential."""
    api = ApiConfig()
    token_file = tmp_path / "ops-token"
    token_file.write_text("supervisor:ops-token-0123456789abcdef\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "FLOORHAND_TOKEN_LINE1").write_text("floor:line1-token-0123456789abcdef")
    (creds / "unrelated").write_text("x")
    environ = {
        "FLOORHAND_TOKEN_OPS_FILE": str(token_file),
        "FLOORHAND_TOKEN_ENG": "engineer:eng-token-0123456789abcdef",
        "CREDENTIALS_DIRECTORY": str(creds),
    }
    store = TokenStore.from_config(api, environ)
    assert store.lookup("ops-token-0123456789abcdef") == Principal("ops", Role.SUPERVISOR)
    assert store.lookup("line1-token-0123456789abcdef") == Principal("line1", Role.FLOOR)
    assert store.lookup("eng-token-0123456789abcdef") == Principal("eng", Role.ENGINEER)
    assert len(store.entries) == 3
    with pytest.raises(TokenConfigError, match="FLOORHAND_TOKEN_OPS: cannot read"):
        TokenStore.from_config(api, {"FLOORHAND_TOKEN_OPS_FILE": str(tmp_path / "missing")})
    token_file.write_text("no-role-here")
    with pytest.raises(TokenConfigError, match="expected <role>:<token>"):
        TokenStore.from_config(api, {"FLOORHAND_TOKEN_OPS_FILE": str(token_file)})
