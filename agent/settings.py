"""Every setting of the agent, as one pydantic model tree.

Sources, lowest priority first: defaults, a settings file (`--config`, YAML/JSON/TOML), environment
variables (`EDGE_AGENT_` prefix, `__` between levels: `EDGE_AGENT_MQTT__ENDPOINT`), command-line flags,
and under Greengrass the component configuration (same names, same tree). Each module receives only the
branch it needs.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import string
import typing
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Mapping, Union

import tomllib
import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator
from pydantic_settings import EnvSettingsSource

from agent.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent
# What ships inside the package (agent/shipped/ links to models/ and deploy/ in a checkout; a wheel holds copies),
# so an installed agent needs no source checkout.
SHIPPED = PACKAGE / "shipped"
SHIPPED_BUNDLE = SHIPPED / "mnist-bundle"
SHIPPED_SAMPLE_VIDEO = SHIPPED / "sample.avi"
# The development key that signs the shipped bundles (MNIST 1.2.0, face, COCO), and the earlier ones, whose
# private halves are lost, so they sign nothing new; the bundles they signed still load: 1.0.0 (the first
# key), 1.1.0 and the face bundle as first shipped (the 2026-12 key).
DEV_SIGNING_KEY = SHIPPED / "keys" / "dev-signing-2026-12b.pub"
PREVIOUS_DEV_SIGNING_KEY = SHIPPED / "keys" / "dev-signing.pub"
DEV_SIGNING_KEY_2026_12 = SHIPPED / "keys" / "dev-signing-2026-12.pub"
DEV_SIGNING_KEYS = (PREVIOUS_DEV_SIGNING_KEY, DEV_SIGNING_KEY_2026_12, DEV_SIGNING_KEY)
AMAZON_ROOT_CA = PACKAGE / "certs" / "AmazonRootCA1.pem"
# State the agent writes; relative values of these settings are inside state_dir.
STATE_PATHS = (("outbox", "path"), ("updates", "store"), ("capture", "spool"))
# A source spec that names a camera or a URL (camera:0, rtsp://...) rather than a file or folder.
LOCATION = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class Section(BaseModel):
    """A settings branch: unknown keys are errors, so a typo is named instead of silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceSettings(Section):
    spec: str = Field(str(SHIPPED_SAMPLE_VIDEO), description="camera:N, a video file, an image folder, or an rtsp:// / http(s):// stream URL (default: the sample video shipped in the package)")
    loop: bool = Field(False, description="restart a video file or image folder at its end instead of stopping")
    pace_fps: float | None = Field(None, gt=0, description="most frames a second taken from the source: a file is read at this rate, like a camera; a camera or stream drops the frames in between (default: as fast as the model goes)")
    colour: bool | None = Field(
        None,
        description="keep frames in colour (the live view shows them so); off, frames are grey, all the digit finder reads, and an MJPG file decodes in 40% less time; "
        "null: as the model in use reads them (colour for a face detector, grey for the digit finder), switching when a model update swaps one for the other",
    )
    open_timeout_s: float = Field(30.0, ge=0, description="how long start-up keeps trying to open a camera or stream that is not there yet (plugged in late, still booting) before giving up; 0: one attempt")
    reconnect_initial_s: float = Field(0.5, gt=0, description="first wait before reopening a live source that disappeared (or did not open at start-up)")
    reconnect_max_s: float = Field(1.0, gt=0, description="longest wait between reopen attempts (the wait doubles up to this); frames flow again within about this long of the source's return")
    read_timeout_s: float = Field(5.0, gt=0, description="a live source with no new frame for this long counts as stalled")


THREADS = "threads one invoke may use; one is fastest for a model this small"


class DelegateSettings(Section):
    """An external TFLite delegate: a shared library with the delegate plugin API (tflite_plugin_create_delegate)."""

    library: str = Field(min_length=1, description="the delegate's shared library: a path, or a name the loader finds (libedgetpu.so.1)")
    options: dict[str, str] = Field(default_factory=dict, description="options handed to the delegate, e.g. {device: usb} for the Edge TPU")


class InterpreterSettings(Section):
    """The TFLite interpreter's knobs, the same in ai-edge-litert and tflite-runtime."""

    threads: int = Field(1, ge=1, le=64, description=THREADS)
    kernels: Literal["xnnpack", "builtin"] = Field("xnnpack", description="CPU kernels: XNNPACK, or TFLite's builtin ones (no default delegate)")
    delegate: DelegateSettings | None = Field(None, description="external delegate {library: PATH, options: {KEY: VALUE}} (Edge TPU, GPU, Hexagon...); ops it does not take stay on the CPU")


class LiteRtSettings(InterpreterSettings):
    type: Literal["litert"] = "litert"


