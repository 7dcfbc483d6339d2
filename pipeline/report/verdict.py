"""The report's headline: is the INT8 build ready to ship, and which artifact to run on this machine.

`verdict(manifest)` follows the build manifest alone: the drift result ("passed", "failures") and
the budget of each deployed INT8 stage (openvino_int8 on the CPU target; quantize / quantize_fp16 on
the GPU targets), each budget shown beside its figure. `recommendation(rows)` picks the fastest
artifact within its budget among the stage rows that were timed here (`pipeline.report.latency`).
"""

from __future__ import annotations

from pipeline.formats import abs_diff, cosine, pct, percent, points, sqnr

# budget key -> (figure name, how the figure is read off a drift dict, formatter, comparison)
_BUDGETS = {
    "min_agreement": ("top-1 agreement", lambda d: d.get("agreement"), pct, "≥"),
    "max_top1_drop": ("top-1 drop", lambda d: _drop(d), points, "≤"),
    "min_cosine": ("mean cosine", lambda d: d.get("cosine"), cosine, "≥"),
    "max_abs_rel": ("relative max abs diff", lambda d: d.get("max_abs_rel"), abs_diff, "≤"),
    "min_sqnr_db": ("SQNR", lambda d: d.get("sqnr_db"), sqnr, "≥"),
    "min_centred_cosine": ("centred cosine", lambda d: d.get("centred_cosine"), cosine, "≥"),
    "min_centred_sqnr_db": ("centred SQNR", lambda d: d.get("centred_sqnr_db"), sqnr, "≥"),
}
GPU_INT8_STAGES = ("quantize", "quantize_fp16")


def _drop(drift: dict):
    if drift.get("top1") is None or drift.get("ref_top1") is None:
        return None
    return drift["ref_top1"] - drift["top1"]


def _number(value) -> float:
    if value == "inf":
        return float("inf")
    return float("nan") if value is None or isinstance(value, str) else float(value)


def budget_checks(drift: dict) -> list[dict]:
    """Each budget of a drift result beside its figure: {"figure", "value", "budget", "text", "within"}.

    `within` is None when the figure is not measured (no labels for a top-1 drop)."""
    checks = []
    for key, limit in (drift.get("budget") or {}).items():
        if limit is None or key not in _BUDGETS:
            continue
        name, read, show, sign = _BUDGETS[key]
        value = read(drift)
        if value is None and key == "max_top1_drop":
            checks.append({"figure": name, "value": None, "budget": limit, "within": None, "shown": "not measured (no labels)",
                           "limit": f"{sign} {show(limit)}",
                           "text": f"{name} not measured (no labels) (budget {sign} {show(limit)})"})
            continue
        number = _number(value)
        within = number >= limit if sign == "≥" else number <= limit  # NaN is never within
        checks.append({"figure": name, "value": value, "budget": limit, "within": within, "shown": show(value),
                       "limit": f"{sign} {show(limit)}", "text": f"{name} {show(value)} ({'within' if within else 'past'} budget {sign} {show(limit)})"})
    return checks


def deployed_int8_stages(manifest: dict) -> list[str]:
    """The INT8 stages whose verdict decides shipping: openvino_int8 on the CPU target, else quantize /
    quantize_fp16 (the GPU targets' Q/DQ ONNX the device builds its engine from)."""
    stages = manifest.get("stages") or {}
    if "openvino_int8" in stages:
        return ["openvino_int8"]
    return [name for name in GPU_INT8_STAGES if name in stages]


def verdict(manifest: dict, random_weights: bool = False) -> dict:
    """{"ready": True / False / None (INT8 not built), "text", "stages": {stage: {"passed", "images", "checks"}}}."""
    names = deployed_int8_stages(manifest)
    precision = str(manifest.get("precision") or "?")
    if not names:
        return {"ready": None, "stages": {},
                "text": f"INT8 ready to ship: not built (a {precision.upper()} build: no INT8 stage)"}
    reasons, stages = [], {}
    for name in names:
        drift = (manifest["stages"][name] or {}).get("drift")
        if drift is None:
            reasons.append(f"{name} was not checked (build status: {manifest.get('status')})")
            stages[name] = {"passed": None, "images": None, "checks": []}
            continue
        checks = budget_checks(drift)
        stages[name] = {"passed": bool(drift.get("passed")), "images": drift.get("images"), "checks": checks}
        if not drift.get("passed"):
            past = [check["text"] for check in checks if check["within"] is False]
            reasons.append(f"{name} is over its drift budget: " + "; ".join(past or drift.get("failures") or ["failed"]))
    if manifest.get("status") not in (None, "ok"):
        reasons.append(f"the build did not finish ({manifest.get('status')})")
    if random_weights:
        reasons.append("the weights are random (never trained)")
    ready = not reasons
    text = "INT8 ready to ship: yes" if ready else "INT8 ready to ship: no, because " + "; ".join(reasons)
    return {"ready": ready, "text": text, "stages": stages}


def recommendation(rows: list[dict]) -> dict:
    """The fastest timed artifact within its drift budget: {"stage", "latency_ms", "accuracy", "text"}
    or {"stage": None, "text"} when nothing was timed or nothing timed is within budget."""
    timed = [row for row in rows if row.get("latency") and row.get("drift") is not None]
    if not timed:
        return {"stage": None, "text": "No recommendation: no artifact was timed on this machine (no latency "
                                       "figures: --latency-seconds 0, or the artifacts run on the device)"}
    within = [row for row in timed if row["drift"].get("passed")]
    if not within:
        return {"stage": None, "text": "No recommendation: no timed artifact is within its drift budget"}
    best = min(within, key=lambda row: row["latency"]["median_ms"])
    drift = best["drift"]
    if drift.get("top1") is not None:
        accuracy = f"top-1 {percent(drift['top1'])} (FP32 {percent(drift.get('ref_top1'))})"
    else:
        accuracy = f"top-1 agreement with FP32 {pct(drift.get('agreement'))}"
    accuracy += f" on {drift.get('images')} images"
    text = (f"Recommended on this machine: {best['stage']} ({best.get('artifact')}), the fastest artifact within its "
            f"budget: {best['latency']['median_ms']:.2f} ms p50 at batch 1, {accuracy}")
    return {"stage": best["stage"], "artifact": best.get("artifact"), "latency_ms": best["latency"]["median_ms"],
            "accuracy": accuracy, "text": text}


def headline_blocks(report: dict) -> list[tuple]:
    """The top of the report: the verdict, each budget beside its figure, the recommendation."""
    decision = report["verdict"]
    blocks: list[tuple] = [("warning" if decision["ready"] is False else "text", decision["text"] + ".")]
    rows = [[stage, str(info["images"] or "—"), check["figure"], check["shown"], check["limit"],
             {True: "within", False: "PAST BUDGET", None: "not measured"}[check["within"]]]
            for stage, info in decision["stages"].items() for check in info["checks"]]
    if rows:
        blocks.append(("table", ["deployed INT8 stage", "images", "figure", "value", "budget", "verdict"], rows))
    blocks.append(("text", report["recommendation"]["text"] + "."))
    return blocks
