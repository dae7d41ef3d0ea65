"""The worker pool: one actor per GPU (or CPU slot), shards handed out, failures retried.

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

from runner.cluster import placement
from runner.config import ClusterConfig
from runner.errors import ConfigError, JobFailedError, RowFailedError, last_line
from runner.generation import ShardGenerator
from runner.tasks import Event, ShardDone, ShardRetried, ShardTask, TaskSource, WorkerSetup

log = logging.getLogger(__name__)
MAX_SHARD_ATTEMPTS = 3
ERRORS_BEFORE_REPLACING = 2  # a worker whose shards raise this many times in a row is replaced
GROW_CHECK_S = 5.0  # how often the pool looks for new nodes to put workers on


@dataclass
class WorkerPlan:
    count: int
    kind: placement.WorkerKind
    wanted: int = 0  # the slots the cluster had: more than `count` when the job has fewer shards
    reason: str = ""  # why this device, in words

    @property
    def options(self) -> dict[str, Any]:
        return self.kind.options


def read_capacity(cluster: ClusterConfig) -> placement.Capacity:
    """What the live nodes hold, and the GPUs the cluster's autoscaler may add (0 where it has none)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    offered = 0
    try:  # the autoscaler's node types, as Ray Data reads them; a cluster without an autoscaler has none
        from ray._private.state import state

        offered = int((state.get_max_resources_from_cluster_config() or {}).get("GPU", 0))
    except Exception as e:  # a private API: its absence must not stop a job
        log.debug("could not read the autoscaler's node types: %s", e)
    return placement.Capacity(
        node_gpus=tuple(int(n["Resources"].get("GPU", 0)) for n in nodes),
        node_cpus=tuple(int(n["Resources"].get("CPU", 0)) for n in nodes),
        offered_gpus=offered,
        private=not cluster.address,
    )


def plan_workers(
    cluster: ClusterConfig, num_shards: int | None = None, capacity: placement.Capacity | None = None
) -> WorkerPlan:
    """How many actors, of which kind: GPU workers (`cluster.gpus_per_worker` GPUs each) or CPU slots.

    Args:
        num_shards: the job's shard count when known: no more workers than shards are started.
        capacity: the cluster's nodes (read from Ray when not given).
    """
    capacity = capacity or read_capacity(cluster)
    device, reason = placement.choose_device(cluster, capacity)
    if device == "cuda":
        problem = placement.spread_gpus(cluster, capacity)
        if problem and capacity.private:
            raise ConfigError([problem])
        if problem:  # a cluster may still add such a node
            log.warning("%s; waiting for a node that has", problem)
        kind = placement.gpu_kind(cluster)
    else:
        kind = placement.cpu_kind(cluster, capacity)
    count = placement.worker_count(cluster, kind, capacity)
    if num_shards is not None and num_shards < count:
        log.warning(
            "only %d shard(s) to run for %d worker slots: %d will sit idle; a smaller batching.shard_size "
            "spreads a small job over every worker",
            num_shards,
            count,
            count - num_shards,
        )
    return WorkerPlan(max(1, min(count, num_shards or count)), kind, count, reason)


