"""What the figures were measured on: CPU name, cores, library versions, load average.

Timings on a busy machine are only indicative, so every table says what it ran on and how loaded
the machine was before and after measuring.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform.processor()` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cores() -> int:
    """The cores this process may run on (its affinity), which is what the back ends use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _version(module: str) -> str | None:
    loaded = sys.modules.get(module)
    if loaded is None:
        return None
    if module == "openvino":
        return loaded.get_version().split("-")[0]
    return getattr(loaded, "__version__", None)


def machine_summary() -> str:
    """One line for a latency / throughput / frame-path table: CPU, cores, the runtimes loaded."""
    versions = [f"{module} {version}" for module in ("torch", "onnxruntime", "openvino") if (version := _version(module))]
    return f"{cpu_name() or platform.machine()}, {cores()} cores" + (f"; {', '.join(versions)}" if versions else "")


def cpu_summary() -> str:
    """One line for the build-time and NNCF tables: CPU, every core, Python."""
    return f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def machine_description() -> dict:
    """What the figures were measured on, for benchmark.json."""
    versions = {module: _version(module) for module in ("onnxruntime", "openvino", "cv2", "numpy")
                if sys.modules.get(module) is not None}
    return {"cpu": cpu_name(), "cores": cores(), "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}


def load_average() -> float | None:
    """The 1-minute load average, None where the system does not report it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def load_pair(before: float | None, after: float | None) -> tuple[float, float] | None:
    return None if before is None or after is None else (before, after)


def load_lines(load: tuple[float, float] | None) -> list[str]:
    """The load average before and after measuring, and a warning when the machine was busy."""
    if load is None:
        return []
    before, after = load
    line = f"1-minute load average: {before:.2f} before, {after:.2f} after measuring."
    count = cores()
    if max(before, after) > count + 0.5:  # our own run accounts for about `count`
        line += (f" The machine was busy (more runnable threads than its {count} cores): "
                 "multi-threaded timings are then dominated by scheduling, only indicative.")
    return [line]
