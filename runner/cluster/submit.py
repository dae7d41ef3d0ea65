"""Submit `jobs/generate.py` to a Ray cluster through the Jobs API and follow it to the end."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from runner.secrets import SECRETS_FILE, SECRETS_MODULE_ENV, holds_secret

AGENT_WAIT_S = 60.0  # how long a submission waits for a just-started cluster's job agent

REPO = Path(__file__).resolve().parents[2]
# Never uploaded with the working directory: environments, results, caches.
EXCLUDES = [".venv", ".git", "outputs", "multirun", "out", "**/__pycache__", "*.parquet", ".pytest_cache", ".whl"]
# Passed to the job as environment variables (shown in Ray's job list: nothing secret).
PASSED_ENV = ("HF_HOME", "RUNNER_CACHE_DIR", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "RAY_AUTH_MODE")
# Passed inside a package of the job's runtime environment, never as job metadata.
SECRET_ENV = ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def entrypoint(overrides: list[str]) -> str:
    """The command the cluster runs: the same job command as on a laptop, joining the cluster."""
    return " ".join(["python", "jobs/generate.py", "cluster.address=auto", *(shlex.quote(o) for o in overrides)])


def split_secret_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(overrides safe to show, overrides holding credentials inside a URI)."""
    shown = [o for o in overrides if not holds_secret(o)]
    return shown, [o for o in overrides if holds_secret(o)]


def secrets_package(secret_overrides: list[str], where: Path) -> Path | None:
    """A package for the job's `py_modules` holding its secrets: environment values and overrides.

    Ray uploads it to the cluster's own storage and puts it on the job's workers' path; its
    content never appears in the job's entrypoint, runtime-env variables or Ray's job list.
    """
    env = {k: os.environ[k] for k in SECRET_ENV if k in os.environ}
    if not env and not secret_overrides:
        return None
    package = where / f"runner_job_secrets_{uuid.uuid4().hex[:12]}"
    package.mkdir(mode=0o700)
    # Ray names an uploaded package by a hash of its files' content, not of its folder's name: the
    # name inside makes each submission's package its own (else a cached one with another name is used).
    init = f'"""Secrets of one submitted job (made by runner.cluster.submit)."""\n\nNAME = "{package.name}"\n'
    (package / "__init__.py").write_text(init)
    path = package / SECRETS_FILE
    path.touch(mode=0o600)
    path.write_text(json.dumps({"env": env, "overrides": secret_overrides}))
    return package


def runtime_env(package: Path | None = None) -> dict:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    runtime: dict = {"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": env}
    if package is not None:
        runtime["py_modules"] = [str(package)]
        env[SECRETS_MODULE_ENV] = package.name
    return runtime


def submit_and_follow(address: str, overrides: list[str], wait: bool = True) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as e:
        print(
            f"error: no Ray dashboard answers at {address} ({e}); start a cluster (cluster/local.sh up) or "
            "pass --address",
            file=sys.stderr,
        )
        return 2
    shown, secret = split_secret_overrides(overrides)
    with tempfile.TemporaryDirectory() as where:
        package = secrets_package(secret, Path(where))
        job_id = _submit(client, entrypoint(shown), runtime_env(package))
    hidden = f" (+ {len(secret)} override(s) with credentials, sent with the job's secrets)" if secret else ""
    print(f"submitted {job_id} to {address}: {entrypoint(shown)}{hidden}", flush=True)
    if not wait:
        return 0

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _submit(client: Any, command: str, runtime: dict, wait_for_agent_s: float = AGENT_WAIT_S) -> str:
    """Submit the job; a cluster that has just started may not have its job agent yet: wait for it a while."""
    deadline = time.time() + wait_for_agent_s
    while True:
        try:
            return client.submit_job(entrypoint=command, runtime_env=runtime)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            print("the cluster's job agent is not up yet; trying again", file=sys.stderr, flush=True)
            time.sleep(2.0)