class WorkerPool:
    """Actors holding one model; runs the shard tasks of one job after another.

    A worker that dies (process killed, node lost) gives its shard back to the
    queue and a replacement is asked for. The replacement joins only once its
    model is loaded, so when the cluster has shrunk (a node is gone) the shard
    simply goes to a surviving worker. Between jobs (the points of a sweep) the
    actors keep their model and only take the new settings.
    """

    def __init__(self, setup: WorkerSetup | None, workers: WorkerPlan, start_timeout_s: float = 900.0):
        """Start `workers`; with no `setup` yet they only import the model code and wait for `begin`."""
        import ray

        self._ray = ray
        self.setup = setup
        self.workers = workers
        self.start_timeout_s = start_timeout_s
        self.actor_class = ray.remote(ShardGenerator)
        self.next_index = 0
        self.starting: dict[Any, Any] = {}  # load() ref -> actor still loading its model
        self.warm: list[Any] = []  # actors started before the job's setup was known: no model loaded yet
        self.idle: list[Any] = []
        self.running: dict[Any, tuple[Any, ShardTask]] = {}  # stream -> (actor, task)
        self.configured: dict[int, WorkerSetup] = {}  # id(actor) -> the setup it holds
        self.start_failures: list[str] = []
        self.last_heard: dict[Any, float] = {}  # stream -> when its worker last reported progress
        self.failed_on: dict[int, set[Any]] = {}  # shard -> the workers it raised on
        self.errors_in_a_row: dict[Any, int] = {}  # worker -> shards it raised on since its last success
        self.committed: set[Any] = set()  # streams whose shard file is committed (only their end is to come)
        self.no_room_since: float | None = None
        self.kind_of: dict[Any, placement.WorkerKind] = {}  # worker -> the kind it was started as
        self.gpu_unusable = False  # a GPU worker found no CUDA (cluster.device=auto): CPU workers from then on
        self.gpu_loaded = False  # some GPU worker loaded its model: the GPUs work
        if setup is not None:
            self._say_plan()
        for _ in range(workers.count):
            self._spawn()

    def _say_plan(self) -> None:
        w = self.workers
        log.info("%s: %d %s", w.reason or "workers", w.count, w.kind.describe())

    def begin(self, setup: WorkerSetup, workers: WorkerPlan) -> None:
        """Load the model on the warm workers (as many as `workers` asks for), starting any more it needs."""
        self.setup, self.workers = setup, workers
        self._say_plan()
        same = [a for a in self.warm if self.kind_of.get(_key(a)) == workers.kind]  # the cluster may have changed
        keep = same[: workers.count]
        extra = [a for a in self.warm if a not in keep]
        self.warm = []
        for actor in extra:
            self._retire(actor)
        for actor in keep:
            self._load(actor)
        for _ in range(workers.count - len(keep)):
            self._spawn()

    @property
    def begun(self) -> bool:
        return self.setup is not None

    def _spawn(self) -> None:
        index = self.next_index
        self.next_index += 1
        kind = self.workers.kind
        actor = self.actor_class.options(**kind.options, max_restarts=0).remote(None, index, kind.threads, kind.device)
        self.kind_of[_key(actor)] = kind
        if self.setup is None:
            self.warm.append(actor)
        else:
            self._load(actor)

    def _load(self, actor: Any) -> None:
        self.configured[id(actor)] = self.setup
        self.starting[actor.load.remote(self.setup)] = actor

    def run(
        self,
        setup: WorkerSetup,
        feed: TaskSource,
        on_event: Callable[[Event], None],
        check: Callable[[], None] | None = None,
    ) -> None:
        """Run every task the feed gives (in the order given) to completion; retried shards go first.

        Args:
            check: called every loop; raises to stop the run (the output directory's lease was lost).
        """
        ray = self._ray
        self.setup = setup
        cluster = setup.job.cluster
        retry: deque[ShardTask] = deque()
        attempts: dict[int, int] = {}
        self.failed_on = {}  # shard ids repeat between the jobs (sweep points) a pool runs
        no_worker_since = last_grow = time.time()
        while True:
            while self.idle:
                task = retry.popleft() if retry else feed.next()
                if task is None:
                    break
                actor = self._pick_idle(task)
                if self.configured[id(actor)] is not setup:  # calls on one actor run in order
                    actor.configure.remote(setup)
                    self.configured[id(actor)] = setup
                attempts[task.shard_id] = task.attempt = attempts.get(task.shard_id, 0) + 1
                stream = actor.run_shard.options(num_returns="streaming").remote(task)
                self.running[stream] = (actor, task)
                self.last_heard[stream] = time.time()
            if not self.running and not retry and feed.exhausted:
                return
            if check is not None:
                check()
            if self.idle or self.running:
                no_worker_since = time.time()
            elif time.time() - no_worker_since > self.start_timeout_s:
                raise JobFailedError(
                    f"no worker has been able to start for {self.start_timeout_s:.0f}s: the cluster has no free "
                    f"{self.workers.options} for one; failures so far: {self.start_failures[-3:]}"
                )
            if time.time() - last_grow > GROW_CHECK_S:
                last_grow = time.time()
                self._follow_cluster()
                self._check_resources(cluster.resources_timeout_s)
            self._kill_hung(cluster.hang_timeout_s, retry, attempts, on_event)
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

    def _pick_idle(self, task: ShardTask) -> Any:
        """An idle worker; for a retried shard, one that has not failed it where there is one."""
        failed = self.failed_on.get(task.shard_id, set())
        for i in range(len(self.idle) - 1, -1, -1):
            if _key(self.idle[i]) not in failed:
                return self.idle.pop(i)
        return self.idle.pop()

    def _check_resources(self, timeout_s: float) -> None:
        """Fail when, for `timeout_s`, no worker is up and no live node could hold one."""
        if self.idle or self.running:
            self.no_room_since = None
            return
        need = {"CPU": self.workers.options.get("num_cpus", 0), "GPU": self.workers.options.get("num_gpus", 0)}
        nodes = [n for n in self._ray.nodes() if n.get("Alive")]
        if any(all(n["Resources"].get(k, 0) >= v for k, v in need.items()) for n in nodes):
            self.no_room_since = None
            return
        self.no_room_since = self.no_room_since or time.time()
        if time.time() - self.no_room_since >= timeout_s:
            have = [{k: n["Resources"].get(k, 0) for k in need} for n in nodes]
            if self.workers.kind.device == "cuda":
                fix = (
                    f"add GPU nodes, raise cluster.resources_timeout_s while an autoscaler boots them, or set "
                    f"cluster.device=cpu to run on CPUs (cluster.device={self.setup.job.cluster.device})"
                )
            else:
                fix = (
                    "add a node with those resources, lower cluster.cpus_per_worker, or raise "
                    "cluster.resources_timeout_s where an autoscaler adds nodes"
                )
            raise JobFailedError(
                f"no live node of the cluster can hold a worker ({self.workers.options}) for "
                f"{timeout_s:.0f}s: {len(nodes)} node(s) alive, with {have}. {fix[0].upper() + fix[1:]}; rerun the "
                "same command to go on from the committed shards"
            )

    def _kill_hung(self, timeout_s: float, retry: deque, attempts: dict[int, int], on_event: Callable) -> None:
        """A busy worker silent for `timeout_s` (no planned batch ended) is killed; its shard is retried."""
        now = time.time()
        for stream, (actor, task) in list(self.running.items()):
            if now - self.last_heard[stream] < timeout_s:
                continue
            del self.running[stream]
            self._ray.kill(actor, no_restart=True)
            current = self._device(actor) == self.workers.kind.device
            self._forget(actor)
            error = f"no progress for {now - self.last_heard.pop(stream):.0f}s (cluster.hang_timeout_s): worker killed"
            if stream not in self.committed:
                self._retry(task, error, retry, attempts, on_event)
            self.committed.discard(stream)
            if current:  # a worker of a kind the job no longer starts (CPU after GPUs joined) is not replaced
                self._spawn()

    def _retry(self, task: ShardTask, error: str, retry: deque, attempts: dict[int, int], on_event: Callable) -> None:
        if attempts[task.shard_id] >= MAX_SHARD_ATTEMPTS:
            raise JobFailedError(f"shard {task.shard_id} failed {MAX_SHARD_ATTEMPTS} times; the last error: {error}")
        log.warning("shard %s failed (%s); the shard goes back on the queue", task.shard_id, error)
        on_event(ShardRetried(task.shard_id, error))
        retry.append(task)

    def _follow_cluster(self) -> None:
        """Start workers on resources that joined the cluster (a node added, the autoscaler).

        Under `cluster.device=auto`, GPUs joining a job that runs on CPU workers get GPU workers,
        and the CPU workers stop as they finish their shard.
        """
        cluster = self.setup.job.cluster
        capacity = read_capacity(cluster)
        if (
            self.workers.kind.device == "cpu"
            and cluster.device == "auto"
            and not self.gpu_unusable
            and placement.gpu_slots(cluster, capacity)
        ):
            self._switch_to_gpus(capacity)
            return
        if cluster.num_workers or self.workers.count < self.workers.wanted:
            return  # a fixed worker count, or a job with fewer shards than slots
        try:
            target = placement.worker_count(cluster, self.workers.kind, capacity)
        except ConfigError:
            return
        have = self._count(self.workers.kind)
        if target > have:
            log.warning("the cluster grew: starting %d more worker(s) (%d -> %d)", target - have, have, target)
            for _ in range(target - have):
                self._spawn()

    def _switch_to_gpus(self, capacity: placement.Capacity) -> None:
        cluster = self.setup.job.cluster
        kind = placement.gpu_kind(cluster)
        count = placement.worker_count(cluster, kind, capacity)
        log.warning(
            "GPU node(s) joined (%d GPU(s)): starting %d GPU worker(s) (%s); the CPU workers stop after their "
            "current shard",
            capacity.gpus,
            count,
            kind.options,
        )
        self.workers = WorkerPlan(count, kind, count, "cluster.device=auto: GPUs joined")
        for actor in [a for a in self.idle if self._device(a) != "cuda"]:
            self.idle.remove(actor)
            self._retire(actor)
        for _ in range(count):
            self._spawn()

    def _back_to_cpus(self, error: str) -> None:
        """A GPU worker found no usable CUDA under cluster.device=auto: go on with CPU workers."""
        self.gpu_unusable = True
        log.warning("a GPU worker cannot use its GPU (%s): going on with CPU workers (cluster.device=auto)", error)
        for ref, actor in list(self.starting.items()):
            if self._device(actor) == "cuda":
                del self.starting[ref]
                self._retire(actor)
        cluster = self.setup.job.cluster
        capacity = read_capacity(cluster)
        kind = placement.cpu_kind(cluster, capacity)
        count = placement.worker_count(cluster, kind, capacity)
        self.workers = WorkerPlan(count, kind, count, "cluster.device=auto: no usable GPU")
        for _ in range(max(0, count - self._count(kind))):
            self._spawn()

    def _count(self, kind: placement.WorkerKind) -> int:
        """Workers of one kind (same device) started, idle or busy."""
        actors = self.idle + list(self.starting.values()) + [a for a, _ in self.running.values()]
        return sum(1 for a in actors if self._device(a) == kind.device)

    def _device(self, actor: Any) -> str:
        kind = self.kind_of.get(_key(actor))
        return kind.device if kind else self.workers.kind.device

    def _retire(self, actor: Any) -> None:
        self._ray.kill(actor, no_restart=True)
        self._forget(actor)

    def close(self) -> None:
        for actor in self.warm + self.idle + list(self.starting.values()) + [a for a, _ in self.running.values()]:
            self._ray.kill(actor)
        self.warm, self.idle, self.starting, self.running = [], [], {}, {}

    def _on_started(self, ref: Any) -> None:
        actor = self.starting.pop(ref)
        ray = self._ray
        try:
            info = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            self.start_failures.append(last_line(e))
            if "DeviceUnavailableError" in str(e):
                self._retire(actor)
                if self.gpu_loaded:  # other GPU workers run: only this one's GPU (node) is broken
                    log.warning("a GPU worker cannot use its GPU (%s): it is dropped; the others go on", last_line(e))
                    return
                if self.setup.job.cluster.device == "auto":
                    if not self.gpu_unusable:
                        self._back_to_cpus(last_line(e))
                    return
                raise JobFailedError(f"a GPU worker cannot use its GPU (cluster.device=cuda): {last_line(e)}") from e
            if isinstance(e, ray.exceptions.RayTaskError):  # the model failed to load: another try will not help
                self._retire(actor)
                raise JobFailedError(f"a worker could not load the model:\n{e.cause or e}") from e
            if "creation task" in str(e):  # the worker process could not start its code
                raise JobFailedError(f"a worker could not start:\n{e}") from e
            log.warning("a worker died while starting (%s); starting another", last_line(e))
            self._forget(actor)
            self._spawn()
            return
        if self.setup.job.batching.max_batch_tokens is None:
            log.info("worker %s on %s: %s", info["worker"], info["device"], info["token_budget"])
        self.gpu_loaded = self.gpu_loaded or self._device(actor) == "cuda"
        self.idle.append(actor)

    def _on_stream(self, stream: Any, retry: deque, attempts: dict[int, int], on_event: Callable) -> None:
        ray = self._ray
        actor, task = self.running[stream]
        try:
            event = ray.get(next(stream))
            on_event(event)
            self.last_heard[stream] = time.time()
            if isinstance(event, ShardDone):  # its file is committed: whatever happens next, it is done
                self.committed.add(stream)
            return
        except StopIteration:
            self.errors_in_a_row.pop(_key(actor), None)
            if self._device(actor) == self.workers.kind.device:
                self.idle.append(actor)
            else:  # a CPU worker once GPU workers have taken over
                self._retire(actor)
        except ray.exceptions.RayActorError as e:  # the worker died (process killed, node lost)
            if stream not in self.committed:
                self._retry(task, f"worker lost: {last_line(e)}", retry, attempts, on_event)
            current = self._device(actor) == self.workers.kind.device
            self._forget(actor)
            if current:
                self._spawn()
        except ray.exceptions.RayTaskError as e:  # the shard raised; the worker lives on
            if isinstance(e.cause, RowFailedError):  # on_row_error=fail: the user asked for the job to stop
                raise JobFailedError(f"shard {task.shard_id}: {e.cause} (output.on_row_error=fail)") from e
            if stream not in self.committed:
                self.failed_on.setdefault(task.shard_id, set()).add(_key(actor))
                self._retry(task, f"{type(e.cause).__name__}: {last_line(e.cause or e)}", retry, attempts, on_event)
            self.errors_in_a_row[_key(actor)] = self.errors_in_a_row.get(_key(actor), 0) + 1
            current = self._device(actor) == self.workers.kind.device
            if self.errors_in_a_row[_key(actor)] >= ERRORS_BEFORE_REPLACING:  # a broken worker (device state)
                log.warning("a worker failed %d shards in a row: replacing it", ERRORS_BEFORE_REPLACING)
                self._retire(actor)
                if current:
                    self._spawn()
            elif current:
                self.idle.append(actor)
            else:
                self._retire(actor)
        del self.running[stream]
        self.last_heard.pop(stream, None)
        self.committed.discard(stream)

    def _forget(self, actor: Any) -> None:
        """Drop what was kept about a worker that is gone."""
        self.errors_in_a_row.pop(_key(actor), None)
        self.kind_of.pop(_key(actor), None)
        for workers in self.failed_on.values():
            workers.discard(_key(actor))


def _key(actor: Any) -> Any:
    """A worker's identity that outlives its handle (id() of a freed handle is reused)."""
    return actor._actor_id
