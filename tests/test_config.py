"""Settings: one validated tree from defaults < file < environment < flags, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO

from agent.errors import ConfigError
from agent.settings import Settings, deep_merge, load_settings


def test_defaults_run_the_shipped_sample_on_the_shipped_model(shipped_bundle, sample_video):
    settings = load_settings()
    assert settings.model.bundle.resolve() == shipped_bundle  # agent/shipped/ links into models/ in a checkout
    assert Path(settings.source.spec).resolve() == sample_video
    assert settings.transport == "console"
    assert settings.mqtt.port == 8883


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "thing_name: from-file\nmqtt:\n  port: 1000\n  endpoint: file.example\n"),
    (".json", json.dumps({"thing_name": "from-file", "mqtt": {"port": 1000, "endpoint": "file.example"}})),
    (".toml", 'thing_name = "from-file"\n[mqtt]\nport = 1000\nendpoint = "file.example"\n'),
])
def test_file_then_environment_then_flags(tmp_path, monkeypatch, suffix, text):
    config = tmp_path / f"agent{suffix}"
    config.write_text(text)
    monkeypatch.setenv("EDGE_AGENT_MQTT__PORT", "2000")
    settings = load_settings(config, {"thing_name": "from-flag"})
    assert settings.thing_name == "from-flag"  # flag beats file
    assert settings.mqtt.port == 2000  # environment beats file
    assert settings.mqtt.endpoint == "file.example"  # file beats default


def test_unknown_key_is_named(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("mqtt:\n  prot: 8883\n")
    with pytest.raises(ConfigError, match=r"mqtt\.prot: unknown setting"):
        load_settings(config)


def test_wrong_type_names_key_and_value(monkeypatch):
    monkeypatch.setenv("EDGE_AGENT_MAX_FRAMES", "many")
    with pytest.raises(ConfigError, match=r"max_frames: .*integer.*'many'"):
        load_settings()


@pytest.mark.parametrize("name, text, message", [
    ("bad.yaml", "mqtt: [unclosed", "not valid YAML"),
    ("bad.json", "{", "not valid JSON"),
    ("bad.ini", "[x]", "unknown format"),
    ("list.yaml", "- a\n- b\n", "expected a mapping"),
])
def test_unreadable_settings_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(path)


def test_missing_settings_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        load_settings(tmp_path / "nope.yaml")


def test_deep_merge_keeps_siblings():
    assert deep_merge({"mqtt": {"port": 1, "endpoint": "a"}}, {"mqtt": {"port": 2}}) == {"mqtt": {"port": 2, "endpoint": "a"}}


def test_thing_name_rejects_topic_wildcards():
    with pytest.raises(ValueError):
        Settings(thing_name="a/#")


def test_readme_settings_table_is_current():
    """README's table is `edge-agent settings`; a new or changed setting without a README update fails here."""
    from agent.settings import settings_table

    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- settings:begin -->\n", 1)[1].split("<!-- settings:end -->", 1)[0]
    assert block == settings_table(), "run `edge-agent settings` and paste it into README.md"
