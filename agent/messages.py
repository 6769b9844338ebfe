"""The messages the agent publishes, as pydantic models with a published JSON Schema.

Every message carries a schema version, a unique id, and (run id, sequence) so a receiver can drop
duplicates (QoS1 delivers at least once) and spot gaps. Times are UTC ISO 8601, scores are numbers.
`agent/schemas/*.json` are generated from these models (`edge-agent schema`) and checked by a test.
"""

from __future__ import annotations

import itertools
import json
import uuid
from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.0"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def new_message_id() -> str:
    return str(uuid.uuid4())


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class Box(Message):
    """Where a prediction is, in frame pixels (origin top-left)."""

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    w: int = Field(gt=0)
    h: int = Field(gt=0)

    def iou(self, other: Box) -> float:
        """Intersection over union: 1.0 for the same box, 0.0 for boxes that do not touch."""
        x = max(0, min(self.x + self.w, other.x + other.w) - max(self.x, other.x))
        y = max(0, min(self.y + self.h, other.y + other.h) - max(self.y, other.y))
        overlap = x * y
        return overlap / (self.w * self.h + other.w * other.h - overlap)


class Keypoint(Message):
    """A named point of a detection (a face's eyes, nose tip, ...), in frame pixels."""

    name: str
    x: int
    y: int


class Prediction(Message):
    label: str
    class_index: int = Field(ge=0)
    score: float = Field(ge=0.0, le=1.0)
    box: Box | None = None
    keypoints: list[Keypoint] | None = Field(None, description="points of the detection, in the order its model names them")


class ModelRef(Message):
    """Which model produced a result: enough to tell two versions of the same model apart."""

    name: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    backend: str | None = Field(None, description="the backend that ran it (litert, openvino, ...)")
    device: str | None = Field(None, description="what the backend ran it on, e.g. CPU (1 thread)")


class StageLatency(Message):
    """Milliseconds spent in each stage of the frame's trip through the pipeline."""

    find_ms: float = Field(ge=0)
    classify_ms: float = Field(ge=0)
    total_ms: float = Field(ge=0, description="from frame handed to the pipeline to result built")


class Envelope(Message):
    """Fields every message shares."""

    schema_version: Literal["1.0"] = SCHEMA_VERSION
    message_id: str = Field(default_factory=new_message_id)
    thing_name: str
    run_id: str = Field(description="changes every time the agent starts; sequence restarts at 1 with it")
    sequence: int = Field(ge=1, description="per (thing, run), +1 for every message of any kind")
    sent_at: datetime = Field(default_factory=utc_now)


class InferenceResult(Envelope):
    kind: Literal["inference"] = "inference"
    source: str
    frame: int = Field(ge=0, description="frame number within the source, from 0")
    captured_at: datetime
    model: ModelRef
    task: str = Field(description="what the predictions are: the task id of the model's bundle (mnist-digits: one digit per box; detection: objects with boxes and keypoints)")
    predictions: list[Prediction]
    latency: StageLatency


class ShadowFigures(Message):
    """How a candidate running in shadow compares with the serving model, so far or in the end.

    Per prediction: boxes are matched at IoU 0.5 (a classifier's single prediction is its top-1), and a
    prediction agrees when its match has the same label. `agreement` is agreeing predictions over the larger
    of the two models' prediction counts, summed over the frames evaluated.
    """

    candidate: ModelRef
    state: Literal["running", "succeeded", "failed", "promoted"]
    frames: int = Field(ge=0, description="frames the candidate evaluated")
    frames_served: int = Field(ge=0, description="frames the serving model served meanwhile")
    frames_skipped: int = Field(ge=0, description="sampled frames not evaluated: the candidate was busy or over its CPU budget")
    agreement: float | None = Field(None, ge=0.0, le=1.0)
    box_match: float | None = Field(None, ge=0.0, le=1.0, description="predictions with a counterpart at IoU 0.5 (classifier: always 1)")
    label_agreement: float | None = Field(None, ge=0.0, le=1.0, description="of the matched predictions, those with the same label")
    score_drift: float | None = Field(None, description="mean candidate score minus serving score, over matched predictions")
    latency_ratio: float | None = Field(None, ge=0.0, description="candidate median time per frame over the serving model's")
    elapsed_s: float = Field(ge=0)
    reason: str | None = None