class TfliteRuntimeSettings(InterpreterSettings):
    type: Literal["tflite-runtime"] = "tflite-runtime"


class LiteRtCompiledSettings(Section):
    type: Literal["litert-compiled"] = "litert-compiled"
    threads: int = Field(1, ge=1, le=64, description=THREADS)
    accelerator: Literal["cpu", "npu"] = Field("cpu", description="cpu: LiteRT's own CPU kernels; npu: compiled for the vendor dispatch library ai-edge-litert bundles (Intel OpenVINO)")
    openvino_device: Literal["NPU", "GPU", "CPU"] = Field("NPU", description="with accelerator npu, the Intel device OpenVINO compiles for (CPU runs the NPU path on any x86 machine)")


class OpenVinoSettings(Section):
    type: Literal["openvino"] = "openvino"
    threads: int = Field(1, ge=1, le=64, description=THREADS)
    device: str = Field("CPU", min_length=1, description="OpenVINO device: CPU, GPU, NPU, or AUTO")


class OnnxRuntimeSettings(Section):
    type: Literal["onnxruntime"] = "onnxruntime"
    threads: int = Field(1, ge=1, le=64, description=THREADS)
    providers: list[str] = Field(["CPUExecutionProvider"], min_length=1, description="ONNX Runtime execution providers, in order of preference")


class AutoBackendSettings(Section):
    type: Literal["auto"] = "auto"
    threads: int = Field(1, ge=1, le=64, description=THREADS)


