"""Which backends exist, which are installed here, and opening the one the settings name on a bundle.

Built-in backends are listed here, in the order `auto` tries them; another package adds one through the
entry point group `edge_agent.backends` (name = "module:BackendClass"), as Frigate's detectors are added:

    [project.entry-points."edge_agent.backends"]
    hailo = "edge_agent_hailo:HailoBackend"

A backend module imports its runtime only when a model is opened, so listing them costs nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path

from pydantic import BaseModel, ValidationError

from agent.errors import ConfigError, ModelError, Reason
from agent.inference.backends.base import Backend, TensorSpec
from agent.settings import BACKEND_ENTRY_POINTS, BACKEND_SETTINGS, describe_validation_error

__all__ = ["Backend", "TensorSpec", "available_backends", "backend_class", "backend_names", "open_backend", "open_interpreter", "resolve_settings"]

BUILTIN: dict[str, str] = {
    "litert": "agent.inference.backends.litert:LiteRtBackend",
    "tflite-runtime": "agent.inference.backends.tflite_runtime:TfliteRuntimeBackend",
    "litert-compiled": "agent.inference.backends.litert_compiled:LiteRtCompiledBackend",
    "openvino": "agent.inference.backends.openvino:OpenVinoBackend",
    "onnxruntime": "agent.inference.backends.onnxruntime:OnnxRuntimeBackend",
}
REFERENCE = "litert"  # the backend every other one is measured against


def _plugins() -> dict[str, str]:
    return {entry.name: entry.value for entry in entry_points(group=BACKEND_ENTRY_POINTS) if entry.name not in BUILTIN}


def backend_names() -> list[str]:
    """Every backend this agent knows: the built-in ones in `auto`'s order, then installed plugins."""
    return [*BUILTIN, *sorted(_plugins())]


def backend_class(name: str) -> type[Backend]:
    """The Backend class registered as `name` (its module imported, its runtime not yet)."""
    target = BUILTIN.get(name) or _plugins().get(name)
    if target is None:
        raise ModelError(f"unknown backend {name!r}; choose one of {', '.join(backend_names())}", Reason.MODEL_FAILED)
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"backend {name}: cannot load {target} ({exc}); reinstall the package that provides it", Reason.MODEL_FAILED) from None
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ModelError(f"backend {name}: {target} is not an agent.inference.backends.Backend; fix the plugin's entry point", Reason.MODEL_FAILED)
    return cls


def _installed(cls: type[Backend]) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in cls.requires)


def available_backends() -> list[str]:
    """Backends whose runtime is installed in this environment, in `auto`'s order."""
    found = []
    for name in backend_names():
        try:
            cls = backend_class(name)
        except ModelError:
            continue
        if _installed(cls):
            found.append(name)
    return found


def resolve_settings(settings: BaseModel) -> BaseModel:
    """`auto` -> the settings of the first installed built-in backend (with auto's threads); others as given."""
    if settings.type != "auto":
        return settings
    for name in BUILTIN:
        if _installed(backend_class(name)):
            return BACKEND_SETTINGS[name](threads=settings.threads)
    raise ModelError("no backend installed: pip install ai-edge-litert (or tflite-runtime, openvino, onnxruntime)", Reason.MODEL_FAILED)


def _plugin_settings(cls: type[Backend], settings: BaseModel) -> BaseModel:
    """A plugin's settings (kept untyped by agent.settings) validated by the plugin's own model."""
    if cls.settings_type is None:
        return settings
    try:
        return cls.settings_type.model_validate(settings.model_extra or {})
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, "setting model.backend")) from None


def open_backend(bundle_root: Path, files: Iterable[str], settings: BaseModel) -> Backend:
    """Open the model file of a (verified) bundle that the configured backend reads.

    `files` are the bundle's files (its manifest's list); `settings` is model.backend.
    """
    settings = resolve_settings(settings)
    cls = backend_class(settings.type)
    if cls.model_file not in set(files):
        raise ModelError(f"{bundle_root}: backend {cls.name} reads {cls.model_file}, which this bundle does not carry; choose another model.backend or re-pack the bundle with it", Reason.INVALID_BUNDLE)
    if settings.type not in BACKEND_SETTINGS:
        settings = _plugin_settings(cls, settings)
    return cls(Path(bundle_root) / cls.model_file, settings)


def open_interpreter(model_path: Path, threads: int) -> Backend:
    """A TFLite file a task runs beside its bundle's model (the learned digit finder) on the first installed
    TFLite interpreter, ai-edge-litert or tflite-runtime, whatever backend serves the model itself."""
    for name in ("litert", "tflite-runtime"):
        cls = backend_class(name)
        if _installed(cls):
            return cls(Path(model_path), BACKEND_SETTINGS[name](threads=threads))
    raise ModelError(f"{model_path}: no TFLite interpreter installed to run it; pip install ai-edge-litert (or tflite-runtime)", Reason.MODEL_FAILED)