class StatusMessage(Envelope):
    """Retained on the status topic; the MQTT last will publishes the offline form."""

    kind: Literal["status"] = "status"
    state: Literal["online", "offline", "degraded"]
    agent_version: str
    model: ModelRef | None = None
    reason: str | None = None
    outbox_dropped: int = Field(0, ge=0, description="messages the outbox dropped this run (full, too old, or refused for good)")
    shadow: ShadowFigures | None = Field(None, description="the newest shadow evaluation of this run, so far or in the end (what `edge-fleet fleet status` shows)")


class MetricsMessage(Envelope):
    kind: Literal["metrics"] = "metrics"
    interval_s: float
    model: ModelRef | None = None
    frames_read: int
    frames_dropped: int
    frames_corrupt: int
    results: int
    fps: float
    latency_p50_ms: float
    latency_p99_ms: float
    outbox_depth: int = 0
    outbox_dropped: int = 0
    shadow: ShadowFigures | None = Field(None, description="a candidate model's shadow evaluation, while one runs and when it ends")


class CaptureImage(Message):
    """One JPEG of a capture: the whole frame (no box), or one prediction's box cut out of it."""

    file: str = Field(pattern=r"^[0-9a-f-]{36}(-[0-9]+)?\.jpg$")
    box: Box | None = None


class CaptureRecord(Message):
    """What a kept frame is, stored beside its JPEG(s) in S3 (`captures/{thing}/{date}/{model}/{id}.json`):
    enough to review it, label it and train on it. `edge-fleet data pull` reads these."""

    schema_version: Literal["1.0"] = SCHEMA_VERSION
    kind: Literal["capture"] = "capture"
    capture_id: str = Field(pattern=r"^[0-9a-f-]{36}$")
    thing_name: str
    captured_at: datetime
    source: str
    frame: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    strategy: Literal["near_threshold", "disagreement", "random"]
    score_threshold: float = Field(ge=0.0, le=1.0)
    model: ModelRef
    predictions: list[Prediction] = Field(description="what the serving model said: the proposed labels")
    candidate: ModelRef | None = Field(None, description="the shadow candidate that disagreed (strategy disagreement)")
    candidate_predictions: list[Prediction] | None = None
    images: list[CaptureImage] = Field(min_length=1)

    def key_prefix(self, prefix: str = "captures") -> str:
        """Where it goes in S3: the device's own prefix (the upload role allows nothing else), then date and model."""
        return f"{prefix}/{self.thing_name}/{self.captured_at:%Y-%m-%d}/{self.model.name}-{self.model.version}"


class Batch(Message):
    """Several messages of one topic in one MQTT message, oldest first (setting outbox.batch_max).

    Only a wrapper: every message inside keeps its own id and (run id, sequence), so a receiver
    de-duplicates and spots gaps exactly as for single messages. IoT Core meters each connection's
    publishes (100/s) and bills per 5 KB, so ten ~0.9 KB results in one publish drain a backlog ten times
    faster and cost two messages' worth instead of ten.
    """

    schema_version: Literal["1.0"] = SCHEMA_VERSION
    kind: Literal["batch"] = "batch"
    messages: list[Annotated[InferenceResult | MetricsMessage, Field(discriminator="kind")]] = Field(min_length=1)


PUBLISHED = {"inference-result": InferenceResult, "status": StatusMessage, "metrics": MetricsMessage, "batch": Batch, "capture": CaptureRecord}

_BATCH_HEAD, _BATCH_TAIL = b'{"schema_version":"1.0","kind":"batch","messages":[', b"]}"
BATCH_OVERHEAD = len(_BATCH_HEAD) + len(_BATCH_TAIL)  # bytes a batch adds, besides one comma per message after the first


def batch_payload(payloads: list[bytes]) -> bytes:
    """Already-encoded messages as one Batch, joined as they are (the sender never decodes them again)."""
    return _BATCH_HEAD + b",".join(payloads) + _BATCH_TAIL


def unbatch(payload: bytes | str) -> list[dict]:
    """What a receiver does with a payload from an agent topic: the messages it carries (a batch's, or itself)."""
    message = json.loads(payload)
    return message["messages"] if message.get("kind") == "batch" else [message]


class SequenceCounter:
    """Hands out (run id, sequence) for one run of the agent. One instance serves every message kind."""

    def __init__(self, thing_name: str):
        self.thing_name = thing_name
        self.run_id = new_message_id()
        self._sequence = itertools.count(1)  # next() on it is atomic under the GIL: safe from any thread

    def envelope(self) -> dict:
        """Keyword arguments for a new message's envelope fields."""
        return {"thing_name": self.thing_name, "run_id": self.run_id, "sequence": next(self._sequence)}
