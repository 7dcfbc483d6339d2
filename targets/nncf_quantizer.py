"""INT8 OpenVINO IR made by NNCF's own post-training quantizer (`nncf.quantize`).

The alternative to "INT8 IR converted from our Q/DQ ONNX": NNCF places FakeQuantize nodes on the
OpenVINO model itself, with its own placement rules and calibration. Both are measured side by side
(`pipeline.measure`, the drift checks).

Two NNCF/OpenVINO defaults are pinned here:
- `nncf.quantize` uses only 300 calibration samples unless `subset_size` says otherwise: this module
  passes `subset_size` explicitly and refuses a subset larger than the images given (NNCF would
  silently use fewer);
- `ov.save_model` compresses weights to FP16 unless `compress_to_fp16=False`.

Preset: `performance` (NNCF's default for CNNs): symmetric INT8 weights (per channel) and symmetric
activations, what TensorRT and our Q/DQ ONNX use too. `mixed` makes activations asymmetric (better
for activations that are not centred on zero, e.g. after a non-ReLU). NNCF is imported inside the
function: `import targets.nncf_quantizer` costs nothing when NNCF is not installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline.errors import PipelineError
from targets.runner import first_line

PRESETS = ("performance", "mixed")
INSTALL_HINT = "install it with `pip install nncf` (the project's `nncf` extra)"


def nncf_available() -> bool:
    try:
        import nncf  # noqa: F401
    except ImportError:
        return False
    return True


def nncf_version() -> str:
    import nncf

    return nncf.__version__


def calibration_samples(calibration_inputs: np.ndarray | Iterable[np.ndarray]) -> list[np.ndarray]:
    """One (1, C, H, W) float32 array per image, from an (N, C, H, W) array or from batches of them.

    NNCF's `subset_size` counts dataset items: with one image per item it counts images, whatever
    batching the caller used.
    """
    batches = [calibration_inputs] if isinstance(calibration_inputs, np.ndarray) else list(calibration_inputs)
    samples = []
    for batch in batches:
        batch = np.asarray(batch)
        if batch.ndim != 4:
            raise PipelineError(f"calibration images must be (N, C, H, W) arrays, got shape {batch.shape}")
        samples.extend(np.ascontiguousarray(batch[i : i + 1], dtype=np.float32) for i in range(len(batch)))
    return samples


def nncf_quantize_ir(
    model_path: str | Path,
    calibration_inputs: np.ndarray | Iterable[np.ndarray],
    subset_size: int,
    output_xml: str | Path,
    preset: str = "performance",
    fast_bias_correction: bool = True,
) -> Path:
    """Quantize an FP32 OpenVINO IR (`.xml`) or ONNX file with `nncf.quantize`; write an INT8 IR.

    `calibration_inputs`: preprocessed float32 images, (N, C, H, W) or an iterable of such batches.
    `subset_size`: how many of them NNCF uses (at most N). Writes `output_xml` and the `.bin` beside
    it with FP32 storage of the non-quantized constants; the caller makes the write atomic.
    """
    if preset not in PRESETS:
        raise PipelineError(f"NNCF preset must be one of {PRESETS}, got {preset!r}")
    model_path, output_xml = Path(model_path), Path(output_xml)
    if not model_path.is_file():
        raise PipelineError(f"model to quantize not found: {model_path}")
    if model_path.suffix not in (".xml", ".onnx"):
        raise PipelineError(f"NNCF quantizes an OpenVINO IR (.xml) or an ONNX file, got {model_path.name}")
    samples = calibration_samples(calibration_inputs)
    if subset_size < 1:
        raise PipelineError(f"subset_size must be at least 1, got {subset_size}")
    if subset_size > len(samples):
        raise PipelineError(
            f"NNCF subset_size {subset_size} asks for more calibration images than the {len(samples)} given: "
            "give more images or a smaller subset_size"
        )
    try:
        import nncf
    except ImportError:
        raise PipelineError(f"NNCF is not installed: {INSTALL_HINT}") from None
    import openvino as ov

    from targets.openvino import read_ir

    if model_path.suffix == ".xml":
        model = read_ir(model_path)
    else:
        try:
            model = ov.convert_model(str(model_path))
        except Exception as error:
            raise PipelineError(f"OpenVINO cannot read {model_path}: {first_line(error)}") from error

    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    input_name = model.inputs[0].get_any_name()
    quantized = nncf.quantize(
        model,
        nncf.Dataset(samples, lambda sample: {input_name: sample}),
        preset=presets[preset],
        target_device=nncf.TargetDevice.CPU,
        subset_size=subset_size,
        fast_bias_correction=fast_bias_correction,
    )
    output_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(output_xml), compress_to_fp16=False)
    return output_xml


def count_fake_quantize(xml_path: str | Path) -> int:
    """How many FakeQuantize layers an IR holds (0 for a float IR)."""
    from targets.openvino import read_ir

    model = read_ir(xml_path)
    return sum(1 for op in model.get_ops() if op.get_type_name() == "FakeQuantize")

