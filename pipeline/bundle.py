"""Writes the self-verifying bundle (`build/<model>/<target>/bundle/`), the last stage of every build.

The layout and the manifest keys are `pipeline.artifact`'s (the reader); this module is the writer.
It runs on the build host only. The golden images are the first N evaluation images, so their torch
reference logits are a prefix of the reference stage's, and the logits that the drift checks already
computed (check_<stage>/logits.npy, quantize/logits.npy) are reused wherever they cover them.

`tolerance[precision].max_abs` is the largest |logit - reference| that ONNX Runtime (OpenVINO for the
CPU IR) gave on the golden images here, with a margin: running the bundled model on the same inputs
reproduces the golden reference within it. Other back ends (TensorRT) are judged on `budgets`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from pipeline.artifact import (BUNDLE_FORMAT, GOLDEN_INPUTS, GOLDEN_INTERMEDIATES, GOLDEN_LABELS, GOLDEN_REFERENCE,
                               MANIFEST, sha256_file)
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.build import BuildContext
    from pipeline.cache import StageRecord

MODELS = "models"
CALIBRATION = "calibration.json"
TRTEXEC = "trtexec.txt"
WHEEL_DIR = "wheel"
INTERMEDIATE_IMAGES = 2  # golden images whose intermediate tensors are stored
MAX_INTERMEDIATES = 16
TOLERANCE_MARGIN = 1.25  # times the largest difference seen here, plus TOLERANCE_FLOOR
TOLERANCE_FLOOR = 1e-3
# Sources of the project that go into its wheel: their digest is part of the bundle stage's key.
SOURCE_PACKAGES = ("pipeline", "calibration", "targets")
SOURCE_FILES = ("pyproject.toml", "README.md")


def project_root() -> Path | None:
    """The source tree holding pyproject.toml above the `pipeline` package; None for an installed package."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def _source_files(root: Path) -> list[Path]:
    files = [root / name for name in SOURCE_FILES if (root / name).is_file()]
    for package in SOURCE_PACKAGES:
        files += sorted(p for p in (root / package).rglob("*")  # what setuptools packs: modules, pipeline.yaml
                        if p.is_file() and p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts
                        and not p.name.startswith("."))
    return files


