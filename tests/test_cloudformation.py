"""The cloud side's CloudFormation template (deploy/cloudformation/edge-agent.yaml) and `edge-fleet cloud`.

1. cfn-lint: every resource's properties against CloudFormation's own resource schemas.
2. `edge-fleet cloud deploy` into moto's CloudFormation (server mode) with every resource whose type moto's
   CloudFormation implements; references to the others are stood in by placeholders there.
3. The resources whose type moto's CloudFormation lacks are made from the same template properties through
   their own service's API in moto (IoT thing group and topic rules, Firehose, Glue, Logs stream and metric
   filters, S3 bucket policy), so botocore checks each against the service model and moto keeps it; the
   provisioning template (no moto API either) is checked against the IoT API's request shape, and its body is
   what the provisioning stand-in (tests/identity_service.py) answers RegisterThing with.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.messages import InferenceResult
from aws_stand_in import ACCOUNT, REGION, aws, aws_env, client, moto_server  # noqa: F401 (fixtures)
from cfn_template import SUB, TEMPLATE, Resolver, load_template
from conftest import REPO, agent_env, one_line_error, run_cli

STACK = "edge"
# What moto 5.2.5's CloudFormation does not implement (a moto upgrade that adds one fails this test: move it).
NOT_IN_MOTO_CLOUDFORMATION = {
    "AWS::IoT::ThingGroup",
    "AWS::IoT::TopicRule",
    "AWS::IoT::ProvisioningTemplate",
    "AWS::KinesisFirehose::DeliveryStream",
    "AWS::Glue::Database",
    "AWS::Glue::Table",
    "AWS::Logs::LogStream",
    "AWS::Logs::MetricFilter",
    "AWS::S3::BucketPolicy",
}
# Resources whose Ref is a name given in the template (moto's Ref to the first two is broken; the others
# moto's CloudFormation does not make, so a Ref to them is their name, made through the API below).
NAME_PROPERTY = {
    "AWS::IoT::Policy": "PolicyName",
    "AWS::IoT::RoleAlias": "RoleAlias",
    "AWS::IoT::ThingGroup": "ThingGroupName",
    "AWS::IoT::ProvisioningTemplate": "TemplateName",
    "AWS::Logs::LogStream": "LogStreamName",
}


def moto_types() -> set[str]:
    from moto.cloudformation.parsing import get_model_map

    return set(get_model_map())


def fleet(endpoint: str, *args) -> subprocess.CompletedProcess:
    return run_cli(*args, "--endpoint-url", endpoint, env=agent_env(), program="agent.fleet")


# -- intrinsic functions: placeholders for moto's stack, real values for the API-made resources --------------

def without(template: dict[str, Any], dropped: set[str]) -> dict[str, Any]:
    """The template minus `dropped` resources, every reference to them a placeholder string."""

    def placeholder(name: str) -> str:
        return f"arn:aws:placeholder:{REGION}:{ACCOUNT}:{name.replace('.', '-')}"

    def scrub(node):
        if isinstance(node, list):
            return [scrub(item) for item in node]
        if not isinstance(node, dict):
            return node
        if node.keys() == {"Ref"} and node["Ref"] in dropped and template["Resources"][node["Ref"]]["Type"] not in NAME_PROPERTY:
            return placeholder(node["Ref"])
        if node.keys() == {"Fn::GetAtt"} and node["Fn::GetAtt"][0] in dropped:
            return placeholder(".".join(node["Fn::GetAtt"]))
        if node.keys() == {"Fn::Sub"}:
            text, variables = (node["Fn::Sub"], {}) if isinstance(node["Fn::Sub"], str) else node["Fn::Sub"]
            text = SUB.sub(lambda m: placeholder(m.group(1)) if m.group(1).split(".")[0] in dropped else m.group(0), text)
            return {"Fn::Sub": [text, scrub(variables)] if variables else text}
        return {key: scrub(value) for key, value in node.items()}

    def named(node):
        """moto answers Ref to an IoT policy or role alias with an object's repr, not its name: spell the name."""
        if isinstance(node, list):
            return [named(item) for item in node]
        if not isinstance(node, dict):
            return node
        if node.keys() == {"Ref"} and template["Resources"].get(node["Ref"], {}).get("Type") in NAME_PROPERTY:
            resource = template["Resources"][node["Ref"]]
            return resource["Properties"][NAME_PROPERTY[resource["Type"]]]
        return {key: named(value) for key, value in node.items()}

    kept = {name: resource for name, resource in template["Resources"].items() if name not in dropped}
    return named({**template, "Resources": scrub(kept), "Outputs": scrub(template["Outputs"])})


