"""`edge-fleet cloud deploy|claim`: the whole cloud side from one CloudFormation template, and a claim certificate.

`deploy` does what `aws cloudformation deploy` does, through boto3: create the stack, or update it (no
change is not an error), follow its events until it settles, and name the first resource that failed. It then
prints the stack's outputs together with what CloudFormation cannot output: the account's IoT data and
credentials-provider endpoints, so the operator has every value a device's settings need. `--fleet-indexing`
also turns on fleet indexing (registry, shadow, connectivity), which `fleet status` uses at scale.

`claim` makes the claim certificate devices ship with (`edge-agent provision` trades it for their own).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

from agent.errors import ConfigError
from agent.fleet.aws import Aws, CloudError
from agent.fleet.provision import CA_FILE, refuse_existing, write_file
from agent.settings import AMAZON_ROOT_CA, SHIPPED

DEFAULT_TEMPLATE = SHIPPED / "cloudformation.yaml"  # deploy/cloudformation/edge-agent.yaml, shipped in the package
MAX_TEMPLATE_BODY = 51_200  # bytes CloudFormation takes inline; a larger template must go through S3
CAPABILITIES = ["CAPABILITY_IAM"]  # the template makes IAM roles (unnamed, so CAPABILITY_NAMED_IAM is not needed)
SUCCEEDED = {"CREATE_COMPLETE", "UPDATE_COMPLETE"}
CLAIM_CERT_FILE, CLAIM_KEY_FILE = "claim.pem.crt", "claim.pem.key"


def parse_parameters(pairs: list[str]) -> list[dict[str, str]]:
    """`--parameter KEY=VALUE` flags as CloudFormation Parameters."""
    parameters = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--parameter {pair!r}: expected KEY=VALUE, e.g. --parameter ThingGroupName=line-a")
        parameters.append({"ParameterKey": key, "ParameterValue": value})
    return parameters


def read_template(path: Path) -> str:
    try:
        body = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--template {path}: cannot read it ({exc.strerror}); pass deploy/cloudformation/edge-agent.yaml") from None
    if len(body.encode()) > MAX_TEMPLATE_BODY:
        raise ConfigError(f"--template {path}: {len(body.encode())} bytes, over the {MAX_TEMPLATE_BODY} CloudFormation takes inline; shorten it")
    return body


def describe_stack(aws: Aws, stack: str) -> dict[str, Any] | None:
    """The stack, or None when there is none of that name (CloudFormation says so with a ValidationError)."""
    try:
        return aws.call("cloudformation", "describe_stacks", StackName=stack)["Stacks"][0]
    except CloudError as error:
        if error.code == "ValidationError" and "does not exist" in str(error):
            return None
        raise


def first_failure(aws: Aws, stack: str, since: float) -> str:
    """The oldest failed resource event of this deployment, as `Logical (Type): reason`."""
    events = aws.pages("cloudformation", "describe_stack_events", "StackEvents", StackName=stack)
    failed = [e for e in events if e["ResourceStatus"].endswith("FAILED") and e["Timestamp"].timestamp() >= since and e["LogicalResourceId"] != stack]
    if not failed:
        return "no resource reported a reason"
    event = min(failed, key=lambda e: e["Timestamp"])
    return f"{event['LogicalResourceId']} ({event['ResourceType']}): {' '.join(str(event.get('ResourceStatusReason') or 'no reason').split())}"


def follow(aws: Aws, stack: str, since: float, poll_s: float, out: TextIO) -> dict[str, Any]:
    """Print the stack's new events until it is no longer IN_PROGRESS; its final description."""
    seen: set[str] = set()
    while True:
        events = aws.call("cloudformation", "describe_stack_events", StackName=stack)["StackEvents"]
        for event in reversed(events):
            if event["EventId"] not in seen and event["Timestamp"].timestamp() >= since:
                seen.add(event["EventId"])
                print(f"{event['Timestamp']:%H:%M:%S}  {event['ResourceStatus']:<28} {event['ResourceType']:<38} {event['LogicalResourceId']}", file=out)
        description = describe_stack(aws, stack)
        if description is None or not description["StackStatus"].endswith("IN_PROGRESS"):
            return description or {"StackStatus": "DELETE_COMPLETE"}
        time.sleep(poll_s)


