"""`python -m pipeline device-check [BUNDLE]`: can this device build and run the bundle's engine? One line a fact.

Each check says what it found and, when something is off, what to do: TensorRT (and whether it takes
the bundle's precision path), the CUDA driver and runtime against the installed cuda-python, NumPy
against the TensorRT bindings, DLA cores, GPU memory, the Jetson power mode and clocks, free disk for
the engine. `device-build` runs it first. Exit status: 0 when nothing blocks an engine build
(warnings allowed), 2 when something does (the same status `device-build` gives when it cannot build).
No check raises: a machine without TensorRT, cuda-python or a GPU gets a line for each.

Device side: no torch, ONNX or build code; Python 3.10; TensorRT and cuda-python imported inside checks.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import PipelineError

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
EXIT_BLOCKED = 2
ENGINE_SPACE_FACTOR = 3  # engine + timing cache + a marked engine for the divergence search, per ONNX byte


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    found: str
    todo: str = ""

    def line(self) -> str:
        return f"{self.status.upper():4} {self.name:9} {self.found}" + (f": {self.todo}" if self.todo else "")


def command(args) -> int:
    checks = run_checks(args.bundle)
    if args.json:
        print(json.dumps({"checks": [asdict(c) for c in checks], "exit": exit_status(checks)}, indent=2))
    else:
        print("\n".join(c.line() for c in checks))
    return exit_status(checks)


def exit_status(checks: list[Check]) -> int:
    return EXIT_BLOCKED if any(c.status == FAIL for c in checks) else 0


def run_checks(bundle_dir: str | Path | None = None) -> list[Check]:
    """Every check, in order; a check that breaks unexpectedly reports itself as failed, never raises."""
    checks: list[Check] = []
    try:
        bundle = _bundle(bundle_dir)
    except PipelineError as error:
        bundle = None
        checks.append(Check("bundle", FAIL, str(error), "copy the whole bundle (or its .tar.gz) again"))
    trt = _tensorrt()
    checks_in_order = (("tensorrt", check_tensorrt), ("cuda", check_cuda), ("numpy", check_numpy), ("dla", check_dla),
                       ("gpu", check_gpu_memory), ("power", check_power), ("disk", check_disk))
    for name, check in checks_in_order:
        try:
            checks.append(check(trt, bundle))
        except Exception as error:  # noqa: BLE001 (a preflight reports, it never stops)
            checks.append(Check(name, FAIL, f"the check itself failed: "
                                f"{type(error).__name__}: {error}", "report this with the output of device-check"))
    return checks


def _bundle(bundle_dir):
    if bundle_dir is None:
        return None
    from pipeline.artifact import Bundle

    return Bundle.open(bundle_dir, check_hashes=False)


def _tensorrt():
    """The tensorrt module, or the reason it does not load (str)."""
    from targets.tensorrt.device_info import NO_TENSORRT

    try:
        import tensorrt
    except ImportError:
        return NO_TENSORRT
    except Exception as error:  # noqa: BLE001 (a broken install raises OSError and friends)
        return f"TensorRT's Python module does not load ({type(error).__name__}: {error})"
    return tensorrt


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in str(text).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_tensorrt(trt, bundle) -> Check:
    if isinstance(trt, str):
        return Check("tensorrt", FAIL, trt, "run device-build where JetPack's (or NVIDIA's) TensorRT imports")
    from targets.tensorrt.builder import detect_features

    features = detect_features(trt)
    generation = "strongly typed only (11.x branch)" if features.strongly_typed_only else "FP16/INT8 flags (10.x branch)"
    found = f"TensorRT {features.version}, {generation}"
    if bundle is None:
        return Check("tensorrt", OK, found)
    from targets.tensorrt.builder import EngineOptions, model_files, plan_build

    precision = bundle.precision
    settings = bundle.manifest.get("tensorrt") or {}
    try:
        options = EngineOptions(precision=precision, image_size=int(bundle.manifest["input"]["size"]),
                                dla_core=int(settings.get("dla_core", -1)))
        models = {key: bundle.path(file) for key, file in model_files(bundle.manifest).items()
                  if key != "int8_qdq_fallback"}
        plan = plan_build(features, options, models, calibration_cache=Path("calibration.cache"))
    except PipelineError as error:
        return Check("tensorrt", FAIL, f"{found}; the bundle's {precision} path is not supported: {error}",
                     "use --precision or --dla-core that this TensorRT supports, or rebuild the bundle")
    return Check("tensorrt", OK, f"{found}; {precision} from {plan.onnx.name}: {plan.note}")


def check_cuda(trt, bundle) -> Check:
    from targets.tensorrt.device_info import (
        CUDA_PYTHON_CUDA13,
        CUDA_PYTHON_JETPACK6,
        _cuda_python_version,
        cudart,
    )

    try:
        runtime = cudart()
    except PipelineError as error:
        return Check("cuda", FAIL, str(error), f"pip install '{CUDA_PYTHON_JETPACK6}' (JetPack 6) or "
                                               f"'{CUDA_PYTHON_CUDA13}' (CUDA 13)")
    package = _cuda_python_version() or "unknown"
    try:
        error, driver = runtime.cudaDriverGetVersion()
    except RuntimeError:  # cuda-python 12.x without libcuda: "Failed to dlopen libcuda.so.1"
        error, driver = None, 0
    driver = driver if error == runtime.cudaError_t.cudaSuccess else 0
    error, runtime_version = runtime.cudaRuntimeGetVersion()
    runtime_version = runtime_version if error == runtime.cudaError_t.cudaSuccess else 0
    found = f"cuda-python {package}, CUDA runtime {_cuda(runtime_version)}, driver {_cuda(driver) if driver else 'none'}"
    if not driver:
        return Check("cuda", FAIL, found, "no NVIDIA driver here: run on the Jetson or GPU machine (JetPack installs it)")
    major = _version(package)[:1]
    if major and major[0] > driver // 1000:  # cuda-python 13.x needs a CUDA 13 driver (>= 580)
        pin = CUDA_PYTHON_JETPACK6 if driver // 1000 == 12 else f"cuda-python<{major[0]}"
        return Check("cuda", FAIL, found + f": cuda-python {major[0]}.x needs a CUDA {major[0]} driver",
                     f"pip install '{pin}'")
    if runtime_version > driver:
        return Check("cuda", WARN, found + ": the runtime is newer than the driver (minor-version compatibility only)",
                     f"if CUDA calls fail, pip install '{CUDA_PYTHON_JETPACK6}' on JetPack 6")
    return Check("cuda", OK, found)


def _cuda(number: int) -> str:
    return f"{number // 1000}.{number % 1000 // 10}"


def check_numpy(trt, bundle) -> Check:
    import numpy as np

    found = f"NumPy {np.__version__}"
    if isinstance(trt, str):
        return Check("numpy", SKIP, found + " (no TensorRT to check it against)")
    try:
        np.zeros(1, dtype=trt.nptype(trt.DataType.FLOAT))  # the bindings' NumPy interface
    except Exception as error:  # noqa: BLE001 (a NumPy ABI mismatch shows up as anything)
        return Check("numpy", FAIL, f"{found}: TensorRT {trt.__version__}'s bindings fail with it ({error})",
                     "pip install 'numpy<2' in the venv (JetPack's bindings are built for its NumPy 1.x)")
    if _version(np.__version__)[:1] >= (2,) and _version(trt.__version__)[:2] <= (10, 3):
        # Unverified: JetPack 6 ships NumPy 1.21 beside TensorRT 10.3's bindings; a venv pulls NumPy 2.
        return Check("numpy", WARN, f"{found} with TensorRT {trt.__version__}: unverified (JetPack 6 ships NumPy 1.21 "
                     "for these bindings)", "if TensorRT fails with '_ARRAY_API not found', pip install 'numpy<2'")
    return Check("numpy", OK, f"{found} with TensorRT {trt.__version__}")


def check_dla(trt, bundle) -> Check:
    wanted = int(((bundle.manifest.get("tensorrt") or {}).get("dla_core", -1)) if bundle else -1)
    if isinstance(trt, str):
        return Check("dla", FAIL if wanted >= 0 else SKIP, "no TensorRT to count DLA cores"
                     + (f" (the bundle asks for DLA core {wanted})" if wanted >= 0 else ""))
    logger = trt.Logger(trt.Logger.WARNING)
    cores = trt.Builder(logger).num_DLA_cores
    found = f"{cores} DLA cores" + (f", the bundle asks for core {wanted}" if wanted >= 0 else "")
    if wanted >= cores:
        return Check("dla", FAIL, found, "build for the GPU: device-build --dla-core -1 (Orin Nano and Thor have no DLA)")
    return Check("dla", OK, found)


def check_gpu_memory(trt, bundle) -> Check:
    from targets.tensorrt.device_info import gpu_description

    try:
        gpu = gpu_description()
    except PipelineError as error:
        return Check("gpu", FAIL, str(error), "run on the Jetson or GPU machine the engine is for")
    found = f"{gpu['name']} (compute capability {gpu['compute_capability']}), {gpu['memory_mib']} MiB"
    workspace = int(((bundle.manifest.get("tensorrt") or {}).get("workspace_mib", 2048)) if bundle else 2048)
    if gpu["memory_mib"] < 2 * workspace:
        return Check("gpu", WARN, found + f": less than twice the {workspace} MiB builder workspace",
                     "lower tensorrt.workspace_mib, or close other GPU programs")
    return Check("gpu", OK, found)


def check_power(trt, bundle) -> Check:
    from targets.tensorrt.device_info import jetson_info

    info = jetson_info()
    if info is None:
        return Check("power", SKIP, "not a Jetson (no /etc/nv_tegra_release): no power mode to record")
    mode = info.get("power_mode") or {}
    clocks = info.get("clocks_mhz") or {}
    found = (f"L4T {info.get('l4t_release')}, power mode {mode.get('name', 'unknown')}, GPU clock "
             f"{clocks.get('gpu', 'unknown')} MHz")
    if mode.get("name") != "MAXN" or not info.get("jetson_clocks"):
        return Check("power", WARN, found, "for comparable numbers: sudo nvpmodel -m 0 && sudo jetson_clocks")
    return Check("power", OK, found)


def check_disk(trt, bundle) -> Check:
    folder = Path(bundle.root) if bundle else Path.cwd()
    free = shutil.disk_usage(folder).free
    sources = [bundle.path(f) for f in (bundle.manifest.get("files") or {}) if f.endswith(".onnx")] if bundle else []
    need = ENGINE_SPACE_FACTOR * max((p.stat().st_size for p in sources if p.is_file()), default=0)
    found = f"{free >> 20} MiB free in {folder}"
    if bundle is None:
        return Check("disk", OK, found)
    if free < need:
        return Check("disk", FAIL, found + f", an engine build needs about {need >> 20} MiB",
                     "free disk space or copy the bundle to a larger disk")
    return Check("disk", OK, found + f" (an engine build needs about {need >> 20} MiB)")
