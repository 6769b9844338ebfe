"""The model-update job document: what an operator signs and a device parses before it fetches anything.

Shared by the device (agent.updates.manager, agent.cloud.jobs) and the operator (agent.fleet.publish), so
the document is described once; deploy/jobs/model-update.schema.json is generated from `ModelUpdate`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.bundles.bundle import SEMVER, SHA256, canonical_bytes
from agent.bundles.signing import Signature
from agent.errors import AgentError, Reason

OPERATION = "model-update"


class Status(StrEnum):
    """The job execution status an outcome maps to (AWS IoT Jobs' own words)."""

    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"



class UpdateFailed(AgentError):
    """An update refused at some step; `reason` is the code reported to the cloud."""

    def __init__(self, reason: Reason, message: str, status: Status = Status.FAILED):
        super().__init__(message)
        self.reason = reason
        self.status = status


class ShadowPlan(BaseModel):
    """How long a candidate runs in shadow beside the serving model, and whether it may then serve.

    Unset fields take the device's `shadow` settings. The evaluation ends at `frames` evaluated frames or
    `seconds`, whichever comes first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    frames: int | None = Field(None, ge=1, le=1_000_000, description="end after this many frames evaluated by the candidate")
    seconds: float | None = Field(None, gt=0, le=7 * 24 * 3600, description="end after this long, however many frames were evaluated")
    every_nth: int | None = Field(None, ge=1, le=1000, description="evaluate every Nth frame the serving model serves")
    promote_at: float | None = Field(None, ge=0.0, le=1.0, description="promote the candidate (hot swap, health window, rollback) when its agreement reaches this")


class ModelUpdate(BaseModel):
    """A job document asking for a model update (deploy/jobs/model-update.schema.json is generated from it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="model-update job document")

    operation: Literal["model-update"]
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="model name, as in the bundle's manifest")
    version: str = Field(pattern=SEMVER, description="semantic version, as in the bundle's manifest")
    url: str = Field(
        pattern=r"^(https://|http://|\$\{aws:iot:s3-presigned-url-v2:https://)",
        description="https URL of the bundle .zip, or ${aws:iot:s3-presigned-url-v2:https://s3.<region>.amazonaws.com/<bucket>/<key>} for IoT Core to presign",
    )
    sha256: SHA256 = Field(description="sha256 of the bundle .zip")
    size: int = Field(gt=0, description="size of the bundle .zip in bytes")
    signature: Signature | None = Field(None, description="the operator's Ed25519 signature of document_signed_bytes(name, version, sha256, size)")
    allow_downgrade: bool = Field(False, description="install even if older than the version serving now")
    mode: Literal["serve", "shadow"] = Field("serve", description="serve: swap it in; shadow: verify it, then run it beside the serving model on sampled frames and report agreement, publishing none of its predictions")
    shadow: ShadowPlan | None = Field(None, description="shadow mode options (default: the device's shadow settings)")


JOB_SCHEMA_ID = "https://github.com/edge-agent/schemas/model-update.schema.json"


def job_document_schema() -> dict:
    """The JSON Schema of a model-update job document (committed as deploy/jobs/model-update.schema.json)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": JOB_SCHEMA_ID, **ModelUpdate.model_json_schema()}


def document_signed_bytes(name: str, version: str, sha256: str, size: int) -> bytes:
    """What a job document's signature covers: the artifact's identity, canonical JSON."""
    return canonical_bytes({"name": name, "version": version, "sha256": sha256, "size": size})


def parse_update(raw: Any) -> ModelUpdate:
    """A decoded job document -> ModelUpdate, or UpdateFailed naming what is wrong with it."""
    if not isinstance(raw, dict):
        raise UpdateFailed(Reason.MALFORMED_DOCUMENT, "job document must be a JSON object; see deploy/jobs/model-update.schema.json")
    if raw.get("operation") != OPERATION:
        raise UpdateFailed(Reason.UNKNOWN_OPERATION, f"job operation {raw.get('operation')!r} is unknown to this agent (it handles {OPERATION!r})")
    for key in ("name", "version"):
        value = raw.get(key)
        if isinstance(value, str) and ("/" in value or "\\" in value or ".." in value or value.startswith(".")):
            raise UpdateFailed(Reason.UNSAFE_PATH, f"job document {key} {value!r} contains a path; use a plain model {key}")
    try:
        return ModelUpdate.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise UpdateFailed(Reason.MALFORMED_DOCUMENT, f"job document {key}: {first['msg']}; see deploy/jobs/model-update.schema.json") from None


def version_key(version: str) -> tuple:
    """Semantic-version order: 1.2.3-rc1 < 1.2.3 < 1.10.0 (build metadata ignored)."""
    core, _, pre = version.split("+", 1)[0].partition("-")
    numbers = tuple(int(part) for part in core.split("."))
    pre_parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")) if pre else ()
    return numbers, (0, pre_parts) if pre else (1, ())
