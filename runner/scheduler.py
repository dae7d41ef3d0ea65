"""Start or join Ray, create one actor per GPU (or CPU slot), hand out shards.

Actors pull work from the driver: whenever one is free it gets the largest
shard left. An actor that dies mid-shard is replaced and its shard goes back
on the queue; since a shard's file name is fixed by the plan and files are
renamed into place, a retried shard can never be written twice.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runner.config import ClusterConfig, ConfigError
from runner.raynet import keep_loopback_addresses
from runner.stream import TaskFeed
from runner.worker import ShardGenerator, ShardTask, WorkerSetup

log = logging.getLogger(__name__)
MAX_SHARD_ATTEMPTS = 3
DEFAULT_CPUS_PER_WORKER = 2  # CPU workers when cluster.cpus_per_worker is null, unless the nodes are smaller
GROW_CHECK_S = 5.0  # how often the pool looks for new nodes to put workers on


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
    with keep_loopback_addresses():
        if cluster.address:
            ray.init(address=cluster.address, **common)
        else:
            # A private cluster for this job: every server on 127.0.0.1, dashboard included.
            ray.init(address="local", _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", **common)
    return True


@dataclass
class WorkerPlan:
    count: int
    options: dict[str, Any]
    threads: int | None
    wanted: int = 0  # the slots the cluster had: more than `count` when the job has fewer shards


def plan_workers(cluster: ClusterConfig, num_shards: int | None = None) -> WorkerPlan:
    """How many actors, with which resources: one per GPU, or CPU slots when there is no GPU.

    Args:
        num_shards: the job's shard count when known: no more workers than shards are started.
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        count = cluster.num_workers or gpus
        if not cluster.address:  # a private local Ray never grows: no more workers than GPUs
            count = min(count, gpus)
        options = {"num_gpus": 1, "num_cpus": 1}
        threads = None
    else:
        cpus = int(resources.get("CPU", 1))
        per_node = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        largest = max(per_node, default=cpus)
        if cluster.cpus_per_worker and cluster.cpus_per_worker > largest:
            raise ConfigError(
                [
                    f"cluster.cpus_per_worker={cluster.cpus_per_worker}: no node of the cluster has that many CPUs "
                    f"(the largest has {largest}, {cpus} in all); lower it, or leave it null to fit the nodes"
                ]
            )
        per_worker = cluster.cpus_per_worker or max(1, min(DEFAULT_CPUS_PER_WORKER, largest))
        count = cluster.num_workers or max(1, cpus // per_worker)
        options = {"num_cpus": per_worker}
        threads = per_worker
    if num_shards is not None and num_shards < count:
        log.warning(
            "only %d shard(s) to run for %d worker slots: %d will sit idle; a smaller batching.shard_size "
            "spreads a small job over every worker",
            num_shards,
            count,
            count - num_shards,
        )
    return WorkerPlan(max(1, min(count, num_shards or count)), options, threads, count)


class WorkerPool:
    """Actors holding one model; runs the shard tasks of one job after another.

    A worker that dies (process killed, node lost) gives its shard back to the
    queue and a replacement is asked for. The replacement joins only once its
    model is loaded, so when the cluster has shrunk (a node is gone) the shard
    simply goes to a surviving worker. Between jobs (the points of a sweep) the
    actors keep their model and only take the new settings.
    """

    def __init__(self, setup: WorkerSetup, workers: WorkerPlan, start_timeout_s: float = 900.0):
        import ray

        self._ray = ray
        self.setup = setup
        self.workers = workers
        self.start_timeout_s = start_timeout_s
        self.actor_class = ray.remote(ShardGenerator)
        self.next_index = 0
        self.starting: dict[Any, Any] = {}  # ready() ref -> actor still loading its model
        self.idle: list[Any] = []
        self.running: dict[Any, tuple[Any, ShardTask]] = {}  # stream -> (actor, task)
        self.configured: dict[int, WorkerSetup] = {}  # id(actor) -> the setup it holds
        self.start_failures: list[str] = []
        for _ in range(workers.count):
            self._spawn()

    def _spawn(self) -> None:
        index = self.next_index
        self.next_index += 1
        actor = self.actor_class.options(**self.workers.options, max_restarts=0).remote(
            self.setup, index, self.workers.threads
        )
        self.configured[id(actor)] = self.setup
        self.starting[actor.ready.remote()] = actor

    def run(self, setup: WorkerSetup, feed: TaskFeed, on_event: Callable[[dict[str, Any]], None]) -> None:
        """Run every task the feed gives (in the order given) to completion; retried shards go first."""
        ray = self._ray
        self.setup = setup
        retry: deque[ShardTask] = deque()
        attempts: dict[int, int] = {}
        no_worker_since = last_grow = time.time()
        while True:
            while self.idle:
                task = retry.popleft() if retry else feed.next()
                if task is None:
                    break
                actor = self.idle.pop()
                if self.configured[id(actor)] is not setup:  # calls on one actor run in order
                    actor.configure.remote(setup)
                    self.configured[id(actor)] = setup
                attempts[task.shard_id] = attempts.get(task.shard_id, 0) + 1
                self.running[actor.run_shard.options(num_returns="streaming").remote(task)] = (actor, task)
            if not self.running and not retry and feed.exhausted:
                return
            if self.idle or self.running:
                no_worker_since = time.time()
            elif time.time() - no_worker_since > self.start_timeout_s:
                raise RuntimeError(
                    f"no worker has been able to start for {self.start_timeout_s:.0f}s: the cluster has no free "
                    f"{self.workers.options} for one; failures so far: {self.start_failures[-3:]}"
                )
            if time.time() - last_grow > GROW_CHECK_S:
                last_grow = time.time()
                self._follow_cluster()
            waiting = list(self.running) + list(self.starting)
            if not waiting:
                time.sleep(0.05)  # idle workers wait for the planner's next window
                continue
            ready, _ = ray.wait(waiting, num_returns=1, timeout=0.5)
            for ref in ready:
                if ref in self.starting:
                    self._on_started(ref)
                else:
                    self._on_stream(ref, retry, attempts, on_event)

    def _follow_cluster(self) -> None:
        """Start workers on resources that joined the cluster (a node added, the autoscaler)."""
        if self.setup.job.cluster.num_workers or self.workers.count < self.workers.wanted:
            return  # a fixed worker count, or a job with fewer shards than slots
        try:
            target = plan_workers(self.setup.job.cluster).count
        except ConfigError:
            return
        have = len(self.idle) + len(self.running) + len(self.starting)
        if target > have:
            log.warning("the cluster grew: starting %d more worker(s) (%d -> %d)", target - have, have, target)
            for _ in range(target - have):
                self._spawn()

    def close(self) -> None:
        for actor in self.idle + list(self.starting.values()) + [a for a, _ in self.running.values()]:
            self._ray.kill(actor)
        self.idle, self.starting, self.running = [], {}, {}

    def _on_started(self, ref: Any) -> None:
        actor = self.starting.pop(ref)
        try:
            info = self._ray.get(ref)
        except self._ray.exceptions.RayActorError as e:
            self.start_failures.append(_short(e))
            if "creation task" in str(e):  # the model failed to load: another try will not help
                raise RuntimeError(f"a worker could not start:\n{e}") from e
            log.warning("a worker died while starting (%s); starting another", _short(e))
            self._spawn()
            return
        if self.setup.job.batching.max_batch_tokens is None:
            log.info("worker %s on %s: %s", info["worker"], info["device"], info["token_budget"])
        self.idle.append(actor)

    def _on_stream(self, stream: Any, retry: deque, attempts: dict[int, int], on_event: Callable) -> None:
        ray = self._ray
        actor, task = self.running[stream]
        try:
            on_event(ray.get(next(stream)))
        except StopIteration:
            del self.running[stream]
            self.idle.append(actor)
        except ray.exceptions.RayActorError as e:
            del self.running[stream]
            if attempts[task.shard_id] >= MAX_SHARD_ATTEMPTS:
                lost = f"shard {task.shard_id} lost its worker {MAX_SHARD_ATTEMPTS} times"
                raise RuntimeError(f"{lost}; the last error: {e}") from e
            log.warning("worker died on shard %s (%s); the shard goes back on the queue", task.shard_id, _short(e))
            on_event({"event": "retry", "shard_id": task.shard_id, "error": _short(e)})
            retry.append(task)
            self._spawn()


def _short(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(e).__name__
