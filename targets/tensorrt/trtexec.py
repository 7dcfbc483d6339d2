"""The `trtexec` equivalents of a bundle's engine builds, and trtexec's own timings.

`command_lines(manifest)` writes, for each TensorRT generation, the trtexec command that builds the
same engine `device-build` builds, with paths relative to the bundle folder (run them there). Each is
preceded by a `# comment` line naming the TensorRT it is for. `run_trtexec` times an engine with
trtexec for comparison with our own loop; trtexec lives in /usr/src/tensorrt/bin on JetPack.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

from targets.tensorrt.builder import model_files

JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
CALIBRATION_CACHE = "engines/calibration.cache"  # written on the device by device-build
ENGINES = "engines"


def _common(manifest: dict, engine: str, static: bool = False) -> list[str]:
    """Shapes, workspace, timing cache, output; `static`: min = opt = max = tensorrt.dla_batch (DLA)."""
    name = (manifest.get("input") or {}).get("name", "input")
    size = int((manifest.get("input") or {})["size"])
    options = manifest.get("tensorrt") or {}
    shape = lambda batch: f"{name}:{int(batch)}x3x{size}x{size}"  # noqa: E731
    timing_cache = options.get("timing_cache") or "tensorrt-timing.cache"
    batches = [options.get(key, default) for key, default in (("min_batch", 1), ("opt_batch", 1), ("max_batch", 8))]
    if static:  # DLA supports no dynamic dimensions
        batches = [options.get("dla_batch", 1)] * 3
    return [
        f"--minShapes={shape(batches[0])}",
        f"--optShapes={shape(batches[1])}",
        f"--maxShapes={shape(batches[2])}",
        f"--memPoolSize=workspace:{int(options.get('workspace_mib', 2048))}M",
        f"--timingCacheFile={ENGINES}/{Path(timing_cache).name}",
        f"--saveEngine={ENGINES}/{engine}",
    ]


def command_lines(manifest: dict) -> list[str]:
    """Comment + command pairs for the bundle's deployed precision (paths relative to the bundle)."""
    precision = manifest.get("precision", "fp32")
    models = model_files(manifest)
    dla_core = int((manifest.get("tensorrt") or {}).get("dla_core", -1))
    cases: list[tuple[str, list[str], str]] = []  # (comment, arguments, engine file)
    if precision == "int8":
        if "int8_qdq" in models:
            cases.append(("TensorRT 10.x (JetPack 6 / 7, desktop 10.x): explicit INT8 from Q/DQ, FP16 elsewhere",
                          [f"--onnx={models['int8_qdq']}", "--fp16", "--int8"], "trtexec-int8-trt10.engine"))
        if "int8_qdq_fp16" in models:
            cases.append(("TensorRT 11.x (always strongly typed): the FP16-typed Q/DQ model",
                          ["--stronglyTyped", f"--onnx={models['int8_qdq_fp16']}"], "trtexec-int8-trt11.engine"))
        if "fp32" in models and dla_core >= 0:  # only where a DLA core is configured (Orin Nano has none)
            batch = int((manifest.get("tensorrt") or {}).get("dla_batch", 1))
            cases.append((f"TensorRT 10.3 (JetPack 6, Orin DLA core {dla_core}, static batch {batch}): implicit INT8 "
                          f"from the legacy calibration cache that device-build writes to {CALIBRATION_CACHE}",
                          [f"--onnx={models['fp32']}", f"--useDLACore={dla_core}", "--allowGPUFallback", "--int8",
                           "--fp16", f"--calib={CALIBRATION_CACHE}"], f"trtexec-int8-dla{dla_core}-b{batch}.engine"))
    elif precision == "fp16":
        if "fp32" in models:
            cases.append(("TensorRT 10.x: FP32 ONNX with the FP16 flag",
                          [f"--onnx={models['fp32']}", "--fp16"], "trtexec-fp16-trt10.engine"))
        if "fp16" in models:
            cases.append(("TensorRT 11.x (always strongly typed): the FP16 ONNX",
                          ["--stronglyTyped", f"--onnx={models['fp16']}"], "trtexec-fp16-trt11.engine"))
    elif "fp32" in models:
        cases.append(("TensorRT 10.x and 11.x: FP32", [f"--onnx={models['fp32']}"], "trtexec-fp32.engine"))
    lines = []
    for comment, arguments, engine in cases:
        static = any(a.startswith("--useDLACore=") for a in arguments)
        lines.append(f"# {comment}")
        lines.append(" ".join(["trtexec"] + [shlex.quote(a) for a in arguments + _common(manifest, engine, static)]))
    return lines


INPUT_OPTIONS = ("--onnx", "--calib")  # options whose file must exist before trtexec runs


def files_named(lines: list[str], device_files: bool = False) -> list[str]:
    """Bundle-relative input files the command lines read.

    Files under engines/ (the calibration cache) are written on the device by device-build, so they
    are left out unless `device_files` is true.
    """
    files = []
    for line in lines:
        if line.lstrip().startswith("#"):
            continue
        for word in shlex.split(line):
            option, _, value = word.partition("=")
            if option not in INPUT_OPTIONS or not value or value in files:
                continue
            if device_files or not value.startswith(f"{ENGINES}/"):
                files.append(value)
    return files


_STAT = r"(min|max|mean|median|percentile\(\s*(\d+(?:\.\d+)?)%\))\s*=\s*([\d.eE+-]+)\s*ms"


def parse_trtexec(text: str) -> dict:
    """GPU compute time (ms: min/max/mean/median/p90/p95/p99...), latency and throughput (qps)."""
    result: dict = {}
    throughput = re.search(r"Throughput:\s*([\d.eE+-]+)\s*qps", text)
    if throughput:
        result["throughput_qps"] = float(throughput.group(1))
    for key, label in (("gpu_compute_ms", r"GPU Compute Time"), ("latency_ms", r"\]\s*Latency|^Latency")):
        match = re.search(rf"(?:{label}):\s*(min\s*=.*)$", text, flags=re.MULTILINE)
        if not match:
            continue
        stats = {}
        for name, percent, value in re.findall(_STAT, match.group(1)):
            stats[f"p{float(percent):g}" if percent else name] = float(value)
        result[key] = stats
    return result


def trtexec_path() -> str | None:
    found = shutil.which("trtexec")
    if found:
        return found
    return JETPACK_TRTEXEC if Path(JETPACK_TRTEXEC).is_file() else None


def run_trtexec(engine: Path, shape: str, seconds: float, timeout: float | None = None,
                dla_core: int = -1) -> dict | None:
    """trtexec's timings of a built engine (`shape` as "input:1x3x224x224"); None without trtexec.

    The result also holds the command and, when trtexec fails, its exit code and last output line.
    """
    executable = trtexec_path()
    if executable is None:
        return None
    command = [executable, f"--loadEngine={engine}", f"--shapes={shape}", f"--duration={max(1, round(seconds))}",
               "--warmUp=500"] + ([f"--useDLACore={dla_core}"] if dla_core >= 0 else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True,
                              timeout=timeout if timeout is not None else seconds * 3 + 120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"command": " ".join(command), "error": f"{type(error).__name__}: {error}"}
    result = {"command": " ".join(command), **parse_trtexec(done.stdout)}
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()
        result["error"] = f"exit {done.returncode}: {tail[-1] if tail else ''}"
    return result
