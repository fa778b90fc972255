"""Settings: environment beats the TOML file, bad values are one clear line, and the README lists them all."""

from __future__ import annotations

from pathlib import Path

import pytest

from persona.settings import Settings, load_settings
from recsys.errors import PersonaError


def test_environment_beats_the_file_and_the_file_beats_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "persona.toml"
    cfg.write_text('[persona]\napi_port = 9001\nkafka_topic = "from-file"\n')
    monkeypatch.setenv("PERSONA_KAFKA_TOPIC", "from-env")
    s = load_settings(cfg)
    assert s.api_port == 9001
    assert s.kafka_topic == "from-env"
    assert s.kafka_group == "persona-consumer"


def test_default_store_is_sqlite_under_the_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PERSONA_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("PERSONA_DATABASE_URL", raising=False)
    assert load_settings().resolved_database_url == f"sqlite:///{tmp_path.as_posix()}/persona.db"


@pytest.mark.parametrize(
    ("env", "value", "needle"),
    [("PERSONA_API_PORT", "eighty", "api_port"), ("PERSONA_UNKNOWN_ITEM_POLICY", "explode", "unknown_item_policy")],
)
def test_a_bad_value_names_the_setting(monkeypatch: pytest.MonkeyPatch, env: str, value: str, needle: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(PersonaError, match=needle):
        load_settings()


def test_missing_or_broken_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PersonaError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("api_port = = 3\n")
    with pytest.raises(PersonaError, match="not valid TOML"):
        load_settings(broken)


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [f"PERSONA_{name.upper()}" for name in Settings.model_fields if f"PERSONA_{name.upper()}" not in readme]
    assert not missing, f"README configuration table lacks {missing}"
