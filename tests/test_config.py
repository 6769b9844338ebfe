"""Settings: one validated tree from defaults < file < environment < flags, and one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import REPO

from agent.errors import ConfigError
from agent.settings import (
    Settings,
    check_environment_names,
    deep_merge,
    environment_variable,
    load_settings,
    setting_paths,
)


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


@pytest.mark.parametrize("variable, hint", [
    ("EDGE_AGENT_TRANSPRT", "EDGE_AGENT_TRANSPORT"),  # top-level name
    ("EDGE_AGENT_MQQT__PORT", "EDGE_AGENT_MQTT__PORT"),  # section name
    ("EDGE_AGENT_MQTT_PORT", "EDGE_AGENT_MQTT__PORT"),  # one underscore where two belong
    ("EDGE_AGENT_SOURCE__PACEFPS", "EDGE_AGENT_SOURCE__PACE_FPS"),
    ("edge_agent_updates__downlaod__max_mb", "EDGE_AGENT_UPDATES__DOWNLOAD__MAX_MB"),
])
def test_an_environment_variable_that_names_no_setting_is_named(monkeypatch, variable, hint):
    """Before: pydantic-settings looked up only known names, so these were silently ignored."""
    monkeypatch.setenv(variable, "1")
    with pytest.raises(ConfigError, match=rf"environment variable {variable} names no setting \(did you mean {hint}\?\)"):
        load_settings()


def test_every_setting_and_section_has_its_environment_variable():
    variables = {environment_variable(path): "x" for path in setting_paths()}
    assert {"EDGE_AGENT_MQTT", "EDGE_AGENT_MQTT__PORT", "EDGE_AGENT_UPDATES__DOWNLOAD__MAX_MB"} <= set(variables)
    check_environment_names(variables)  # none refused
    check_environment_names({"edge_agent_mqtt__port": "1", "PATH": "/bin", "EDGE_AGENTS": "not ours"})


def test_a_section_as_json_in_one_variable_still_works(monkeypatch):
    monkeypatch.setenv("EDGE_AGENT_MQTT", '{"port": 1883}')
    assert load_settings().mqtt.port == 1883


def test_a_settings_file_that_is_not_utf8_is_one_line(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_bytes("thing_name: ok\nmqtt:\n  endpoint: caf\u00e9.example\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"agent.yaml: not UTF-8 text \(byte 0xe9 on line 3\); save it as UTF-8"):
        load_settings(config)


def test_a_utf8_settings_file_with_a_byte_order_mark_is_read(tmp_path):
    config = tmp_path / "agent.json"
    config.write_bytes(b"\xef\xbb\xbf" + json.dumps({"thing_name": "bom"}).encode())
    assert load_settings(config).thing_name == "bom"


@pytest.mark.parametrize("template, problem", [
    ("{prefix}/{thng}/inference", "unknown placeholder {thng}"),
    ("{prefix/{thing}/inference", "unexpected '{' in field name"),
    ("{prefix}/{thing}}/inference", "single '}' encountered"),
    ("{prefix}/{thing/inference", "expected '}' before end of string"),
    ("{prefix}/{thing!r}/inference", "unknown placeholder {thing!r}"),
])
def test_a_typo_in_a_topic_template_names_the_setting(monkeypatch, template, problem):
    """Before: a KeyError or ValueError traceback when the transport expanded the template."""
    monkeypatch.setenv("EDGE_AGENT_TOPICS__INFERENCE", template)
    with pytest.raises(ConfigError, match=re.escape(f"topics.inference: {problem}") + ".*placeholders are {prefix} and {thing}"):
        load_settings()


def test_topic_templates_may_double_braces_for_a_literal_one():
    assert Settings(topics={"metrics": "{prefix}/{thing}/{{raw}}"}).topics.metrics == "{prefix}/{thing}/{{raw}}"


@pytest.mark.parametrize("name, text, message", [
    # A parse error says where (before: YAML's first line of its message, without line or column).
    ("bad.yaml", "mqtt:\n  port: 1\n endpoint: [x\n", "not valid YAML at line 3, column 2: expected <block end>"),
    ("bad.yaml", "mqtt: [unclosed", "not valid YAML at line 1, column 16: expected ',' or ']'"),
    ("bad.yaml", 'thing_name: "a\x07"\n', "not valid YAML at line 1, column 15: character U+0007 is not allowed"),
    ("bad.json", '{"mqtt": {\n  "port": ,\n}}', "not valid JSON at line 2, column 11: Expecting value"),
    ("bad.json", "{", "not valid JSON at line 1, column 2"),
    ("bad.toml", "[mqtt]\nport = \n", "not valid TOML at line 2, column 8: Invalid value"),
    ("bad.ini", "[x]", "unknown format"),
    ("list.yaml", "- a\n- b\n", "expected a mapping"),
])
def test_unreadable_settings_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"--config {path}: {message}")):
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