class PluginBackendSettings(Section):
    """A backend another package adds (entry point group edge_agent.backends); it validates its own settings."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    type: str


BACKEND_SETTINGS: dict[str, type[Section]] = {
    cls.model_fields["type"].default: cls
    for cls in (AutoBackendSettings, LiteRtSettings, LiteRtCompiledSettings, TfliteRuntimeSettings, OpenVinoSettings, OnnxRuntimeSettings)
}
BACKEND_ENTRY_POINTS = "edge_agent.backends"


def _backend_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in BACKEND_SETTINGS else "plugin"


BackendSettings = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in BACKEND_SETTINGS.items()) + (Annotated[PluginBackendSettings, Tag("plugin")],)],
    Discriminator(_backend_tag),
]


class ModelSettings(Section):
    bundle: Path = Field(SHIPPED_BUNDLE, description="model bundle directory or .zip (default: the one shipped in the package)")
    trusted_keys: list[Path] = Field(default_factory=lambda: list(DEV_SIGNING_KEYS), description="Ed25519 public keys (PEM) allowed to sign bundles (default: the development keys shipped in the package)")
    require_signature: bool = Field(True, description="refuse bundles without a valid signature from a trusted key")
    backend: BackendSettings = Field(
        AutoBackendSettings(),
        description="what runs the model: auto (the first installed of litert, tflite-runtime, litert-compiled, openvino, onnxruntime), "
        "one of those, or a plugin's name; a name alone, or {type: NAME, ...its settings below}",
    )
    max_bundle_mb: float = Field(16.0, gt=0, description="largest bundle accepted, unpacked")
    score_threshold: float = Field(0.5, ge=0.0, le=1.0, description="predictions scoring below this are not published")

    @property
    def max_bundle_bytes(self) -> int:
        return int(self.max_bundle_mb * 1024 * 1024)

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_by_name(cls, value: Any) -> Any:
        """"litert" means {type: litert}; a type no built-in backend or installed plugin has is named here."""
        if isinstance(value, str):
            value = {"type": value}
        if isinstance(value, dict):
            kind = value.get("type", "auto")
            plugins = {entry.name for entry in entry_points(group=BACKEND_ENTRY_POINTS)} if kind not in BACKEND_SETTINGS else set()
            if kind not in BACKEND_SETTINGS and kind not in plugins:
                known = ", ".join([*BACKEND_SETTINGS, *sorted(plugins)])
                raise ValueError(f"unknown backend {kind!r}; choose one of {known}")
            value = {**value, "type": kind}
        return value

    @model_validator(mode="before")
    @classmethod
    def _threads_moved(cls, values: Any) -> Any:
        if isinstance(values, dict) and "num_threads" in values:
            raise ValueError("model.num_threads moved into the backend: set model.backend.threads (e.g. model.backend: {type: litert, threads: 2})")
        return values


TOPIC_PLACEHOLDERS = ("prefix", "thing")


class TopicSettings(Section):
    prefix: str = Field("edge", description="first topic level; '{thing}' below is the thing name")
    inference: str = Field("{prefix}/{thing}/inference", description="results, QoS 1")
    status: str = Field("{prefix}/{thing}/status", description="retained online/degraded/offline (the last will)")
    metrics: str = Field("{prefix}/{thing}/metrics", description="periodic pipeline statistics")
    commands: str = Field("{prefix}/{thing}/commands", description="subscribed: commands addressed to this thing")

    @field_validator("inference", "status", "metrics", "commands")
    @classmethod
    def _placeholders_known(cls, template: str) -> str:
        """A template is expanded with str.format: refuse here what would fail (or come out wrong) there."""
        usage = "placeholders are {prefix} and {thing}, and a literal brace is written twice"
        try:
            fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template) if name is not None]
        except ValueError as exc:  # an unbalanced brace
            raise ValueError(f"{str(exc).lower()}; {usage}") from None
        for name, spec, conversion in fields:
            if name not in TOPIC_PLACEHOLDERS or spec or conversion:
                raise ValueError(f"unknown placeholder {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}; {usage}")
        return template


class MqttSettings(Section):
    endpoint: str | None = Field(None, description="IoT Core data endpoint (aws iot describe-endpoint --endpoint-type iot:Data-ATS)")
    port: int = Field(8883, ge=1, le=65535, description="8883 for mutual TLS (443 would need ALPN)")
    cert: Path | None = Field(None, description="device certificate (PEM)")
    key: Path | None = Field(None, description="device private key (PEM)")
    ca: Path = Field(AMAZON_ROOT_CA, description="CA that signed the endpoint's certificate")
    keep_alive_s: int = Field(60, ge=5, le=1200, description="MQTT keep-alive; IoT Core allows 30 to 1200")
    flow_control: Literal["iot-core", "none"] = Field("iot-core", description="iot-core caps publishing at IoT Core's per-connection quotas")
    connect_timeout_s: float = Field(10.0, gt=0, description="how long start-up waits for the first connection attempt before carrying on offline")
    min_reconnect_delay_s: float = Field(1.0, gt=0, description="first wait before reconnecting (the SDK backs off exponentially, with full jitter)")
    max_reconnect_delay_s: float = Field(120.0, gt=0, description="longest wait between reconnect attempts")
    ack_timeout_s: int = Field(60, ge=1, description="a publish not acknowledged this long after sending is retried by the outbox")


class IotSettings(Section):
    """IoT Core's device services, on the agent's own MQTT connection (transport mqtt; other transports ignore them)."""

    jobs: bool = Field(True, description="take model updates from IoT Jobs; off for a broker that is not IoT Core, or a policy without the Jobs topics")
    shadow: bool = Field(True, description="report the model in use and take desired threshold/rate from the classic Device Shadow; off for a broker that is not IoT Core, or a policy without the Shadow topics")
    request_timeout_s: int = Field(30, ge=1, le=300, description="how long a Jobs or Shadow request waits for its answer before it is retried later")


class LogSettings(Section):
    """What the agent logs on stderr, and how (journald and CloudWatch read JSON lines)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="least severe level logged (INFO: connections, the model served, jobs, outbox backlog)")
    format: Literal["text", "json"] = Field("text", description="text: time level logger: message; json: one object per line with time, level, logger, message and the event's own fields")

    @field_validator("level", mode="before")
    @classmethod
    def _upper_case(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class OutboxSettings(Section):
    path: Path = Field(Path("outbox.sqlite3"), description="SQLite spool holding results until their PUBACK (relative: inside state_dir)")
    max_mb: float = Field(64.0, gt=0, description="oldest results are dropped (and counted) past this size")
    max_age_s: float = Field(7 * 24 * 3600, gt=0, description="results older than this are dropped (and counted)")
    max_publishes_per_s: float = Field(100.0, gt=0, description="IoT Core allows 100 publishes/s per connection")
    max_bytes_per_s: float = Field(512 * 1024, gt=0, description="IoT Core allows 512 KiB/s per connection")
    synchronous: Literal["normal", "full"] = Field("normal", description="normal: a power cut can lose the last sync_interval_s of results; full: fsync every result")
    sync_interval_s: float = Field(1.0, gt=0, description="how often the outbox is checkpointed; with synchronous=normal, how often accepted results are fsynced")
    max_in_flight: int = Field(100, ge=1, description="results sent but not yet acknowledged, at most (the SDK queues them in order, so this bounds how long a Jobs/Shadow request waits behind results)")
    batch_max: int = Field(10, ge=1, le=100, description="most waiting messages of one topic sent as one batch message (1: each alone); fewer publishes drain a backlog faster within IoT Core's quota and cost less")
    retry_initial_s: float = Field(0.5, gt=0, description="first wait before resending after a failed publish (doubles up to retry_max_s)")
    retry_max_s: float = Field(30.0, gt=0, description="longest wait before resending after failed publishes")


class DigitFinderSettings(Section):
    """How the finder looks for digits. Heights are fractions of the frame height, so one setting serves
    any camera resolution."""

    finder: Literal["auto", "learned", "opencv"] = Field(
        "auto",
        description="learned: the bundle's finder model (finder.tflite, best on ruled paper, close digits and shadows); "
        "opencv: the hand-written finder; auto: learned when the bundle carries a finder model",
    )
    centre_score: float = Field(0.3, gt=0, lt=1, description="learned finder: a digit's centre must score at least this")
    learned_min_contrast: float = Field(
        0.12, gt=0, lt=1, description="learned finder: the ink at a found centre must differ from its own paper by this "
        "fraction of it (below min_contrast: the network has already judged it a digit, and shadows and blur fade ink)",
    )
    polarity: Literal["auto", "dark", "light"] = Field(
        "auto", description="dark: dark ink on light paper; light: chalk on a dark board; auto: either, per digit"
    )
    min_height: float = Field(0.05, gt=0, lt=1, description="smallest digit, as a fraction of the frame height")
    max_height: float = Field(0.35, gt=0, le=1, description="largest digit, as a fraction of the frame height")
    min_contrast: float = Field(
        0.25, gt=0, lt=1, description="ink must differ from the local paper by this fraction of it"
    )
    max_aspect: float = Field(
        2.2, gt=0, description="widest digit, width / height (MNIST's widest are 2.0); wider marks are lines"
    )
    max_fill: float = Field(0.8, gt=0, le=1, description="solid blobs filling more of their box are not digits")
    join_gap: float = Field(
        0.12, ge=0, lt=1, description="pieces closer than this fraction of their height are one digit"
    )
    work_width: int = Field(320, ge=64, description="frames wider than this are downscaled for finding")
    max_digits: int = Field(16, ge=1, description="keep at most this many digits (the inkiest) per frame")

    @model_validator(mode="after")
    def _heights_ordered(self) -> DigitFinderSettings:
        if self.min_height >= self.max_height:
            raise ValueError(f"min_height ({self.min_height}) must be below max_height ({self.max_height})")
        return self


class DetectionSettings(Section):
    """How a detector's raw candidates become detections (the score threshold is model.score_threshold)."""

    max_detections: int = Field(20, ge=1, le=1000, description="keep at most this many detections per frame (the highest scoring)")
    nms_iou: float = Field(0.3, gt=0, le=1, description="candidates of one label overlapping a better one by more than this IoU are the same object")
    weighted_nms: bool = Field(True, description="merge the candidates of one object into their score-weighted mean box (MediaPipe's WEIGHTED) instead of keeping only the best")


class TaskSettings(Section):
    """Each task's own settings, under its task id (dashes as underscores); a bundle's task reads its own."""

    mnist_digits: DigitFinderSettings = DigitFinderSettings()
    detection: DetectionSettings = DetectionSettings()


class LiveViewSettings(Section):
    """The live view server."""

    enabled: bool = Field(False, description="serve the live view, /metrics and /healthz over HTTP")
    host: str = Field("127.0.0.1", description="address to listen on; 0.0.0.0 exposes the unauthenticated view to the network")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0: any free port)")
    max_fps: float = Field(10.0, gt=0, le=60, description="most frames a second sent to a viewer")
    jpeg_quality: int = Field(80, ge=10, le=100, description="JPEG quality of the stream")



