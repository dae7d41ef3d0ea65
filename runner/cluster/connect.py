"""Start or join Ray: a private local Ray on 127.0.0.1, or the cluster at `cluster.address`.

Ray replaces a loopback node address (127.0.0.1, localhost, ::1) with the
machine's external address before it starts or joins a node, so its servers
would listen on the network even for a private, single-machine cluster. For
the duration of `ray.init`, loopback addresses are kept as they are: a local
cluster then listens on 127.0.0.1 only. Addresses of other machines are never
touched. Ray's own processes in a `ray start` cluster get the same treatment
from cluster/loopback/sitecustomize.py (see cluster/local.sh).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from runner import faults
from runner.config import ClusterConfig


def connect(cluster: ClusterConfig) -> bool:
    """Join the cluster at `cluster.address`, or start a local Ray bound to 127.0.0.1.

    Returns:
        True when this call started Ray (and so should shut it down).
    """
    import ray

    if ray.is_initialized():
        return False
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get(faults.ENV):  # a failure test's injected faults reach the workers wherever they run
        env[faults.ENV] = os.environ[faults.ENV]
    common = {"logging_level": logging.WARNING, "log_to_driver": True}
    with keep_loopback_addresses():
        if cluster.address:
            ray.init(address=cluster.address, runtime_env={"env_vars": env}, **common)
        else:
            # A private cluster for this job: every server on 127.0.0.1, and no dashboard: its job-submission
            # API would let any local user run code as this user. Its processes inherit this one's environment,
            # so the variables are set here rather than in a runtime environment (which costs every actor a
            # round trip to Ray's runtime-env agent, about a second on a small machine).
            os.environ.update(env)
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **common)
    return True


@contextmanager
def keep_loopback_addresses() -> Iterator[None]:
    import ray._private.services as services

    original = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = original
