"""Loaded by every Python process of the loopback cluster that cluster/local.sh starts.

Ray replaces a loopback node address with the machine's external one whenever a
process starts or joins a node (`ray start`, and `ray.init` inside Ray's own
dashboard agent, job supervisor and job drivers). cluster/local.sh puts this
folder on PYTHONPATH and sets RUNNER_RAY_LOOPBACK=1 for the nodes it starts, so
that all of them keep 127.0.0.1 and every server of the cluster listens on
loopback only. Other machines' addresses are never touched. See runner/raynet.py.
"""

import os

if os.environ.get("RUNNER_RAY_LOOPBACK") == "1":
    try:
        import ray._private.services as _services

        _services.resolve_ip_for_localhost = lambda host: host
    except ImportError:  # a Python without Ray: nothing to keep
        pass
