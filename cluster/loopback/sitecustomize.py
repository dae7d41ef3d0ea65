"""Loaded by every Python process of the loopback cluster that cluster/local.sh starts.

Ray replaces a loopback node address with the machine's external one whenever a
process starts or joins a node (`ray start`, and `ray.init` inside Ray's own
dashboard agent, job supervisor and job drivers). cluster/local.sh puts this
folder on PYTHONPATH and sets RUNNER_RAY_LOOPBACK=1 for the nodes it starts, so
that all of them keep 127.0.0.1 and every server of the cluster listens on
loopback only. Other machines' addresses are never touched. See runner/cluster/connect.py.

Python loads only the first `sitecustomize` on its path: this one then loads the next one
there (the environment's own, if it has one), so putting this folder first hides nothing.
"""

import os

if os.environ.get("RUNNER_RAY_LOOPBACK") == "1":
    try:
        import ray._private.services as _services

        _services.resolve_ip_for_localhost = lambda host: host
    except ImportError:  # a Python without Ray: nothing to keep
        pass


def _load_the_next_sitecustomize() -> None:
    import importlib.machinery
    import importlib.util
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None or os.path.abspath(spec.origin or "") == os.path.abspath(__file__):
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_load_the_next_sitecustomize()