def project_source_digest() -> str:
    """SHA-256 over the project's source files (the wheel's content); "installed" outside a source tree."""
    root = project_root()
    if root is None:
        return "installed"
    digest = hashlib.sha256()
    for path in _source_files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def write_bundle(ctx: "BuildContext", inputs: dict[str, "StageRecord"], folder: Path) -> dict:
    """Fill `folder` (the bundle stage's temporary folder) and return the stage's facts."""
    from pipeline import __version__
    from pipeline.config import GPU_TARGETS
    from pipeline.stages import BUNDLE_BUDGET_STAGE, ENGINE_BUDGET_STAGE, LOGITS_FILE

    config = ctx.config
    gpu = config.target in GPU_TARGETS
    reference = inputs["reference"]
    all_reference = np.load(reference.path(LOGITS_FILE))
    count = min(config.bundle.golden_images, len(all_reference))
    golden_reference = np.ascontiguousarray(all_reference[:count], dtype=np.float32)
    labels = ctx.labels(reference)[:count].astype(np.int64)
    crops = np.ascontiguousarray(ctx.evaluation.crops[:count])
    labelled = bool((labels >= 0).any())

    (folder / "golden").mkdir()
    (folder / MODELS).mkdir()
    np.save(folder / GOLDEN_INPUTS, crops)
    np.save(folder / GOLDEN_LABELS, labels)
    np.save(folder / GOLDEN_REFERENCE, golden_reference)
    shutil.copyfile(ctx.root / "labels.txt", folder / "labels.txt")

    golden = _Golden(ctx, crops, golden_reference, labels)
    if gpu:
        artifacts, measured = _gpu_models(ctx, inputs, folder, golden)
    else:
        artifacts, measured = _cpu_model(ctx, inputs, folder, golden)
    if "calibrate" in inputs:
        shutil.copyfile(inputs["calibrate"].path(CALIBRATION), folder / CALIBRATION)

    stage_of = BUNDLE_BUDGET_STAGE["gpu" if gpu else "cpu"]
    budgets, expected, tolerance = {}, {}, {}
    for precision, (logits, source, variants) in measured.items():
        budget = config.budget(stage_of[precision], ctx.random_weights, labelled)
        device_budget = config.budget(ENGINE_BUDGET_STAGE[precision], ctx.random_weights, labelled) if gpu else budget
        budgets[precision] = device_budget.as_dict()
        result = golden.compare(stage_of[precision], logits, budget)
        expected[precision] = {"top1": result.top1, "top5": result.top5, "agreement": result.agreement,
                               "ref_top1": result.ref_top1, "ref_top5": result.ref_top5, "images": result.images,
                               "labelled_images": result.labelled_images, "cosine": result.cosine,
                               "source": source, "host_proxy": precision == "fp16",
                               "budget_stage": stage_of[precision], "within_budget": result.passed}
        tolerance[precision] = {"max_abs": golden.tolerance(logits),
                                "variants": {file: golden.tolerance(v) for file, v in variants.items()}}

    intermediates = None
    if gpu:
        intermediates = write_intermediates(inputs["simplify"].path("model.onnx"),
                                            ctx.preprocessing.normalize(crops[:INTERMEDIATE_IMAGES]),
                                            folder / GOLDEN_INTERMEDIATES, ctx.threads)

    manifest = {
        "format": BUNDLE_FORMAT,
        "pipeline_version": __version__,
        "model": ctx.model_name,
        "target": config.target,
        "precision": config.precision,
        "random_weights": ctx.random_weights,
        "labelled": labelled,
        "input": {"name": "input", "layout": "NCHW", "size": ctx.preprocessing.crop, "dtype": "float32"},
        "output": {"name": "logits", "classes": int(golden_reference.shape[1])},
        "preprocessing": ctx.preprocessing.as_dict(),
        "labels": "labels.txt",
        "golden": {"images": count, "inputs": GOLDEN_INPUTS, "labels": GOLDEN_LABELS, "reference": GOLDEN_REFERENCE,
                   "intermediates": GOLDEN_INTERMEDIATES if intermediates else None,
                   "intermediate_tensors": intermediates or [],
                   "intermediate_images": INTERMEDIATE_IMAGES if intermediates else 0,
                   "selection": "the first N evaluation images (ImageNet val/, balanced, seeded)"},
        "artifacts": artifacts,
        "budgets": budgets,
        "expected": expected,
        "tolerance": tolerance,
        "host": {"python": platform.python_version(), "machine": platform.machine(), "platform": platform.platform(),
                 "onnxruntime": _version("onnxruntime"), "openvino": _version("openvino")},
    }
    if gpu:
        manifest["tensorrt"] = _tensorrt_options(config)
    if "calibrate" in inputs:
        manifest["calibration"] = CALIBRATION
    manifest["wheel"], wheel_note = _write_wheel(folder / WHEEL_DIR) if config.bundle.include_wheel else (None, "bundle.include_wheel is off")
    if wheel_note:
        manifest["wheel_note"] = wheel_note
    manifest["trtexec"], trtexec_note = _trtexec_lines(manifest) if gpu else ([], "")
    if trtexec_note:
        manifest["trtexec_note"] = trtexec_note
    if manifest["trtexec"]:
        (folder / TRTEXEC).write_text("\n".join(manifest["trtexec"]) + "\n")
    (folder / "README.md").write_text(_readme(manifest))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        path.chmod(0o644)  # some writers make private temp files; a bundle is meant to be copied
    manifest["files"] = {str(p.relative_to(folder)): sha256_file(p) for p in files}
    _write_json(folder / MANIFEST, manifest)  # last: the bundle's completion marker
    return {"golden_images": count, "precisions": list(artifacts), "expected": expected,
            "wheel": manifest["wheel"], "trtexec_lines": len(manifest["trtexec"])}


