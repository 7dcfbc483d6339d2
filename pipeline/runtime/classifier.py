"""`Classifier`: a bundle opened for camera applications: frames in, top-k classes out.

    from pipeline.runtime import Classifier

    with Classifier.open("build/inception_v4/cpu") as classifier:
        for prediction in classifier.classify(frame):       # HxWx3 uint8, BGR as OpenCV delivers
            print(prediction.name, prediction.probability)

The back end follows from the bundle unless forced: a TensorRT engine built on this machine
(engines/, by device-build) -> TensorRT; an OpenVINO IR -> OpenVINO; else the bundle's ONNX of its
precision -> ONNX Runtime. Needs numpy, OpenCV and one back end: never torch, onnx or build code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from pipeline.artifact import ENGINES_DIR, Bundle
from pipeline.errors import PipelineError
from pipeline.runtime.backends import (BACKENDS, Backend, OnnxRuntimeBackend, OpenVinoBackend,
                                       TensorRtBackend)
from pipeline.runtime.preprocess import Cropper, check_frame


class Prediction(NamedTuple):
    index: int
    name: str
    probability: float


@dataclass(frozen=True)
class _Choice:
    backend: str
    file: Path
    reason: str


class Classifier:
    def __init__(self, bundle: Bundle, backend: Backend, precision: str, reason: str = ""):
        self.bundle = bundle
        self.backend = backend
        self.precision = precision
        self.reason = reason  # why this back end was chosen, for logs
        pre = bundle.manifest["preprocessing"]
        self.cropper = Cropper(int(pre["resize"]), int(pre["crop"]), pre.get("interpolation", "bicubic"))
        self.labels = bundle.labels()

    @classmethod
    def open(cls, path: str | os.PathLike, backend: str | None = None, device: str = "CPU",
             precision: str | None = None, throughput: bool = False, check_hashes: bool = True) -> "Classifier":
        """Open a bundle (folder, build folder or .tar.gz). `backend`: None (choose), tensorrt, openvino, onnxruntime.

        `device`: OpenVINO's device name (CPU, GPU, NPU) or, for ONNX Runtime, CPU or CUDA.
        `throughput`: compile for many requests in flight (OpenVINO), for `classify_async`.
        `check_hashes`: the bundle's files are checked against its manifest before use, as `verify` does
        (sizes always; SHA-256 too unless False, remembered by size and mtime so a restart stays fast).
        """
        if backend is not None and backend not in BACKENDS:
            raise PipelineError(f"unknown back end {backend!r}: choose one of {', '.join(BACKENDS)}")
        bundle = Bundle.open(path, check_hashes=check_hashes)
        precision = precision or bundle.precision
        artifact = bundle.artifact(precision)
        pre = bundle.manifest["preprocessing"]
        mean, std = pre["mean"], pre["std"]
        choice = choose_backend(bundle, precision, backend)
        if choice.backend == "tensorrt":
            runner: Backend = TensorRtBackend(choice.file, mean, std)
        elif choice.backend == "openvino":
            from targets.openvino import precision_hint

            runner = OpenVinoBackend(choice.file, mean, std, device, precision_hint(artifact.get("inference_precision")),
                                     throughput)
        else:
            # The bundle says which of its ONNX models ONNX Runtime must run without graph optimizations
            # (the FP16-typed ones: its CPU provider computes them wrongly otherwise).
            runner = OnnxRuntimeBackend(choice.file, mean, std, device, fp16_typed=artifact.get("optimize") is False,
                                        exact=_saturates_here(bundle, precision, device))
        return cls(bundle, runner, precision, choice.reason)

    # -- synchronous ----------------------------------------------------------------------------

    def crop(self, frame: np.ndarray) -> np.ndarray:
        """The deployment preprocessing's uint8 crop of a checked frame (channel order unchanged)."""
        return self.cropper(check_frame(frame))

    def logits(self, frames: Sequence[np.ndarray], rgb: bool = False) -> np.ndarray:
        """Logits (N x classes) of frames, through the deployment preprocessing."""
        crops = np.stack([self.crop(frame) for frame in _frames(frames)])
        return self.logits_of_crops(crops, rgb)

    def logits_of_crops(self, crops: np.ndarray, rgb: bool = False) -> np.ndarray:
        """Logits of already cropped uint8 N x S x S x 3 images (e.g. the bundle's golden RGB crops)."""
        size = self.cropper.crop
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
            raise PipelineError(f"crops must be N x {size} x {size} x 3 uint8, got {crops.shape} {crops.dtype}")
        crops, rgb = self._channel_order(crops, rgb)
        step = self.backend.max_batch or len(crops)
        return np.concatenate([self.backend.infer(crops[i : i + step], rgb) for i in range(0, len(crops), step)])

    def classify(self, frame: np.ndarray, rgb: bool = False, top_k: int = 5) -> list[Prediction]:
        """Top-k classes of one HxWx3 uint8 frame (BGR unless `rgb`), most probable first."""
        return self.classify_batch([frame], rgb, top_k)[0]

    def classify_batch(self, frames: Sequence[np.ndarray], rgb: bool = False, top_k: int = 5) -> list[list[Prediction]]:
        self._check_top_k(top_k)
        return [self.top(row, top_k) for row in self.logits(frames, rgb)]

    # -- asynchronous ---------------------------------------------------------------------------

    def classify_async(self, frame: np.ndarray, callback: Callable[[list[Prediction]], None],
                       rgb: bool = False, top_k: int = 5) -> None:
        """Queue one frame; `callback(predictions)` runs on a worker thread when it is done. See `wait()`.

        Preprocessing runs here, in the caller's thread; inference overlaps with the next frames.
        Callbacks may run out of order: bind a frame number into the callback if order matters.
        """
        self._check_top_k(top_k)
        crops, rgb = self._channel_order(self.crop(frame)[None], rgb)
        self.backend.infer_async(crops, rgb, lambda logits: callback(self.top(logits[0], top_k)))

    def wait(self) -> None:
        """Block until every queued frame's callback has run; re-raises the first error of one."""
        self.backend.wait()

    # -- helpers --------------------------------------------------------------------------------

    def top(self, logits: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """Softmax probabilities of one logit row, the top-k classes first."""
        shifted = logits.astype(np.float64) - np.max(logits)
        probabilities = np.exp(shifted)
        probabilities /= probabilities.sum()
        if top_k < len(probabilities):  # partition first: 1000 classes, 5 wanted
            candidates = np.argpartition(-probabilities, top_k - 1)[:top_k]
        else:
            candidates = np.arange(len(probabilities))
        best = candidates[np.argsort(-probabilities[candidates], kind="stable")]
        return [Prediction(int(i), self._name(int(i)), float(probabilities[i])) for i in best]

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _name(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else f"class {index}"

    def _channel_order(self, crops: np.ndarray, rgb: bool) -> tuple[np.ndarray, bool]:
        """Crops in the order the back end takes: OpenVINO's model converts BGR inside, so RGB is flipped."""
        if self.backend.wants_bgr and rgb:
            return np.ascontiguousarray(crops[..., ::-1]), False
        return crops, rgb

    def _check_top_k(self, top_k: int) -> None:
        if not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise PipelineError(f"top_k must be a positive whole number, got {top_k!r}")


def _frames(frames) -> list:
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        frames = list(frames)
    if frames is None or len(frames) == 0:
        raise PipelineError("classify_batch needs at least one frame")
    return list(frames)


def choose_backend(bundle: Bundle, precision: str, forced: str | None = None) -> _Choice:
    """The back end for a bundle's precision: TensorRT engine built here > OpenVINO IR > ONNX Runtime."""
    artifact = bundle.artifact(precision)
    model = bundle.path(artifact["file"])
    if forced in (None, "tensorrt"):
        engine, why_not = find_engine(bundle, precision)
        if engine is not None:
            return _Choice("tensorrt", engine, "a TensorRT engine built for this machine")
        if forced == "tensorrt":
            raise PipelineError(f"{bundle.root}: no usable TensorRT engine: {why_not}")
    if forced in (None, "openvino") and artifact.get("kind") == "openvino":
        return _Choice("openvino", model, "the bundle's OpenVINO IR")
    if forced == "openvino":
        raise PipelineError(f"{bundle.root}: the bundle has no OpenVINO IR for {precision} (it is a "
                            f"{bundle.target} bundle): use --backend onnxruntime or tensorrt")
    if artifact.get("kind") == "onnx":
        return _Choice("onnxruntime", model, "the bundle's ONNX model")
    raise PipelineError(f"{bundle.root}: the {precision} model {artifact['file']} is not an ONNX model: "
                        "ONNX Runtime cannot run it (use the openvino back end)")


def find_engine(bundle: Bundle, precision: str) -> tuple[Path | None, str]:
    """A TensorRT engine of `precision` under engines/ that this machine can run, or (None, why not)."""
    engines = sorted(bundle.path(ENGINES_DIR).glob(f"{precision}*/model.engine"),
                     key=lambda path: "fallback" in path.parent.name)  # the default variant first
    if not engines:
        return None, f"no {precision} engine under {ENGINES_DIR}/ (build one with `python -m pipeline device-build`)"
    try:
        import tensorrt as trt
    except ImportError:
        return None, "TensorRT is not importable here"
    try:
        from targets.tensorrt.device_info import gpu_description
        from targets.tensorrt.metadata import EngineMetadata, check_compatible

        gpu = gpu_description()
    except ImportError:
        return None, "targets.tensorrt is not installed with this pipeline"
    except PipelineError as error:
        return None, str(error)
    reasons = []
    for engine in engines:
        try:
            metadata = EngineMetadata.load(Path(f"{engine}.json"))
            check_compatible(metadata, trt.__version__, gpu.get("name"), gpu.get("compute_capability"))
            return engine, ""
        except (PipelineError, OSError) as error:
            reasons.append(f"{engine.parent.name}: {error}")
    return None, "; ".join(reasons)


def _saturates_here(bundle: Bundle, precision: str, device: str) -> bool:
    """An INT8 Q/DQ model with full-range weights (a GPU bundle's: TensorRT accumulates in int32) on a CPU whose
    INT8 kernels add pairs of products in int16: run it in its exact arithmetic instead (no INT8 kernels)."""
    from targets.cpu_features import int8_pairs_saturate

    fixed = (bundle.manifest.get("int8") or {}).get("overflow_fix")
    return precision == "int8" and device.upper() == "CPU" and not fixed and int8_pairs_saturate()
