"""Can this machine build TensorRT engines, which GPU is it, and (on Jetson) how is it clocked.

Everything is tolerant of missing tools: a laptop without TensorRT or a driver gets a reason in
words, a Jetson without `nvpmodel` or root access gets the facts that could be read.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
from pathlib import Path

from pipeline.errors import PipelineError

NO_TENSORRT = ("TensorRT's Python module is not installed (it cannot be installed on development machines; "
               "on Jetson, make the venv with `python3 -m venv --system-site-packages` so JetPack's TensorRT is visible)")
# The cuda-python each CUDA generation takes: 13.x needs a driver >= 580, which JetPack 6 (CUDA 12.6) lacks
# (cudaErrorInsufficientDriver at the first call). pyproject.toml's `tensorrt` (JetPack 6) and
# `tensorrt-cuda13` extras pin the same (tests/device/test_device_check.py checks it).
CUDA_PYTHON_JETPACK6 = "cuda-python>=12.6,<12.7"
CUDA_PYTHON_CUDA13 = "cuda-python>=13,<14"
NO_CUDA_PYTHON = (f"cuda-python is not installed (pip install '{CUDA_PYTHON_JETPACK6}' on JetPack 6 / CUDA 12.6, "
                  f"'{CUDA_PYTHON_CUDA13}' on CUDA 13)")


def cudart():
    """cuda-python's runtime module: `cuda.bindings.runtime` (12.6+, 13.x) or `cuda.cudart` (older 12.x)."""
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as runtime

        return runtime
    except ImportError:
        raise PipelineError(NO_CUDA_PYTHON) from None


