"""Every Ray call of the driver: connecting, the preparer actors, the worker pool, the sweep session,
job submission. Ray itself is imported where it is first called, so importing the package is cheap.
"""

from runner.cluster.connect import connect, keep_loopback_addresses
from runner.cluster.pool import WorkerPlan, WorkerPool, plan_workers
from runner.cluster.preparers import fetch, prepare_on_cluster, stop_preparers, unheld
from runner.cluster.session import Session
from runner.cluster.submit import entrypoint, submit_and_follow

__all__ = [
    "Session",
    "WorkerPlan",
    "WorkerPool",
    "connect",
    "entrypoint",
    "fetch",
    "keep_loopback_addresses",
    "plan_workers",
    "prepare_on_cluster",
    "stop_preparers",
    "submit_and_follow",
    "unheld",
]