class _Golden:
    """The golden images and their reference, and the logits a model gives on them (reused when checked)."""

    def __init__(self, ctx: "BuildContext", crops: np.ndarray, reference: np.ndarray, labels: np.ndarray):
        self.ctx, self.crops, self.reference, self.labels = ctx, crops, reference, labels

    def logits(self, runner_factory: Callable, reuse: list[Path] = ()) -> np.ndarray:
        """The model's logits on the golden images: from an earlier check's logits when they cover them."""
        count = len(self.crops)
        for path in reuse:
            if path.is_file():
                earlier = np.load(path, mmap_mode="r")
                if len(earlier) >= count:
                    return np.asarray(earlier[:count], dtype=np.float32)
        from pipeline.runners import predict

        return predict(runner_factory(), self.crops, self.ctx.config.data.batch_size,
                       progress=self.ctx.progress("bundle: golden logits"), prepare=self.ctx.preprocessing.normalize)

    def compare(self, stage: str, logits: np.ndarray, budget):
        from pipeline.drift import compare

        return compare(stage, self.reference, logits, self.labels, budget)

    def tolerance(self, logits: np.ndarray) -> float:
        worst = float(np.max(np.abs(logits.astype(np.float64) - self.reference)))
        return round(worst * TOLERANCE_MARGIN + TOLERANCE_FLOOR, 6)


def _check_logits(ctx: "BuildContext", inputs: dict, stage: str) -> list[Path]:
    """The check's logits of `stage`, when that check ran on exactly the stage's current artifact."""
    check = ctx.root / f"check_{stage}"
    try:
        data = json.loads((check / "stage.json").read_text())
    except (OSError, ValueError):
        return []
    return [check / "logits.npy"] if data.get("artifact_key") == inputs[stage].key else []


def _gpu_models(ctx: "BuildContext", inputs: dict, folder: Path, golden: _Golden):
    from pipeline.fp16 import CONVERTER
    from pipeline.runners import OnnxRuntimeRunner

    threads = ctx.threads
    models = folder / MODELS

    def onnx_runner(path: Path, optimize: bool = True):
        return lambda: OnnxRuntimeRunner(path, threads=threads, optimize=optimize)

    shutil.copyfile(inputs["simplify"].path("model.onnx"), models / "fp32.onnx")
    shutil.copyfile(inputs["fp16"].path("model.onnx"), models / "fp16.onnx")
    artifacts = {
        "fp32": {"file": "models/fp32.onnx", "kind": "onnx", "stage": "simplify"},
        "fp16": {"file": "models/fp16.onnx", "kind": "onnx", "stage": "fp16", "converter": CONVERTER},
    }
    measured = {
        "fp32": (golden.logits(onnx_runner(models / "fp32.onnx"), _check_logits(ctx, inputs, "simplify")),
                 "onnxruntime CPU, models/fp32.onnx", {}),
        "fp16": (golden.logits(onnx_runner(models / "fp16.onnx", optimize=False), _check_logits(ctx, inputs, "fp16")),
                 "onnxruntime CPU (graph optimizations off), models/fp16.onnx: FP16 computed on a CPU", {}),
    }
    if "quantize" in inputs:
        gate = json.loads(inputs["quantize"].path("gate.json").read_text())
        excluded = list(gate["excluded_layers"])
        fallback = fallback_layers(gate, ctx.config.quantization.fallback_group)
        shutil.copyfile(inputs["quantize"].path("model.onnx"), models / "int8_qdq.onnx")
        shutil.copyfile(inputs["quantize_fp16"].path("model.onnx"), models / "int8_qdq_fp16.onnx")
        _write_fallback(inputs, excluded + fallback, models / "int8_qdq_fallback.onnx")
        artifacts["int8"] = {
            "file": "models/int8_qdq.onnx", "kind": "onnx", "stage": "quantize",
            "strongly_typed": "models/int8_qdq_fp16.onnx", "fallback": "models/int8_qdq_fallback.onnx",
            "calibration": CALIBRATION, "layers_in_float": excluded, "fallback_layers_in_float": excluded + fallback,
            "strongly_typed_opset": _opset(models / "int8_qdq_fp16.onnx"),
        }
        int8 = golden.logits(onnx_runner(models / "int8_qdq.onnx"), [inputs["quantize"].path("logits.npy")])
        variants = {
            "models/int8_qdq_fp16.onnx": golden.logits(onnx_runner(models / "int8_qdq_fp16.onnx", optimize=False),
                                                       _check_logits(ctx, inputs, "quantize_fp16")),
            "models/int8_qdq_fallback.onnx": golden.logits(onnx_runner(models / "int8_qdq_fallback.onnx")),
        }
        measured["int8"] = (int8, "onnxruntime CPU, models/int8_qdq.onnx (INT8 Q/DQ, float between)", variants)
        artifacts["int8"]["optimize"] = {"models/int8_qdq_fp16.onnx": False}
    artifacts["fp16"]["optimize"] = False  # ONNX Runtime runs FP16-typed graphs right only without optimizations
    return artifacts, measured


