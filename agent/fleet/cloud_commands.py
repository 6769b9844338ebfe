"""Argument parsing for the `edge-fleet` commands that talk to AWS: cloud deploy|claim, provision, model
publish|rollback, fleet status, job cancel. Registered in agent/fleet/cli.py; the work is in provision, publish, rollout and
status. boto3 is imported only when a command runs, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.bundles.signing import DEFAULT_PRIVATE_KEY
from agent.command_line import Parser
from agent.errors import ConfigError

Subcommands = argparse._SubParsersAction


def add_aws_options(parser: argparse.ArgumentParser, *, changes: bool) -> None:
    aws = parser.add_argument_group("AWS")
    aws.add_argument("--region", help="AWS region (default: AWS_REGION, else AWS_DEFAULT_REGION or the profile's)")
    aws.add_argument("--profile", help="AWS named profile (default: AWS_PROFILE or the default chain)")
    aws.add_argument("--endpoint-url", help="send every AWS request here instead, e.g. a local stand-in such as moto (default: AWS_ENDPOINT_URL if set)")
    if changes:
        aws.add_argument("--dry-run", action="store_true", help="change nothing: print the exact requests that would be made, as JSON; reads still run, so it needs credentials and the network")


def make_aws(args: argparse.Namespace):
    from agent.fleet.aws import Aws, AwsOptions

    return Aws(AwsOptions(region=args.region, profile=args.profile, endpoint_url=args.endpoint_url, dry_run=getattr(args, "dry_run", False)))


def report(aws, result: dict[str, Any]) -> int:
    """Print a command's result (or, in a dry run, the requests held back and what would have come of them)."""
    if aws.options.dry_run:
        result = {"dry_run": True, "requests": aws.planned, "result": result}
    print(json.dumps(result, indent=2, default=_printable))
    return 0