def camel(node):
    """CloudFormation's PascalCase property names as the IoT and Logs APIs spell them (camelCase)."""
    if isinstance(node, list):
        return [camel(item) for item in node]
    if isinstance(node, dict):
        return {key[0].lower() + key[1:]: camel(value) for key, value in node.items()}
    return node


# -- 1. cfn-lint ---------------------------------------------------------------------------------------------


def test_template_is_cfn_lint_clean():
    result = subprocess.run([str(Path(sys.executable).with_name("cfn-lint")), str(TEMPLATE)], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_device_policy_is_deploy_iot_policy_plus_the_capture_role_alias():
    template = load_template()
    resolve = Resolver(template, STACK)
    resolve.attributes["CaptureRoleAlias.RoleAliasArn"] = f"arn:aws:iot:{REGION}:{ACCOUNT}:rolealias/{STACK}-captures"
    statements = resolve(template["Resources"]["DevicePolicy"]["Properties"]["PolicyDocument"])["Statement"]
    expected = json.loads((REPO / "deploy" / "iot" / "policy.json").read_text().replace("arn:aws:iot:REGION:ACCOUNT_ID:", f"arn:aws:iot:{REGION}:{ACCOUNT}:"))
    capture = "iot:AssumeRoleWithCertificate"  # by hand (deploy/iot) the role alias is edge-capture; here the stack's
    assert [s for s in statements if s["Action"] != capture] == [s for s in expected["Statement"] if s["Action"] != capture]
    assert [s for s in statements if s["Action"] == capture] == [{
        "Sid": "CaptureCredentialsThroughTheRoleAlias",
        "Effect": "Allow",
        "Action": capture,
        "Resource": f"arn:aws:iot:{REGION}:{ACCOUNT}:rolealias/{STACK}-captures",
    }]


def hive_fields(type_text: str) -> dict | None:
    """The field names inside a Hive type (struct<...>, array<struct<...>>), nested; None for a plain type."""
    def parse(text: str, at: int) -> tuple[dict | None, int]:
        for opener in ("array<", "struct<"):
            if text.startswith(opener, at):
                at += len(opener)
                if opener == "array<":
                    inner, at = parse(text, at)
                    return inner, at + 1  # past '>'
                fields = {}
                while text[at] != ">":
                    name, at = text[at : text.index(":", at)], text.index(":", at) + 1
                    fields[name], at = parse(text, at)
                    at += text[at] == ","
                return fields, at + 1
        end = min(i for i in (text.find(",", at), text.find(">", at), len(text)) if i != -1)
        return None, end

    return parse(type_text, 0)[0]


def model_fields(model) -> dict:
    """A message model's field names, nested into the models its fields hold."""
    from pydantic import BaseModel

    def inner(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return model_fields(annotation)
        found = [fields for argument in getattr(annotation, "__args__", ()) if (fields := inner(argument)) is not None]
        return found[0] if found else None

    return {name: inner(field.annotation) for name, field in model.model_fields.items()}


def test_the_results_table_has_a_column_for_every_field_of_a_result():
    table = load_template()["Resources"]["ResultsTable"]["Properties"]["TableInput"]
    columns = {column["Name"]: hive_fields(column["Type"]) for column in table["StorageDescriptor"]["Columns"]}
    assert columns == model_fields(InferenceResult)  # names and order, nested structs included
    assert list(columns) == list(InferenceResult.model_fields)
    assert [key["Name"] for key in table["PartitionKeys"]] == ["date"]


def test_moto_lacks_exactly_the_types_listed():
    used = {resource["Type"] for resource in load_template()["Resources"].values()}
    assert used - moto_types() == NOT_IN_MOTO_CLOUDFORMATION


# -- 2 and 3. deployed ------------------------------------------------------------------------------------------


def deploy_into_moto(endpoint: str, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any], Resolver]:
    """The template in moto: the stack by `edge-fleet cloud deploy`, the rest through the service APIs."""
    template = load_template()
    dropped = {name for name, resource in template["Resources"].items() if resource["Type"] not in moto_types()}
    partial = tmp_path / "moto-supported.json"
    partial.write_text(json.dumps(without(template, dropped), indent=1))
    result = fleet(endpoint, "cloud", "deploy", "--stack", STACK, "--template", partial, "--fleet-indexing", "--poll", "0.2")
    assert result.returncode == 0, result.stderr
    deployed = json.loads(result.stdout)

    resolve = Resolver(template, STACK)
    cloudformation, iam = client(endpoint, "cloudformation"), client(endpoint, "iam")
    for resource in cloudformation.list_stack_resources(StackName=STACK)["StackResourceSummaries"]:
        name, kind = resource["LogicalResourceId"], resource["ResourceType"]
        # moto reports no physical id for IoT policies and role aliases: their names are in the template
        physical = resource["PhysicalResourceId"] or resolve(template["Resources"][name]["Properties"][NAME_PROPERTY[kind]])
        resolve.values[name] = physical
        if kind == "AWS::IAM::Role":
            resolve.attributes[f"{name}.Arn"] = iam.get_role(RoleName=physical)["Role"]["Arn"]
        elif kind == "AWS::S3::Bucket":
            resolve.attributes[f"{name}.Arn"] = f"arn:aws:s3:::{physical}"
        elif kind == "AWS::Logs::LogGroup":
            resolve.attributes[f"{name}.Arn"] = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{physical}:*"
        elif kind == "AWS::IoT::RoleAlias":
            resolve.attributes[f"{name}.RoleAliasArn"] = client(endpoint, "iot").describe_role_alias(roleAlias=physical)["roleAliasDescription"]["roleAliasArn"]
    for name in _in_dependency_order(template, dropped):
        _make_through_the_api(endpoint, name, template["Resources"][name], resolve)
    return template, deployed, resolve


def _in_dependency_order(template: dict[str, Any], names: set[str]) -> list[str]:
    text = {name: json.dumps(template["Resources"][name]) for name in names}
    ordered: list[str] = []
    while len(ordered) < len(names):
        for name in sorted(names - set(ordered)):
            needs = {other for other in names - {name} if re.search(rf'"{other}"|\$\{{{other}[}}.]', text[name])}
            if needs <= set(ordered):
                ordered.append(name)
    return ordered


def _make_through_the_api(endpoint: str, name: str, resource: dict[str, Any], resolve: Resolver) -> None:
    kind, properties = resource["Type"], resolve(resource["Properties"])
    if kind == "AWS::IoT::ThingGroup":
        client(endpoint, "iot").create_thing_group(**camel(properties))
        resolve.values[name] = properties["ThingGroupName"]
    elif kind == "AWS::IoT::TopicRule":
        client(endpoint, "iot").create_topic_rule(ruleName=f"{STACK}_{name}", topicRulePayload=camel(properties["TopicRulePayload"]))
    elif kind == "AWS::KinesisFirehose::DeliveryStream":
        stream = f"{STACK}-{name}"
        arn = client(endpoint, "firehose").create_delivery_stream(DeliveryStreamName=stream, **properties)["DeliveryStreamARN"]
        resolve.values[name], resolve.attributes[f"{name}.Arn"] = stream, arn
    elif kind == "AWS::Glue::Database":
        client(endpoint, "glue").create_database(**properties)
        resolve.values[name] = properties["DatabaseInput"]["Name"]
    elif kind == "AWS::Glue::Table":
        client(endpoint, "glue").create_table(**properties)
    elif kind == "AWS::Logs::LogStream":
        client(endpoint, "logs").create_log_stream(**camel(properties))
        resolve.values[name] = properties["LogStreamName"]
    elif kind == "AWS::Logs::MetricFilter":
        client(endpoint, "logs").put_metric_filter(filterName=name, **camel(properties))
    elif kind == "AWS::S3::BucketPolicy":
        client(endpoint, "s3").put_bucket_policy(Bucket=properties["Bucket"], Policy=json.dumps(properties["PolicyDocument"]))
    elif kind == "AWS::IoT::ProvisioningTemplate":
        from botocore.validate import validate_parameters

        iot = client(endpoint, "iot")
        request = {
            "templateName": properties["TemplateName"],
            "description": properties["Description"],
            "templateBody": properties["TemplateBody"],
            "enabled": properties["Enabled"],
            "provisioningRoleArn": properties["ProvisioningRoleArn"],
            "type": properties["TemplateType"],
        }
        validate_parameters(request, iot.meta.service_model.operation_model("CreateProvisioningTemplate").input_shape)
        resolve.values[name] = properties["TemplateName"]
        resolve.attributes["ProvisioningTemplateBody"] = properties["TemplateBody"]
    else:
        raise AssertionError(f"no API route for {kind}: add one")


def document(value) -> dict[str, Any]:
    """A policy document as AWS returns it (JSON text or, from boto3's IAM, a dict); moto's CloudFormation
    stores the documents it was given as the Python repr of the parsed template."""
    if isinstance(value, dict):
        return value
    return json.loads(value) if value.startswith('{"') else ast.literal_eval(value)


def policy_document(iot, name: str) -> dict[str, Any]:
    return document(iot.get_policy(policyName=name)["policyDocument"])


def test_deploy_makes_the_whole_cloud_side(aws, tmp_path):
    template, deployed, resolve = deploy_into_moto(aws, tmp_path)
    assert deployed["status"] == "CREATE_COMPLETE" and deployed["changed"]
    assert deployed["endpoint"].endswith(f"-ats.iot.{REGION}.amazonaws.com")
    assert deployed["credentials_endpoint"]
    # The outputs as AWS would print them; moto's stack printed those of the resources it made.
    outputs = {name: resolve(output["Value"]) for name, output in template["Outputs"].items()}
    printed = {name: value for name, value in deployed["outputs"].items() if "placeholder" not in value}
    assert printed == {name: outputs[name] for name in printed} and len(printed) == len(outputs) - 2  # ResultsStreamName, ResultsTable
    iot, iam, s3 = client(aws, "iot"), client(aws, "iam"), client(aws, "s3")

    # Devices: the policy, the capture role alias behind it, fleet indexing for `fleet status`.
    device_policy = policy_document(iot, outputs["DevicePolicyName"])
    assert device_policy["Statement"][0]["Resource"] == f"arn:aws:iot:{REGION}:{ACCOUNT}:client/${{iot:Connection.Thing.ThingName}}"
    alias = iot.describe_role_alias(roleAlias=outputs["CaptureRoleAlias"])["roleAliasDescription"]
    assert device_policy["Statement"][-1]["Resource"] == alias["roleAliasArn"]
    capture_role = alias["roleArn"].split("/")[-1]
    [capture_policy] = iam.list_role_policies(RoleName=capture_role)["PolicyNames"]
    statement = document(iam.get_role_policy(RoleName=capture_role, PolicyName=capture_policy)["PolicyDocument"])["Statement"]
    assert statement == [{"Effect": "Allow", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{outputs['BucketName']}/captures/${{credentials-iot:ThingName}}/*"}]
    trust = document(iam.get_role(RoleName=capture_role)["Role"]["AssumeRolePolicyDocument"])
    assert trust["Statement"][0]["Principal"] == {"Service": "credentials.iot.amazonaws.com"}
    assert iot.get_indexing_configuration()["thingIndexingConfiguration"]["thingIndexingMode"] == "REGISTRY_AND_SHADOW"

    # Bundles: the presign role reads models/ only; the bucket is encrypted (versioning and lifecycle: cfn-lint + below).
    presign = outputs["PresignRoleArn"].split("/")[-1]
    [read_models] = iam.list_role_policies(RoleName=presign)["PolicyNames"]
    assert document(iam.get_role_policy(RoleName=presign, PolicyName=read_models)["PolicyDocument"])["Statement"] == [
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{outputs['BucketName']}/models/*"}
    ]
    encryption = s3.get_bucket_encryption(Bucket=outputs["BucketName"])["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert encryption["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert json.loads(s3.get_bucket_policy(Bucket=outputs["BucketName"])["Policy"])["Statement"][0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    bucket = template["Resources"]["Bucket"]["Properties"]
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    assert [rule.get("Prefix") for rule in bucket["LifecycleConfiguration"]["Rules"]] == ["models/", "captures/", "results/", "results-errors/", None]

    # Results: both rules feed the one stream; the batch rule unpacks a batch into one record per result.
    rules = {rule["ruleName"]: iot.get_topic_rule(ruleName=rule["ruleName"])["rule"] for rule in iot.list_topic_rules()["rules"]}
    single, batches = rules[f"{STACK}_ResultsRule"], rules[f"{STACK}_ResultBatchesRule"]
    assert single["sql"] == "SELECT * FROM 'edge/+/inference' WHERE kind = 'inference'"
    assert batches["sql"] == "SELECT VALUE messages FROM 'edge/+/inference' WHERE kind = 'batch'"
    assert batches["actions"][0]["firehose"]["batchMode"] is True and "batchMode" not in single["actions"][0]["firehose"]
    stream = batches["actions"][0]["firehose"]["deliveryStreamName"]
    assert single["actions"][0]["firehose"]["deliveryStreamName"] == stream
    destination = client(aws, "firehose").describe_delivery_stream(DeliveryStreamName=stream)["DeliveryStreamDescription"]["Destinations"][0]
    s3_destination = destination["ExtendedS3DestinationDescription"]
    assert s3_destination["BucketARN"] == f"arn:aws:s3:::{outputs['BucketName']}"
    assert s3_destination["Prefix"] == "results/date=!{timestamp:yyyy-MM-dd}/thing=!{partitionKeyFromQuery:thing}/"
    assert {rule["sql"].split("FROM ")[1] for rule in rules.values()} == {"'edge/+/inference' WHERE kind = 'inference'", "'edge/+/inference' WHERE kind = 'batch'", "'edge/+/status'", "'edge/+/metrics'"}

    # Athena's table: where Firehose writes, one row per result, partitions projected by date.
    database, table_name = outputs["ResultsTable"].split(".")
    table = client(aws, "glue").get_table(DatabaseName=database, Name=table_name)["Table"]
    assert table["StorageDescriptor"]["Location"] == f"s3://{outputs['BucketName']}/results/"
    assert table["Parameters"]["storage.location.template"] == f"s3://{outputs['BucketName']}/results/date=${{date}}/"

    # CloudWatch: status and metrics log groups, fleet-wide metrics from single metrics messages.
    logs = client(aws, "logs")
    assert logs.describe_log_groups(logGroupNamePrefix=outputs["MetricsLogGroup"])["logGroups"][0]["retentionInDays"] == 30
    filters = logs.describe_metric_filters(logGroupName=outputs["MetricsLogGroup"])["metricFilters"]
    assert {f["metricTransformations"][0]["metricName"] for f in filters} == {"Fps", "LatencyP99Ms", "OutboxDropped"}

    # Fleet provisioning: the claim may only ask for keys and register through the stack's template.
    claim = policy_document(iot, outputs["ClaimPolicyName"])
    published = [r.split(":topic/")[1] for s in claim["Statement"] if s["Action"] == "iot:Publish" for r in s["Resource"]]
    assert published == ["$aws/certificates/create/json", f"$aws/provisioning-templates/{outputs['ProvisioningTemplateName']}/provision/json"]
    body = json.loads(resolve.attributes["ProvisioningTemplateBody"])
    assert body["Resources"]["policy"]["Properties"]["PolicyName"] == outputs["DevicePolicyName"]
    assert body["Resources"]["thing"]["Properties"]["ThingGroups"] == [outputs["ThingGroupName"]]
    role = template["Resources"]["ProvisioningRole"]["Properties"]["ManagedPolicyArns"][0]["Fn::Sub"]
    assert role.endswith("service-role/AWSIoTThingsRegistration")


def test_deploy_again_updates_and_claim_makes_a_claim_certificate(aws, tmp_path):
    _, first, _ = deploy_into_moto(aws, tmp_path)
    again = fleet(aws, "cloud", "deploy", "--stack", STACK, "--template", tmp_path / "moto-supported.json", "--poll", "0.2")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["outputs"] == first["outputs"]

    claim = fleet(aws, "cloud", "claim", "--stack", STACK, "--out", tmp_path / "claim")
    assert claim.returncode == 0, claim.stderr
    summary = json.loads(claim.stdout)
    iot = client(aws, "iot")
    certificate = iot.describe_certificate(certificateId=summary["certificate_id"])["certificateDescription"]
    assert certificate["status"] == "ACTIVE"
    assert [p["policyName"] for p in iot.list_attached_policies(target=certificate["certificateArn"])["policies"]] == [first["outputs"]["ClaimPolicyName"]]
    assert (tmp_path / "claim" / "claim.pem.key").stat().st_mode & 0o777 == 0o600
    assert summary["template"] == "edge-agent-claim"


def test_deploy_errors_are_one_line(aws, tmp_path):
    line = one_line_error(fleet(aws, "cloud", "deploy", "--stack", STACK, "--parameter", "ThingGroupName"), program="edge-fleet")
    assert "--parameter" in line and "KEY=VALUE" in line
    line = one_line_error(fleet(aws, "cloud", "deploy", "--stack", STACK, "--template", tmp_path / "missing.yaml"), program="edge-fleet")
    assert "--template" in line and "cannot read" in line
    line = one_line_error(fleet(aws, "cloud", "claim", "--stack", "nothing-here", "--out", tmp_path / "c"), program="edge-fleet")
    assert "edge-fleet cloud deploy --stack nothing-here" in line


def test_deploy_dry_run_sends_nothing(aws):
    result = fleet(aws, "cloud", "deploy", "--stack", STACK, "--dry-run")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert [request["operation"] for request in plan["requests"]] == ["CreateStack"]
    assert plan["requests"][0]["params"]["Capabilities"] == ["CAPABILITY_IAM"]
    assert client(aws, "cloudformation").describe_stacks()["Stacks"] == []


@pytest.mark.parametrize("name", ["deploy", "claim"])
def test_cloud_commands_have_help(name):
    result = run_cli("cloud", name, "--help", program="agent.fleet")
    assert result.returncode == 0 and "--stack" in result.stdout


def test_deploy_without_changes_is_not_an_error(aws_env, tmp_path):
    """CloudFormation refuses an update that changes nothing with a ValidationError (moto updates anyway)."""
    from botocore.stub import Stubber

    from agent.fleet.aws import Aws, AwsOptions
    from agent.fleet.cloud import deploy

    real = Aws(AwsOptions(region=REGION))
    stack = {"StackName": STACK, "StackStatus": "UPDATE_COMPLETE", "CreationTime": "2026-01-01T00:00:00Z", "Outputs": [{"OutputKey": "BucketName", "OutputValue": "b"}]}
    with Stubber(real.client("cloudformation")) as cloudformation, Stubber(real.client("iot")) as iot:
        cloudformation.add_response("describe_stacks", {"Stacks": [stack]}, {"StackName": STACK})
        cloudformation.add_client_error("update_stack", "ValidationError", "No updates are to be performed.", 400)
        iot.add_response("describe_endpoint", {"endpointAddress": "abc-ats.iot.us-east-1.amazonaws.com"}, {"endpointType": "iot:Data-ATS"})
        iot.add_response("describe_endpoint", {"endpointAddress": "abc.credentials.iot.us-east-1.amazonaws.com"}, {"endpointType": "iot:CredentialProvider"})
        result = deploy(real, STACK, TEMPLATE, [])
        cloudformation.assert_no_pending_responses()
    assert (result["changed"], result["status"], result["outputs"]) == (False, "UPDATE_COMPLETE", {"BucketName": "b"})


def test_a_failed_deployment_names_the_resource_and_reason(aws_env):
    from datetime import datetime, timezone

    from botocore.stub import ANY, Stubber

    from agent.fleet.aws import Aws, AwsOptions, CloudError
    from agent.fleet.cloud import deploy

    real = Aws(AwsOptions(region=REGION))
    later = datetime.now(timezone.utc).replace(year=datetime.now().year + 1)
    failed = {"StackId": "s", "EventId": "e1", "StackName": STACK, "LogicalResourceId": "ResultsStream", "ResourceType": "AWS::KinesisFirehose::DeliveryStream", "Timestamp": later, "ResourceStatus": "CREATE_FAILED", "ResourceStatusReason": "Access denied for\n firehose:CreateDeliveryStream"}
    stack = {"StackName": STACK, "StackStatus": "ROLLBACK_COMPLETE", "CreationTime": later}
    with Stubber(real.client("cloudformation")) as cloudformation:
        cloudformation.add_client_error("describe_stacks", "ValidationError", f"Stack with id {STACK} does not exist", 400)
        cloudformation.add_response("create_stack", {"StackId": "s"}, {"StackName": STACK, "TemplateBody": ANY, "Parameters": [], "Capabilities": ["CAPABILITY_IAM"], "Tags": ANY})
        cloudformation.add_response("describe_stack_events", {"StackEvents": [failed]}, {"StackName": STACK})
        cloudformation.add_response("describe_stacks", {"Stacks": [stack]}, {"StackName": STACK})
        cloudformation.add_response("describe_stack_events", {"StackEvents": [failed]}, {"StackName": STACK})
        with pytest.raises(CloudError) as caught:
            deploy(real, STACK, TEMPLATE, [], out=open("/dev/null", "w"))
    assert str(caught.value) == (
        f"stack {STACK} ended ROLLBACK_COMPLETE: ResultsStream (AWS::KinesisFirehose::DeliveryStream): Access denied for firehose:CreateDeliveryStream; fix it and deploy again"
    )