def fallback_layers(gate: dict, group: int) -> list[str]:
    """The next 2 * fallback_group layers of the gate's ranking (worst first) that the gate kept in INT8."""
    excluded = set(gate["excluded_layers"])
    ranked = [layer["node"] for layer in gate.get("ranking", []) if layer["node"] not in excluded]
    return ranked[: 2 * group]


def _write_fallback(inputs: dict, excluded: list[str], output: Path) -> None:
    from calibration.statistics import CalibrationTable
    from pipeline.quantize import write_qdq_model

    table = CalibrationTable.load(inputs["calibrate"].path(CALIBRATION))
    write_qdq_model(inputs["simplify"].path("model.onnx"), table.amax, output, excluded)


def _cpu_model(ctx: "BuildContext", inputs: dict, folder: Path, golden: _Golden):
    from pipeline.stages import DEPLOYED_STAGE

    precision = ctx.config.precision
    stage = DEPLOYED_STAGE[precision]
    record = inputs[stage]
    for name in ("model.xml", "model.bin"):
        shutil.copyfile(record.path(name), folder / MODELS / name)
    hint = "f32" if precision == "fp32" else ctx.config.openvino.inference_precision

    def runner():
        from targets.openvino import OpenVinoRunner

        return OpenVinoRunner(folder / MODELS / "model.xml", inference_precision=None if hint == "auto" else hint,
                              threads=ctx.threads)

    artifacts = {precision: {"file": "models/model.xml", "weights": "models/model.bin", "kind": "openvino",
                             "stage": stage, "inference_precision": hint}}
    reuse = _check_logits(ctx, inputs, stage)
    logits = golden.logits(runner, reuse)
    ran = "openvino CPU"
    if reuse:
        ran += f" (precision ran: {json.loads((ctx.root / f'check_{stage}' / 'stage.json').read_text()).get('precision_ran')})"
    return artifacts, {precision: (logits, f"{ran}, models/model.xml, inference precision {hint}", {})}


def write_intermediates(onnx_path: Path, images: np.ndarray, output: Path, threads: int | None = None) -> list[str]:
    """FP32 values of block-level tensors (Concat / residual Add outputs) for a few images, stored float16.

    Returns the tensor names in graph order (the order a divergence search walks)."""
    import onnx

    model = onnx.load(str(onnx_path))
    names = block_outputs(model)
    if not names:
        return []
    graph_outputs = {o.name for o in model.graph.output}
    for name in names:
        if name not in graph_outputs:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory(prefix="intermediates-") as scratch:
        marked = Path(scratch) / "marked.onnx"
        onnx.save(model, str(marked))
        session = _session(marked, threads)  # several outputs: the session itself, not a Runner
        values = session.run(names, {session.get_inputs()[0].name: np.ascontiguousarray(images, np.float32)})
    arrays = {name: value.astype(np.float16) for name, value in zip(names, values)}
    with open(output, "wb") as file:
        np.savez_compressed(file, **arrays)
    return names