def deploy(aws: Aws, stack: str, template: Path, parameters: list[dict[str, str]], *, fleet_indexing: bool = False, poll_s: float = 5.0, out: TextIO = sys.stderr) -> dict[str, Any]:
    """Create or update `stack` from `template`, wait for it, and return its outputs and the IoT endpoints."""
    body = read_template(template)
    current = describe_stack(aws, stack)
    if current is not None and current["StackStatus"] == "ROLLBACK_COMPLETE":
        raise CloudError(f"stack {stack} failed to create earlier and is ROLLBACK_COMPLETE; delete it (aws cloudformation delete-stack --stack-name {stack}) and deploy again")
    if current is not None and current["StackStatus"].endswith("IN_PROGRESS"):
        raise CloudError(f"stack {stack} is {current['StackStatus']}; wait until it settles and deploy again")
    request = {"StackName": stack, "TemplateBody": body, "Parameters": parameters, "Capabilities": CAPABILITIES}
    since = time.time() - 1  # CloudFormation's clock, to the second
    changed = True
    if current is None:
        aws.call("cloudformation", "create_stack", **request, Tags=[{"Key": "app", "Value": "edge-agent"}])
    else:
        try:
            aws.call("cloudformation", "update_stack", **request)
        except CloudError as error:
            if "No updates are to be performed" not in str(error):
                raise
            changed = False
    if aws.options.dry_run:
        return {"stack": stack, "action": "create" if current is None else "update"}
    final = follow(aws, stack, since, poll_s, out) if changed else current
    if final["StackStatus"] not in SUCCEEDED:
        raise CloudError(f"stack {stack} ended {final['StackStatus']}: {first_failure(aws, stack, since)}; fix it and deploy again")
    if fleet_indexing:
        aws.call(
            "iot",
            "update_indexing_configuration",
            thingIndexingConfiguration={"thingIndexingMode": "REGISTRY_AND_SHADOW", "thingConnectivityIndexingMode": "STATUS"},
        )
    outputs = {output["OutputKey"]: output["OutputValue"] for output in final.get("Outputs", [])}
    return {
        "stack": stack,
        "status": final["StackStatus"],
        "changed": changed,
        "outputs": outputs,
        "endpoint": aws.call("iot", "describe_endpoint", endpointType="iot:Data-ATS")["endpointAddress"],
        "credentials_endpoint": aws.call("iot", "describe_endpoint", endpointType="iot:CredentialProvider")["endpointAddress"],
        "fleet_indexing": fleet_indexing,
    }


def stack_outputs(aws: Aws, stack: str) -> dict[str, str]:
    description = describe_stack(aws, stack)
    if description is None:
        raise CloudError(f"stack {stack} not found; create it with `edge-fleet cloud deploy --stack {stack}`")
    return {output["OutputKey"]: output["OutputValue"] for output in description.get("Outputs", [])}


def make_claim(aws: Aws, stack: str, out: Path) -> dict[str, Any]:
    """An active claim certificate with the stack's claim policy, written to `out` (key 0600) with the root CA."""
    out = Path(out)
    refuse_existing(out, [CLAIM_CERT_FILE, CLAIM_KEY_FILE])
    outputs = stack_outputs(aws, stack)
    policy = outputs["ClaimPolicyName"]
    credentials = aws.call("iot", "create_keys_and_certificate", setAsActive=True)
    aws.call("iot", "attach_policy", policyName=policy, target=credentials["certificateArn"])
    summary = {
        "certificate_id": credentials["certificateId"],
        "policy": policy,
        "template": outputs["ProvisioningTemplateName"],
        "endpoint": aws.call("iot", "describe_endpoint", endpointType="iot:Data-ATS")["endpointAddress"],
        "files": [str(out / CLAIM_CERT_FILE), str(out / CLAIM_KEY_FILE), str(out / CA_FILE)],
    }
    if aws.options.dry_run:
        return summary
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file(out / CLAIM_KEY_FILE, credentials["keyPair"]["PrivateKey"].encode(), 0o600)
    write_file(out / CLAIM_CERT_FILE, credentials["certificatePem"].encode(), 0o644)
    if not (out / CA_FILE).exists():
        write_file(out / CA_FILE, AMAZON_ROOT_CA.read_bytes(), 0o644)
    return summary
