"""`python -m pipeline deepstream DIR`: a DeepStream `nvinfer` classifier configuration for a GPU bundle.

nvinfer normalises as y = net-scale-factor * (x - offsets[c]) on 0..255 pixels; the network wants
y = (x / 255 - mean[c]) / std[c], so offsets = 255 * mean and net-scale-factor = 1 / (255 * std),
which needs one std for all channels. The classifier label file has the class names of one output
layer on one line, separated by semicolons. Paths are written relative to the configuration file,
as nvinfer resolves them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pipeline.artifact import Bundle
from pipeline.errors import PipelineError
from pipeline.runtime.classifier import find_engine

CONFIG_NAME = "deepstream_nvinfer.txt"
LABELS_NAME = "deepstream_labels.txt"
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}


def command(args) -> int:
    if args.batch_size < 1:
        raise PipelineError(f"--batch-size must be at least 1, got {args.batch_size}")
    bundle = Bundle.open(args.artifact, check_hashes=False)
    output = Path(args.output) if args.output else bundle.root / CONFIG_NAME
    config, labels, notes = nvinfer_config(bundle, output, args.batch_size)
    _write_atomic(output.parent / LABELS_NAME, labels)
    _write_atomic(output, config)
    print(f"wrote {output} and {output.parent / LABELS_NAME}")
    for note in notes:
        print(f"note: {note}")
    return 0


def nvinfer_config(bundle: Bundle, output: Path, batch_size: int = 1) -> tuple[str, str, list[str]]:
    """(configuration text, label file text, notes for the user)."""
    precision = bundle.precision
    if precision not in NETWORK_MODE:
        raise PipelineError(f"{bundle.root}: unknown bundle precision {precision!r}")
    artifact = bundle.artifact(precision)
    if artifact.get("kind") != "onnx":
        raise PipelineError(f"{bundle.root}: a {bundle.target} bundle holds no ONNX model for DeepStream: "
                            "build with --target jetson or --target desktop-gpu")
    pre = bundle.manifest["preprocessing"]
    mean, std = [float(m) for m in pre["mean"]], [float(s) for s in pre["std"]]
    if len(set(std)) != 1:
        raise PipelineError(f"{bundle.root}: std {std} differs across channels, which nvinfer's single "
                            "net-scale-factor cannot express: normalise in the model instead (or use nvdspreprocess)")
    max_batch = int((bundle.manifest.get("tensorrt") or {}).get("max_batch", batch_size))
    if batch_size > max_batch:
        raise PipelineError(f"--batch-size {batch_size} exceeds the bundle's TensorRT max batch {max_batch}")
    size = int(bundle.manifest["input"]["size"])
    folder = output.parent.resolve()

    def relative(path: Path) -> str:
        return os.path.relpath(path.resolve(), folder)

    notes = ["nvinfer scales the whole frame (or object) to the network size: the reference resize + center "
             f"crop ({pre['resize']} -> {pre['crop']}) is not reproduced; crop upstream if accuracy matters",
             "the network outputs logits (no softmax): classifier-threshold compares raw logits"]
    engine, why_not = find_engine(bundle, precision)
    engine_line = f"model-engine-file={relative(engine)}" if engine else \
        f"# model-engine-file: none yet ({why_not}); nvinfer builds one from onnx-file"
    if not engine:
        notes.append(f"no engine for this machine: {why_not}")
    lines = [
        f"# DeepStream nvinfer configuration of {bundle.model} ({precision}), written by `python -m pipeline deepstream`",
        "[property]",
        "gpu-id=0",
        f"net-scale-factor={1.0 / (255.0 * std[0])!r}",
        "offsets=" + ";".join(repr(255.0 * m) for m in mean),
        "model-color-format=0",
        f"onnx-file={relative(bundle.path(artifact['file']))}",
        engine_line,
        f"labelfile-path={LABELS_NAME}",
        f"infer-dims=3;{size};{size}",
        f"batch-size={batch_size}",
        f"network-mode={NETWORK_MODE[precision]}",
        "network-type=1",
        "process-mode=1",
        "gie-unique-id=1",
        f"output-blob-names={bundle.manifest['output']['name']}",
        "classifier-threshold=0.0",
        "maintain-aspect-ratio=0",
        "",
    ]
    labels = ";".join(name.replace(";", ",") for name in bundle.labels()) + "\n"
    return "\n".join(lines), labels, notes


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
