"""BlazeFace rebuilt in TensorFlow from its own `.tflite` file, so it can be quantized to int8.

The published model is float (float16 weights dequantized at load), and a converted model cannot be
requantized as it is. Its graph is small and plain (convolutions, depthwise convolutions, adds, ReLU, pads,
max pools, reshapes, concatenations), so each operator is rebuilt as the same TensorFlow op with the file's
own weights; the rebuilt float model gives the original's outputs (checked), and TFLite's converter then
quantizes it fully (int8 weights, activations, input and output) with a representative set of images.

Needs TensorFlow (the `train` extra); the agent never imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

PADDING = {0: "SAME", 1: "VALID"}
TENSOR_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 4: np.int64}


def _activation(tf, value, code: int):
    if code == 0:
        return value
    if code == 1:
        return tf.nn.relu(value)
    if code == 3:
        return tf.nn.relu6(value)
    raise ValueError(f"fused activation {code} is not supported")


def rebuild(model_path: Path, output_ranges: dict[str, tuple[float, float]] | None = None) -> tuple[Callable, tuple[int, ...], list[str]]:
    """A TensorFlow function computing what the TFLite model at `model_path` computes, its input shape and
    the names of its outputs (in the model's order).

    `output_ranges` clips the named outputs: an int8 tensor has 256 steps for its whole range, and the raw
    outputs of anchors that can never be detections reach magnitudes of thousands; without a clip they
    would set the output scale and leave no resolution for the values that matter.
    """
    ranges = output_ranges or {}
    import tensorflow as tf
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(model_path))
    graph = model.subgraphs[0]
    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}

    def constant(index: int) -> np.ndarray | None:
        tensor = graph.tensors[index]
        data = model.buffers[tensor.buffer].data
        if data is None or len(data) == 0:
            return None
        return np.frombuffer(bytes(data), TENSOR_TYPES[tensor.type]).reshape(tuple(tensor.shape))

    operators = []
    for operator in graph.operators:
        code = model.operatorCodes[operator.opcodeIndex]
        operators.append((names[max(code.builtinCode, code.deprecatedBuiltinCode)], list(operator.inputs), list(operator.outputs), operator.builtinOptions))
    input_index = int(graph.inputs[0])
    output_indices = [int(i) for i in graph.outputs]
    input_shape = tuple(int(d) for d in graph.tensors[input_index].shape)
    output_names = [graph.tensors[i].name.decode() if isinstance(graph.tensors[i].name, bytes) else graph.tensors[i].name for i in output_indices]

    def run(image):
        values: dict[int, object] = {input_index: image}

        def value(index: int):
            if index not in values:
                values[index] = tf.constant(constant(index).astype(np.float32) if graph.tensors[index].type == 1 else constant(index))
            return values[index]

        for name, inputs, outputs, options in operators:
            if name == "DEQUANTIZE":
                values[outputs[0]] = tf.constant(constant(inputs[0]).astype(np.float32))
                continue
            if name == "CONV_2D":
                kernel = tf.transpose(value(inputs[1]), [1, 2, 3, 0])  # OHWI -> HWIO
                out = tf.nn.conv2d(value(inputs[0]), kernel, [1, options.strideH, options.strideW, 1], PADDING[options.padding]) + value(inputs[2])
                out = _activation(tf, out, options.fusedActivationFunction)
            elif name == "DEPTHWISE_CONV_2D":
                weights = value(inputs[1])  # (1, H, W, C * M)
                channels = int(value(inputs[0]).shape[-1])
                kernel = tf.reshape(weights, [weights.shape[1], weights.shape[2], channels, options.depthMultiplier])
                out = tf.nn.depthwise_conv2d(value(inputs[0]), kernel, [1, options.strideH, options.strideW, 1], PADDING[options.padding]) + value(inputs[2])
                out = _activation(tf, out, options.fusedActivationFunction)
            elif name == "ADD":
                out = _activation(tf, value(inputs[0]) + value(inputs[1]), options.fusedActivationFunction)
            elif name == "RELU":
                out = tf.nn.relu(value(inputs[0]))
            elif name == "PAD":
                out = tf.pad(value(inputs[0]), value(inputs[1]))
            elif name == "MAX_POOL_2D":
                out = tf.nn.max_pool2d(value(inputs[0]), [options.filterHeight, options.filterWidth], [options.strideH, options.strideW], PADDING[options.padding])
            elif name == "RESHAPE":
                out = tf.reshape(value(inputs[0]), value(inputs[1]) if len(inputs) > 1 else list(options.newShape))
            elif name == "CONCATENATION":
                out = _activation(tf, tf.concat([value(i) for i in inputs], options.axis), options.fusedActivationFunction)
            else:
                raise ValueError(f"operator {name} is not supported by the rebuild")
            values[outputs[0]] = out
        outputs = [values[i] for i in output_indices]
        return [tf.clip_by_value(out, *ranges[name]) if name in ranges else out for out, name in zip(outputs, output_names)]

    return run, input_shape, output_names


def to_tflite(run: Callable, input_shape: tuple[int, ...], representative: Iterable[np.ndarray] | None = None) -> bytes:
    """The rebuilt function as a TFLite model: float, or full int8 when a representative set is given."""
    import tensorflow as tf

    function = tf.function(lambda image: run(image), input_signature=[tf.TensorSpec(input_shape, tf.float32, name="input")])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()])
    if representative is not None:
        images = list(representative)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()
