"""The private Ray a job starts has a token of its own, readable by its user only; without it no one joins."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

HOLD = """
import os, time, ray
from runner.cluster.connect import connect
from runner.config import ClusterConfig
connect(ClusterConfig())
print(ray.get_runtime_context().gcs_address, os.environ["RAY_AUTH_TOKEN_PATH"], flush=True)
time.sleep(300)
"""
JOIN = """
import ray
from runner.cluster.connect import keep_loopback_addresses
with keep_loopback_addresses():  # the cluster listens on 127.0.0.1 only
    ray.init(address={address!r}, _node_ip_address="127.0.0.1")
print("joined", flush=True)
"""


def join(address: str, home: Path, **env: str) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return subprocess.Popen(
        [sys.executable, "-c", JOIN.format(address=address)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**clean, "HOME": str(home), "RAY_AUTH_MODE": "token", **env},
    )


def until(proc: subprocess.Popen, *marks: str, timeout: float = 90) -> str:
    """Its output up to the first line holding one of `marks` (or its end); then it is stopped."""
    seen, deadline = [], time.time() + timeout
    try:
        for line in proc.stdout:
            seen.append(line)
            if any(m in line for m in marks) or time.time() > deadline:
                break
    finally:
        proc.kill()
        proc.wait()
    return "".join(seen)


def test_a_process_without_the_private_rays_token_cannot_join_it(tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    held = subprocess.Popen(
        [sys.executable, "-c", HOLD], cwd=REPO, stdout=subprocess.PIPE, text=True, env={**clean, "HOME": str(tmp_path)}
    )
    try:
        address, token = held.stdout.readline().split()
        assert stat.S_IMODE(os.stat(token).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(Path(token).parent).st_mode) == 0o700
        assert not (tmp_path / ".ray" / "auth_token").exists()  # not Ray's shared default token file
        # another process of this user (or another user) with a token of its own, as `ray get-auth-token
        # --generate` makes: refused by the cluster's servers
        (tmp_path / "someone" / ".ray").mkdir(parents=True)
        (tmp_path / "someone" / ".ray" / "auth_token").write_text("0" * 64)
        shown = until(join(address, tmp_path / "someone"), "InvalidAuthToken", "joined")
        assert "InvalidAuthToken" in shown and "joined" not in shown, shown[-2000:]
        # with no token at all: refused before it asks
        shown = until(join(address, tmp_path / "nobody"), "no authentication token", "joined")
        assert "no authentication token was found" in shown and "joined" not in shown, shown[-2000:]
        # the same, given this cluster's token, joins: the refusals were the token's doing
        shown = until(join(address, tmp_path / "someone", RAY_AUTH_TOKEN_PATH=token), "joined")
        assert "joined" in shown, shown[-2000:]
    finally:
        held.terminate()
        held.wait()
