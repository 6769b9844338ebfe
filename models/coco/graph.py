"""NanoDet's TF.js graph rebuilt as a TensorFlow function, so TFLite's converter can quantize it to int8.

A TF.js graph model is `model.json` (TensorFlow GraphDef nodes as JSON, and a manifest of the weights) plus
`.bin` files holding the weights end to end; no `tensorflowjs` package is needed to read them. Each node is
rebuilt as the same TensorFlow op with the file's own weights. Two changes, neither of which changes what
the graph computes:

- Layout. The graph was converted from ONNX (NCHW) and wraps every convolution in transposes to NHWC and
  back. Each value is kept in NHWC and carries the permutation to its NCHW meaning; a transpose only
  changes that permutation, and pads, concatenations and splits have their axes mapped. The TFLite model
  then has no transposes inside.
- The max pool's padding. The graph pads with -inf before a VALID max pool. An int8 tensor cannot hold
  -inf (its range would swallow every step), so the pool is done as TFLite's stride-1 SAME max pool (which
  ignores the padded cells, i.e. -inf semantics) followed by a strided slice picking the same windows:
  identical values, and nothing outside the activations' range.

Needs TensorFlow (the `train` extra); the agent never imports this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DTYPES = {"float32": np.float32, "int32": np.int32, "float16": np.float16, "uint8": np.uint8, "uint16": np.uint16}
NHWC_OF_NCHW = (0, 2, 3, 1)  # physical NHWC = transpose(logical NCHW, this)
IDENTITY = (0, 1, 2, 3)


def read_weights(graph: dict, folder: Path) -> dict[str, np.ndarray]:
    """Every weight the manifest lists, read from its `.bin` files by dtype and shape, as float32/int32."""
    weights: dict[str, np.ndarray] = {}
    for group in graph["weightsManifest"]:
        data = b"".join((folder / path).read_bytes() for path in group["paths"])
        offset = 0
        for entry in group["weights"]:
            quantization = entry.get("quantization")
            stored = DTYPES[quantization["dtype"] if quantization else entry["dtype"]]
            count = int(np.prod(entry["shape"], dtype=np.int64))
            array = np.frombuffer(data, stored, count, offset).reshape(entry["shape"])
            offset += array.nbytes
            if quantization and quantization["dtype"] != "float16":  # affine uint8/uint16: value = q * scale + min
                array = array.astype(np.float32) * quantization["scale"] + quantization["min"]
            weights[entry["name"]] = array.astype(np.float32 if entry["dtype"] == "float32" else DTYPES[entry["dtype"]])
        if offset != len(data):
            raise ValueError(f"weights of {', '.join(group['paths'])}: {len(data)} bytes, the manifest accounts for {offset}")
    return weights


@dataclass(frozen=True)
class Value:
    """A tensor of the graph as it is held: `tensor` = transpose(the graph's tensor, `perm`)."""

    tensor: object
    perm: tuple[int, ...] | None = None  # None: held as the graph has it
    pending_pad: np.ndarray | None = None  # a -inf padding not applied yet (rows: the graph tensor's axes; before, after)

    def axis(self, axis: int) -> int:
        """Where the graph's `axis` is in the held tensor."""
        rank = len(self.perm) if self.perm else None
        axis = axis % rank if rank else axis
        return self.perm.index(axis) if self.perm else axis


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


def _attr_ints(node: dict, name: str) -> list[int]:
    return [int(i) for i in node["attr"][name]["list"]["i"]]


def _attr_text(node: dict, name: str) -> str:
    import base64

    return base64.b64decode(node["attr"][name]["s"]).decode()


def rebuild(graph_path: Path, literal: bool = False, left_out: frozenset[str] = frozenset()) -> tuple[Callable, tuple[int, ...], list[str]]:
    """A TensorFlow function computing what the TF.js graph at `graph_path` computes, for an NHWC float image
    (the graph's own NCHW input transposed), its input shape and the names of its outputs (signature order).

    `literal` runs the graph node by node as it is written (transposes, the -inf padding and all): the
    reference the rebuilt function is checked against. Nodes of the ops in `left_out` pass their input on
    unchanged (for a caller that applies an elementwise op itself, later)."""
    import tensorflow as tf

    graph = json.loads(Path(graph_path).read_text())
    weights = read_weights(graph, Path(graph_path).parent)
    nodes = {node["name"]: node for node in graph["modelTopology"]["node"]}
    signature = graph["signature"]
    ((input_name, input_spec),) = signature["inputs"].items()
    logical_shape = tuple(int(d["size"]) for d in input_spec["tensorShape"]["dim"])
    if len(logical_shape) != 4 or logical_shape[1] != 3:
        raise ValueError(f"input {input_name} is {list(logical_shape)}, not NCHW with 3 channels")
    input_shape = tuple(logical_shape[i] for i in NHWC_OF_NCHW)
    output_names = list(signature["outputs"])

    order = _topological_order(nodes, [name.split(":")[0] for name in output_names])

    def run(image):
        values: dict[str, Value | list[Value] | np.ndarray] = {}

        def held(value: Value):
            """The tensor as the graph has it."""
            tensor = _plain(value)
            return tensor if value.perm is None or value.perm == tuple(range(len(value.perm))) else tf.transpose(tensor, _inverse(value.perm))

        def get(reference: str):
            name, _, index = reference.partition(":")
            found = values[name]
            return found[int(index or 0)] if isinstance(found, list) else found

        for name in order:
            node = nodes[name]
            op = node["op"]
            if op == "Placeholder":
                values[name] = Value(image, NHWC_OF_NCHW)
                continue
            if op == "Const":
                values[name] = weights[name]
                continue
            inputs = [get(reference) for reference in node.get("input", []) if not reference.startswith("^")]
            if op in left_out:
                values[name] = inputs[0]
            elif all(isinstance(i, np.ndarray) for i in inputs):  # constant folding (shapes made by the ONNX export)
                values[name] = _fold(op, inputs)
            else:
                values[name] = _op(tf, node, inputs, held, literal)
        return [held(get(name)) for name in output_names]

    return run, input_shape, output_names


def _topological_order(nodes: dict[str, dict], outputs: list[str]) -> list[str]:
    """The names of the nodes the outputs need, each after its inputs."""
    order: list[str] = []
    done: set[str] = set()
    stack = [(name, False) for name in reversed(outputs)]
    while stack:
        name, expanded = stack.pop()
        if name in done:
            continue
        if expanded:
            done.add(name)
            order.append(name)
            continue
        stack.append((name, True))
        stack += [(reference.lstrip("^").split(":")[0], False) for reference in reversed(nodes[name].get("input", []))]
    return order


def _fold(op: str, inputs: list[np.ndarray]) -> np.ndarray:
    if op == "SparseToDense":
        indices, shape, updates, default = inputs
        out = np.full(shape, default, dtype=updates.dtype)
        if indices.size:
            out[tuple(np.asarray(indices).reshape(len(updates), -1).T)] = updates
        return out
    if op in ("Add", "AddV2"):
        return inputs[0] + inputs[1]
    raise ValueError(f"constant {op} is not supported by the rebuild")


def _op(tf, node: dict, inputs: list, held: Callable, literal: bool):
    op = node["op"]
    x = inputs[0]
    if op == "Transpose":
        perm = tuple(int(i) for i in inputs[1])
        if literal:
            return Value(tf.transpose(held(x), perm))
        before = x.perm or tuple(range(len(perm)))
        # new = transpose(old, perm); held = transpose(old, before) = transpose(new, perm^-1 o before)
        return Value(x.tensor, tuple(_inverse(perm)[i] for i in before), None if x.pending_pad is None else x.pending_pad[list(perm)])
    if op == "Identity":
        return x
    if op in ("Pad", "PadV2"):
        paddings = np.asarray(inputs[1]).reshape(-1, 2)
        constant = float(inputs[2]) if op == "PadV2" else 0.0
        if constant == -np.inf and not literal:
            return Value(x.tensor, x.perm, paddings)
        order = list(x.perm) if x.perm else list(range(len(paddings)))
        return Value(tf.pad(x.tensor, paddings[order], constant_values=constant), x.perm)
    if op == "MaxPool":
        kernel, strides = _attr_ints(node, "ksize"), _attr_ints(node, "strides")
        if _attr_text(node, "data_format") != "NHWC":
            raise ValueError(f"{node['name']}: only NHWC max pools are supported")
        pending, x = x.pending_pad, Value(x.tensor, x.perm)
        tensor = held(x)  # the graph's NHWC tensor
        if pending is None:
            return Value(tf.nn.max_pool2d(tensor, kernel[1:3], strides[1:3], _attr_text(node, "padding")))
        if _attr_text(node, "padding") != "VALID":
            raise ValueError(f"{node['name']}: a -inf padding before a {_attr_text(node, 'padding')} max pool")
        # Stride-1 SAME pooling ignores the cells outside (as -inf would); slice out the windows the strided
        # VALID pool over the -inf padded tensor takes: window i starts at i * stride - pad_before.
        pooled = tf.nn.max_pool2d(tensor, kernel[1:3], 1, "SAME")
        begin, size = [0], [int(tensor.shape[0])]
        for axis in (1, 2):
            before, after = (int(p) for p in pending[axis])
            start = (kernel[axis] - 1) // 2 - before
            length = (int(tensor.shape[axis]) + before + after - kernel[axis]) // strides[axis] + 1
            if start < 0 or before >= kernel[axis] or after >= kernel[axis]:
                raise ValueError(f"{node['name']}: a -inf padding of {before}, {after} is not a stride-1 SAME pool's")
            begin.append(start)
            size.append(length)
        end = [b + (s - 1) * st + 1 for b, s, st in zip(begin, size, [1, strides[1], strides[2]])]
        return Value(tf.strided_slice(pooled, begin + [0], end + [int(tensor.shape[3])], [1, strides[1], strides[2], 1]))
    if op == "Conv2D":
        if _attr_text(node, "data_format") != "NHWC" or _attr_ints(node, "dilations") != [1, 1, 1, 1]:
            raise ValueError(f"{node['name']}: only undilated NHWC convolutions are supported")
        return Value(tf.nn.conv2d(held(x), inputs[1], _attr_ints(node, "strides"), _attr_text(node, "padding")))
    if op in ("Add", "AddV2"):
        a, b = inputs
        if isinstance(b, np.ndarray) and b.ndim <= 1 and not (a.perm and a.perm != IDENTITY and b.size > 1):
            return Value(a.tensor + b, a.perm)
        if isinstance(a, Value) and isinstance(b, Value) and a.perm == b.perm:
            return Value(_plain(a) + _plain(b), a.perm)
        return Value(held(a) + (held(b) if isinstance(b, Value) else b))
    if op == "LeakyRelu":
        return Value(tf.nn.leaky_relu(_plain(x), float(node["attr"]["alpha"]["f"])), x.perm)
    if op == "Sigmoid":
        return Value(tf.sigmoid(_plain(x)), x.perm)
    if op == "ConcatV2":
        parts, axis = inputs[:-1], int(inputs[-1])
        if len({p.perm for p in parts}) == 1:
            return Value(tf.concat([_plain(p) for p in parts], parts[0].axis(axis)), parts[0].perm)
        return Value(tf.concat([held(p) for p in parts], axis))
    if op == "SplitV":
        sizes, axis = [int(s) for s in inputs[1]], int(inputs[2])
        return [Value(t, x.perm) for t in tf.split(_plain(x), sizes, x.axis(axis))]
    if op == "Reshape":
        shape = [int(s) for s in inputs[1]]
        if x.perm == NHWC_OF_NCHW and len(shape) == 3 and shape[:2] == [int(x.tensor.shape[0]), int(x.tensor.shape[3])]:
            # NCHW -> (N, C, H * W), held as (N, H * W, C): no transposes
            return Value(tf.reshape(_plain(x), [shape[0], -1, shape[1]]), (0, 2, 1))
        return Value(tf.reshape(held(x), shape))
    if op == "ResizeBilinear":
        size = [int(s) for s in inputs[1]]
        return Value(tf.raw_ops.ResizeBilinear(images=held(x), size=size, align_corners=node["attr"]["align_corners"].get("b", False), half_pixel_centers=node["attr"]["half_pixel_centers"].get("b", False)))
    raise ValueError(f"{node['name']}: operator {op} is not supported by the rebuild")


def _plain(value: Value):
    """The held tensor of a value, which must have no -inf padding pending (only a max pool takes one)."""
    if value.pending_pad is not None:
        raise ValueError("a -inf padding reaches an op other than a max pool")
    return value.tensor
