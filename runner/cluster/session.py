"""What one process keeps between the jobs it runs: Ray, a pool of loaded workers, prepared input.

A Hydra sweep (`-m`) runs the job once per point in the same process. With one
session for the whole sweep, the model is loaded once per worker, and an input
that fits one sort window is read and tokenized once (its prepared chunks stay in
the object store) when only generation settings change between points.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any

from runner.cluster.connect import connect, restore_auth
from runner.cluster.pool import WorkerPool, plan_workers
from runner.cluster.preparers import unheld
from runner.config import JobConfig
from runner.tasks import WorkerSetup


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


class Session:
    def __init__(self) -> None:
        self.started_ray = False
        self.pool: WorkerPool | None = None
        self._pool_key: str | None = None
        self._input_key: str | None = None
        self._input: list[Any] | None = None  # [(ChunkMeta, object ref of the prepared rows)]
        self.pools_started = 0
        self.inputs_prepared = 0

    def connect(self, cluster: Any) -> None:
        """Start (or join) Ray once for every job of this process."""
        if not self.started_ray:
            self.started_ray = connect(cluster)

    def cached_chunks(self, job: JobConfig) -> list[Any] | None:
        """The prepared chunks of this job's input, when an earlier job of this process prepared it."""
        if self._input_key == self._input_key_for(job):
            return self._input
        self.inputs_prepared += 1
        return None

    def keep_chunks(self, job: JobConfig, chunks: list[Any]) -> None:
        # Only the latest input is kept: a sweep over datasets should not hold them all. Its preparers stop with
        # the job, so the next job's workers fetch the chunks whole.
        self._input_key, self._input = self._input_key_for(job), unheld(chunks)

    @staticmethod
    def _input_key_for(job: JobConfig) -> str:
        # What preparing a row depends on: the input, the model (tokenizer, template) and the room left in the
        # context for generation (too-long prompts are refused or cut against it).
        # The chunks are cut to the sort window, so a sweep over it prepares again.
        model = {k: v for k, v in asdict(job.model).items() if k not in ("adapter", "adapters")}  # nor on the weights
        model["adapter_names"] = sorted(job.model.adapters)  # rows are checked against the names
        g = job.generation  # and what rows' own settings are held to, and which columns are the runner's
        held = (g.max_new_tokens, g.num_return_sequences, g.do_sample, g.logprobs, g.prompt_logprobs)
        return _key(asdict(job.dataset), model, held, job.batching.sort_window)

    def warm_workers(self, job: JobConfig, model_path: str, model_revision: str, adapter: str | None = None) -> None:
        """Start one of this job's workers now, while its first window is prepared: it imports the model code
        (seconds) but loads no model until `workers` hands it the job (bad input loads none). One only: how
        many the job needs is known once its first window is planned (and an autoscaler is not asked early)."""
        self.connect(job.cluster)
        key = _key(asdict(job.model), model_path, model_revision, adapter, asdict(job.cluster))
        if self.pool is not None and self._pool_key == key:
            return
        self._close_pool()
        plan = plan_workers(job.cluster)
        self.pool, self._pool_key = WorkerPool(None, replace(plan, count=1)), key

    def workers(self, job: JobConfig, setup: WorkerSetup, num_tasks: int | None) -> WorkerPool:
        """A pool of workers holding this job's model: the previous job's when it is the same model."""
        self.connect(job.cluster)
        # the adapter by what it holds: retrained weights in the same folder get new workers
        key = _key(asdict(job.model), setup.model_path, setup.model_revision, setup.adapter_key, asdict(job.cluster))
        if self.pool is not None and self._pool_key != key:
            self._close_pool()
        if self.pool is None:
            self.pool, self._pool_key = WorkerPool(setup, plan_workers(job.cluster, num_tasks)), key
            self.pools_started += 1
        elif not self.pool.begun:
            self.pool.begin(setup, plan_workers(job.cluster, num_tasks))
            self.pools_started += 1
        return self.pool

    def _close_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.pool = self._pool_key = None

    def drop_workers(self) -> None:
        """Kill the pool's workers (a job failed mid-run): nothing it was running goes on into the next job."""
        import ray

        if self.pool is not None and ray.is_initialized():
            self.pool.close()
        self.pool = self._pool_key = None

    def close(self) -> None:
        import ray

        # At interpreter exit Ray's own exit hook may have shut it down already; any Ray call
        # would then start (or join) a cluster again, so only a live Ray is touched.
        if self.pool is not None and ray.is_initialized():
            self.pool.close()
        self.pool = None
        self._input = self._input_key = None
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
        if self.started_ray:
            restore_auth()
        self.started_ray = False
