"""Your ONNX image classifier: read and checked (`inspect`), run as the build's FP32 reference
(`SourceRunner`, ONNX Runtime on the file as it is), and rewritten to the project's input convention
(`normalise`, the export stage of such a build).

The convention every later stage, the bundle and the device side assume: one input `input`, float32 NCHW
RGB with a dynamic batch axis, one output `logits` (`targets.runner`). `normalise` puts what the file takes
instead in front of its graph: a channel reversal (BGR), a transpose (NHWC), the names; it makes a fixed batch
axis dynamic and checks that a batch of 2 still gives what two single images give.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from targets.runner import INPUT_NAME, OUTPUT_NAME, RunnerBase, single_input

MIN_OPSET = 13  # per-channel Q/DQ (the quantize stage) needs opset 13; older files are converted
FLOAT = 1  # onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class OnnxClassifier:
    path: Path
    input_name: str
    output_name: str
    layout: str  # NCHW | NHWC
    size: int  # the square input's side; 0 where the file leaves it dynamic
    batch: int  # the fixed batch size; 0 where the batch axis is dynamic
    opset: int


def _load(path: Path, external_data: bool):
    import onnx

    if not path.is_file():
        raise PipelineError(f"--model {path}: no such ONNX file")
    try:
        return onnx.load(str(path), load_external_data=external_data)
    except Exception as error:  # DecodeError, OSError, ... of a file that is not ONNX
        raise PipelineError(f"--model {path}: not a readable ONNX file ({_first_line(error)})") from None


def _dims(value) -> list[int]:
    """A graph input's shape, 0 for a dynamic (named or absent) dimension."""
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else 0 for d in shape.dim]


def inspect(path: Path, layout: str = "") -> OnnxClassifier:
    """The file's one image input and one output, or one PipelineError naming the file and what is wrong.

    `layout` (pipeline.yaml's preprocessing.layout) is needed only where the shape does not tell: a channel axis of
    3 at position 1 is NCHW, at position 3 NHWC."""
    model = _load(path, external_data=False)
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    images = [value for value in inputs if len(value.type.tensor_type.shape.dim) == 4]
    described = ", ".join(f"{v.name} {_dims(v)}" for v in inputs) or "none"
    if len(images) > 1:
        raise PipelineError(f"--model {path}: {len(images)} image (4-D) inputs ({described}): the pipeline builds "
                            "classifiers with one image input")
    if not images:
        raise PipelineError(f"--model {path}: no 4-D image input (inputs: {described})")
    if len(inputs) != 1:
        raise PipelineError(f"--model {path}: inputs besides the image ({described}): the pipeline feeds one image input")
    if len(graph.output) != 1:
        raise PipelineError(f"--model {path}: {len(graph.output)} outputs ({', '.join(o.name for o in graph.output)}): "
                            "the pipeline needs one output, the logits")
    (image,) = images
    if image.type.tensor_type.elem_type != FLOAT:
        raise PipelineError(f"--model {path}: input {image.name} is not float32: the pipeline feeds float32 images")
    dims = _dims(image)
    found = {1: "NCHW", 3: "NHWC"}
    candidates = [found[axis] for axis in (1, 3) if dims[axis] == 3]
    if layout and candidates and layout not in candidates:
        raise PipelineError(f"--model {path}: input {image.name} {dims} is not {layout} (preprocessing.layout)")
    if not layout:
        if len(candidates) != 1:
            raise PipelineError(f"--model {path}: cannot tell the layout of input {image.name} {dims}: set "
                                "preprocessing.layout (NCHW or NHWC)")
        layout = candidates[0]
    channel, height, width = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
    if dims[channel] not in (0, 3):
        raise PipelineError(f"--model {path}: input {image.name} {dims} has {dims[channel]} channels, not 3 colours")
    if dims[height] != dims[width]:
        raise PipelineError(f"--model {path}: input {image.name} {dims} is not square: the pipeline center-crops squares")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxClassifier(path, image.name, graph.output[0].name, layout, dims[height], dims[0], opset)


def to_file_input(x: np.ndarray, layout: str, channels: str) -> np.ndarray:
    """The project's input (N, 3, H, W RGB) as the file takes it."""
    if channels == "BGR":
        x = x[:, ::-1]
    if layout == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x)


class SourceRunner(RunnerBase):
    """The file as it is on ONNX Runtime (the build's FP32 reference), fed the project's input: converted to
    the file's layout and channel order, run in batches of its fixed batch size (the last one padded)."""

    def __init__(self, info: OnnxClassifier, channels: str, threads: int | None = None):
        from targets.onnxruntime import OnnxRuntimeRunner

        self.inner = OnnxRuntimeRunner(info.path, threads=threads, name="onnxruntime fp32 (your ONNX file)")
        self.info, self.channels = info, channels
        self.name = self.inner.name

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = to_file_input(single_input(self, inputs), self.info.layout, self.channels)
        step = self.info.batch or len(x)
        outputs = []
        for start in range(0, len(x), step):
            chunk = x[start:start + step]
            if len(chunk) < step:  # a fixed batch axis: pad with copies of the last image, drop their logits
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - len(chunk), axis=0)])
            logits = self.inner.run({self.inner.input_name: chunk})[self.inner.output_name]
            outputs.append(_logits(logits, self.info.path)[: len(x) - start])
        return {self.output_name: np.concatenate(outputs)}

    def describe(self) -> dict:
        return self.inner.describe()


