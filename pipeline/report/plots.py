"""The report's figures, drawn with matplotlib's Agg backend and returned as PNG bytes.

Each function takes plain data (lists of numbers and names, as `pipeline.report.sections` passes them) and
returns the encoded PNG, so the same bytes go into the markdown folder and inline into the HTML page.
"""

from __future__ import annotations

import io
import math

SENSITIVITY_LAYERS = 40  # the worst layers shown: a full ranking of Inception-v4 has 149 Convs


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")  # no display: this runs in builds and CI
    from matplotlib.figure import Figure

    # A Figure without pyplot: no global state, nothing to close, safe in a long-lived process.
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _finite(value, fallback: float) -> float:
    """Metrics come from JSON: "inf"/"nan" strings or None become a plottable number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return fallback
    return number if math.isfinite(number) else fallback


def sensitivity_plot(ranking: list[dict], kept_in_float: list[str]) -> bytes:
    """Per-layer SQNR (worst first) as horizontal bars; the layers the gate kept in float in red."""
    shown = ranking[:SENSITIVITY_LAYERS]
    kept = set(kept_in_float)
    finite = [_finite(layer.get("local_sqnr_db"), math.nan) for layer in shown]
    ceiling = max([v for v in finite if not math.isnan(v)], default=60.0) + 5.0
    values = [ceiling if math.isnan(v) else v for v in finite]
    figure = _figure(9, 1.5 + 0.22 * max(len(shown), 1))
    axes = figure.add_subplot()
    colours = ["#c0392b" if layer["node"] in kept else "#2e86c1" for layer in shown]
    positions = list(range(len(shown)))
    axes.barh(positions, values, color=colours)
    axes.set_yticks(positions, [layer["node"] for layer in shown], fontsize=7)
    axes.invert_yaxis()  # worst layer on top
    axes.set_xlabel("SQNR of the layer alone quantized, dB (lower = more sensitive)")
    title = f"Per-layer sensitivity: the {len(shown)} worst of {len(ranking)} quantized convolutions"
    axes.set_title(title, fontsize=10)
    from matplotlib.patches import Patch

    axes.legend(handles=[Patch(color="#c0392b", label=f"kept in float ({len(kept)})"),
                         Patch(color="#2e86c1", label="INT8")], loc="lower right", fontsize=8)
    axes.grid(axis="x", alpha=0.3)
    return _png(figure)


def stages_plot(stages: list[str], top1: list[float | None], agreement: list[float], sqnr_db: list,
                title: str = "Accuracy per stage") -> bytes:
    """Top-1, agreement with FP32 and SQNR per stage, side by side (stages judged on the same images only)."""
    return _accuracy_and_sqnr(stages, top1, agreement, sqnr_db, title, zoom=False)


def calibration_plot(methods: list[str], top1: list[float | None], agreement: list[float], sqnr_db: list) -> bytes:
    """The calibration methods compared: accuracy and agreement on the left, SQNR on the right."""
    return _accuracy_and_sqnr(methods, top1, agreement, sqnr_db, "INT8 accuracy by calibration method", zoom=True)


def _accuracy_and_sqnr(names: list[str], top1: list[float | None], agreement: list[float], sqnr_db: list,
                       title: str, zoom: bool) -> bytes:
    """Bars of top-1 (when labelled) and agreement with FP32 on the left, logit SQNR on the right.

    `zoom` starts the accuracy axis 10 points below the lowest bar (methods differ by fractions of a point)."""
    figure = _figure(10, 3.6)
    left, right = figure.subplots(1, 2)
    positions = list(range(len(names)))
    width = 0.4
    has_top1 = any(value is not None for value in top1)
    if has_top1:
        left.bar([p - width / 2 for p in positions], [v or 0.0 for v in top1], width, label="top-1 vs labels (%)",
                 color="#2e86c1")
    left.bar([p + width / 2 if has_top1 else p for p in positions], [100.0 * a for a in agreement], width,
             label="top-1 agreement with FP32 (%)", color="#28b463")
    low = min([v for v in top1 if v is not None] + [100.0 * a for a in agreement], default=0.0)
    left.set_ylim(max(0.0, low - 10.0) if zoom else 0.0, 100.5 if zoom else 105.0)
    left.set_xticks(positions, names, rotation=30, ha="right", fontsize=8)
    left.legend(fontsize=8, loc="lower left")
    left.set_title(title, fontsize=10)
    sqnr = [_finite(value, math.nan) for value in sqnr_db]
    top = max([v for v in sqnr if not math.isnan(v)], default=60.0) + 10.0
    right.bar(positions, [top if math.isnan(v) else v for v in sqnr], color="#8e44ad")
    for position, value in zip(positions, sqnr):
        if math.isnan(value):
            right.text(position, top, "∞", ha="center", va="bottom", fontsize=9)
    right.set_xticks(positions, names, rotation=30, ha="right", fontsize=8)
    right.set_ylabel("dB")
    right.set_title("SQNR of the logits against FP32 (∞: identical)", fontsize=10)
    return _png(figure)
