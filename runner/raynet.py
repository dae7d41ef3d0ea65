"""Keep a Ray cluster on this machine on the loopback interface.

Ray replaces a loopback node address (127.0.0.1, localhost, ::1) with the
machine's external address before it starts or joins a node, so its servers
would listen on the network even for a private, single-machine cluster. For
the duration of `ray.init`, loopback addresses are kept as they are: a local
cluster then listens on 127.0.0.1 only. Addresses of other machines are never
touched. Ray's own processes in a `ray start` cluster get the same treatment
from cluster/loopback/sitecustomize.py (see cluster/local.sh).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def keep_loopback_addresses() -> Iterator[None]:
    import ray._private.services as services

    original = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = original
