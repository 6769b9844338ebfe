"""The CloudFormation template as data, and its intrinsic functions resolved: for the template's tests and for
the fleet provisioning stand-in, which answers RegisterThing with the template's own provisioning template."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from aws_stand_in import ACCOUNT, REGION
from conftest import REPO

TEMPLATE = REPO / "deploy" / "cloudformation" / "edge-agent.yaml"


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    """The template as plain JSON data, short-form intrinsics (!Sub, !GetAtt) in their long form."""
    from cfnlint.decode import decode_str

    template, problems = decode_str(path.read_text())
    assert not problems, problems
    return json.loads(json.dumps(template))


SUB = re.compile(r"\$\{([^}!][^}]*)\}")


def substitute(text: str, value) -> str:
    return SUB.sub(lambda m: value(m.group(1)), text).replace("${!", "${")


class Resolver:
    """Ref, Fn::GetAtt and Fn::Sub against known values: parameter defaults, pseudo parameters, and what a test adds."""

    def __init__(self, template: dict[str, Any], stack: str):
        self.values: dict[str, str] = {name: str(p.get("Default")) for name, p in template["Parameters"].items()}
        self.values.update({"AWS::Region": REGION, "AWS::AccountId": ACCOUNT, "AWS::Partition": "aws", "AWS::StackName": stack})
        self.attributes: dict[str, str] = {}

    def __call__(self, node):
        if isinstance(node, list):
            return [self(item) for item in node]
        if not isinstance(node, dict):
            return node
        if node.keys() == {"Ref"}:
            return self.values[node["Ref"]]
        if node.keys() == {"Fn::GetAtt"}:
            return self.attributes[".".join(node["Fn::GetAtt"])]
        if node.keys() == {"Fn::Sub"}:
            text, variables = (node["Fn::Sub"], {}) if isinstance(node["Fn::Sub"], str) else node["Fn::Sub"]
            local = {name: self(value) for name, value in variables.items()}
            return substitute(text, lambda name: local.get(name) or self.values.get(name) or self.attributes[name])
        return {key: self(value) for key, value in node.items()}


def provisioning_template(stack: str = "edge") -> tuple[str, dict[str, Any]]:
    """(template name, body) of the stack's fleet provisioning template, as IoT Core would hold it."""
    template = load_template()
    resolve = Resolver(template, stack)
    resolve.values.update({"DevicePolicy": f"{stack}-device", "CaptureRoleAlias": f"{stack}-captures"})
    properties = template["Resources"]["ProvisioningTemplate"]["Properties"]
    return resolve(properties["TemplateName"]), json.loads(resolve(properties["TemplateBody"]))