def _printable(value: Any) -> str:
    """Request bodies as their text (the release record is JSON), anything else as str()."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return f"<{len(value)} bytes>"
    return str(value)


def add_rollout_options(parser: argparse.ArgumentParser) -> None:
    from agent.fleet.rollout import DEFAULT_RECIPE, Rollout

    engine = parser.add_argument_group("rollout engine")
    engine.add_argument("--via", choices=["jobs", "greengrass"], default="jobs", help="an IoT Job, or a Greengrass deployment of the model component (default jobs)")
    engine.add_argument("--presign-role-arn", help="(jobs) IAM role IoT Core assumes to presign the bundle's S3 URL")
    engine.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="(greengrass) model component recipe (default: deploy/greengrass/model/recipe.json, shipped with the agent)")
    engine.add_argument("--continuous", action="store_true", help="(jobs) devices added to the group later get the update too")
    pacing = parser.add_argument_group("rollout pacing, abort and timeout (same for jobs and greengrass)")
    for name, info in Rollout.model_fields.items():
        pacing.add_argument("--" + name.replace("_", "-"), dest="rollout_" + name, metavar="N", help=f"{info.description} (default {info.default})")


def rollout_from(args: argparse.Namespace):
    from agent.fleet.rollout import Rollout

    values = {name: getattr(args, "rollout_" + name) for name in Rollout.model_fields if getattr(args, "rollout_" + name) is not None}
    try:
        return Rollout.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-")
        raise ConfigError(f"{flag}: {first['msg']} (got {first.get('input')!r})") from None


def bundle_argument(value: str) -> Path:
    """A bundle path; the word `shipped` names the bundle shipped in the package (./shipped is a folder of that name)."""
    from agent.settings import SHIPPED_BUNDLE

    return SHIPPED_BUNDLE if value == "shipped" else Path(value)


def add_shadow_options(parser: argparse.ArgumentParser) -> None:
    shadow = parser.add_argument_group("shadow evaluation (devices run the model beside the one they serve, publishing none of its predictions)")
    shadow.add_argument("--shadow", action="store_true", help="evaluate the model in shadow instead of serving it; promote it later with `edge-fleet model promote`")
    shadow.add_argument("--promote-at", type=float, metavar="AGREEMENT", help="with --shadow: a device whose agreement reaches this (0..1) promotes the model itself")
    shadow.add_argument("--shadow-frames", type=int, metavar="N", help="with --shadow: end after N frames evaluated (default: the device's shadow.frames)")
    shadow.add_argument("--shadow-seconds", type=float, metavar="S", help="with --shadow: end after S seconds (default: the device's shadow.seconds)")
    shadow.add_argument("--every-nth", type=int, metavar="N", help="with --shadow: evaluate every Nth frame (default: the device's shadow.every_nth)")


def shadow_from(args: argparse.Namespace):
    """The shadow plan the flags ask for, None without --shadow; a ConfigError naming a bad flag."""
    from agent.bundles.document import ShadowPlan

    values = {"promote_at": args.promote_at, "frames": args.shadow_frames, "seconds": args.shadow_seconds, "every_nth": args.every_nth}
    flags = {"promote_at": "--promote-at", "frames": "--shadow-frames", "seconds": "--shadow-seconds", "every_nth": "--every-nth"}
    given = {name: value for name, value in values.items() if value is not None}
    if not args.shadow:
        if given:
            raise ConfigError(f"{', '.join(flags[name] for name in given)}: only with --shadow")
        return None
    try:
        return ShadowPlan.model_validate(given)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"{flags[str(first['loc'][0])]}: {first['msg']} (got {first.get('input')!r})") from None


def add_target_options(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--thing", help="one device (thing name)")
    target.add_argument("--group", help="a thing group: every device in it")


def cmd_provision(args: argparse.Namespace) -> int:
    from agent.fleet.provision import provision

    aws = make_aws(args)
    result = provision(
        aws, args.thing, args.out, group=args.group, policy_name=args.policy_name, policy_file=args.policy_file, device_dir=args.device_dir, trusted_keys=args.trusted_key or []
    )
    return report(aws, result)


def cmd_model_publish(args: argparse.Namespace) -> int:
    from agent.fleet.publish import prepare, upload
    from agent.fleet.rollout import (
        artifact_file_name,
        check_engine,
        load_recipe,
        roll_out,
        target_arn,
    )

    aws = make_aws(args)
    rollout = rollout_from(args)
    shadow = shadow_from(args)
    check_engine(args.via, args.presign_role_arn)
    file_name = artifact_file_name(load_recipe(args.recipe)) if args.via == "greengrass" else "bundle.zip"
    with tempfile.TemporaryDirectory(prefix="edge-publish-") as workdir:
        artifact, release = prepare(args.bundle, args.signing_key, Path(workdir), args.bucket, file_name)
        target = target_arn(aws, args.thing, args.group)
        upload(aws, artifact, release)
    result = roll_out(
        aws, release, target, args.via, rollout, presign_role_arn=args.presign_role_arn, recipe=args.recipe, new_component=True, allow_downgrade=args.allow_downgrade, continuous=args.continuous, shadow=shadow
    )
    mode = {"mode": "shadow"} if shadow is not None else {}
    return report(aws, {"model": release.name, "version": release.version, "sha256": release.sha256, "s3": f"s3://{release.bucket}/{release.key}", **mode, **result})


def redeploy(args: argparse.Namespace, version: str, *, allow_downgrade: bool, kind: str) -> int:
    """Roll out a version published earlier, from its release record: `model promote` and `model rollback`."""
    from agent.fleet.publish import find_release
    from agent.fleet.rollout import check_engine, roll_out, target_arn

    aws = make_aws(args)
    rollout = rollout_from(args)
    check_engine(args.via, args.presign_role_arn)
    release = find_release(aws, args.bucket, version, args.name)
    target = target_arn(aws, args.thing, args.group)
    result = roll_out(
        aws, release, target, args.via, rollout, presign_role_arn=args.presign_role_arn, recipe=args.recipe, new_component=False, allow_downgrade=allow_downgrade, continuous=args.continuous, promote=kind == "promote"
    )
    return report(aws, {"model": release.name, "version": release.version, kind: True, **result})


def cmd_model_promote(args: argparse.Namespace) -> int:
    """The version's serve-mode document: devices that evaluated it in shadow serve their stored copy."""
    return redeploy(args, args.version, allow_downgrade=False, kind="promote")


