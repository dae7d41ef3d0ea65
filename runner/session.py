"""What one process keeps between the jobs it runs: Ray, a pool of loaded workers, tokenized input.

A Hydra sweep (`-m`) runs the job once per point in the same process. With one
session for the whole sweep, the model is loaded once per worker, and the data
is read and tokenized once, when only generation settings change between points.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from runner.config import JobConfig


@dataclass
class TokenizedInput:
    prompts: Any  # runner.data.Prompts
    texts: list[str]
    input_ids: list[list[int]]


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


class Session:
    def __init__(self) -> None:
        self.started_ray = False
        self.pool: Any = None  # runner.scheduler.WorkerPool
        self._pool_key: str | None = None
        self._input_key: str | None = None
        self._input: TokenizedInput | None = None
        self.pools_started = 0

    def cached_input(self, job: JobConfig) -> TokenizedInput | None:
        return self._input if self._input_key == self._input_key_for(job) else None

    def keep_input(self, job: JobConfig, tokenized: TokenizedInput) -> None:
        # Only the latest input is kept: a sweep over datasets should not hold them all in memory.
        self._input_key, self._input = self._input_key_for(job), tokenized

    @staticmethod
    def _input_key_for(job: JobConfig) -> str:
        return _key(asdict(job.dataset), asdict(job.model))

    def workers(self, job: JobConfig, setup: Any, num_tasks: int) -> Any:
        """A pool of workers holding this job's model: the previous job's when it is the same model."""
        from runner import scheduler

        if not self.started_ray:
            self.started_ray = scheduler.connect(job.cluster)
        key = _key(asdict(job.model), setup.model_path, asdict(job.cluster))
        if self.pool is not None and self._pool_key != key:
            self.pool.close()
            self.pool = None
        if self.pool is None:
            plan = scheduler.plan_workers(job.cluster, num_tasks)
            self.pool, self._pool_key = scheduler.WorkerPool(setup, plan), key
            self.pools_started += 1
        return self.pool

    def close(self) -> None:
        import ray

        # At interpreter exit Ray's own exit hook may have shut it down already; any Ray call
        # would then start (or join) a cluster again, so only a live Ray is touched.
        if self.pool is not None and ray.is_initialized():
            self.pool.close()
        self.pool = None
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
        self.started_ray = False
