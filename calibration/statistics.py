"""Calibration statistics: the activation ranges of an FP32 ONNX model, as a version-neutral table.

`collect_ranges` runs the model with ONNX Runtime on calibration batches and returns, for each named
tensor, the symmetric range `amax` from which an INT8 scale follows (`scale = amax / 127`). The table
names no TensorRT or OpenVINO version: a Q/DQ quantizer, or a legacy TensorRT calibration cache
written on the device, is made from it later.

Statistics are gathered batch by batch and only running maxima and histograms are kept, so memory
does not grow with the number of images (ONNX Runtime's own histogram calibrators keep every
intermediate output: tens of GB for 512 Inception images). The price is a second pass over the
images for the histogram methods, whose bins span [0, max|x|] found by the first pass.

Methods:

- `minmax`: amax = max |x| over all images.
- `percentile`: amax = the given percentile of |x|, read from a histogram of |x| (interpolated
  linearly inside the bin where the percentile falls).
- `entropy`: TensorRT's entropy calibration (IInt8EntropyCalibrator2), as NVIDIA's reference
  implementation (pytorch-quantization in the TensorRT repository, `_compute_amax_entropy`) does
  it: a histogram of |x| with 2048 bins; for every candidate threshold of i = 128..2048 bins
  (stride 1), the reference P = hist[:i] with the outliers hist[i:] added to its last bin, the
  candidate Q = hist[:i] merged into 128 groups, each group's sum spread evenly over the group's
  non-empty bins; both normalised; KL(P||Q) with 0·log 0 = 0 and an infinite divergence where P > 0 and Q = 0 (the last
  bin is empty but outliers exist). The largest i of minimal divergence wins and amax is that bin's
  upper edge, i * bin_width (the reference implementation's choice; TensorRT's GTC 2017 slides
  print (i + 0.5) * bin_width). Also as in the reference, the count of bin 0 is replaced by that of
  bin 1 before the search: otherwise the spike of exact zeros after every ReLU dominates the
  divergence and drags the threshold down.
- `mse`: the threshold of least expected squared quantization error of the tensor (rounding inside
  the range, clipping above it), searched over the same candidates as `entropy`
  (`calibration.thresholds.mse_threshold`).

Tensors that are zero on every image get amax `ZERO_TENSOR_AMAX` (a scale of 0 would divide by
zero) and are listed in `CalibrationTable.zero_tensors`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from calibration import METHODS  # noqa: F401  (the one list of methods, re-exported)
from calibration.preprocess import Preprocessing
from calibration.thresholds import NUM_QUANTIZED_BINS, entropy_threshold, mse_threshold, percentile_threshold
from pipeline.errors import PipelineError

FORMAT = "inception-edge-calibration/1"
INT8_MAX = 127
ZERO_TENSOR_AMAX = 1e-6  # any positive value works for an all-zero tensor; 1e-6 / 127 is a normal float32

Progress = Callable[[int, int], None]  # update(done, total) after every batch of every pass


@dataclass(frozen=True)
class CalibrationTable:
    method: str
    images: int
    percentile: float | None  # the `percentile` method's percentile, else None
    bins: int | None  # histogram bins of `percentile` and `entropy`, else None
    amax: dict[str, float]  # tensor name -> symmetric range; INT8 scale = amax / 127
    zero_tensors: tuple[str, ...] = ()  # tensors that were zero on every image (amax = ZERO_TENSOR_AMAX)
    dla: dict | None = None  # Jetson: {"tensors": [...], "share": {tensor: tensor}} (pipeline/stages/quantize/dla.py)

    def scale(self, tensor: str) -> float:
        return self.amax[tensor] / INT8_MAX

    def as_dict(self) -> dict:
        return {
            "format": FORMAT,
            "method": self.method,
            "images": self.images,
            "percentile": self.percentile,
            "bins": self.bins,
            "tensors": {name: {"amax": amax} for name, amax in self.amax.items()},
            "zero_tensors": list(self.zero_tensors),
            **({"dla": self.dla} if self.dla is not None else {}),
        }

    def to_json(self) -> str:
        # json writes floats with repr(): they read back bit for bit.
        return json.dumps(self.as_dict(), indent=2) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON table atomically (a temporary file renamed into place)."""
        path = Path(path)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(self.to_json())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationTable":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PipelineError(f"calibration table not found: {path}") from None
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise PipelineError(f"cannot read calibration table {path}: {error} (rebuild it)") from None
        try:
            return cls._from_dict(data)
        except (KeyError, TypeError, ValueError) as error:
            detail = f"missing key {error}" if isinstance(error, KeyError) else str(error)
            raise PipelineError(f"{path} is not a {FORMAT} calibration table: {detail} (rebuild it)") from None

    @classmethod
    def _from_dict(cls, data) -> "CalibrationTable":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"format is {found!r}")
        if data["method"] not in METHODS:
            raise ValueError(f"unknown method {data['method']!r}")
        if not isinstance(data["images"], int) or data["images"] < 1:
            raise ValueError(f"images must be a positive integer, got {data['images']!r}")
        if not isinstance(data["tensors"], dict):
            raise TypeError("tensors must be an object")
        amax = {}
        for name, entry in data["tensors"].items():
            value = entry["amax"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ValueError(f"amax of {name!r} must be a positive finite number, got {value!r}")
            amax[name] = float(value)
        percentile, bins = data["percentile"], data["bins"]
        if percentile is not None and not isinstance(percentile, (int, float)):
            raise TypeError(f"percentile must be a number or null, got {percentile!r}")
        if bins is not None and not isinstance(bins, int):
            raise TypeError(f"bins must be an integer or null, got {bins!r}")
        zero_tensors = tuple(data.get("zero_tensors", ()))
        if not set(zero_tensors) <= set(amax):
            raise ValueError("zero_tensors names tensors that the table lacks")
        dla = data.get("dla")
        if dla is not None and not set(dla["tensors"]) | set(dla["share"]) | set(dla["share"].values()) <= set(amax):
            raise ValueError("the dla section names tensors that the table lacks")
        return cls(data["method"], data["images"], None if percentile is None else float(percentile), bins,
                   amax, zero_tensors, dla)


class ImageBatches(Sequence):
    """uint8 crops (NxHxWx3) as normalised float32 NCHW batches, made one batch at a time.

    A sequence, so `collect_ranges` can walk it twice, and only one float32 batch exists at once
    (512 Inception crops take 137 MB as uint8, 549 MB as float32).
    """

    def __init__(self, crops: np.ndarray, preprocessing: Preprocessing, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.crops, self.preprocessing, self.batch_size = crops, preprocessing, batch_size

    def __len__(self) -> int:
        return -(-len(self.crops) // self.batch_size)

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        start = (index % len(self)) * self.batch_size
        return self.preprocessing.normalize(self.crops[start:start + self.batch_size])


def collect_ranges(
    onnx_path: str | os.PathLike,
    tensors: Sequence[str],
    batches: Sequence[np.ndarray],
    method: str = "entropy",
    percentile: float = 99.99,
    bins: int = 2048,
    threads: int | None = None,
    progress: Progress | None = None,
) -> CalibrationTable:
    """The calibration table of `tensors` (activation names of the FP32 ONNX at `onnx_path`).

    batches: float32 NCHW network inputs, already normalised. A sequence (a list, or `ImageBatches`
    to normalise uint8 crops lazily), not a one-shot iterator: the histogram methods walk it twice,
    first for max|x| (the histogram range), then for the histogram. Memory is one batch's
    intermediate outputs plus one histogram per tensor, whatever the number of images; choose the
    batch size for the former (Inception-v4 at 299 has roughly 20 M activation values per image).
    tensors: names of node outputs or of the graph input (its values are the batch itself);
    duplicates are ignored, the table keeps the given order.
    progress: called as progress(done, total) after each batch, total counting both passes.
    """
    check_method(method, bins, percentile)
    if not hasattr(batches, "__len__") or iter(batches) is batches:
        raise TypeError("batches must be a sequence that can be walked more than once (a list, or ImageBatches), "
                        "not a one-shot iterator")
    if len(batches) == 0:
        raise PipelineError("no calibration images: the calibration set is empty")
    names = list(dict.fromkeys(tensors))
    if not names:
        raise PipelineError("no tensors to calibrate")

    runs = TensorReader(Path(onnx_path), names, threads)
    histogram = method != "minmax"
    passes = 2 if histogram else 1
    total, done = passes * len(batches), 0

    def one_pass(digest) -> int:
        """Run every batch and hand its outputs to `digest`; they live only inside that call."""
        nonlocal done
        images = 0
        for batch in batches:
            digest(runs.run(batch))
            images += len(batch)
            done += 1
            if progress is not None:
                progress(done, total)
        return images

    maxima = np.zeros(len(names), np.float64)
    images = one_pass(lambda outputs: update_maxima(maxima, outputs, runs))

    if histogram:
        hists = np.zeros((len(names), bins), np.int64)
        second_pass_images = one_pass(lambda outputs: update_histograms(hists, outputs, maxima))
        if second_pass_images != images:
            raise PipelineError(f"the calibration batches gave {images} images, then {second_pass_images}: "
                                "they must give the same images on every pass")
    return table_from(names, maxima, hists if histogram else None, method, percentile, bins, images)


def check_method(method: str, bins: int, percentile: float) -> None:
    """The method and its settings, checked before any image is read."""
    if method not in METHODS:
        raise PipelineError(f"unknown calibration method {method!r}: choose one of {', '.join(METHODS)}")
    if method != "minmax" and not (isinstance(bins, int) and bins >= NUM_QUANTIZED_BINS):
        raise PipelineError(f"calibration bins must be an integer of at least {NUM_QUANTIZED_BINS}, got {bins!r}")
    if method == "percentile" and not 0 < percentile <= 100:
        raise PipelineError(f"calibration percentile must be in (0, 100], got {percentile!r}")


def table_from(names: list[str], maxima: np.ndarray, hists: np.ndarray | None, method: str, percentile: float,
               bins: int, images: int) -> CalibrationTable:
    """The table from the gathered statistics: max |x| per tensor (first pass) and, for the histogram methods,
    the histograms of |x| over [0, max] (second pass). Statistics gathered in parts merge before this: maxima
    take the max, histograms over the same maxima add (`pipeline.executor`)."""
    histogram = method != "minmax"
    zero = maxima == 0
    amax: dict[str, float] = {}
    for k, name in enumerate(names):
        if zero[k]:
            amax[name] = ZERO_TENSOR_AMAX
        elif method == "minmax":
            amax[name] = float(maxima[k])
        elif method == "percentile":
            amax[name] = percentile_threshold(hists[k], maxima[k] / bins, percentile)
        elif method == "mse":
            amax[name] = mse_threshold(hists[k], maxima[k] / bins)
        else:
            amax[name] = entropy_threshold(hists[k], maxima[k] / bins)
    return CalibrationTable(
        method=method,
        images=images,
        percentile=float(percentile) if method == "percentile" else None,
        bins=bins if histogram else None,
        amax=amax,
        zero_tensors=tuple(name for k, name in enumerate(names) if zero[k]),
    )


class TensorReader:
    """An ONNX Runtime session over a copy of the model whose graph outputs are the wanted tensors.

    The copy is passed to ONNX Runtime as bytes, which protobuf limits to 2 GB (Inception-ResNet-v2
    takes 224 MB).
    """

    def __init__(self, path: Path, names: list[str], threads: int | None):
        import onnx

        from targets.onnxruntime import open_session

        if not path.is_file():
            raise PipelineError(f"ONNX model not found: {path}")
        try:
            model = onnx.load(str(path))
        except Exception as error:  # onnx raises DecodeError and others
            raise PipelineError(f"cannot read ONNX model {path}: {error}") from None
        graph = model.graph
        weights = {init.name for init in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in weights]
        if len(inputs) != 1:
            raise PipelineError(f"{path} must have one input, it has {inputs}")
        self.input_name = inputs[0]
        produced = {name for node in graph.node for name in node.output}
        unknown = [n for n in names if n not in produced and n != self.input_name]
        if unknown:
            kind = "weights, not activations" if set(unknown) <= weights else "not tensors of the model"
            raise PipelineError(f"{len(unknown)} calibration tensor(s) are {kind} of {path}: "
                                f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        outputs = {o.name for o in graph.output}
        for name in names:
            if name != self.input_name and name not in outputs:
                graph.output.append(onnx.ValueInfoProto(name=name))  # ONNX Runtime infers the type

        self.session = open_session(model, threads, what=str(path))
        self.names = names
        self.fetched = [n for n in names if n != self.input_name]
        self.path = path

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """The wanted tensors on one batch, in the order of `names`."""
        if not isinstance(batch, np.ndarray) or batch.dtype != np.float32 or batch.ndim != 4:
            described = f"{batch.dtype} {batch.shape}" if isinstance(batch, np.ndarray) else type(batch).__name__
            raise PipelineError(f"calibration batches must be normalised float32 NCHW arrays, got {described}")
        values = dict(zip(self.fetched, self.session.run(self.fetched, {self.input_name: batch})))
        values[self.input_name] = batch
        result = [values[name] for name in self.names]
        for name, x in zip(self.names, result):
            if not np.issubdtype(x.dtype, np.floating):
                raise PipelineError(f"calibration tensor {name!r} of {self.path} is {x.dtype}, not a float tensor")
        return result


def update_maxima(maxima: np.ndarray, values: list[np.ndarray], runs: "TensorReader") -> None:
    for k, x in enumerate(values):
        maxima[k] = max(maxima[k], _max_abs(x))
        if not math.isfinite(maxima[k]):
            raise PipelineError(f"tensor {runs.names[k]!r} of {runs.path} has NaN or infinite values on the "
                                "calibration images: check the model and the preprocessing")


def update_histograms(hists: np.ndarray, values: list[np.ndarray], maxima: np.ndarray) -> None:
    for k, x in enumerate(values):
        if maxima[k] > 0:
            hists[k] += _abs_histogram(x, maxima[k], hists.shape[1])


def _max_abs(x: np.ndarray) -> float:
    if x.size == 0:
        return 0.0
    return max(float(x.max()), -float(x.min()))  # no |x| copy


def _abs_histogram(x: np.ndarray, amax: float, bins: int, chunk: int = 1 << 18) -> np.ndarray:
    """Counts of |x| in `bins` equal bins over [0, amax]; amax itself falls in the last bin.

    Works through x in chunks with reused buffers: no temporary as large as x (an Inception tensor
    of a batch of 8 holds 11 M values), and about 20 % faster than whole-array numpy.
    """
    flat = x.reshape(-1)
    scale = np.float32(bins / amax)
    scaled = np.empty(min(chunk, flat.size), np.float32)
    index = np.empty(len(scaled), np.intp)
    counts = np.zeros(bins, np.int64)
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk]
        s, i = scaled[:len(part)], index[:len(part)]
        np.abs(part, out=s)  # never in place: x may be the caller's batch
        s *= scale
        np.minimum(s, bins - 1, out=s)
        i[...] = s  # truncation = floor for non-negative values
        counts += np.bincount(i, minlength=bins)
    return counts
