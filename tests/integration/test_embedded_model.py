"""Preparing the embedded model: concurrent workers and killed conversions never leave a trusted broken folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.input import COMPLETE_MARKER, is_complete_model_dir

PREPARE = "from runner.input import prepare_embedded_model as p; print('READY', p('SmolLM2-135M-Instruct'))"


def start(cache: Path) -> subprocess.Popen:
    env = {**os.environ, "RUNNER_CACHE_DIR": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-c", PREPARE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def ready_path(proc: subprocess.Popen) -> Path:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return Path(out.split("READY", 1)[1].strip())


@pytest.mark.slow  # keeps make test under 10 minutes; runs in make test-slow
def test_two_workers_preparing_at_once_share_one_complete_folder(tmp_path):
    first, second = start(tmp_path), start(tmp_path)
    a, b = ready_path(first), ready_path(second)
    assert a == b and is_complete_model_dir(a)
    assert {"config.json", "model.safetensors", "tokenizer.json", COMPLETE_MARKER} <= {p.name for p in a.iterdir()}
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == [a.name]


@pytest.mark.slow  # keeps make test under 10 minutes; runs in make test-slow
def test_a_conversion_killed_halfway_is_never_trusted_and_is_redone(tmp_path):
    proc = start(tmp_path)
    models = tmp_path / "models"
    deadline = time.time() + 300
    while time.time() < deadline and not any(
        p.name.startswith(".") and "tmp-" in p.name and any(p.iterdir())
        for p in (models.iterdir() if models.exists() else [])
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p for p in models.iterdir() if p.is_dir()]
    assert leftovers and all(p.name.startswith(".") for p in leftovers)  # only the dead temporary folder
    assert not any(is_complete_model_dir(p) for p in leftovers)
    path = ready_path(start(tmp_path))
    assert is_complete_model_dir(path)
    assert [p.name for p in models.iterdir() if p.is_dir()] == [path.name]  # the dead one was cleaned up


@pytest.mark.slow  # keeps make test under 10 minutes; runs in make test-slow
def test_a_folder_without_its_marker_is_replaced(tmp_path, embedded_model_dir):
    import shutil

    target = tmp_path / "models" / Path(embedded_model_dir).name
    shutil.copytree(embedded_model_dir, target)
    (target / COMPLETE_MARKER).unlink()
    (target / "model.safetensors").write_bytes(b"truncated")
    path = ready_path(start(tmp_path))
    assert path == target and is_complete_model_dir(path)
    assert (path / "model.safetensors").stat().st_size > 1_000_000
