"""tflite-runtime: the fallback for devices ai-edge-litert has no wheel for. It needs numpy<2, so here it
lives in its own environment (.venv-tflite, constraints-tflite.txt, `make test-tflite`)."""

from __future__ import annotations

from agent.inference.backends.litert import InterpreterBackend


class TfliteRuntimeBackend(InterpreterBackend):
    name = "tflite-runtime"
    module = "tflite_runtime.interpreter"
    install = "tflite-runtime (it needs numpy<2: see constraints-tflite.txt)"
    requires = ("tflite_runtime",)
