"""Which workers a cluster gets: pure decisions over what its nodes hold, no Ray calls.

A GPU worker holds `cluster.gpus_per_worker` GPUs of one node (Ray's `num_gpus`), a CPU
worker `cluster.cpus_per_worker` CPUs. `cluster.device` says which kinds may start:
`cuda` only GPU workers (they wait for GPU nodes), `cpu` only CPU workers, `auto` GPU
workers where the cluster has GPUs or its autoscaler offers GPU node types, CPU workers
otherwise; under `auto`, GPUs that join later get GPU workers and the CPU workers stop
after their shard. `runner.cluster.pool` reads the cluster into a `Capacity` and asks here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runner.config import ClusterConfig
from runner.errors import ConfigError

DEFAULT_CPUS_PER_WORKER = 2  # CPU workers when cluster.cpus_per_worker is null, unless the nodes are smaller
CPUS_PER_GPU_WORKER = 1  # a GPU worker's process: tokenizing is done by preparers, not here
MAX_OFFERED_GPUS = 1024  # an autoscaler without a limit offers "any number"


@dataclass(frozen=True)
class Capacity:
    """What the cluster's live nodes hold, and what its autoscaler may add."""

    node_gpus: tuple[int, ...] = ()  # GPUs of each live node
    node_cpus: tuple[int, ...] = ()  # CPUs of each live node
    offered_gpus: int = 0  # GPUs the autoscaler's node types may add (0: none, or no autoscaler)
    private: bool = False  # a private local Ray: it never grows

    @property
    def gpus(self) -> int:
        return sum(self.node_gpus)

    @property
    def cpus(self) -> int:
        return sum(self.node_cpus)


@dataclass(frozen=True)
class WorkerKind:
    device: str  # "cuda" or "cpu": what the worker must run on
    options: dict[str, Any] = field(default_factory=dict)  # Ray actor resources
    threads: int | None = None  # torch threads (CPU workers)

    def describe(self) -> str:
        if self.device == "cuda":
            return f"GPU workers ({self.options['num_gpus']} GPU(s) each)"
        return f"CPU workers ({self.options['num_cpus']} CPUs each)"


def choose_device(cluster: ClusterConfig, capacity: Capacity) -> tuple[str, str]:
    """The workers' device for `cluster.device`, and why, in words for the log."""
    if cluster.device == "cuda":
        return "cuda", "cluster.device=cuda: GPU workers only"
    if cluster.device == "cpu":
        return "cpu", "cluster.device=cpu: CPU workers only"
    if capacity.gpus:
        return "cuda", f"cluster.device=auto: the cluster has {capacity.gpus} GPU(s), GPU workers"
    if capacity.offered_gpus:
        return "cuda", (
            f"cluster.device=auto: no GPU node yet, its autoscaler offers up to {capacity.offered_gpus} GPU(s): "
            "GPU workers, waiting for GPU nodes"
        )
    return "cpu", "cluster.device=auto: no GPU in the cluster, CPU workers (GPU nodes that join later get GPU workers)"


def gpu_kind(cluster: ClusterConfig) -> WorkerKind:
    return WorkerKind("cuda", {"num_gpus": cluster.gpus_per_worker, "num_cpus": CPUS_PER_GPU_WORKER}, None)


def cpu_kind(cluster: ClusterConfig, capacity: Capacity) -> WorkerKind:
    """CPU workers sized to fit the nodes.

    Raises:
        ConfigError: `cluster.cpus_per_worker` is more than any node has.
    """
    largest = max(capacity.node_cpus, default=1)
    if cluster.cpus_per_worker and cluster.cpus_per_worker > largest:
        raise ConfigError(
            [
                f"cluster.cpus_per_worker={cluster.cpus_per_worker}: no node of the cluster has that many CPUs "
                f"(the largest has {largest}, {capacity.cpus} in all); lower it, or leave it null to fit the nodes"
            ]
        )
    per_worker = cluster.cpus_per_worker or max(1, min(DEFAULT_CPUS_PER_WORKER, largest))
    return WorkerKind("cpu", {"num_cpus": per_worker}, per_worker)


def gpu_slots(cluster: ClusterConfig, capacity: Capacity) -> int:
    """GPU workers the live nodes can hold: each holds `gpus_per_worker` GPUs of one node."""
    return sum(g // cluster.gpus_per_worker for g in capacity.node_gpus)


def worker_count(cluster: ClusterConfig, kind: WorkerKind, capacity: Capacity) -> int:
    """How many workers of `kind` the job wants now (at least 1: a GPU worker waits for its node)."""
    if kind.device == "cuda":
        slots = gpu_slots(cluster, capacity)
        if cluster.num_workers:
            # A private Ray never grows: no more workers than its GPUs can hold.
            return max(1, min(cluster.num_workers, slots)) if capacity.private else cluster.num_workers
        # One per GPU the nodes hold or the autoscaler may add: waiting workers are what make it add nodes.
        offered = min(capacity.offered_gpus, MAX_OFFERED_GPUS) // cluster.gpus_per_worker
        return max(1, slots, offered)
    per_node = kind.options["num_cpus"]
    return cluster.num_workers or max(1, sum(c // per_node for c in capacity.node_cpus) or 1)


def spread_gpus(cluster: ClusterConfig, capacity: Capacity) -> str | None:
    """A problem with `gpus_per_worker` on this cluster, in words, or None."""
    if cluster.gpus_per_worker > 1 and capacity.node_gpus and not gpu_slots(cluster, capacity):
        return (
            f"cluster.gpus_per_worker={cluster.gpus_per_worker}: no node has that many GPUs "
            f"(GPUs per node: {sorted(set(capacity.node_gpus), reverse=True)}); a worker spreads its model over "
            "GPUs of one node only"
        )
    return None
