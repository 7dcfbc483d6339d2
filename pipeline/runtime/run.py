"""`python -m pipeline run --artifact DIR --source SOURCE`: classify every frame of a source, live.

stderr shows rolling FPS and latency (preprocessing + inference per frame) and the top class;
`--json` writes one JSON line per frame on stdout: {"frame", "source", "latency_ms", "top_k": [...]}.
Ctrl-C (or SIGTERM) stops the stream: the summary of the frames classified so far is still printed,
and the exit status is 130 (143).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import deque

import numpy as np

from pipeline.errors import PipelineError
from pipeline.runtime.classifier import Classifier
from pipeline.runtime.sources import open_source

WINDOW = 30  # frames in the rolling FPS / latency


def command(args) -> int:
    if args.top_k < 1:
        raise PipelineError(f"--top-k must be at least 1, got {args.top_k}")
    if args.max_frames < 0:
        raise PipelineError(f"--max-frames must be 0 (no limit) or more, got {args.max_frames}")
    with Classifier.open(args.artifact, backend=args.backend, device=args.device) as classifier:
        frames = open_source(args.source)
        status = _Status(sys.stderr)
        status.say(f"{classifier.bundle.model} {classifier.precision} on {classifier.backend_name} "
                   f"({classifier.reason}); source {args.source}")
        latencies: deque[float] = deque(maxlen=WINDOW)
        stamps: deque[float] = deque(maxlen=WINDOW + 1)
        all_latencies = []
        count = 0
        interrupted = None  # the signal number that stopped the stream
        started = time.perf_counter()
        try:
            for index, (name, frame) in enumerate(frames):
                if args.max_frames and index >= args.max_frames:
                    break
                begin = time.perf_counter()
                predictions = classifier.classify(frame, rgb=args.rgb, top_k=args.top_k)
                end = time.perf_counter()
                latency_ms = 1000.0 * (end - begin)
                latencies.append(latency_ms)
                all_latencies.append(latency_ms)
                stamps.append(end)
                count += 1
                if args.json:
                    print(json.dumps({"frame": index, "source": name, "latency_ms": round(latency_ms, 3),
                                      "top_k": [p._asdict() for p in predictions]}), flush=True)
                best = predictions[0]
                status.update(f"frame {index:>6}  {_rolling_fps(stamps)} FPS  latency {np.median(latencies):7.2f} ms  "
                              f"{best.name} ({best.probability:.1%})")
        except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM raised as one by the command line
            interrupted = getattr(error, "signum", signal.SIGINT)
        if count == 0:
            if interrupted:
                status.done("interrupted before the first frame")
                return 128 + interrupted
            raise PipelineError(f"--source {args.source}: no frames could be read")
        seconds = time.perf_counter() - started
        p50, p90, p99 = np.percentile(all_latencies, [50, 90, 99])
        status.done(f"{count} frames in {seconds:.2f} s ({count / seconds:.1f} FPS); latency per frame "
                    f"p50 {p50:.2f} ms, p90 {p90:.2f} ms, p99 {p99:.2f} ms" + ("; interrupted" if interrupted else ""))
    return 128 + interrupted if interrupted else 0


def _rolling_fps(stamps) -> str:
    """FPS over the window, once two frames have been timed ("—" before: nothing is measured yet)."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return f"{'—':>6}"
    return f"{(len(stamps) - 1) / (stamps[-1] - stamps[0]):6.1f}"


class _Status:
    """One rewritten line on a terminal; a line per second otherwise (logs, pipes)."""

    def __init__(self, stream):
        self.stream = stream
        self.live = stream.isatty()
        self.last = 0.0

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def update(self, text: str) -> None:
        now = time.perf_counter()
        if self.live:
            print(f"\r{text}\x1b[K", end="", file=self.stream, flush=True)
        elif now - self.last >= 1.0:
            self.last = now
            self.say(text)

    def done(self, text: str) -> None:
        if self.live:
            print(file=self.stream)
        self.say(text)