def check(result, call: str):
    """cuda-python returns (error, values...): raise one PipelineError naming the call, else the values."""
    runtime = cudart()
    error, values = result[0], result[1:]
    if error != runtime.cudaError_t.cudaSuccess:
        raise PipelineError(f"{call} failed: {cuda_error_text(runtime, error)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def cuda_error_text(runtime, error) -> str:
    name, text = getattr(error, "name", str(error)), ""
    try:
        text = runtime.cudaGetErrorString(error)[1].decode()
    except Exception:  # the message is a courtesy: never hide the error behind another
        pass
    return f"{name} ({text})" if text else name


def _version(number: int) -> str:
    """CUDA's 12060 -> "12.6"."""
    return f"{number // 1000}.{number % 1000 // 10}"


def gpu_description(device: int = 0) -> dict:
    """Name, compute capability, memory, driver and runtime versions of a CUDA device."""
    runtime = cudart()
    try:
        count = check(runtime.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except RuntimeError as error:  # cuda-python 12.x without libcuda: "Failed to dlopen libcuda.so.1"
        raise PipelineError(f"no NVIDIA driver here ({error})") from None
    if count < 1:
        raise PipelineError("no CUDA device found")
    props = check(runtime.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {
        "name": name.split("\x00", 1)[0].strip(),
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_mib": int(props.totalGlobalMem) // (1 << 20),
        "devices": count,
        "driver": _version(check(runtime.cudaDriverGetVersion(), "cudaDriverGetVersion")),
        "runtime": _version(check(runtime.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")),
        "cuda_python": _cuda_python_version(),
    }


def _cuda_python_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("cuda-python")
    except Exception:
        return None


def tensorrt_status() -> tuple[bool, str]:
    """(True, "TensorRT 10.3.0 on Orin (sm 87)") when engines can be built here, else (False, the reason)."""
    try:
        import tensorrt
    except ImportError:
        return False, NO_TENSORRT
    except Exception as error:  # a broken install (missing libnvinfer) raises OSError and friends
        return False, f"TensorRT's Python module does not load ({type(error).__name__}: {error})"
    try:
        gpu = gpu_description()
    except PipelineError as error:
        reason = str(error)
        if "InsufficientDriver" in reason or "NoDevice" in reason:
            reason = f"no CUDA driver or device ({reason})"
        return False, reason
    version = getattr(tensorrt, "__version__", "unknown")
    return True, f"TensorRT {version} on {gpu['name']} (compute capability {gpu['compute_capability']})"


def jetson_info(root: str | Path = "/") -> dict | None:
    """L4T release, model, power mode and clocks of a Jetson; None when this is not a Jetson.

    `root` lets tests point at a copy of the files a Jetson has; commands (nvpmodel, jetson_clocks)
    run only when `root` is the real one.
    """
    root = Path(root)
    release_file = root / "etc/nv_tegra_release"
    if not release_file.is_file():
        return None
    info = {"l4t_release": l4t_release_here(root), "model": None, "power_mode": None,
            "clocks_mhz": {}, "jetson_clocks": None}
    model = _read(root / "proc/device-tree/model")
    info["model"] = model.replace("\x00", "").strip() if model else None
    info["clocks_mhz"] = _clocks_mhz(root)
    if root == Path("/"):
        info["power_mode"] = _power_mode()
        info["jetson_clocks"] = _run(["jetson_clocks", "--show"])
    return info


def l4t_release(text: str) -> str | None:
    """"# R36 (release), REVISION: 4.3, ..." -> "36.4.3"."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def l4t_release_here(root: str | Path = "/") -> str | None:
    """This Jetson's L4T release ("36.4.3"), None elsewhere (no commands run)."""
    text = _read(Path(root) / "etc/nv_tegra_release")
    return l4t_release(text) if text else None


def parse_nvpmodel(text: str) -> dict | None:
    """`nvpmodel -q` ("NV Power Mode: MAXN\\n0") -> {"name": "MAXN", "id": 0}."""
    match = re.search(r"NV Power Mode:\s*(\S+)", text)
    if not match:
        return None
    ids = re.findall(r"^\s*(\d+)\s*$", text, flags=re.MULTILINE)
    return {"name": match.group(1), "id": int(ids[0]) if ids else None}


def _power_mode() -> dict | None:
    output = _run(["nvpmodel", "-q"])
    return parse_nvpmodel(output) if output else None


def _clocks_mhz(root: Path) -> dict:
    """Current CPU (per core), GPU and EMC clocks in MHz from sysfs, where readable."""
    clocks: dict = {}
    cpus = {}
    for file in sorted(glob.glob(str(root / "sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"))):
        value = _number(file)
        if value is not None:
            cpus[Path(file).parts[-3]] = round(value / 1000)  # kHz
    if cpus:
        clocks["cpu"] = cpus
    # JetPack 6: 17000000.gpu; JetPack 5 names the Orin GPU by its chip, 17000000.ga10b (Xavier: gv11b).
    for pattern in ("sys/class/devfreq/*gpu*/cur_freq", "sys/devices/platform/gpu.0/devfreq/*/cur_freq",
                    "sys/devices/platform/*gpu*/devfreq/*/cur_freq", "sys/class/devfreq/*.ga10b/cur_freq",
                    "sys/devices/*.ga10b/devfreq/*/cur_freq", "sys/class/devfreq/*.gv11b/cur_freq",
                    "sys/devices/*.gv11b/devfreq/*/cur_freq"):
        values = [v for v in (_number(f) for f in sorted(glob.glob(str(root / pattern)))) if v is not None]
        if values:
            clocks["gpu"] = round(values[0] / 1e6)  # Hz
            break
    for file in ("sys/kernel/debug/bpmp/debug/clk/emc/rate", "sys/kernel/debug/clk/emc/clk_rate"):
        value = _number(root / file)
        if value is not None:
            clocks["emc"] = round(value / 1e6)  # Hz
            break
    return clocks


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _number(path: str | Path) -> float | None:
    text = _read(path)
    try:
        return float(text.strip()) if text else None
    except ValueError:
        return None


def _run(command: list[str], timeout: float = 10.0) -> str | None:
    """A tool's output, or None when it is missing, fails or hangs (often it needs root)."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None
