"""`edge-fleet provision`: a thing, its certificate and policy in IoT Core, and the folder a device needs.

The folder holds the device's settings file (validated by agent.settings.Settings before anything is
written), its certificate, private key (0600, never overwritten) and the Amazon root CA, in a 0700
directory. The settings name those files relative to themselves, so the folder works wherever it is
copied. The IoT policy is the project's least-privilege one (deploy/iot/policy.json), created once per
account and shared by every device through its `${iot:Connection.Thing.ThingName}` variables.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from agent.errors import ConfigError
from agent.fleet.aws import Aws
from agent.settings import AMAZON_ROOT_CA, CERT_FILE, KEY_FILE, SETTINGS_FILE, SHIPPED, device_settings, validate_settings

DEFAULT_POLICY_FILE = SHIPPED / "iot-policy.json"  # deploy/iot/policy.json, shipped in the package
DEFAULT_POLICY_NAME = "edge-agent"
CA_FILE = "AmazonRootCA1.pem"
ARN_PLACEHOLDER = "arn:aws:iot:REGION:ACCOUNT_ID:"


def policy_document(path: Path, region: str, account: str) -> str:
    """The policy file with its REGION/ACCOUNT_ID placeholders filled in for this account."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        json.loads(text)
    except OSError as exc:
        raise ConfigError(f"--policy-file {path}: cannot read it ({exc.strerror}); pass the IoT policy (deploy/iot/policy.json)") from None
    except ValueError as exc:
        raise ConfigError(f"--policy-file {path}: not valid JSON ({exc}); fix the policy file") from None
    return text.replace(ARN_PLACEHOLDER, f"arn:aws:iot:{region}:{account}:")


def settings_for(thing: str, endpoint: str, device_dir: Path | None, trusted_keys: list[str]) -> dict[str, Any]:
    """The agent settings a provisioned device starts with: file names relative to the settings file, or
    absolute under `device_dir` when given."""
    folder = device_dir or Path()
    return device_settings(thing, endpoint, cert=folder / CERT_FILE, key=folder / KEY_FILE, ca=folder / CA_FILE, trusted_keys=[folder / name for name in trusted_keys])


def refuse_existing(out: Path, names: list[str]) -> None:
    """Refuse to overwrite an earlier device's files: a private key is never replaced."""
    for name in names:
        if (out / name).exists():
            raise ConfigError(f"--out {out}: {name} already exists; choose an empty folder (credentials are never overwritten)")


def write_file(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    os.chmod(path, mode)  # not widened or narrowed by the umask


def provision(
    aws: Aws,
    thing: str,
    out: Path,
    *,
    group: str | None = None,
    policy_name: str = DEFAULT_POLICY_NAME,
    policy_file: Path = DEFAULT_POLICY_FILE,
    device_dir: Path | None = None,
    trusted_keys: list[Path] = (),
) -> dict[str, Any]:
    """Register `thing` and write its credentials and settings to `out`; returns what was made."""
    out = Path(out)
    device_dir = Path(device_dir) if device_dir else None
    keys = [Path(key) for key in trusted_keys]
    for key in keys:
        if not key.is_file():
            raise ConfigError(f"--trusted-key {key}: no such file; pass the public key (.pub) that signs your models")
    files = [SETTINGS_FILE, CERT_FILE, KEY_FILE, CA_FILE, *(key.name for key in keys)]
    # Check the settings (thing name included) before any AWS call, with the endpoint still unknown.
    validate_settings(settings_for(thing, "endpoint.invalid", device_dir, keys), "provision")
    refuse_existing(out, files)

    account = aws.call("sts", "get_caller_identity")["Account"]
    document = policy_document(policy_file, aws.region, account)

    if aws.exists("iot", "describe_thing", thingName=thing) is None:
        aws.call("iot", "create_thing", thingName=thing)
    if group:
        if aws.exists("iot", "describe_thing_group", thingGroupName=group) is None:
            aws.call("iot", "create_thing_group", thingGroupName=group)
        aws.call("iot", "add_thing_to_thing_group", thingGroupName=group, thingName=thing)
    if aws.exists("iot", "get_policy", policyName=policy_name) is None:
        aws.call("iot", "create_policy", policyName=policy_name, policyDocument=document)
    credentials = aws.call("iot", "create_keys_and_certificate", setAsActive=True)
    certificate_arn = credentials["certificateArn"]
    aws.call("iot", "attach_policy", policyName=policy_name, target=certificate_arn)
    aws.call("iot", "attach_thing_principal", thingName=thing, principal=certificate_arn)
    endpoint = aws.call("iot", "describe_endpoint", endpointType="iot:Data-ATS")["endpointAddress"]

    settings = settings_for(thing, endpoint, device_dir, keys)
    validate_settings(settings, "provision")
    summary = {
        "thing": thing,
        "group": group,
        "certificate_id": credentials["certificateId"],
        "endpoint": endpoint,
        "policy": policy_name,
        "out": str(out),
        "files": files,
    }
    if aws.options.dry_run:
        return summary

    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    write_file(out / KEY_FILE, credentials["keyPair"]["PrivateKey"].encode(), 0o600)
    write_file(out / CERT_FILE, credentials["certificatePem"].encode(), 0o644)
    write_file(out / CA_FILE, AMAZON_ROOT_CA.read_bytes(), 0o644)
    for key in keys:
        write_file(out / key.name, key.read_bytes(), 0o644)
    write_file(out / SETTINGS_FILE, yaml.safe_dump(settings, sort_keys=False).encode(), 0o600)
    return summary