def cmd_model_rollback(args: argparse.Namespace) -> int:
    return redeploy(args, args.to, allow_downgrade=True, kind="rollback")


def cmd_fleet_status(args: argparse.Namespace) -> int:
    from agent.fleet.status import fleet_status, render, watch

    aws = make_aws(args)
    if args.watch:
        status = watch(aws, args.group, args.interval, args.job)
    else:
        status = fleet_status(aws, args.group, args.job)
        print(json.dumps(status.as_json(), indent=2) if args.json else render(status, sys.stdout.isatty()))
    return 1 if status.failed else 0


def cmd_job_cancel(args: argparse.Namespace) -> int:
    from agent.fleet.rollout import cancel_job

    aws = make_aws(args)
    return report(aws, cancel_job(aws, args.job_id, force=args.force))


def cmd_cloud_deploy(args: argparse.Namespace) -> int:
    from agent.fleet.cloud import deploy, parse_parameters

    aws = make_aws(args)
    return report(aws, deploy(aws, args.stack, args.template, parse_parameters(args.parameter or []), fleet_indexing=args.fleet_indexing, poll_s=args.poll))


def cmd_cloud_claim(args: argparse.Namespace) -> int:
    from agent.fleet.cloud import make_claim

    aws = make_aws(args)
    return report(aws, make_claim(aws, args.stack, args.out))


def add_cloud_commands(commands: Subcommands) -> None:
    from agent.fleet.cloud import DEFAULT_TEMPLATE

    cloud = command_group(commands, "cloud", "the cloud side as one CloudFormation stack")
    deploy = cloud.add_parser("deploy", help="create or update the stack (deploy/cloudformation/edge-agent.yaml), wait, print what devices need")
    deploy.add_argument("--stack", required=True, help="CloudFormation stack name (also prefixes the policy, role alias and log group names)")
    deploy.add_argument("--template", type=Path, default=DEFAULT_TEMPLATE, help="template file (default deploy/cloudformation/edge-agent.yaml)")
    deploy.add_argument("--parameter", action="append", metavar="KEY=VALUE", help="template parameter, e.g. ThingGroupName=line-a (repeatable)")
    deploy.add_argument("--fleet-indexing", action="store_true", help="also turn on fleet indexing (registry, shadow, connectivity) for `fleet status` at scale")
    deploy.add_argument("--poll", type=float, default=5.0, help=argparse.SUPPRESS)
    add_aws_options(deploy, changes=True)
    deploy.set_defaults(handler=cmd_cloud_deploy)

    claim = cloud.add_parser("claim", help="make the claim certificate devices ship with (the stack's claim policy attached)")
    claim.add_argument("--stack", required=True, help="the stack `cloud deploy` made")
    claim.add_argument("--out", type=Path, required=True, help="folder for claim.pem.crt, claim.pem.key (0600) and the root CA")
    add_aws_options(claim, changes=True)
    claim.set_defaults(handler=cmd_cloud_claim)


def add_provision_command(commands: Subcommands) -> None:
    from agent.fleet.provision import DEFAULT_POLICY_FILE, DEFAULT_POLICY_NAME

    provision = commands.add_parser("provision", help="register a device: thing, certificate, policy; write its settings and credentials")
    provision.add_argument("thing", help="thing name (also the device's MQTT client id)")
    provision.add_argument("--group", help="thing group to add it to (created if missing)")
    provision.add_argument("--out", type=Path, required=True, help="folder to write agent.yaml, certificate, private key and root CA to (made 0700)")
    provision.add_argument("--device-dir", type=Path, help="where that folder will be on the device, to write absolute paths in agent.yaml (default: paths relative to agent.yaml, so the folder can go anywhere)")
    provision.add_argument("--trusted-key", type=Path, action="append", help="public key that signs your models, copied for the device (repeatable)")
    provision.add_argument("--policy-name", default=DEFAULT_POLICY_NAME, help=f"IoT policy to attach, created if missing (default {DEFAULT_POLICY_NAME})")
    provision.add_argument("--policy-file", type=Path, default=DEFAULT_POLICY_FILE, help="policy document used when creating it (default deploy/iot/policy.json)")
    add_aws_options(provision, changes=True)
    provision.set_defaults(handler=cmd_provision)


