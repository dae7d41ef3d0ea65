"""Preparing a job: bad input fails before any worker or model starts; long prompts are refused or cut."""

from __future__ import annotations

import pytest

from runner import job as job_lib
from runner.config import ConfigError, DatasetConfig, GenerationSettings, JobConfig, ModelConfig, OutputConfig
from tests.conftest import write_jsonl


def make_job(tmp_path, rows, **dataset) -> JobConfig:
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    return JobConfig(
        dataset=DatasetConfig(path=str(path), **dataset),
        model=ModelConfig(name_or_path="embedded:SmolLM2-135M-Instruct"),
        generation=GenerationSettings(max_new_tokens=8),
        output=OutputConfig(dir=str(tmp_path / "out")),
    )


@pytest.fixture()
def no_workers(monkeypatch):
    """Fail the test if anything tries to start Ray or load model weights."""
    from runner import model, scheduler

    def forbidden(*args, **kwargs):
        raise AssertionError("a worker or model was started for a job that should have been refused")

    monkeypatch.setattr(scheduler, "connect", forbidden)
    monkeypatch.setattr(model, "load_model", forbidden)


@pytest.mark.parametrize(
    "rows,fragment",
    [
        ([{"prompt": "a", "id": "1"}, {"prompt": "b", "id": "1"}], "ids must be unique"),
        ([{"prompt": "", "id": "1"}], "empty or blank prompt"),
        ([{"text": "a", "id": "1"}], "no such column"),
        ([{"prompt": ["not", "text"], "id": "1"}], "not text"),
    ],
)
def test_bad_input_is_refused_before_any_worker_starts(tmp_path, no_workers, embedded_model_dir, rows, fragment):
    with pytest.raises(ConfigError, match=fragment):
        job_lib.run_job(make_job(tmp_path, rows, id_column="id"))


def test_unwritable_output_dir_is_refused_before_any_worker_starts(tmp_path, no_workers):
    job = make_job(tmp_path, [{"prompt": "hi"}], id_column=None)
    (tmp_path / "blocker").write_text("a file, not a folder")
    job.output.dir = str(tmp_path / "blocker" / "out")
    with pytest.raises(ConfigError, match="cannot write there"):
        job_lib.run_job(job)


def test_too_long_prompts_are_refused_or_cut_from_the_left(tmp_path, no_workers, embedded_model_dir):
    long_prompt = "word " * 9000  # SmolLM2's context is 8192 tokens
    rows = [{"prompt": "short one"}, {"prompt": long_prompt}]
    with pytest.raises(ConfigError, match=r"1 prompts are longer than the model's context \(8192 tokens\).*'1'"):
        job_lib.prepare(make_job(tmp_path, rows, id_column=None))
    prep = job_lib.prepare(make_job(tmp_path, rows, id_column=None, too_long="truncate_left"))
    assert prep.truncated[0] == 0 and prep.truncated[1] > 0
    assert len(prep.input_ids[1]) == 8192 - 8
    # the end of the prompt (the chat template's assistant turn) is what is kept
    assert prep.input_ids[1][-3:] == prep.input_ids[0][-3:]