class WatchdogSettings(Section):
    """When the agent counts as unhealthy, and when a stuck stage is restarted."""

    enabled: bool = Field(True, description="restart a source or inference stage that is stuck, and report health changes on the status topic")
    stale_after_s: float = Field(10.0, gt=0, description="unhealthy (/healthz 503) when no frame arrived for this long")
    source_stall_s: float = Field(60.0, gt=0, description="restart the source when it delivers no frame for this long")
    inference_stall_s: float = Field(30.0, gt=0, description="restart inference when one frame takes this long")
    max_restarts: int = Field(3, ge=1, description="report ERRORED after this many restarts in a row that did not bring frames back")
    check_interval_s: float = Field(1.0, gt=0, description="how often the watchdog looks")



class DownloadSettings(Section):

    max_mb: float = Field(16.0, gt=0, description="largest artifact accepted; bigger downloads stop at the limit")
    connect_timeout_s: float = Field(10.0, gt=0, description="longest wait for the artifact server to accept the connection")
    read_timeout_s: float = Field(30.0, gt=0, description="longest silence from the server before the attempt is retried")
    retries: int = Field(4, ge=0, le=20, description="attempts after the first; each resumes where the last stopped")
    backoff_initial_s: float = Field(1.0, ge=0, description="wait before the first retry; doubles each time")
    backoff_max_s: float = Field(30.0, ge=0, description="longest wait between retries")
    allow_http: bool = Field(False, description="accept plain http:// artifact URLs (development only)")
    ca_file: Path | None = Field(None, description="CA bundle for artifact servers (default: the system's trusted CAs)")

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 1024 * 1024)



