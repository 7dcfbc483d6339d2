"""Timing one runner: warm-up calls, then timed calls (a fixed count, or for a number of seconds),
p50 (median) / p90 / p99 / mean latency and images per second.

The device (`verify`, `device-build`) and the host's benchmarks time runners through this module, so
it needs nothing but numpy. Speed is measured and reported, never asserted by tests.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class LatencyResult:
    name: str
    median_ms: float
    p90_ms: float | None  # None where the tool does not report it (benchmark_app)
    p99_ms: float | None
    mean_ms: float
    throughput_ips: float  # images per second: batch x 1000 / mean latency (sequential calls)
    batch: int
    iterations: int

    @classmethod
    def from_times(cls, name: str, times_ms: Sequence[float], batch: int) -> "LatencyResult":
        median, p90, p99 = percentiles(times_ms, (50, 90, 99))
        mean = float(np.mean(np.asarray(times_ms, dtype=np.float64)))
        return cls(name, median, p90, p99, mean, batch * 1000.0 / mean, batch, len(times_ms))

    @property
    def p50_ms(self) -> float:
        """The 50th percentile: the median, under the name the p90/p99 columns use."""
        return self.median_ms

    def as_dict(self) -> dict:
        return {**self.__dict__, "p50_ms": self.p50_ms}


def percentiles(times_ms: Sequence[float], quantiles: Sequence[float] = (50, 90, 99)) -> tuple[float, ...]:
    """Percentiles of timings, linearly interpolated between the closest ranks (numpy's default):
    with n sorted times t[0..n-1], percentile q lies at rank q/100 x (n - 1)."""
    times = np.asarray(times_ms, dtype=np.float64)
    if times.size == 0:
        raise ValueError("no timed iterations")
    if any(not 0 <= q <= 100 for q in quantiles):
        raise ValueError(f"percentiles must lie in 0..100, got {tuple(quantiles)}")
    return tuple(float(v) for v in np.percentile(times, list(quantiles)))


def measure_latency(
    target: Any,
    input_shape: Sequence[int],
    warmup: int = 5,
    iterations: int | None = None,
    seconds: float = 10.0,
    min_iterations: int = 10,
    name: str | None = None,
    seed: int = 0,
) -> LatencyResult:
    """Time `target` on one fixed random input of `input_shape` (N, C, H, W), N being the batch.

    `target` is a runner (`targets.runner.Runner`) or a zero-argument factory that returns one.
    A runner with a `bind(x) -> step` method (the lean OpenVINO loop) is timed through `step()`;
    any other through `run({input_name: x})`. `iterations` given: exactly that many timed calls;
    otherwise calls until `seconds` have passed and at least `min_iterations` were made.
    """
    if warmup < 0:
        raise ValueError(f"warmup must not be negative, got {warmup}")
    if iterations is not None and iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (N, C, H, W), got {tuple(input_shape)}")
    # A runner object has `run`; a factory (a function, or a runner class) is called once.
    runner = target if hasattr(target, "run") and not isinstance(target, type) else target()
    x = np.random.default_rng(seed).standard_normal(tuple(input_shape)).astype(np.float32)
    step = _step(runner, x)
    for _ in range(warmup):
        step()
    times = _timed(step, seconds, iterations, min_iterations)
    return LatencyResult.from_times(name or getattr(runner, "name", "runner"), times, int(input_shape[0]))


def measure_interleaved(targets: dict[str, Any], input_shape: Sequence[int], seconds: float = 10.0, rounds: int = 8,
                        warmup: int = 5, seed: int = 0) -> dict[str, LatencyResult]:
    """Time several runners (name -> runner or factory) for `seconds` each, in `rounds` alternating slices
    of seconds / rounds, so that a load that comes and goes on the machine falls on all of them alike:
    the way to compare two artifacts, where one after the other would compare two moments."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    x = np.random.default_rng(seed).standard_normal(tuple(input_shape)).astype(np.float32)
    steps = {}
    for name, target in targets.items():
        runner = target if hasattr(target, "run") and not isinstance(target, type) else target()
        steps[name] = _step(runner, x)
        for _ in range(warmup):
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(rounds):
        order = list(steps) if round_ % 2 == 0 else list(reversed(steps))  # neither always goes first
        for name in order:
            times[name] += _timed(steps[name], seconds / rounds, None, 1)
    return {name: LatencyResult.from_times(name, values, int(input_shape[0])) for name, values in times.items()}


def _step(runner, x: np.ndarray):
    """One call of `runner` on `x`: the lean OpenVINO loop where the runner has one (`bind`)."""
    if hasattr(runner, "bind"):
        return runner.bind(x)
    feed = {runner.input_name: x}
    run = runner.run

    def step():
        return run(feed)

    return step


def _timed(step, seconds: float, iterations: int | None, min_iterations: int) -> list[float]:
    """Milliseconds of each timed call: `iterations` calls, or calls until `seconds` and `min_iterations`."""
    times: list[float] = []
    clock = time.perf_counter
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call is noise, not the model's latency
    try:
        started = clock()
        while True:
            t0 = clock()
            step()
            t1 = clock()
            times.append((t1 - t0) * 1000.0)
            if iterations is not None:
                if len(times) >= iterations:
                    break
            elif len(times) >= min_iterations and t1 - started >= seconds:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return times
