"""Inference speed of a build's artifacts, and the `benchmark` command that records it.

- `latency`: p50 / p90 / p99 latency of every artifact side by side (`latency_table`, `latency_for_build`);
- `throughput`: images per second at each back end's best batch / streams (`throughput_for_build`);
- `frame_path`: the camera runtime's decode + preprocess + infer per frame (`measure_frame_path`);
- `benchmark_app`: OpenVINO's own benchmark tool, run and parsed as a reference for our loops;
- `machine`: what the figures were measured on (CPU, cores, load average);
- `artifacts`: which artifacts of a build are measured, and where the build keeps them;
- `benchmark`: the `benchmark` command (build times, the modes above, benchmark.json); `nncf`: its NNCF comparison.

Runners and the timing loop come from `targets` (`targets.timing.measure_latency`); nothing here
compiles a model or opens a session itself. Speed is measured and reported, never asserted by tests.
"""
