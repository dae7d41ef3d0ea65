"""Starting a job: bad input fails before any model loads; a bad output dir before Ray starts."""

from __future__ import annotations

import pytest

from runner.config import DatasetConfig, GenerationSettings, JobConfig, ModelConfig, OutputConfig
from runner.driver import job as job_lib
from runner.errors import ConfigError
from tests.conftest import write_jsonl


def make_job(tmp_path, rows, **dataset) -> JobConfig:
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    return JobConfig(
        dataset=DatasetConfig(path=str(path), **dataset),
        model=ModelConfig(name_or_path="embedded:SmolLM2-135M-Instruct"),
        generation=GenerationSettings(max_new_tokens=8),
        output=OutputConfig(dir=str(tmp_path / "out")),
    )


def forbid(monkeypatch, module, name):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"{module.__name__}.{name} was called for a job that should have been refused")

    monkeypatch.setattr(module, name, forbidden)


class WarmOnly:
    """A pool that may start warm (its workers import the model code, load nothing), never be handed the job."""

    def __init__(self, setup, workers, *args, **kwargs):
        if setup is not None:
            raise AssertionError("a worker pool was handed a job that should have been refused")
        self.begun = False

    def begin(self, *args, **kwargs):
        raise AssertionError("warm workers were handed a job that should have been refused: a model would load")

    def close(self) -> None:
        pass


@pytest.fixture()
def no_workers(monkeypatch):
    """Fail the test if workers get the job (and so load the model), or weights load here. Ray may start (it
    prepares the input) and workers may start warm, as every job's do while its first window is prepared."""
    from runner.cluster import session
    from runner.generation import model

    monkeypatch.setattr(session, "WorkerPool", WarmOnly)
    forbid(monkeypatch, model, "load_model")


@pytest.fixture()
def no_ray(monkeypatch, no_workers):
    from runner.cluster import session

    forbid(monkeypatch, session, "connect")


@pytest.mark.slow  # keeps make test under 10 minutes; the CLI's own run of this stays in it (test_generate_job)
def test_bad_input_is_refused_before_any_worker_starts(tmp_path, no_workers, embedded_model_dir):
    rows = [{"prompt": "a", "id": "1"}, {"prompt": "", "id": "2"}, {"prompt": ["not", "text"], "id": "3"}]
    with pytest.raises(
        ConfigError, match=r"in.jsonl \(rows 0-2\).*\n.*'prompt' holds values of several types.*list at lines \[3\]"
    ):
        job_lib.run_job(make_job(tmp_path, rows, id_column="id"))


def test_a_wrong_input_path_is_refused_before_ray_starts(tmp_path, no_ray):
    job = make_job(tmp_path, [{"prompt": "hi"}], id_column=None)
    job.dataset.path = str(tmp_path / "missing" / "*.jsonl")
    with pytest.raises(ConfigError, match="no file matches"):
        job_lib.run_job(job)


def test_unwritable_output_dir_is_refused_before_ray_starts(tmp_path, no_ray):
    job = make_job(tmp_path, [{"prompt": "hi"}], id_column=None)
    (tmp_path / "blocker").write_text("a file, not a folder")
    job.output.dir = str(tmp_path / "blocker" / "out")
    with pytest.raises(ConfigError, match="cannot write there"):
        job_lib.run_job(job)


def test_input_inside_the_output_dir_is_refused_before_ray_starts(tmp_path, no_ray):
    """Readers of the output would read the prompts as results, and overwrite would have removed them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"prompt": ["hi"]}), out / "prompts.parquet")
    job = make_job(tmp_path, [{"prompt": "hi"}], id_column=None)
    job.dataset.path, job.output.dir, job.output.overwrite = str(out / "prompts.parquet"), str(out), True
    with pytest.raises(ConfigError, match=r"overlap: the input file\(s\) .*prompts.parquet lie inside the output"):
        job_lib.run_job(job)
    assert (out / "prompts.parquet").exists()