class UpdateSettings(Section):
    """`updates` branch of the settings: where models are kept and how much an update is trusted."""

    store: Path = Field(Path("models"), description="versioned model store, one directory per name/version (relative: inside state_dir)")
    keep: int = Field(3, ge=2, le=100, description="installed versions kept; the active and previous are never pruned")
    allow_unsigned: bool = Field(False, description="accept bundles without a signature (development only)")
    allow_downgrade: bool = Field(False, description="accept an older version even when the job document does not say so")
    health_frames: int = Field(30, ge=1, description="frames the new model must serve cleanly before it is kept")
    health_timeout_s: float = Field(30.0, gt=0, description="longest wait for those frames (a stalled source ends the window early)")
    download: DownloadSettings = DownloadSettings()



class GreengrassSettings(Section):
    """How the agent holds on to the Greengrass nucleus (transport greengrass)."""

    wait_for_nucleus_s: float = Field(
        60.0, ge=0, description="how long the agent keeps trying to reach the nucleus's IPC socket, at start (it may still be starting) and after losing it, before it exits with code 2; at start it is read before the component configuration, so set it in the settings file or the environment"
    )


class ShadowSettings(Section):
    """A candidate model run beside the serving one on live frames (a job document in shadow mode, or the
    Greengrass configuration's `shadow.candidate`); job document values override these."""

    candidate: Path | None = Field(None, description="(Greengrass) bundle directory or .zip to evaluate in shadow; null: none. Set model.bundle to the same path to promote it")
    frames: int = Field(300, ge=1, description="evaluation ends after this many frames evaluated by the candidate")
    seconds: float = Field(600.0, gt=0, description="evaluation ends after this long, however many frames were evaluated")
    every_nth: int = Field(3, ge=1, description="the candidate sees every Nth frame the serving model serves")
    cpu_budget: float = Field(0.5, gt=0, le=8, description="most CPU the candidate may use, in cores (0.5: half of one); frames beyond it are skipped and counted")
    stall_s: float = Field(10.0, gt=0, description="a candidate busy with one frame for this long has stalled: the evaluation fails")
    promote_at: float | None = Field(None, ge=0.0, le=1.0, description="promote the candidate when its agreement reaches this (null: only when told)")
    nice: int = Field(10, ge=0, le=19, description="how much lower the candidate thread's scheduling priority is than the serving model's (Linux nice)")


class CredentialSettings(Section):
    """Where capture uploads get temporary AWS credentials; none are ever stored on the device."""

    source: Literal["auto", "iot", "greengrass"] = Field("auto", description="iot: the AWS IoT credentials provider with the device certificate (mqtt.cert/key); greengrass: the token exchange service (AWS_CONTAINER_CREDENTIALS_FULL_URI); auto: greengrass under a nucleus, else iot")
    endpoint: str | None = Field(None, description="credentials provider endpoint (aws iot describe-endpoint --endpoint-type iot:CredentialProvider); host or host:port")
    role_alias: str | None = Field(None, pattern=r"^[\w=,@-]{1,128}$", description="IoT role alias naming the IAM role captures are uploaded with")
    ca: Path = Field(AMAZON_ROOT_CA, description="CA that signed the credentials provider's certificate")
    timeout_s: float = Field(10.0, gt=0, description="longest wait for the credentials provider")


class CaptureSettings(Section):
    """Frames kept for retraining: what is kept, how much, and where it goes (off by default)."""

    enabled: bool = Field(False, description="keep frames the strategies below choose, and upload them to S3")
    near_threshold: float | None = Field(0.1, ge=0, le=1, description="keep a frame with a prediction scoring less than this above the score threshold (unsure); null: off")
    disagreements: bool = Field(True, description="keep frames where a candidate in shadow disagrees with the serving model")
    random_rate: float = Field(0.0, ge=0, le=1, description="keep this share of all frames, at random")
    min_interval_s: float = Field(2.0, ge=0, description="keep at most one frame per this many seconds (frames in a row are near duplicates)")
    crops: bool = Field(False, description="keep the predictions' boxes cut out of the frame instead of the whole frame")
    jpeg_quality: int = Field(85, ge=10, le=100, description="JPEG quality of kept frames")
    max_per_day: int = Field(500, ge=0, description="most frames kept a day (UTC); more are counted and dropped")
    max_mb: float = Field(256.0, gt=0, description="most space the capture spool takes; the oldest waiting captures are dropped (and counted) past it")
    max_age_days: float = Field(14.0, gt=0, description="captures waiting longer than this are dropped (and counted)")
    queue: int = Field(8, ge=1, description="frames waiting to be encoded, at most; the pipeline never waits, a frame beyond is counted and dropped")
    spool: Path = Field(Path("var/captures"), description="durable spool: captures wait here until uploaded")
    bucket: str | None = Field(None, description="S3 bucket; captures go to s3://BUCKET/captures/{thing}/{date}/{model}/; null: keep them in the spool only")
    region: str | None = Field(None, description="the bucket's AWS region (default: AWS_REGION)")
    s3_endpoint_url: str | None = Field(None, description="send S3 requests here instead (a local stand-in; development only)")
    retry_initial_s: float = Field(1.0, gt=0, description="first wait before retrying a failed upload (doubles up to retry_max_s)")
    retry_max_s: float = Field(300.0, gt=0, description="longest wait between upload retries")
    credentials: CredentialSettings = CredentialSettings()


