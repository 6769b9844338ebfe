"""Every setting of the agent, as one pydantic model tree.

Sources, lowest priority first: defaults, a settings file (`--config`, YAML/JSON/TOML), environment
variables (`EDGE_AGENT_` prefix, `__` between levels: `EDGE_AGENT_MQTT__ENDPOINT`), command-line flags,
and under Greengrass the component configuration (same names, same tree). Each module receives only the
branch it needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import tomllib
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import EnvSettingsSource

from agent.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_BUNDLE = REPO_ROOT / "models" / "mnist" / "bundle"
SHIPPED_SAMPLE_VIDEO = REPO_ROOT / "models" / "mnist" / "sample" / "sample.avi"
DEV_SIGNING_KEY = REPO_ROOT / "models" / "keys" / "dev-signing.pub"
AMAZON_ROOT_CA = Path(__file__).resolve().parent / "certs" / "AmazonRootCA1.pem"


class Section(BaseModel):
    """A settings branch: unknown keys are errors, so a typo is named instead of silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceSettings(Section):
    spec: str = Field(str(SHIPPED_SAMPLE_VIDEO), description="camera:N, a video file, an image folder, or an rtsp:// / http(s):// stream URL")
    loop: bool = Field(False, description="restart a video file or image folder at its end instead of stopping")
    pace_fps: float | None = Field(None, gt=0, description="deliver file frames at this rate, like a camera (default: as fast as the model goes)")
    colour: bool = Field(False, description="keep frames in colour (the live view shows them so); off, frames are grey, all the digit finder reads, and an MJPG file decodes in 40% less time")
    reconnect_initial_s: float = Field(0.5, gt=0, description="first wait before reopening a live source that disappeared")
    reconnect_max_s: float = Field(30.0, gt=0, description="longest wait between reopen attempts (exponential backoff)")
    read_timeout_s: float = Field(5.0, gt=0, description="a live source with no new frame for this long counts as stalled")


class ModelSettings(Section):
    bundle: Path = Field(SHIPPED_BUNDLE, description="model bundle directory or .zip")
    trusted_keys: list[Path] = Field(default_factory=lambda: [DEV_SIGNING_KEY], description="Ed25519 public keys (PEM) allowed to sign bundles")
    require_signature: bool = Field(True, description="refuse bundles without a valid signature from a trusted key")
    backend: Literal["auto", "litert", "tflite-runtime"] = Field("auto", description="TFLite runtime; auto prefers ai-edge-litert, then tflite-runtime")
    num_threads: int = Field(1, ge=1, le=64, description="interpreter threads; one is fastest for a model this small")
    max_bundle_mb: float = Field(16.0, gt=0, description="largest bundle accepted, unpacked")
    score_threshold: float = Field(0.5, ge=0.0, le=1.0, description="predictions scoring below this are not published")

    @property
    def max_bundle_bytes(self) -> int:
        return int(self.max_bundle_mb * 1024 * 1024)


class TopicSettings(Section):
    prefix: str = Field("edge", description="first topic level; '{thing}' below is the thing name")
    inference: str = Field("{prefix}/{thing}/inference", description="results, QoS 1")
    status: str = Field("{prefix}/{thing}/status", description="retained online/degraded/offline (the last will)")
    metrics: str = Field("{prefix}/{thing}/metrics", description="periodic pipeline statistics")
    commands: str = Field("{prefix}/{thing}/commands", description="subscribed: commands addressed to this thing")


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


class OutboxSettings(Section):
    path: Path = Field(Path("var/outbox.sqlite3"), description="SQLite spool holding results until their PUBACK")
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


class TaskSettings(Section):
    """Each task's own settings, under its task id (dashes as underscores); a bundle's task reads its own."""

    mnist_digits: DigitFinderSettings = DigitFinderSettings()


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

    store: Path = Field(Path("var/models"), description="versioned model store (one directory per name/version)")
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