def add_release_commands(model: Subcommands) -> None:
    """`model publish` and `model rollback`, added to the `model` group."""
    publish = model.add_parser("publish", help="sign if needed, upload to S3, and roll out to a thing or thing group")
    publish.add_argument("bundle", type=bundle_argument, help="bundle directory or .zip, or `shipped`: the model the agent ships with, which devices start with (publish it once to be able to roll back to it)")
    add_target_options(publish)
    publish.add_argument("--bucket", required=True, help="S3 bucket for model artifacts (must exist)")
    publish.add_argument("--signing-key", type=Path, default=DEFAULT_PRIVATE_KEY, help=f"Ed25519 private key (default {DEFAULT_PRIVATE_KEY})")
    publish.add_argument("--allow-downgrade", action="store_true", help="let devices install it even if they run a newer version")
    add_shadow_options(publish)
    add_rollout_options(publish)
    add_aws_options(publish, changes=True)
    publish.set_defaults(handler=cmd_model_publish)

    promote = model.add_parser("promote", help="serve a version evaluated in shadow: devices swap in the copy they verified and stored (no second download)")
    add_target_options(promote)
    promote.add_argument("--version", required=True, help="the version published with --shadow")
    promote.add_argument("--bucket", required=True, help="S3 bucket the version was published to")
    promote.add_argument("--name", help="model name (default: the one model in the bucket with that version)")
    add_rollout_options(promote)
    add_aws_options(promote, changes=True)
    promote.set_defaults(handler=cmd_model_promote)

    rollback = model.add_parser("rollback", help="roll a thing or group back to an already-published version")
    add_target_options(rollback)
    rollback.add_argument("--to", required=True, metavar="VERSION", help="the version to go back to (published earlier)")
    rollback.add_argument("--bucket", required=True, help="S3 bucket the version was published to")
    rollback.add_argument("--name", help="model name (default: the one model in the bucket with that version)")
    add_rollout_options(rollback)
    add_aws_options(rollback, changes=True)
    rollback.set_defaults(handler=cmd_model_rollback)


def command_group(commands: Subcommands, name: str, help_text: str) -> Subcommands:
    """A top-level group (`edge-fleet NAME ...`) to add subcommands to."""
    return commands.add_parser(name, help=help_text).add_subparsers(dest=f"{name}_command", required=True, parser_class=Parser)


def add_fleet_commands(commands: Subcommands) -> None:
    status = command_group(commands, "fleet", "watch the fleet").add_parser("status", help="every device's model version, job status and last seen (from fleet indexing when on); exit 1 if any failed")
    status.add_argument("--group", help="only this thing group (default: every thing)")
    status.add_argument("--job", help="the rollout to report on (default: the newest job aimed at the group)")
    status.add_argument("--watch", action="store_true", help="a progress bar of the rollout's counts until it settles, then its failures")
    status.add_argument("--interval", type=float, default=5.0, help="seconds between redraws (default 5)")
    status.add_argument("--json", action="store_true", help="print JSON instead of the table")
    add_aws_options(status, changes=False)
    status.set_defaults(handler=cmd_fleet_status)


def add_job_commands(commands: Subcommands) -> None:
    cancel = command_group(commands, "job", "manage IoT Jobs").add_parser("cancel", help="cancel a rollout job (queued executions are removed)")
    cancel.add_argument("job_id")
    cancel.add_argument("--force", action="store_true", help="also cancel executions already IN_PROGRESS on devices")
    add_aws_options(cancel, changes=True)
    cancel.set_defaults(handler=cmd_job_cancel)
