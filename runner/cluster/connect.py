"""Start or join Ray: a private local Ray on 127.0.0.1, or the cluster at `cluster.address`.

Ray replaces a loopback node address (127.0.0.1, localhost, ::1) with the
machine's external address before it starts or joins a node, so its servers
would listen on the network even for a private, single-machine cluster. For
the duration of `ray.init`, loopback addresses are kept as they are: a local
cluster then listens on 127.0.0.1 only. Addresses of other machines are never
touched. Ray's own processes in a `ray start` cluster get the same treatment
from cluster/loopback/sitecustomize.py (see cluster/local.sh).

The private cluster has a token of its own (`private_token`): a fresh random one in a file only this
user can read (0600, in a 0700 folder), not Ray's shared `~/.ray/auth_token` (which Ray creates
readable by everyone who can enter the home folder). A process without it cannot join the cluster,
run code in it as this user, or read what the job's workers hold.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import tempfile
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
        if cluster.address and cluster.address != "local":  # "local" is Ray's word for a new local cluster
            ray.init(address=cluster.address, runtime_env={"env_vars": env}, **common)
        else:
            # A private cluster for this job: every server on 127.0.0.1, and no dashboard: its job-submission
            # API would let any local user run code as this user. Its processes inherit this one's environment,
            # so the variables are set here rather than in a runtime environment (which costs every actor a
            # round trip to Ray's runtime-env agent, about a second on a small machine).
            os.environ.update(env)
            _SAVED_AUTH.clear()
            _SAVED_AUTH.update({k: os.environ.get(k) for k in AUTH_VARIABLES})
            os.environ.update(private_token())
            _reload_auth_config()
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **common)
    return True


AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")
_SAVED_AUTH: dict[str, str | None] = {}  # the user's own, while a private Ray runs


def restore_auth() -> None:
    """After a private Ray is shut down: the process's own authentication settings again (a later join of
    another cluster must not present the private token)."""
    if not _SAVED_AUTH:
        return
    for key, value in _SAVED_AUTH.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _SAVED_AUTH.clear()
    _reload_auth_config()


def private_token() -> dict[str, str]:
    """The environment that gives a private Ray (and every process it starts) a token only this user can read.

    The token lies in a fresh folder of mode 0700, its file 0600, removed when this process exits normally.
    """
    folder = tempfile.mkdtemp(prefix="runner-ray-")  # 0700: mkdtemp's own mode
    path = os.path.join(folder, "auth_token")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    atexit.register(shutil.rmtree, folder, True)
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": path}


def _reload_auth_config() -> None:
    """Ray reads its authentication mode and token when it is imported: make this process see the new ones."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication (before 2.52): pyproject asks for a newer one
        raise RuntimeError("this Ray has no token authentication; install ray>=2.52 (make demo does)") from None
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def keep_loopback_addresses() -> Iterator[None]:
    import ray._private.services as services

    original = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = original
