"""Start or join Ray, create one actor per GPU (or CPU slot), hand out shards.

Actors pull work from the driver: whenever one is free it gets the largest
shard left. An actor that dies mid-shard is replaced and its shard goes back
on the queue; since a shard's file name is fixed by the plan and files are
renamed into place, a retried shard can never be written twice.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runner.config import ClusterConfig, ConfigError
from runner.worker import ShardGenerator, ShardTask, WorkerSetup

log = logging.getLogger(__name__)
MAX_SHARD_ATTEMPTS = 3


def connect(cluster: ClusterConfig) -> bool:
    """Join the cluster at `cluster.address`, or start a local Ray bound to 127.0.0.1.

    Returns:
        True when this call started Ray (and so should shut it down).
    """
    import ray

    if ray.is_initialized():
        return False
    common = {
        "logging_level": logging.WARNING,
        "log_to_driver": True,
        "runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    }
    if cluster.address:
        ray.init(address=cluster.address, **common)
    else:
        ray.init(
            address="local", _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", include_dashboard=False, **common
        )
    return True


@dataclass
class WorkerPlan:
    count: int
    options: dict[str, Any]
    threads: int | None


def plan_workers(cluster: ClusterConfig, num_shards: int) -> WorkerPlan:
    """How many actors, with which resources: one per GPU, or CPU slots when there is no GPU."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        count = min(cluster.num_workers or gpus, gpus)
        options = {"num_gpus": 1, "num_cpus": 1}
        threads = None
    else:
        cpus = int(resources.get("CPU", 1))
        if cluster.cpus_per_worker > cpus:
            raise ConfigError(
                [f"cluster.cpus_per_worker={cluster.cpus_per_worker}: the cluster has only {cpus} CPUs; lower it"]
            )
        count = cluster.num_workers or max(1, cpus // cluster.cpus_per_worker)
        options = {"num_cpus": cluster.cpus_per_worker}
        threads = cluster.cpus_per_worker
    return WorkerPlan(max(1, min(count, num_shards)), options, threads)


class ShardScheduler:
    """Runs shard tasks on a pool of actors; calls `on_event` with each progress event."""

    def __init__(self, setup: WorkerSetup, workers: WorkerPlan, on_event: Callable[[dict[str, Any]], None]):
        import ray

        self._ray = ray
        self.setup = setup
        self.workers = workers
        self.on_event = on_event
        self.actor_class = ray.remote(ShardGenerator)
        self.next_index = 0

    def _start_actor(self) -> Any:
        index = self.next_index
        self.next_index += 1
        return self.actor_class.options(**self.workers.options, max_restarts=0).remote(
            self.setup, index, self.workers.threads
        )

    def run(self, tasks: list[ShardTask]) -> None:
        """Run every task to completion (tasks come in the order they should start)."""
        ray = self._ray
        pending = deque(tasks)
        attempts = {t.shard_id: 0 for t in tasks}
        idle = [self._start_actor() for _ in range(self.workers.count)]
        running: dict[Any, tuple[Any, ShardTask]] = {}
        failures: list[str] = []
        while pending or running:
            while idle and pending:
                actor, task = idle.pop(), pending.popleft()
                attempts[task.shard_id] += 1
                running[actor.run_shard.options(num_returns="streaming").remote(task)] = (actor, task)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for stream in ready:
                actor, task = running[stream]
                try:
                    self.on_event(ray.get(next(stream)))
                except StopIteration:
                    del running[stream]
                    idle.append(actor)
                except ray.exceptions.RayActorError as e:
                    del running[stream]
                    if "creation task" in str(e):  # the model failed to load: retrying will not help
                        raise RuntimeError(f"a worker could not start:\n{e}") from e
                    failures.append(f"shard {task.shard_id}: {_short(e)}")
                    if attempts[task.shard_id] >= MAX_SHARD_ATTEMPTS:
                        raise RuntimeError(
                            f"shard {task.shard_id} failed {MAX_SHARD_ATTEMPTS} times; last "
                            f"errors:\n" + "\n".join(failures[-MAX_SHARD_ATTEMPTS:])
                        ) from e
                    log.warning("worker died on shard %s (%s); retrying it on a new worker", task.shard_id, _short(e))
                    self.on_event({"event": "retry", "shard_id": task.shard_id, "error": _short(e)})
                    pending.appendleft(task)
                    idle.append(self._start_actor())
        for actor in idle:
            ray.kill(actor)


def _short(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(e).__name__
