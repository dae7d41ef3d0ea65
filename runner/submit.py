"""Submit `jobs/generate.py` to a Ray cluster through the Jobs API and follow it to the end."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Never uploaded with the working directory: environments, results, caches.
EXCLUDES = [".venv", ".git", "outputs", "multirun", "out", "**/__pycache__", "*.parquet", ".pytest_cache", ".whl"]
PASSED_ENV = (
    "HF_TOKEN",
    "HF_HOME",
    "RUNNER_CACHE_DIR",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "RAY_AUTH_MODE",
)


def entrypoint(overrides: list[str]) -> str:
    """The command the cluster runs: the same job command as on a laptop, joining the cluster."""
    return " ".join(["python", "jobs/generate.py", "cluster.address=auto", *(shlex.quote(o) for o in overrides)])


def runtime_env() -> dict:
    # Secrets travel as environment variables of the job, never inside its command line or config.
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    return {"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": env}


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
    job_id = client.submit_job(entrypoint=entrypoint(overrides), runtime_env=runtime_env())
    print(f"submitted {job_id} to {address}: {entrypoint(overrides)}", flush=True)
    if not wait:
        return 0

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