class Settings(Section):
    """The whole agent configuration."""

    thing_name: str = Field("local-dev", min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9:_-]+$", description="IoT thing name; also the MQTT client id (under Greengrass, when not set: the core device's, AWS_IOT_THING_NAME)")
    transport: Literal["console", "mqtt", "greengrass"] = Field("console", description="where results go: stdout, IoT Core over MQTT5, or IoT Core through the Greengrass nucleus")
    max_frames: int | None = Field(None, ge=1, description="stop after this many frames (default: until the source ends)")
    metrics_interval_s: float = Field(60.0, gt=0, description="how often pipeline statistics are published")
    publish_empty: bool = Field(False, description="also publish frames in which nothing was found")
    opencv_threads: int | None = Field(1, ge=1, le=64, description="OpenCV worker threads; the pipeline is one thread, and on small frames a pool only adds wake-ups (null: OpenCV's default)")
    state_dir: Path | None = Field(None, validate_default=True, description="folder for what the agent writes (outbox, model store), the same whichever directory it starts in (null: $XDG_STATE_HOME/edge-agent, or ~/.local/state/edge-agent)")
    source: SourceSettings = SourceSettings()
    model: ModelSettings = ModelSettings()
    tasks: TaskSettings = TaskSettings()
    topics: TopicSettings = TopicSettings()
    mqtt: MqttSettings = MqttSettings()
    iot: IotSettings = IotSettings()
    outbox: OutboxSettings = OutboxSettings()
    liveview: LiveViewSettings = LiveViewSettings()
    watchdog: WatchdogSettings = WatchdogSettings()
    updates: UpdateSettings = UpdateSettings()
    greengrass: GreengrassSettings = GreengrassSettings()
    log: LogSettings = LogSettings()
    shadow: ShadowSettings = ShadowSettings()
    capture: CaptureSettings = CaptureSettings()

    @field_validator("state_dir", mode="after")
    @classmethod
    def _state_dir(cls, value: Path | None) -> Path:
        if value is None:
            value = Path(os.environ.get("XDG_STATE_HOME") or "~/.local/state") / "edge-agent"
        return value.expanduser().absolute()

    @model_validator(mode="after")
    def _state_inside_state_dir(self) -> Settings:
        """Relative state paths name places inside state_dir, so what one run spooled the next run finds."""
        for section, name in STATE_PATHS:
            branch = getattr(self, section)
            path = getattr(branch, name)
            if not path.expanduser().is_absolute():
                setattr(self, section, branch.model_copy(update={name: self.state_dir / path}))
        return self


ENV_PREFIX = "EDGE_AGENT_"
ENV_NESTED_DELIMITER = "__"


def environment_variable(path: tuple[str, ...]) -> str:
    """The EDGE_AGENT_* variable that sets the setting at `path`, e.g. ("mqtt", "port") -> EDGE_AGENT_MQTT__PORT."""
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(path).upper()


def setting_paths(model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every branch and leaf of the settings tree as a key path: all an environment variable may name."""
    for name, field in model.model_fields.items():
        path = prefix + (name,)
        yield path
        for branch in _models_in(field.annotation):
            yield from setting_paths(branch, path)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The settings models a field holds: its own type, or each model of a union."""
    if (section := _section(annotation)) is not None:
        return [section]
    return [model for argument in typing.get_args(annotation) for model in _models_in(argument)]


def check_environment_names(environ: Mapping[str, str]) -> None:
    """Every EDGE_AGENT_* variable must name a setting. pydantic-settings looks up only the names it knows,
    so a typo in a section or top-level name (EDGE_AGENT_MQQT__PORT, EDGE_AGENT_MQTT_PORT) would be ignored."""
    known = {environment_variable(path).removeprefix(ENV_PREFIX) for path in setting_paths()}
    for name in sorted(environ):
        variable = name.upper()  # pydantic-settings matches names case-insensitively
        if variable.startswith(ENV_PREFIX) and variable.removeprefix(ENV_PREFIX) not in known:
            close = difflib.get_close_matches(variable.removeprefix(ENV_PREFIX), known, n=1)
            hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
            raise ConfigError(f"environment variable {name} names no setting{hint}; fix or unset it (`edge-agent settings` lists every variable)")


def environment_values() -> dict[str, Any]:
    """EDGE_AGENT_* variables as a nested dict (values still strings; Settings validates them)."""
    check_environment_names(os.environ)
    return EnvSettingsSource(Settings, env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER)()


def read_settings_file(path: Path) -> dict[str, Any]:
    """A settings file as a dict; the format follows the extension (.yaml/.yml, .json, .toml)."""
    loaders = {".yaml": yaml.safe_load, ".yml": yaml.safe_load, ".json": json.loads, ".toml": tomllib.loads}
    loader = loaders.get(path.suffix)
    if loader is None:
        raise ConfigError(f"--config {path}: unknown format; use a .yaml, .json or .toml file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror}); pass an existing settings file") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is fine
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"--config {path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); save it as UTF-8") from None
    try:
        data = loader(text) or {}
    except (yaml.YAMLError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: not valid {path.suffix[1:].upper()} at {_where(exc, text)}; fix it there") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings at the top level")
    return data


def _where(error: Exception, text: str) -> str:
    """Where a YAML, JSON or TOML parser stopped in `text`, and why: "line L, column C: problem"."""
    if isinstance(error, json.JSONDecodeError):
        return f"line {error.lineno}, column {error.colno}: {error.msg}"
    if isinstance(error, yaml.MarkedYAMLError) and (mark := error.problem_mark or error.context_mark):
        return f"line {mark.line + 1}, column {mark.column + 1}: {error.problem or error.context}"
    if isinstance(error, yaml.reader.ReaderError):  # a character YAML does not allow
        before = text[: error.position]
        code = error.character if isinstance(error.character, int) else ord(error.character)
        return f"line {before.count(chr(10)) + 1}, column {len(before) - before.rfind(chr(10))}: character U+{code:04X} is not allowed"
    first = str(error).strip().splitlines()[0]
    if match := re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", first):  # tomllib
        return f"line {match[2]}, column {match[3]}: {match[1]}"
    return first


def write_settings_file(path: Path, data: dict[str, Any]) -> None:
    """A settings dict back into a .yaml/.yml or .json file (comments in it are not kept)."""
    dumpers = {".yaml": lambda d: yaml.safe_dump(d, sort_keys=False), ".yml": lambda d: yaml.safe_dump(d, sort_keys=False), ".json": lambda d: json.dumps(d, indent=2) + "\n"}
    dumper = dumpers.get(path.suffix)
    if dumper is None:
        raise ConfigError(f"--config {path}: can write only .yaml or .json settings files")
    try:
        path.write_text(dumper(data), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot write it ({exc.strerror})") from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts merged key by key; `override` wins. Layers file < environment < flags, and live updates.

    A section chosen by its `type` (model.backend) is a new section when the type changes, not a merge of
    two backends' settings; a bare name there ("litert") stands for {type: litert}.
    """
    merged = dict(base)
    for key, value in override.items():
        below = merged.get(key)
        if isinstance(value, dict) and isinstance(below, str):
            below = {"type": below}
        if isinstance(value, dict) and isinstance(below, dict) and value.get("type", below.get("type")) == below.get("type"):
            merged[key] = deep_merge(below, value)
        else:
            merged[key] = value
    return merged


def describe_validation_error(error: ValidationError, origin: str = "setting") -> str:
    """The first pydantic error as one line: which key, what was wrong, what it got."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown setting; check its spelling against the settings table in README.md"
    value = first.get("input")
    shown = "" if isinstance(value, dict) or first["type"] in ("missing", "extra_forbidden") else f" (got {value!r})"
    return f"{origin} {key}: {message}{shown}"


def validate_settings(values: dict[str, Any], origin: str = "setting") -> Settings:
    """A dict of settings -> Settings, or a ConfigError naming the first bad key."""
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, origin)) from None