class Settings(Section):
    """The whole agent configuration."""

    thing_name: str = Field("local-dev", min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9:_-]+$", description="IoT thing name; also the MQTT client id (under Greengrass, when not set: the core device's, AWS_IOT_THING_NAME)")
    transport: Literal["console", "mqtt", "greengrass"] = Field("console", description="where results go: stdout, IoT Core over MQTT5, or IoT Core through the Greengrass nucleus")
    max_frames: int | None = Field(None, ge=1, description="stop after this many frames (default: until the source ends)")
    metrics_interval_s: float = Field(60.0, gt=0, description="how often pipeline statistics are published")
    publish_empty: bool = Field(False, description="also publish frames in which nothing was found")
    opencv_threads: int | None = Field(1, ge=1, le=64, description="OpenCV worker threads; the pipeline is one thread, and on small frames a pool only adds wake-ups (null: OpenCV's default)")
    source: SourceSettings = SourceSettings()
    model: ModelSettings = ModelSettings()
    tasks: TaskSettings = TaskSettings()
    topics: TopicSettings = TopicSettings()
    mqtt: MqttSettings = MqttSettings()
    outbox: OutboxSettings = OutboxSettings()
    liveview: LiveViewSettings = LiveViewSettings()
    watchdog: WatchdogSettings = WatchdogSettings()
    updates: UpdateSettings = UpdateSettings()
    greengrass: GreengrassSettings = GreengrassSettings()


def environment_values() -> dict[str, Any]:
    """EDGE_AGENT_* variables as a nested dict (values still strings; Settings validates them)."""
    return EnvSettingsSource(Settings, env_prefix="EDGE_AGENT_", env_nested_delimiter="__")()


def read_settings_file(path: Path) -> dict[str, Any]:
    """A settings file as a dict; the format follows the extension (.yaml/.yml, .json, .toml)."""
    loaders = {".yaml": yaml.safe_load, ".yml": yaml.safe_load, ".json": json.loads, ".toml": tomllib.loads}
    loader = loaders.get(path.suffix)
    if loader is None:
        raise ConfigError(f"--config {path}: unknown format; use a .yaml, .json or .toml file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror}); pass an existing settings file") from None
    try:
        data = loader(text) or {}
    except (yaml.YAMLError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"--config {path}: not valid {path.suffix[1:].upper()} ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings at the top level")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts merged key by key; `override` wins. Layers file < environment < flags, and live updates."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def describe_validation_error(error: ValidationError, origin: str = "setting") -> str:
    """The first pydantic error as one line: which key, what was wrong, what it got."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
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
    """Defaults < settings file < EDGE_AGENT_* environment < command-line flags."""
    layered = read_settings_file(config_file) if config_file else {}
    layered = deep_merge(layered, environment_values())
    return validate_settings(deep_merge(layered, flags or {}))


def settings_reference(model: type[BaseModel] = Settings, prefix: str = "") -> list[tuple[str, str, str]]:
    """Every leaf setting as (dotted key, default as JSON, description), in declaration order.

    README's settings table is this, rendered by `edge-agent settings`; a test keeps the two equal.
    """
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += settings_reference(annotation, key + ".")
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, str) and default.startswith(str(REPO_ROOT)):
            default = _display_path(Path(default))
        elif isinstance(default, Path) or (isinstance(default, list) and default and isinstance(default[0], Path)):
            default = [_display_path(p) for p in default] if isinstance(default, list) else _display_path(default)
        rows.append((key, json.dumps(default, default=str), field.description or ""))
    return rows


def _display_path(path: Path) -> str:
    """Paths inside the checkout shown relative to it, so the table reads the same on every machine."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def settings_table() -> str:
    """The settings reference as a Markdown table (key, environment variable, default, meaning)."""
    lines = ["| setting | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for key, default, description in settings_reference():
        variable = "EDGE_AGENT_" + key.replace(".", "__").upper()
        lines.append(f"| `{key}` | `{variable}` | `{default}` | {description.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