def _session(path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def block_outputs(model, limit: int = MAX_INTERMEDIATES) -> list[str]:
    """Up to `limit` Concat outputs and residual Add outputs (both inputs computed), spread evenly."""
    graph = model.graph
    constants = {init.name for init in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    candidates = [node.output[0] for node in graph.node
                  if node.op_type == "Concat" and len(node.input) > 1 and not set(node.input) & constants
                  or node.op_type == "Add" and not set(node.input) & constants]
    if len(candidates) <= limit:
        return candidates
    picks = np.linspace(0, len(candidates) - 1, limit).round().astype(int)
    return [candidates[i] for i in sorted(set(picks.tolist()))]


def _tensorrt_options(config) -> dict:
    trt = config.tensorrt
    return {"min_batch": trt.min_batch, "opt_batch": trt.opt_batch, "max_batch": trt.max_batch,
            "workspace_mib": trt.workspace_mib, "dla_core": trt.dla_core, "timing_cache": trt.timing_cache}


def _trtexec_lines(manifest: dict) -> tuple[list[str], str]:
    try:
        from targets.tensorrt.trtexec import command_lines
    except ImportError as error:
        return [], f"targets.tensorrt.trtexec is not available ({error}): no trtexec lines"
    return list(command_lines(manifest)), ""


def _write_wheel(target: Path) -> tuple[str | None, str]:
    """Build the project's wheel into `target` from a copy of its source tree (the tree stays clean)."""
    root = project_root()
    if root is None:
        return None, "the pipeline package is not installed from a source tree: no wheel"
    with tempfile.TemporaryDirectory(prefix="bundle-wheel-") as scratch:
        source = Path(scratch) / "src"
        for path in _source_files(root):
            copy = source / path.relative_to(root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
        out = Path(scratch) / "dist"
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                   "-q", "-w", str(out), str(source)]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(out.glob("*.whl")) if out.is_dir() else []
        if done.returncode != 0 or len(wheels) != 1:
            last = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise PipelineError(f"cannot build the project's wheel for the bundle ({last}): install pip, setuptools "
                                "and wheel in the build environment, or set bundle.include_wheel: false")
        target.mkdir()
        shutil.copyfile(wheels[0], target / wheels[0].name)
        return f"{WHEEL_DIR}/{wheels[0].name}", ""


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _version(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


def write_archive(bundle_dir: Path, archive: Path) -> Path:
    """`bundle.tar.gz` of the bundle folder (its files under `bundle/`), written to a temp name then renamed."""
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    # The manifest's files only: not the cache's stage.json, nor engines/ or results/ that a device-build
    # on this machine may have added.
    members = list(manifest["files"]) + [MANIFEST]
    handle, temporary = tempfile.mkstemp(prefix=f".{archive.name}.", suffix=".tmp", dir=archive.parent)
    os.close(handle)
    try:
        with tarfile.open(temporary, "w:gz") as tar:
            for relative in members:
                tar.add(bundle_dir / relative, arcname=f"{bundle_dir.name}/{relative}")
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the archive is meant to be copied and shared
        os.replace(temporary, archive)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return archive


def _readme(manifest: dict) -> str:
    gpu = manifest["target"] != "cpu"
    lines = [
        f"# {manifest['model']} for {manifest['target']} ({manifest['precision']})",
        "",
        "A self-verifying bundle written by the inception-edge pipeline: the models, the golden data (uint8 crops",
        "of the first evaluation images, their labels and the torch FP32 reference logits), the drift budget per",
        "precision, the accuracy measured on the build host (`manifest.json` -> `expected`), and the pipeline's",
        "own wheel for an offline install. `manifest.json` lists every file with its sha256.",
        "",
        "## Contents",
        "",
    ]
    for precision, artifact in manifest["artifacts"].items():
        lines.append(f"- {precision}: `{artifact['file']}` ({artifact['kind']})")
    lines += ["- `golden/`: inputs, labels, reference logits" + (", intermediate tensors" if gpu else ""),
              "- `labels.txt`: one class name per line"]
    if manifest.get("calibration"):
        lines.append("- `calibration.json`: the version-neutral INT8 calibration table (amax per tensor)")
    if manifest.get("trtexec"):
        lines.append("- `trtexec.txt`: the equivalent trtexec command lines")
    wheel = manifest.get("wheel")
    lines += ["", "## On the device", ""]
    install = f"pip install {wheel}" if wheel else "pip install <the pipeline's wheel>"
    if gpu:
        lines += [
            "TensorRT engines are tied to the GPU and the TensorRT version: they are built here, on the device.",
            "",
            "```sh",
            "python3 -m venv --system-site-packages ~/edge-venv   # JetPack's TensorRT bindings stay visible",
            ". ~/edge-venv/bin/activate",
            f"{install}",
            "pip install 'cuda-python>=12.6,<13'     # JetPack 6 (CUDA 12.6, Python 3.10); CUDA 13: cuda-python 13.x",
            "python -m pipeline device-build .        # builds the engine, checks the golden data, times it",
            "```",
            "",
            "When the check fails, device-build names the first intermediate tensor that diverges and offers",
            "`python -m pipeline device-build . --variant fallback` (more layers in float) or `--precision fp16`.",
        ]
    else:
        lines += [
            "```sh",
            "python3 -m venv ~/edge-venv && . ~/edge-venv/bin/activate",
            f"{install} openvino",
            "python -m pipeline verify .              # runs the golden data, records the precision and ISA that ran",
            "```",
        ]
    return "\n".join(lines) + "\n"
