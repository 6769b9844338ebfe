"""The Greengrass recipes, gdk-config and deployment template: valid, consistent with each other and with
the agent's settings, and asking for no more than the agent needs."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import pytest
import tomllib
from conftest import REPO

from agent.cloud.nucleus import configuration_layer
from agent.settings import Settings, deep_merge, validate_settings
from agent.topics import Topics

GREENGRASS = REPO / "deploy" / "greengrass"
AGENT = GREENGRASS / "recipe.json"
MODEL = GREENGRASS / "model" / "recipe.json"
RECIPES = [AGENT, MODEL]
SCHEMA = json.loads((REPO / "tests" / "data" / "greengrass-recipe.schema.json").read_text())
# Recipe variables Greengrass defines (developer guide, "Recipe variables"); a component's own, or
# another component's when prefixed with that component's name (which must be a dependency).
OWN_VARIABLES = re.compile(r"^(artifacts:path|artifacts:decompressedPath|work:path|kernel:rootPath|iot:thingName|configuration:/[^{}]*)$")
OTHER_VARIABLES = re.compile(r"^(?P<component>[A-Za-z0-9._-]+):(artifacts:path|artifacts:decompressedPath|work:path|configuration:/[^{}]*)$")


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def lower_keys(value):
    """What GDK validates: every key lower-cased (recipe keys are case-insensitive)."""
    if isinstance(value, dict):
        return {key.lower(): lower_keys(item) for key, item in value.items()}
    if isinstance(value, list):
        return [lower_keys(item) for item in value]
    return value


def build_script():
    spec = importlib.util.spec_from_file_location("greengrass_build", GREENGRASS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lifecycle_text(recipe: dict) -> str:
    return json.dumps([manifest.get("Lifecycle", {}) for manifest in recipe["Manifests"]])


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.parent.name)
def test_recipe_passes_the_gdk_schema(path):
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    errors = sorted(jsonschema.Draft7Validator(SCHEMA).iter_errors(lower_keys(load(path))), key=str)
    assert not errors, "; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_schema_check_catches_a_broken_recipe():
    broken = lower_keys({**load(AGENT), "ComponentVersion": 1, "Bogus": True})
    assert len(list(jsonschema.Draft7Validator(SCHEMA).iter_errors(broken))) >= 2


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.parent.name)
def test_every_recipe_variable_is_one_greengrass_defines(path):
    recipe = load(path)
    dependencies = set(recipe.get("ComponentDependencies", {}))
    for variable in re.findall(r"\{([^{}]+)\}", lifecycle_text(recipe)):
        other = OTHER_VARIABLES.match(variable)
        assert OWN_VARIABLES.match(variable) or (other and other["component"] in dependencies), f"{{{variable}}} is not a Greengrass recipe variable"
    resources = json.dumps(recipe.get("ComponentConfiguration", {}).get("DefaultConfiguration", {}).get("accessControl", {}))
    assert set(re.findall(r"\{([^{}]+)\}", resources)) <= {"iot:thingName"}


def test_access_control_names_only_the_components_own_topics():
    configuration = load(AGENT)["ComponentConfiguration"]["DefaultConfiguration"]
    assert set(configuration["accessControl"]) == {"aws.greengrass.ipc.mqttproxy"}
    topics = Topics.for_thing(Settings().topics, "{iot:thingName}")
    allowed = {"aws.greengrass#PublishToIoTCore": {topics.inference, topics.status, topics.metrics}, "aws.greengrass#SubscribeToIoTCore": {topics.commands}}
    granted: dict[str, set[str]] = {}
    for policy in configuration["accessControl"]["aws.greengrass.ipc.mqttproxy"].values():
        for operation in policy["operations"]:
            granted.setdefault(operation, set()).update(policy["resources"])
    assert granted == allowed


def test_default_configuration_holds_every_setting_under_its_own_name():
    configuration = load(AGENT)["ComponentConfiguration"]["DefaultConfiguration"]
    expected = build_script().default_configuration()
    assert {k: v for k, v in configuration.items() if k != "accessControl"} == expected, (
        "recipe.json's DefaultConfiguration is out of date with agent.settings; run: python deploy/greengrass/build.py recipe"
    )
    settings = validate_settings(deep_merge(Settings().model_dump(), configuration_layer(configuration)), origin="DefaultConfiguration")
    assert settings.transport == "greengrass" and settings.source.spec == "camera:0"


def test_agent_recipe_installs_a_venv_runs_the_agent_and_finds_the_model_component():
    agent, model = load(AGENT), load(MODEL)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert agent["ComponentDependencies"] == {model["ComponentName"]: {"VersionRequirement": f">={model['ComponentVersion']}", "DependencyType": "HARD"}}
    (manifest,) = agent["Manifests"]
    artifacts = {Path(a["Uri"]).name for a in manifest["Artifacts"]}
    assert artifacts == {f"edge_agent-{version}-py3-none-any.whl", "constraints.txt", "model-signing.pub"}
    install, run = manifest["Lifecycle"]["Install"]["Script"], manifest["Lifecycle"]["Run"]["Script"]
    assert "python3 -m venv {work:path}/venv" in install and "-c {artifacts:path}/constraints.txt" in install
    assert "sha256sum" in install and "exit 0" in install, "a reinstall of the same wheel must be skipped"
    bundle_dir = Path(build_script().BUNDLE_ZIP).stem
    assert run.startswith("exec {work:path}/venv/bin/python -m agent run --transport greengrass ")
    assert f"--model {{{model['ComponentName']}:artifacts:decompressedPath}}/{bundle_dir}" in run
    assert "RequiresPrivilege" not in json.dumps(agent) + json.dumps(model)


def test_model_component_version_is_the_shipped_model_version():
    """A new model version is a new version of the model component (edge-fleet model publish --via greengrass)."""
    manifest = json.loads((REPO / "models" / "mnist" / "bundle" / "manifest.json").read_text())
    assert load(MODEL)["ComponentVersion"] == manifest["version"]


def test_model_recipe_is_an_unarchived_zip_with_no_lifecycle():
    (manifest,) = load(MODEL)["Manifests"]
    (artifact,) = manifest["Artifacts"]
    assert "Lifecycle" not in manifest and "Lifecycle" not in load(MODEL)
    assert artifact["Unarchive"] == "ZIP" and Path(artifact["Uri"]).name == build_script().BUNDLE_ZIP


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.parent.name)
def test_gdk_config_matches_its_recipe(path):
    gdk = load(path.parent / "gdk-config.json")
    recipe = load(path)
    ((name, component),) = gdk["component"].items()
    assert name == recipe["ComponentName"] and component["version"] == recipe["ComponentVersion"]
    assert component["build"]["build_system"] == "custom" and "build.py" in " ".join(component["build"]["custom_build_command"])


def test_deployment_template_rolls_out_carefully_and_rolls_back():
    deployment = load(GREENGRASS / "deployment.json")
    for path in RECIPES:
        recipe = load(path)
        assert deployment["components"][recipe["ComponentName"]]["componentVersion"] == recipe["ComponentVersion"]
    policies = deployment["deploymentPolicies"]
    assert policies["failureHandlingPolicy"] == "ROLLBACK"
    assert policies["componentUpdatePolicy"]["action"] == "NOTIFY_COMPONENTS"
    job = deployment["iotJobConfiguration"]
    assert job["jobExecutionsRolloutConfig"]["exponentialRate"]["incrementFactor"] > 1
    assert {c["action"] for c in job["abortConfig"]["criteriaList"]} == {"CANCEL"}
    assert job["timeoutConfig"]["inProgressTimeoutInMinutes"] > 0
    merge = json.loads(deployment["components"][load(AGENT)["ComponentName"]]["configurationUpdate"]["merge"])
    validate_settings(deep_merge(Settings().model_dump(), configuration_layer(merge)), origin="deployment.json merge")
