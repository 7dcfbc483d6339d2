"""Model-matrix builds on Ray: independent model/target builds as Ray tasks over one shared build folder.

Each task takes the build-folder lock of its `<build_dir>/<model>/<target>` (`pipeline.lock`), so two tasks
(or a task and a user's build) never build the same folder; a task that finds it held waits, or with
`--no-wait` fails naming the holder. Inside a task the build's evaluations run in the task's own process:
a task that sharded them again would hold its CPU while waiting for its shards.
"""

from __future__ import annotations

from dataclasses import replace

import ray

from pipeline.errors import PipelineError
from pipeline.executor.ray_cluster import TASK_RETRIES, connect


def _build_one(config, model: str, force: bool, wait: bool) -> dict:
    """One build, as `python -m pipeline build` runs it, in a Ray worker."""
    from pipeline.build import Builder
    from pipeline.layout import build_root
    from pipeline.lock import folder_lock
    from pipeline.progress import Reporter

    reporter = Reporter()
    with folder_lock(build_root(config.build_dir, model, config.target), wait=wait, say=reporter.say):
        return Builder(config, model, reporter, force=force).run()


# A killed worker's build is retried: its finished stages are cached, so the retry resumes where it stopped.
_remote_build = ray.remote(max_retries=TASK_RETRIES)(_build_one)


def build_matrix(config, jobs: list[tuple[str, str]], force: bool = False, wait: bool = True) -> dict:
    """Build every (model, target) of `jobs` as a Ray task; {(model, target): manifest}, in the order of `jobs`.
    The first failure is raised (as the build's own error, naming the model and target) after every task ends."""
    connect(config.executor.address)
    local = replace(config, executor=replace(config.executor, kind="local"))
    refs = [_remote_build.options(num_cpus=config.executor.worker_cpus).remote(
        replace(local, target=target), model, force, wait) for model, target in jobs]
    results, failure = {}, None
    for job, ref in zip(jobs, refs):
        try:
            results[job] = ray.get(ref)
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            if not isinstance(cause, PipelineError):
                raise
            failure = failure or type(cause)(f"{job[0]} → {job[1]}: {cause}")
    if failure is not None:
        raise failure
    return results
