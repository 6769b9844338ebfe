"""model.onnx for a bundle, converted from its model.tflite; and re-making a bundle around it.

    python -m models.mnist.convert_onnx --bundle models/mnist/bundle --version 1.1.0 --key KEY

The training program calls `write_onnx` for every new bundle. Run as above, it re-makes an existing
bundle: the same model.tflite (same weights, same figures), plus model.onnx, under a new version with
this program's provenance, signed with KEY. tf2onnx (the train extra) reads the int8 .tflite and writes
the same int8 graph as QuantizeLinear/DequantizeLinear nodes with int8 inputs and outputs.

Reproducible: tf2onnx names intermediate tensors from a hash-ordered walk, so the names are replaced by
their order in the graph (t0, t1...; nodes n0, n1...) and the bytes are serialised deterministically.
ONNX tensors carry no quantization, so each int8 input's and output's scale and zero point, read from
the .tflite, go into the model's metadata (QUANTIZATION_KEY) for the onnxruntime backend.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

from agent.bundles.bundle import MANIFEST, MODEL_FILE, read_manifest
from agent.errors import ModelError
from agent.fleet.packing import sign_bundle, write_manifest
from agent.inference.backends.base import tflite_quantization
from agent.inference.backends.onnxruntime import QUANTIZATION_KEY
from models.mnist.train import created_time, program_sha256, run_program

ONNX_FILE = "model.onnx"
OPSET = 17  # QuantizeLinear/DequantizeLinear with per-tensor int8, run by every ONNX Runtime since 1.13
CONVERTERS = ("tf2onnx", "onnx")


def _canonical_names(graph) -> None:
    """Intermediate tensors and nodes renamed by their order in the graph; inputs and outputs kept."""
    kept = {value.name for value in graph.input} | {value.name for value in graph.output}
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in kept:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for node in graph.node:
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
    for tensor in graph.initializer:
        tensor.name = rename(tensor.name)
    for index, node in enumerate(graph.node):
        node.name = f"n{index}"
    graph.initializer.sort(key=lambda tensor: int(tensor.name[1:]) if tensor.name[1:].isdigit() else -1)
    del graph.value_info[:]  # shape hints tf2onnx keeps under the old names; runtimes infer them again


def tflite_to_onnx(tflite_path: Path) -> bytes:
    """The ONNX bytes of a .tflite model: same tensors in and out, their quantization in the metadata."""
    import onnx
    import tf2onnx

    model, _ = tf2onnx.convert.from_tflite(str(tflite_path), opset=OPSET)
    graph = model.graph
    _canonical_names(graph)
    graph.doc_string = ""  # tf2onnx writes the converted file's path here
    quantization = tflite_quantization(tflite_path)
    ends = [value.name for value in graph.input] + [value.name for value in graph.output]
    if sorted(ends) != sorted(quantization):
        raise ModelError(f"{tflite_path}: tf2onnx made tensors {ends}, the .tflite has {sorted(quantization)}; check the converter version")
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = QUANTIZATION_KEY, json.dumps({name: list(quantization[name]) for name in ends}, sort_keys=True)
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def write_onnx(bundle: Path) -> Path:
    """bundle/model.onnx from bundle/model.tflite."""
    path = Path(bundle) / ONNX_FILE
    path.write_bytes(tflite_to_onnx(Path(bundle) / MODEL_FILE))
    return path


def converter_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in CONVERTERS}


def remake_bundle(bundle: Path, version: str, key: Path | None) -> str:
    """Add model.onnx to a bundle under a new version with this program's provenance; sign it if a key."""
    raw, _ = read_manifest(bundle, str(bundle))
    raw.pop("files", None)
    write_onnx(bundle)
    raw["version"] = version
    provenance = raw["provenance"]
    provenance["program_sha256"] = program_sha256()
    provenance["libraries"] = {**provenance["libraries"], **converter_versions()}
    provenance["created"] = created_time()
    manifest = write_manifest(bundle, raw)
    signer = sign_bundle(bundle, key) if key else None
    return f"{manifest.name} {manifest.version}: {', '.join(sorted(manifest.files))} in {bundle / MANIFEST}, " + (f"signed by key {signer}" if signer else "UNSIGNED")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.mnist.convert_onnx", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent / "bundle", help="bundle directory to re-make in place")
    parser.add_argument("--version", required=True, help="the re-made bundle's version (a bundle's content never changes under one version)")
    parser.add_argument("--key", type=Path, help="Ed25519 private key to sign with (unsigned without one)")
    args = parser.parse_args(argv)
    return run_program(lambda: print(remake_bundle(args.bundle, args.version, args.key)))


if __name__ == "__main__":
    raise SystemExit(main())