def _logits(logits: np.ndarray, path: Path) -> np.ndarray:
    """(N, classes) logits: a (N, classes, 1, 1) head is flattened; anything else is not a classifier's output."""
    if logits.ndim > 2 and all(size == 1 for size in logits.shape[2:]):
        logits = logits.reshape(logits.shape[:2])
    if logits.ndim != 2:
        raise PipelineError(f"--model {path}: its output has shape {list(logits.shape)}, not (batch, classes) logits")
    return logits.astype(np.float32, copy=False)


def normalise(info: OnnxClassifier, channels: str, output: Path, opset: int, threads: int | None = None,
              size: int = 224) -> dict:
    """Write `info`'s model with the project's input and output (see the module docstring) to `output`;
    `size`: the side of the images the batch axis is checked on where the file leaves it open (the crop)."""
    import onnx
    from onnx import TensorProto, helper

    model = _load(info.path, external_data=True)
    converted = info.opset < MIN_OPSET
    if converted:
        try:
            model = onnx.version_converter.convert_version(model, opset)
        except Exception as error:
            raise PipelineError(f"--model {info.path}: opset {info.opset} is older than {MIN_OPSET} (per-channel "
                                f"INT8 needs it) and converting it to {opset} failed ({_first_line(error)}): "
                                "export it with a newer opset") from None
    graph = model.graph
    # The file's own tensors get names of their own first, so its input or output may already be called
    # `input` or `logits`.
    _rename(graph, info.input_name, "source_input")
    _rename(graph, info.output_name, "source_logits")
    graph.input.remove(next(value for value in graph.input if value.name == info.input_name))
    graph.input.insert(0, helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                                        ["batch", 3, info.size or "height", info.size or "width"]))
    front, tensor = [], INPUT_NAME
    if channels == "BGR":  # reverse the channel axis: the file takes BGR
        constants = [helper.make_tensor(f"input_reverse_{key}", TensorProto.INT64, [1], [value])
                     for key, value in (("starts", -1), ("ends", -(2 ** 63)), ("axes", 1), ("steps", -1))]
        graph.initializer.extend(constants)
        front.append(helper.make_node("Slice", [tensor] + [c.name for c in constants], ["input_bgr"], name="input_to_bgr"))
        tensor = "input_bgr"
    if info.layout == "NHWC":
        front.append(helper.make_node("Transpose", [tensor], ["input_nhwc"], perm=[0, 2, 3, 1], name="input_to_nhwc"))
        tensor = "input_nhwc"
    front.append(helper.make_node("Identity", [tensor], ["source_input"], name="input_as_given"))
    del graph.output[:]
    # Flatten: a (N, classes, 1, 1) head becomes (N, classes), as the reference runner flattens it; (N, classes) stays.
    graph.node.append(helper.make_node("Flatten", ["source_logits"], [OUTPUT_NAME], name="logits_as_named", axis=1))
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", "classes"]))
    for node in reversed(front):
        graph.node.insert(0, node)
    del graph.value_info[:]  # shapes inferred for the fixed batch would contradict the dynamic one
    onnx.checker.check_model(model)
    onnx.save(model, str(output))
    _check_batch_axis(info, output, threads, info.size or size)
    return {"source": str(info.path), "source_layout": info.layout, "source_channels": channels,
            "fixed_batch": info.batch or None, "source_opset": info.opset, "opset_converted": converted,
            "opset": max(info.opset, opset) if converted else info.opset}


def _rename(graph, old: str, new: str) -> None:
    """Rename tensor `old` wherever the graph's nodes read or write it."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


def _check_batch_axis(info: OnnxClassifier, path: Path, threads: int | None, size: int) -> None:
    """A batch of 2 must give what two single images give: a fixed batch size baked into a Reshape would not."""
    from targets.onnxruntime import OnnxRuntimeRunner

    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    advice = "export it with a dynamic batch axis"
    try:
        runner = OnnxRuntimeRunner(path, threads=threads)
        both = runner.run({INPUT_NAME: x})[OUTPUT_NAME]
        single = np.concatenate([runner.run({INPUT_NAME: x[i:i + 1]})[OUTPUT_NAME] for i in range(2)])
    except PipelineError as error:
        raise PipelineError(f"--model {info.path}: does not run with a dynamic batch axis ({error}): {advice}") from None
    except Exception as error:  # ONNX Runtime's errors of a graph that bakes the batch size in
        raise PipelineError(f"--model {info.path}: does not run with a dynamic batch axis "
                            f"({_first_line(error)}): {advice}") from None
    if both.shape != single.shape or not np.allclose(both, single, rtol=1e-4, atol=1e-4 * float(np.abs(single).max())):
        raise PipelineError(f"--model {info.path}: a batch of 2 gives other logits than 2 single images: {advice}")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
