"""What a build prints: a line per stage, progress bars for long work, the drift table at the end.

With --json nothing but the final JSON goes to stdout; lines and bars go to stderr.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.formats import abs_diff, cosine, pct, percent_change, sqnr


class Reporter:
    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True, highlight=False)
        if not self.console.is_terminal:
            self.console.width = max(self.console.width, 160)  # logs: no wrapping mid-line
        self.quiet = quiet

    def say(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    def warn(self, text: str) -> None:
        self.console.print(f"[yellow]warning:[/] {text}", markup=True, soft_wrap=True)

    def stage_cached(self, stage) -> None:
        self.say(f"[green]✓[/] {stage.name:<14} cached")

    @contextmanager
    def stage_running(self, stage, reason: str) -> Iterator[None]:
        self.say(f"[cyan]…[/] {stage.name:<14} building ({reason}): {stage.description}")
        yield

    def stage_built(self, stage, seconds: float) -> None:
        self.say(f"[green]✓[/] {stage.name:<14} built in {seconds:.1f} s")

    @contextmanager
    def status(self, text: str) -> Iterator[None]:
        if self.quiet or not self.console.is_terminal:
            self.say(f"  {text}")
            yield
            return
        with self.console.status(text):
            yield

    def progress(self, what: str) -> Callable[[int, int], None]:
        """A callback `update(done, total)` that draws a rich progress bar for long loops."""
        state: dict = {}

        def update(done: int, total: int) -> None:
            if self.quiet or not self.console.is_terminal:  # bars only where someone watches them
                return
            if "bar" not in state:
                bar = Progress(TextColumn(f"  {what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                               console=self.console, transient=True)
                bar.start()
                state["bar"], state["task"] = bar, bar.add_task(what, total=total)
            state["bar"].update(state["task"], completed=done, total=total)
            if done >= total:
                state.pop("bar").stop()

        return update

    def drift_line(self, result) -> None:
        mark = "[green]✓[/]" if result.passed else "[red]✗[/]"
        detail = (f"{result.images} images, agreement {pct(result.agreement)}, cosine {cosine(result.cosine)}, "
                  f"max abs diff {abs_diff(result.max_abs)}")
        if not result.passed:
            detail += " — " + "; ".join(result.failures)
        self.say(f"{mark} {result.stage:<14} drift: {detail}")

    def drift_table(self, model: str, manifest: dict) -> None:
        if self.quiet:
            return
        random = manifest["weights"]["random"]
        # Each stage is judged on its own first N evaluation images (the "images" column), not all of them.
        counts = sorted({stage["drift"]["images"] for stage in manifest["stages"].values() if stage.get("drift")})
        reference = (manifest["stages"].get("reference") or {}).get("facts", {}).get("runner", "torch fp32")
        table = Table(title=f"{model}: drift against the FP32 reference ({reference}), each stage on the first "
                      f"{' or '.join(map(str, counts)) or 'N'} held-out images" + (" (random weights)" if random else ""))
        for column in ("stage", "ran in", "images", "top-1 ref→stage", "top-5 ref→stage", "agreement", "cosine",
                       "relative max abs diff", "SQNR", "centred cos", "centred SQNR", "verdict"):
            table.add_column(column, justify="left" if column in ("stage", "verdict") else "right")
        for name, stage in manifest["stages"].items():
            drift = stage.get("drift")
            if not drift:
                continue
            table.add_row(
                name,
                stage.get("precision_ran") or "",
                str(drift["images"]),
                percent_change(drift.get("ref_top1"), drift.get("top1")),
                percent_change(drift.get("ref_top5"), drift.get("top5")),
                pct(drift["agreement"]),
                cosine(drift["cosine"]),
                abs_diff(drift["max_abs_rel"]),
                sqnr(drift.get("sqnr_db")),
                cosine(drift.get("centred_cosine")),
                sqnr(drift.get("centred_sqnr_db")),
                "pass" if drift["passed"] else "FAIL: " + "; ".join(drift["failures"]),
            )
        self.console.print(table)