def _holds_paths(annotation: Any) -> bool:
    """Path, Path | None or list[Path]: a setting naming files."""
    return annotation is Path or any(_holds_paths(arg) for arg in typing.get_args(annotation))


def _section(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def anchor_paths(values: dict[str, Any], folder: Path, model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """A settings file's relative paths made relative to `folder`, the file's own folder.

    State paths (STATE_PATHS) are left alone: relative, they are inside state_dir. A source spec naming a
    camera or a URL is not a path.
    """
    anchored = dict(values)
    for name, value in values.items():
        field = model.model_fields.get(name)
        if field is None or value is None or prefix + (name,) in STATE_PATHS:
            continue  # unknown keys are reported by validation
        section = _section(field.annotation)
        if section is not None and isinstance(value, dict):
            anchored[name] = anchor_paths(value, folder, section, prefix + (name,))
        elif _holds_paths(field.annotation) or (prefix + (name,) == ("source", "spec") and not LOCATION.match(str(value))):
            anchored[name] = [_anchor(item, folder) for item in value] if isinstance(value, list) else _anchor(value, folder)
    return anchored


def _anchor(value: Any, folder: Path) -> Any:
    if not isinstance(value, (str, Path)):
        return value  # validation names the wrong type
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else folder / path)


# A provisioned device's folder: its settings file, certificate and private key (`edge-fleet provision` on
# the operator's side, `edge-agent provision` by claim on the device's).
SETTINGS_FILE = "agent.yaml"
CERT_FILE = "device.pem.crt"
KEY_FILE = "private.pem.key"


def device_settings(thing: str, endpoint: str, *, cert: Path, key: Path, ca: Path, port: int = 8883, trusted_keys: list[Path] = ()) -> dict[str, Any]:
    """The settings a provisioned device starts with (paths as they are on the device)."""
    values: dict[str, Any] = {
        "thing_name": thing,
        "transport": "mqtt",
        "mqtt": {"endpoint": endpoint, "port": port, "cert": str(cert), "key": str(key), "ca": str(ca)},
    }
    if trusted_keys:
        values["model"] = {"trusted_keys": [str(path) for path in trusted_keys]}
    return values


def load_settings(config_file: Path | None = None, flags: dict[str, Any] | None = None) -> Settings:
    """Defaults < settings file < EDGE_AGENT_* environment < command-line flags.

    Relative paths in the settings file are relative to its folder; in flags and the environment, to the
    current directory (as on any command line); state paths, to state_dir.
    """
    layered = anchor_paths(read_settings_file(config_file), config_file.absolute().parent) if config_file else {}
    layered = deep_merge(layered, environment_values())
    return validate_settings(deep_merge(layered, flags or {}))


def settings_reference(model: type[BaseModel] = Settings, prefix: str = "") -> list[tuple[str, str, str]]:
    """Every leaf setting as (dotted key, default as JSON, description), in declaration order.

    A section chosen by type (model.backend) is its own row, then one row per setting of its kinds,
    saying which kinds have it. README's settings table is this, rendered by `edge-agent settings`; a test
    keeps the two equal.
    """
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += settings_reference(annotation, key + ".")
            continue
        default = field.get_default(call_default_factory=True)
        kinds = _kinds(annotation)
        if kinds:
            rows.append((key, json.dumps(default.type), field.description or ""))
            rows += _kind_rows(kinds, key + ".")
            continue
        if isinstance(default, str) and default.startswith(str(PACKAGE)):
            default = _display_path(Path(default))
        elif isinstance(default, Path) or (isinstance(default, list) and default and isinstance(default[0], Path)):
            default = [_display_path(p) for p in default] if isinstance(default, list) else _display_path(default)
        rows.append((key, json.dumps(default, default=str), field.description or ""))
    return rows


def _kinds(annotation: Any) -> list[type[BaseModel]]:
    """The settings classes of a section chosen by type (a discriminated union), else []."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is not Union:
        return []
    members = [typing.get_args(a)[0] if typing.get_origin(a) is Annotated else a for a in typing.get_args(annotation)]
    return [m for m in members if isinstance(m, type) and issubclass(m, BaseModel) and "type" in m.model_fields]


def _kind_rows(kinds: list[type[BaseModel]], prefix: str) -> list[tuple[str, str, str]]:
    """One row per setting the kinds have (the same setting of several kinds is one row naming them all)."""
    owners: dict[tuple[str, str, str], list[str]] = {}
    for kind in kinds:
        if kind.model_config.get("extra") == "allow":  # a plugin's settings are its own
            continue
        for row in settings_reference(kind, prefix):
            if row[0] != prefix + "type":
                owners.setdefault(row, []).append(kind.model_fields["type"].default)
    return [(key, default, f"({', '.join(names)}) {description}") for (key, default, description), names in owners.items()]


def _display_path(path: Path) -> str:
    """Paths inside the installed package shown from its name (agent/...), so the table reads the same everywhere."""
    try:
        return str(path.relative_to(PACKAGE.parent))
    except ValueError:
        return str(path)


def settings_table() -> str:
    """The settings reference as a Markdown table (key, environment variable, default, meaning)."""
    lines = ["| setting | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for key, default, description in settings_reference():
        variable = environment_variable(tuple(key.split(".")))
        lines.append(f"| `{key}` | `{variable}` | `{default}` | {description.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
