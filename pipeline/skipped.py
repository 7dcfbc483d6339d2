"""The images a build left out (unreadable, truncated, label out of range, unknown class folder, missing
from val.txt, ...), counted by reason for the manifest and the report, not only warned about.

Two sources: the dataset scan, redone on every run (cheap: it lists files), and decoding, which happens
only when a stage that reads images is built. Decoding skips are therefore kept in the stage.json of the
stage that decoded them; its key covers the image list, so they stay true while the stage stays cached.
"""

from __future__ import annotations

from collections import Counter

# The image sets of BuildContext, and the Stage flag saying a stage reads each.
_USES = (("evaluation", "uses_evaluation_images"), ("calibration", "uses_calibration_images"),
         ("batch-norm", "uses_weights"))


def entries(skipped, images: str) -> list[dict]:
    """calibration.datasets.Skipped tuples as JSON rows."""
    return [{"path": str(item.path), "kind": item.kind, "reason": item.reason, "images": images} for item in skipped]


def decoded_by(ctx, stage) -> list[dict]:
    """The decoding skips among the image sets this stage reads, as far as they were decoded in this run."""
    rows = []
    for images, flag in _USES:
        if getattr(stage, flag, False) and images in ctx.decode_skipped:
            rows += entries(ctx.decode_skipped[images], images)
    return rows


def summary(ctx, records: dict) -> dict:
    """{"count", "by_reason": {kind: n}, "files": [rows]} for the manifest: the scan's plus every stage's."""
    rows, seen = [], set()
    for row in entries(ctx.scan_skipped, "dataset scan") + [
            row for record in records.values() for row in record.data.get("skipped_images", [])]:
        if (row["path"], row["reason"]) not in seen:
            seen.add((row["path"], row["reason"]))
            rows.append(row)
    return {"count": len(rows), "by_reason": dict(Counter(row["kind"] for row in rows).most_common()), "files": rows}
