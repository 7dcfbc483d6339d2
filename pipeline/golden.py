"""The golden-data check both device commands share (`verify` on CPUs, `device-build` on GPUs).

A bundle carries golden inputs (uint8 crops), their labels and the torch FP32 reference logits, plus
the drift budget per precision the host judged that precision on. On the device, the artifact runs the
same crops (normalised with the bundle's mean/std), is judged on the same budget, is timed, and the
outcome is written into the bundle as `results/<name>-<UTC time>.json`.

Device-side: numpy and the standard library only (Python 3.10); runners are passed in.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.artifact import Bundle
from pipeline.drift import DriftBudget, DriftResult, compare
from pipeline.errors import PipelineError

RESULTS_DIR = "results"


def budget_for(bundle: Bundle, precision: str) -> DriftBudget:
    """The drift budget the host judged `precision` on, as the manifest records it."""
    budgets = bundle.manifest.get("budgets") or {}
    if precision not in budgets:
        raise PipelineError(f"{bundle.path('manifest.json')}: no drift budget for {precision} "
                            f"(it has: {', '.join(budgets) or 'none'}): rebuild the bundle")
    try:
        return DriftBudget(**budgets[precision])
    except TypeError as error:
        raise PipelineError(f"{bundle.path('manifest.json')}: bad drift budget for {precision} ({error}): "
                            "rebuild the bundle with this version of the pipeline") from None


def load_golden(bundle: Bundle) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(uint8 crops N x H x W x 3, labels or None when the bundle is unlabelled, reference logits N x C),
    checked for consistent shapes so that a damaged golden set gives a clear error, not a numpy one."""
    try:
        crops, labels, reference = bundle.golden()
    except (OSError, ValueError, KeyError) as error:
        raise PipelineError(f"{bundle.root}: cannot read the golden data ({error}): copy the bundle again") from None
    size = int(bundle.manifest["input"]["size"])
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
        raise PipelineError(f"{bundle.path(bundle.manifest['golden']['inputs'])}: expected uint8 N x {size} x {size} x 3 "
                            f"crops, found {crops.dtype} {crops.shape}: copy the bundle again")
    if reference.ndim != 2 or len(reference) != len(crops) or len(labels) != len(crops):
        raise PipelineError(f"{bundle.root}: golden inputs ({len(crops)}), labels ({len(labels)}) and reference "
                            f"logits {reference.shape} do not match: copy the bundle again")
    if len(crops) == 0:
        raise PipelineError(f"{bundle.root}: the bundle holds no golden images: rebuild it")
    labelled = bundle.manifest.get("labelled", True) and bool(np.any(labels >= 0))
    return crops, (labels if labelled else None), reference


def run_golden(bundle: Bundle, runner, crops: np.ndarray, batch_size: int,
               output: str | None = None, pad: bool = False) -> np.ndarray:
    """The runner's output (logits by default) for every crop, `batch_size` crops per call.

    `pad`: every call gets exactly `batch_size` crops (a static-shape engine), the last batch padded
    with its last crop and the padding's outputs dropped."""
    output = output or runner.output_name
    batches = []
    for start in range(0, len(crops), batch_size):
        chunk = crops[start:start + batch_size]
        count = len(chunk)
        if pad and count < batch_size:
            chunk = np.concatenate([chunk] + [chunk[-1:]] * (batch_size - count))
        y = runner.run({runner.input_name: bundle.normalize(chunk)})[output]
        batches.append(np.asarray(y, dtype=np.float32)[:count])
    return np.concatenate(batches)


def judge(stage: str, reference: np.ndarray, logits: np.ndarray, labels: np.ndarray | None,
          budget: DriftBudget) -> DriftResult:
    if logits.shape != reference.shape:
        raise PipelineError(f"{stage}: the artifact gives logits of shape {logits.shape}, the golden reference "
                            f"is {reference.shape}: the bundle's model and golden data do not belong together")
    return compare(stage, reference, logits, labels, budget)


def time_runner(runner, input_shape: Sequence[int], seconds: float) -> dict:
    """Latency (median / p90 / p99 / mean ms, images per second) of sequential calls on one fixed input."""
    from targets.timing import measure_latency

    if seconds <= 0:
        raise PipelineError(f"--seconds must be positive, got {seconds}")
    result = measure_latency(runner, tuple(input_shape), seconds=seconds, name=getattr(runner, "name", None))
    return result.as_dict()


def comparison_rows(expected: dict | None, drift: DriftResult, latency: dict | None) -> list[tuple[str, str, str]]:
    """(what, expected on the host, measured here) for the printed table."""
    expected = expected or {}
    rows = [
        ("top-1 %", _number(expected.get("top1"), ".2f"), _number(drift.top1, ".2f")),
        ("top-5 %", _number(expected.get("top5"), ".2f"), _number(drift.top5, ".2f")),
        ("agreement with FP32 %", _number(_percent(expected.get("agreement")), ".2f"), _number(100 * drift.agreement, ".2f")),
        ("reference top-1 %", "", _number(drift.ref_top1, ".2f")),
        ("mean cosine", "", f"{drift.cosine:.6f}"),
        ("SQNR dB", "", _number(drift.sqnr_db, ".1f")),
        ("images", _number(expected.get("images"), "d"), str(drift.images)),
    ]
    if latency:
        rows.append(("latency p50 / p90 / p99 ms (batch {})".format(latency.get("batch", 1)), "",
                     " / ".join(_number(latency.get(key), ".2f") for key in ("median_ms", "p90_ms", "p99_ms"))))
    return rows


def render_table(title: str, rows: Sequence[tuple[str, ...]], header: tuple[str, ...] = ("", "host", "here")) -> str:
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    lines = [title, "  ".join(str(cell).ljust(width) for cell, width in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def utc_stamp(now: datetime | None = None) -> str:
    """A file-name-safe UTC time: 20261125T154723Z."""
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def hostname() -> str:
    name = socket.gethostname() or "host"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def write_results(bundle: Bundle, name: str, results: dict) -> Path:
    """`results/<name>-<UTC time>.json` inside the bundle, written atomically (temp file, then rename)."""
    folder = bundle.path(RESULTS_DIR)
    try:
        folder.mkdir(exist_ok=True)
        target = folder / f"{name}-{utc_stamp()}.json"
        handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(results, file, indent=2, default=_json_default)
                file.write("\n")
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    except OSError as error:
        raise PipelineError(f"{folder}: cannot write the results ({error}): make the bundle folder writable") from None
    return target


def failure_message(what: str, drift: DriftResult, advice: str = "") -> str:
    """One line naming the failing figures (the DriftResult's reasons) and what to do."""
    message = f"{what}: drift past the bundle's budget on {drift.images} golden images: " + "; ".join(drift.failures)
    return message + (f". {advice}" if advice else "")


def say(reporter, text: str) -> None:
    """Progress lines go to the reporter when one is given (the host build), else to stderr."""
    if reporter is not None:
        reporter.say(text)
    else:
        import sys

        print(text, file=sys.stderr, flush=True)


def _number(value, spec: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):  # "inf" / "nan" in JSON form
        return value
    return format(value, spec)


def _percent(value):
    return None if value is None else 100.0 * value if value <= 1.0 else value


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)

