"""Which workers a cluster gets (cluster.device, gpus_per_worker), decided over what its nodes hold."""

from __future__ import annotations

import pytest

from runner.cluster.placement import (
    Capacity,
    choose_device,
    cpu_kind,
    gpu_kind,
    gpu_slots,
    spread_gpus,
    worker_count,
)
from runner.config import ClusterConfig
from runner.errors import ConfigError

CPU_HEAD = Capacity(node_gpus=(0,), node_cpus=(8,))
GPU_CLUSTER = Capacity(node_gpus=(0, 8, 8), node_cpus=(8, 96, 96))


def test_auto_picks_gpus_where_the_cluster_has_them_and_cpus_where_it_has_none():
    assert choose_device(ClusterConfig(), GPU_CLUSTER)[0] == "cuda"
    device, reason = choose_device(ClusterConfig(), CPU_HEAD)
    assert device == "cpu" and "GPU nodes that join later get GPU workers" in reason


def test_auto_waits_for_gpus_an_autoscaler_offers():
    # The shipped ray-up and KubeRay heads have no GPU; their autoscalers offer GPU node types.
    booting = Capacity(node_gpus=(0,), node_cpus=(8,), offered_gpus=4)
    device, reason = choose_device(ClusterConfig(address="auto"), booting)
    assert device == "cuda" and "autoscaler offers up to 4 GPU(s)" in reason
    # waiting workers are what make the autoscaler add nodes: one per GPU it may add
    assert worker_count(ClusterConfig(address="auto"), gpu_kind(ClusterConfig()), booting) == 4


def test_cuda_never_plans_cpu_workers_and_cpu_never_plans_gpu_workers():
    assert choose_device(ClusterConfig(device="cuda"), CPU_HEAD)[0] == "cuda"
    assert choose_device(ClusterConfig(device="cpu"), GPU_CLUSTER)[0] == "cpu"
    # a cuda job on a cluster with no GPU yet still asks for a (pending) GPU worker
    assert worker_count(ClusterConfig(device="cuda", address="auto"), gpu_kind(ClusterConfig()), CPU_HEAD) == 1


def test_gpu_workers_hold_gpus_per_worker_gpus_of_one_node():
    cluster = ClusterConfig(gpus_per_worker=4)
    kind = gpu_kind(cluster)
    assert kind.device == "cuda" and kind.options == {"num_gpus": 4, "num_cpus": 1} and kind.threads is None
    assert gpu_slots(cluster, GPU_CLUSTER) == 4  # two 8-GPU nodes, two workers each
    assert worker_count(cluster, kind, GPU_CLUSTER) == 4
    # 3 GPUs on one node and 1 on another hold one 2-GPU worker, not two
    assert gpu_slots(ClusterConfig(gpus_per_worker=2), Capacity(node_gpus=(3, 1), node_cpus=(8, 8))) == 1


def test_a_worker_larger_than_every_node_is_named():
    problem = spread_gpus(ClusterConfig(gpus_per_worker=16), GPU_CLUSTER)
    assert "cluster.gpus_per_worker=16: no node has that many GPUs" in problem and "[8, 0]" in problem
    assert spread_gpus(ClusterConfig(gpus_per_worker=8), GPU_CLUSTER) is None


def test_cpu_workers_fit_the_nodes():
    kind = cpu_kind(ClusterConfig(), Capacity(node_cpus=(8, 3)))
    assert kind.device == "cpu" and kind.options == {"num_cpus": 2} and kind.threads == 2
    assert worker_count(ClusterConfig(), kind, Capacity(node_cpus=(8, 3))) == 5  # 4 + 1: per node, not 11 // 2
    assert cpu_kind(ClusterConfig(), Capacity(node_cpus=(1,))).options == {"num_cpus": 1}
    with pytest.raises(ConfigError, match="cpus_per_worker=16: no node of the cluster has that many CPUs"):
        cpu_kind(ClusterConfig(cpus_per_worker=16), Capacity(node_cpus=(8, 8)))


def test_a_private_ray_never_asks_for_more_gpu_workers_than_it_has():
    private = Capacity(node_gpus=(2,), node_cpus=(16,), private=True)
    assert worker_count(ClusterConfig(num_workers=8), gpu_kind(ClusterConfig()), private) == 2
    joined = Capacity(node_gpus=(2,), node_cpus=(16,))
    assert worker_count(ClusterConfig(address="auto", num_workers=8), gpu_kind(ClusterConfig()), joined) == 8
