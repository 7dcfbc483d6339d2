"""Where a build's evaluations run: in the build's own process (`local`, the default) or sharded over a Ray
cluster (`ray`, `pipeline.yaml`'s `executor`, `--executor`, `--ray-address`).

Both executors take the same requests and give the same results:

- `predict(spec, images, count, what)`: the logits of the first `count` images of `images` that decode, in
  image order, with their labels and records (`Predictions`); `spec` says how to open the artifact
  (`pipeline.executor.work.RunnerSpec`), so a worker opens it itself through `targets/`.
- `calibrate(onnx, tensors, images, method, ...)`: the calibration table, from statistics gathered per shard
  and merged (maxima take the max; histograms over the merged maxima add), equal to the local table.

`local` never imports Ray. The choice of executor is made here once (`executor_for`); what a worker does is
in `work.py`, the requests and how shard results join in `requests.py`, the two executors in `local.py` and
`ray_cluster.py`, model-matrix builds on Ray in `matrix.py`, the throughput benchmark in `benchmark.py`.
"""

from __future__ import annotations

KINDS = ("local", "ray")


def executor_for(options, batch_size: int, reporter):
    """The executor `options` (`pipeline.config.ExecutorOptions`) asks for; Ray is imported only for `ray`."""
    if options.kind == "ray":
        from pipeline.executor.ray_cluster import RayExecutor

        return RayExecutor(options, batch_size, reporter)
    from pipeline.executor.local import LocalExecutor

    return LocalExecutor(batch_size, reporter)
