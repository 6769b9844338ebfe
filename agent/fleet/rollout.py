"""`edge-fleet model publish|rollback`, second half, and `job cancel`: hand a release to AWS's own rollout engines.

Two engines, one set of rollout options: an IoT Job whose document is the model-update document (the
device's UpdateManager applies it), or a new version of the model's Greengrass component deployed to a thing
group. Both take the same staged-rollout, abort and timeout settings (IoT Jobs' own shapes, which Greengrass
takes unchanged under `iotJobConfiguration`), so AWS, not this tool, paces the fleet and stops a bad model.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from agent.errors import ConfigError
from agent.fleet.aws import Aws
from agent.settings import SHIPPED

if TYPE_CHECKING:  # publish pulls in the device-side update code; `--help` should not
    from agent.bundles.document import ShadowPlan
    from agent.fleet.publish import Release

DEFAULT_RECIPE = SHIPPED / "model-recipe.json"  # deploy/greengrass/model/recipe.json, shipped in the package
AGENT_COMPONENT = "com.example.EdgeAgent"  # deploy/greengrass/recipe.json: whose configuration names a shadow candidate
CANDIDATE_SUFFIX = ".Candidate"  # a model in shadow is a component of its own, beside the one serving
GREENGRASS_ROOT = "/greengrass/v2"  # where the nucleus unpacks artifacts on the devices
PRESIGNED_URL_SECONDS = 3600


class Rollout(BaseModel):
    """How fast a rollout widens, when AWS stops it, and how long a device may take (IoT Jobs' limits)."""

    model_config = ConfigDict(extra="forbid")

    base_rate_per_minute: int = Field(10, ge=1, le=1000, description="devices notified per minute at first")
    increment_factor: float = Field(2.0, ge=1.1, le=5.0, description="rate multiplier at each step")
    increase_after_succeeded: int = Field(10, ge=1, description="devices that must succeed before the rate steps up")
    maximum_per_minute: int = Field(100, ge=1, le=1000, description="devices notified per minute, at most")
    abort_threshold_percent: float = Field(10.0, gt=0, le=100, description="cancel the rollout when this share of devices failed")
    abort_min_devices: int = Field(10, ge=1, description="judge that share only once at least this many devices finished")
    timeout_minutes: int = Field(60, ge=1, le=10080, description="a device still IN_PROGRESS after this is TIMED_OUT")

    def job_configuration(self) -> dict[str, Any]:
        """rolloutConfig/abortConfig/timeoutConfig as both IoT CreateJob and Greengrass iotJobConfiguration take them."""
        return {
            "jobExecutionsRolloutConfig": {
                "maximumPerMinute": self.maximum_per_minute,
                "exponentialRate": {
                    "baseRatePerMinute": self.base_rate_per_minute,
                    "incrementFactor": self.increment_factor,
                    "rateIncreaseCriteria": {"numberOfSucceededThings": self.increase_after_succeeded},
                },
            },
            "abortConfig": {
                "criteriaList": [
                    {"failureType": "ALL", "action": "CANCEL", "thresholdPercentage": self.abort_threshold_percent, "minNumberOfExecutedThings": self.abort_min_devices}
                ]
            },
            "timeoutConfig": {"inProgressTimeoutInMinutes": self.timeout_minutes},
        }


def check_engine(via: str, presign_role_arn: str | None) -> None:
    """Refuse before anything is uploaded when the chosen engine lacks what it needs."""
    if via == "jobs" and not presign_role_arn:
        raise ConfigError("--presign-role-arn is required with --via jobs: the IAM role IoT Core assumes to presign the S3 URL (see deploy/RUNBOOK.md)")


def target_arn(aws: Aws, thing: str | None, group: str | None) -> str:
    """The ARN of the thing or thing group a rollout aims at (which must exist)."""
    if group:
        fix = f"thing group {group!r} not found; create it with `edge-fleet provision THING --group {group}`"
        return aws.call("iot", "describe_thing_group", thingGroupName=group, fix=fix)["thingGroupArn"]
    fix = f"thing {thing!r} not found; create it with `edge-fleet provision {thing}`"
    return aws.call("iot", "describe_thing", thingName=thing, fix=fix)["thingArn"]


def job_id(release: Release) -> str:
    """A unique, readable job id: model-<name>-<version>-<utc time>-<random> ([a-zA-Z0-9_-], 64 chars at most)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return re.sub(r"[^a-zA-Z0-9_-]", "_", f"model-{release.name}-{release.version}")[:41] + f"-{stamp}-{secrets.token_hex(2)}"


def create_job(aws: Aws, release: Release, target: str, rollout: Rollout, presign_role_arn: str, *, allow_downgrade: bool = False, continuous: bool = False, shadow: ShadowPlan | None = None) -> dict[str, Any]:
    """An IoT Job carrying the model-update document, its URL presigned by IoT Core with `presign_role_arn`."""
    document = release.document(aws.region, allow_downgrade=allow_downgrade, shadow=shadow).model_dump(mode="json", exclude_none=True)
    reply = aws.call(
        "iot",
        "create_job",
        jobId=job_id(release),
        targets=[target],
        document=json.dumps(document, separators=(",", ":")),
        description=f"model {release.name} {release.version}{' in shadow' if shadow else ''} (sha256 {release.sha256[:12]})",
        presignedUrlConfig={"roleArn": presign_role_arn, "expiresInSec": PRESIGNED_URL_SECONDS},
        targetSelection="CONTINUOUS" if continuous else "SNAPSHOT",
        **rollout.job_configuration(),
    )
    return {"via": "jobs", "job_id": reply["jobId"], "job_arn": reply["jobArn"], "target": target, "document": document}


def load_recipe(path: Path) -> dict[str, Any]:
    """The model component's recipe (JSON or YAML), deploy/greengrass/model/recipe.json by default."""
    try:
        recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--recipe {path}: cannot read it ({exc.strerror}); pass the model component recipe (deploy/greengrass/model/recipe.json)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--recipe {path}: not valid YAML/JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(recipe, dict) or "ComponentName" not in recipe or not any(_zip_artifact(m.get("Artifacts") or []) for m in recipe.get("Manifests") or []):
        raise ConfigError(f"--recipe {path}: not a model component recipe (needs ComponentName and a manifest with an Unarchive: ZIP artifact)")
    return recipe


def _zip_artifact(artifacts: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((artifact for artifact in artifacts if str(artifact.get("Unarchive", "")).upper() == "ZIP"), None)


def _uri_key(artifact: dict[str, Any]) -> str:
    """Recipes spell it URI or Uri; keep the recipe's spelling."""
    return next((key for key in artifact if key.lower() == "uri"), "URI")


def artifact_file_name(recipe: dict[str, Any]) -> str:
    """The file name the bundle zip must keep: the nucleus unpacks it to a folder of that name, which the
    agent component's Run script points --model at."""
    artifact = next(filter(None, (_zip_artifact(m.get("Artifacts") or []) for m in recipe["Manifests"])))
    return PurePosixPath(artifact[_uri_key(artifact)]).name


def component_recipe(recipe: dict[str, Any], release: Release) -> dict[str, Any]:
    """The recipe for this release: its version, and each manifest's zip artifact pointing at the release."""
    uri = f"s3://{release.bucket}/{release.key}"
    manifests = []
    for manifest in recipe["Manifests"]:
        artifacts = list(manifest.get("Artifacts") or [])
        bundle = _zip_artifact(artifacts)
        manifests.append({**manifest, "Artifacts": [{**artifact, _uri_key(artifact): uri} if artifact is bundle else artifact for artifact in artifacts]})
    return {**recipe, "ComponentVersion": release.version, "Manifests": manifests}


def create_deployment(aws: Aws, component: str, version: str, target: str, rollout: Rollout, *, configure: dict[str, dict] | None = None, remove: str | None = None) -> dict[str, Any]:
    """A Greengrass deployment of `component` at `version` to `target`, keeping the target's other components.

    A deployment replaces the target's previous one, so the latest deployment's components and policies are
    carried over and only this component's version changes (and, with `configure`, a component's configuration
    is merged; with `remove`, a component is left out).
    """
    components: dict[str, Any] = {}
    policies: dict[str, Any] = {"failureHandlingPolicy": "ROLLBACK", "componentUpdatePolicy": {"action": "NOTIFY_COMPONENTS", "timeoutInSeconds": 60}}
    latest = aws.call("greengrassv2", "list_deployments", targetArn=target, historyFilter="LATEST_ONLY").get("deployments", [])
    if latest:
        current = aws.call("greengrassv2", "get_deployment", deploymentId=latest[0]["deploymentId"])
        components = current.get("components") or {}
        policies = current.get("deploymentPolicies") or policies
    components = {name: value for name, value in {**components, component: {**components.get(component, {}), "componentVersion": version}}.items() if name != remove}
    for name, merge in (configure or {}).items():
        if name not in components:
            raise ConfigError(f"component {name} is not in the latest deployment to {target}; deploy the agent component there first")
        components[name] = {**components[name], "configurationUpdate": {"merge": json.dumps(merge)}}
    reply = aws.call(
        "greengrassv2",
        "create_deployment",
        targetArn=target,
        deploymentName=f"{component} {version}",
        components=components,
        deploymentPolicies=policies,
        iotJobConfiguration=rollout.job_configuration(),
    )
    return {"via": "greengrass", "deployment_id": reply["deploymentId"], "iot_job_id": reply.get("iotJobId"), "target": target, "components": components}


def publish_component(aws: Aws, release: Release, recipe_path: Path, target: str, rollout: Rollout, *, promote: bool = False) -> dict[str, Any]:
    """A new model component version for the release, deployed to `target`; promoting, the candidate component
    evaluated in shadow leaves the deployment and the agent's shadow.candidate is cleared."""
    recipe = component_recipe(load_recipe(recipe_path), release)
    aws.call("greengrassv2", "create_component_version", inlineRecipe=json.dumps(recipe).encode())
    if not promote:
        return create_deployment(aws, recipe["ComponentName"], release.version, target, rollout)
    clear = {AGENT_COMPONENT: {"shadow": {"candidate": None}}}
    return create_deployment(aws, recipe["ComponentName"], release.version, target, rollout, configure=clear, remove=recipe["ComponentName"] + CANDIDATE_SUFFIX)


def publish_candidate(aws: Aws, release: Release, recipe_path: Path, target: str, rollout: Rollout, shadow: ShadowPlan) -> dict[str, Any]:
    """The release as the model's candidate component, deployed beside the serving one, and the agent's
    configuration naming where the nucleus unpacks it as `shadow.candidate` (agent.cloud.nucleus evaluates it)."""
    recipe = component_recipe(load_recipe(recipe_path), release)
    candidate = recipe["ComponentName"] + CANDIDATE_SUFFIX
    aws.call("greengrassv2", "create_component_version", inlineRecipe=json.dumps({**recipe, "ComponentName": candidate}).encode())
    folder = PurePosixPath(artifact_file_name(recipe)).stem
    plan = {"candidate": f"{GREENGRASS_ROOT}/packages/artifacts-unarchived/{candidate}/{release.version}/{folder}", **shadow.model_dump(exclude_none=True)}
    return create_deployment(aws, candidate, release.version, target, rollout, configure={AGENT_COMPONENT: {"shadow": plan}})


def roll_out(aws: Aws, release: Release, target: str, via: Literal["jobs", "greengrass"], rollout: Rollout, *, presign_role_arn: str | None, recipe: Path, new_component: bool, allow_downgrade: bool = False, continuous: bool = False, shadow: ShadowPlan | None = None, promote: bool = False) -> dict[str, Any]:
    """Publish, promote and rollback alike: hand the release to the chosen engine (in shadow mode: to be
    evaluated beside the serving model). Promoting through IoT Jobs is the release's serve-mode document (the
    devices serve the copy in their store); through Greengrass, the release as the model component's version."""
    if via == "jobs":
        return create_job(aws, release, target, rollout, presign_role_arn, allow_downgrade=allow_downgrade, continuous=continuous, shadow=shadow)
    if shadow is not None:
        return publish_candidate(aws, release, recipe, target, rollout, shadow)
    if new_component or promote:
        return publish_component(aws, release, recipe, target, rollout, promote=promote)
    return create_deployment(aws, load_recipe(recipe)["ComponentName"], release.version, target, rollout)


def cancel_job(aws: Aws, job: str, *, force: bool = False, comment: str = "canceled by edge-fleet") -> dict[str, Any]:
    """Cancel a rollout: queued executions are removed; in-progress ones too with `force`."""
    fix = f"job {job!r} not found; list jobs with `aws iot list-jobs`"
    reply = aws.call("iot", "cancel_job", jobId=job, reasonCode="OPERATOR_CANCELED", comment=comment, force=force, fix=fix)
    return {"job_id": reply.get("jobId", job), "canceled": True, "force": force}
