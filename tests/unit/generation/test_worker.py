"""The worker without Ray: a shard through the engine into one Parquet file, config, out-of-memory back-off."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.config import DatasetConfig, GenerationSettings, JobConfig, ModelConfig, OutputConfig
from runner.errors import RowFailedError
from runner.generation.worker import ShardGenerator, gather
from runner.input import PREPARED_FIELDS, TOKENS
from runner.tasks import BatchDone, ShardDone, ShardTask, WorkerSetup


def shard_task(shard_id, file_name, batches, ids, prompts, input_ids, carry) -> ShardTask:
    """A shard task over rows prepared in memory (a job's come from the object store)."""
    rows = pa.table(
        {
            "id": ids,
            "prompt": prompts,
            TOKENS: pa.array(input_ids, pa.list_(pa.int32())),
            "truncated_tokens": pa.array([0] * len(ids), pa.int32()),
        },
        schema=pa.schema(PREPARED_FIELDS),
    )
    for name in carry.column_names:
        rows = rows.append_column(name, carry.column(name))
    take = [(0, i) for i in range(len(ids))]
    return ShardTask(shard_id, file_name, "f" * 16, batches, [rows], take)


def make_generator(model_dir, out_dir, quantization="none", chat_template="none", **gen) -> ShardGenerator:
    """A worker without Ray, as the pool would build it."""
    job = JobConfig(
        dataset=DatasetConfig(path="unused"),
        model=ModelConfig(name_or_path=model_dir, quantization=quantization, chat_template=chat_template),
        generation=GenerationSettings(**{"max_new_tokens": 8, **gen}),
        output=OutputConfig(dir=str(out_dir)),
    )
    setup = WorkerSetup(
        job=job,
        model_path=model_dir,
        run_id="run-1",
        config_hash="hash-1",
        carry_schema=pa.schema([("topic", pa.string())]),
        file_metadata={b"runner.config_hash": b"hash-1"},
    )
    return ShardGenerator(setup, index=0, threads=2)


def test_generation_config_is_the_jobs_settings_over_the_models_defaults(tiny_llama_dir, tmp_path):
    gen = make_generator(
        tiny_llama_dir, tmp_path, max_new_tokens=5, do_sample=True, temperature=0.5, top_p=0.8, stop_strings=["\n\n"]
    )
    config = gen.generation_config
    assert (config.max_new_tokens, config.do_sample, config.temperature, config.top_p) == (5, True, 0.5, 0.8)
    assert config.pad_token_id == gen.tokenizer.pad_token_id and config.eos_token_id is not None
    assert gen.static_columns["top_k"] == 50  # transformers' default, recorded as used
    greedy = make_generator(tiny_llama_dir, tmp_path, temperature=0.5)
    assert greedy.generation_config.temperature is None and greedy.static_columns["temperature"] is None


def test_run_shard_writes_one_file_with_every_row_and_sample(tiny_llama_dir, tmp_path):
    gen = make_generator(tiny_llama_dir, tmp_path, max_new_tokens=6, do_sample=True, num_return_sequences=2)
    texts = ["a b c d e f g", "hello", "one two three"]
    input_ids = [gen.tokenizer.encode(t) for t in texts]
    task = shard_task(
        3,
        "part-3.parquet",
        [(7, 0, 2), (8, 2, 3)],
        ["x", "y", "z"],
        texts,
        input_ids,
        pa.table({"topic": ["t1", "t2", "t3"]}),
    )
    events = list(gen.run_shard(task))
    assert [type(e) for e in events] == [BatchDone, BatchDone, ShardDone]
    table = pq.read_table(tmp_path / "part-3.parquet")
    rows = table.to_pylist()
    assert [(r["id"], r["sample_index"]) for r in rows] == [("x", 0), ("x", 1), ("y", 0), ("y", 1), ("z", 0), ("z", 1)]
    assert [r["topic"] for r in rows] == ["t1", "t1", "t2", "t2", "t3", "t3"]
    assert [r["prompt_tokens"] for r in rows] == [len(input_ids[i // 2]) for i in range(6)]
    assert all(1 <= r["completion_tokens"] <= 6 for r in rows)
    assert [r["batch_id"] for r in rows] == [7, 7, 7, 7, 8, 8]
    # the three rows (six sequences) fit one running set: read at once, in groups of similar length
    assert {r["batch_size"] for r in rows} == {6}
    assert all(r["padded_length"] >= r["prompt_tokens"] for r in rows)
    assert len({(r["latency_s"], r["created_at"]) for r in rows if r["batch_id"] == 7}) == 1  # its batch's time
    assert {r["shard_id"] for r in rows} == {3} and rows[0]["seed"] == 0 and rows[0]["device"] == "cpu"
    totals = json.loads(table.schema.metadata[b"runner.shard_totals"])  # what a manifest reads instead of the rows
    assert totals["rows"] == 6 and totals["completion_tokens"] == sum(r["completion_tokens"] for r in rows)


def test_a_shard_gathers_its_rows_from_several_parts_in_plan_order():
    parts = [
        pa.table(
            {"id": ["a", "b"], "prompt": ["pa", "pb"], TOKENS: [[1], [2, 2]], "truncated_tokens": [0, 0], "n": [1, 2]}
        ),
        pa.table({"id": ["c"], "prompt": ["pc"], TOKENS: [[3, 3, 3]], "truncated_tokens": [1], "n": [None]}),
    ]
    task = ShardTask(0, "part.parquet", "f" * 16, [(0, 0, 3)], parts, [(1, 0), (0, 1), (0, 0)])
    rows = gather(task, pa.schema([("n", pa.string())]))  # carried columns take the run's types
    assert rows.column("id").to_pylist() == ["c", "b", "a"]
    assert rows.column("n").to_pylist() == [None, "2", "1"] and rows.column("truncated_tokens").to_pylist() == [1, 0, 0]


class OutOfMemoryAbove:
    """Wraps a model's forward: raises torch's real OutOfMemoryError when it holds more than `max_rows` sequences."""

    def __init__(self, model, max_rows: int):
        self.forward, self.max_rows, self.sizes, self.failed = model.forward, max_rows, [], []
        model.forward = self

    def __call__(self, input_ids=None, **kwargs):
        import torch

        rows = input_ids.shape[0]
        self.sizes.append(rows)
        if rows > self.max_rows:
            self.failed.append(rows)
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {rows} rows")
        return self.forward(input_ids=input_ids, **kwargs)


def oom_task(gen, n: int) -> ShardTask:
    texts = [f"prompt number {i} " + "word " * (n - i) for i in range(n)]
    input_ids = [gen.tokenizer.encode(t) for t in texts]
    batches = [(0, 0, n // 2), (1, n // 2, n)]
    return shard_task(
        0, "part-0.parquet", batches, [str(i) for i in range(n)], texts, input_ids, pa.table({"topic": ["t"] * n})
    )


def test_out_of_memory_admits_fewer_rows_and_the_limit_holds(tiny_llama_dir, tmp_path):
    gen = make_generator(tiny_llama_dir, tmp_path, max_new_tokens=4)
    fake = OutOfMemoryAbove(gen.model, max_rows=2)
    events = [e for e in gen.run_shard(oom_task(gen, 16)) if isinstance(e, BatchDone)]
    rows = pq.read_table(tmp_path / "part-0.parquet").to_pylist()
    assert sorted(int(r["id"]) for r in rows) == list(range(16))  # nothing lost, nothing twice
    assert all(r["finish_reason"] in ("stop", "length") and r["batch_size"] <= 2 for r in rows)
    # 16 rows failed to prefill, then fewer each time (the prompt tokens one admission reads halve);
    # a decode step of 3 rows then failed too (the cache's limit, learned apart); once both hold,
    # the engine runs at most 2 rows at once and nothing fails again
    assert fake.failed[0] == 16 and fake.failed == sorted(fake.failed, reverse=True)
    last = max(i for i, n in enumerate(fake.sizes) if n > 2)
    assert fake.sizes[last] == fake.failed[-1] and all(n <= 2 for n in fake.sizes[last + 1 :])
    assert gen.limits.prefill.value is not None and gen.limits.cache.value is not None
    assert sum(e.oom_splits for e in events) == len(fake.failed) and sum(e.rows for e in events) == 16


def test_a_row_that_fails_alone_is_written_as_an_error_or_fails_the_job(tiny_llama_dir, tmp_path):
    gen = make_generator(tiny_llama_dir, tmp_path, max_new_tokens=4)
    OutOfMemoryAbove(gen.model, max_rows=0)
    list(gen.run_shard(oom_task(gen, 4)))
    rows = pq.read_table(tmp_path / "part-0.parquet").to_pylist()
    assert len(rows) == 4 and {r["finish_reason"] for r in rows} == {"error"}
    assert all("out of memory even alone" in r["error"] and r["completion"] is None for r in rows)

    strict = make_generator(tiny_llama_dir, tmp_path / "strict", max_new_tokens=4)
    strict.setup.job.output.on_row_error = "fail"
    strict.configure(strict.setup)
    OutOfMemoryAbove(strict.model, max_rows=0)
    with pytest.raises(RowFailedError, match="out of memory even alone"):
        list(strict.run_shard(oom_task(strict, 4)))


def test_redoing_error_rows_rewrites_exactly_those_sequences_in_the_committed_file(tiny_llama_dir, tmp_path):
    gen = make_generator(tiny_llama_dir, tmp_path, max_new_tokens=6, do_sample=True, num_return_sequences=2)
    texts = ["a b c d e f g", "hello", "one two three"]
    args = (3, "part-3.parquet", [(7, 0, 2), (8, 2, 3)], ["x", "y", "z"], texts)
    input_ids = [gen.tokenizer.encode(t) for t in texts]
    carry = pa.table({"topic": ["t1", "t2", "t3"]})
    list(gen.run_shard(shard_task(*args, input_ids, carry)))
    path = tmp_path / "part-3.parquet"
    first = pq.read_table(path)
    # an earlier run's error rows: y's second sample and z's first
    rows = first.to_pylist()
    for r in rows:
        if (r["id"], r["sample_index"]) in {("y", 1), ("z", 0)}:
            r.update(completion=None, completion_tokens=None, finish_reason="error", error="oom", run_id="old")
    pq.write_table(pa.Table.from_pylist(rows, schema=first.schema), path)

    gen.setup.run_id = "run-2"
    gen.configure(gen.setup)
    task = shard_task(*args, input_ids, carry)
    task.redo = {"y": [1], "z": [0]}
    events = list(gen.run_shard(task))
    assert [e.rows for e in events if isinstance(e, BatchDone)] == [0, 0]  # no new rows: two sequences redone
    assert events[-1].redone == 2 and events[-1].totals.errors == 0
    after = pq.read_table(path).to_pylist()
    assert [(r["id"], r["sample_index"]) for r in after] == [(r["id"], r["sample_index"]) for r in rows]
    for old, new, clean in zip(rows, after, first.to_pylist()):
        if old["finish_reason"] == "error":  # generated again, from the same per-row random stream
            assert new["run_id"] == "run-2" and new["completion"] == clean["completion"]
        else:  # untouched
            assert new == old


def test_workers_load_the_revision_the_job_resolved_and_refuse_a_changed_folder(tiny_llama_dir, tmp_path):
    import dataclasses
    import shutil

    from runner.generation.worker import ModelChangedError, pinned
    from runner.input import folder_revision, resolve_revision

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    job = JobConfig(dataset=DatasetConfig(path="unused"), model=ModelConfig(name_or_path=str(folder)))
    revision = resolve_revision(str(folder), job.model)
    assert revision.startswith("local:") and revision == folder_revision(folder)
    setup = WorkerSetup(job, str(folder), "run", "hash", pa.schema([]), {}, model_revision=revision)
    assert pinned(str(folder), setup) is job.model
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))  # new weights' config
    with pytest.raises(ModelChangedError, match="the model folder changed since the job started"):
        pinned(str(folder), setup)
    # a Hub model loads at the commit resolved once, whatever `main` points to when the worker starts
    hub = dataclasses.replace(setup, model_path="org/model", model_revision="0123abcd" * 5)
    assert pinned("org/model", hub).revision == "0123abcd" * 5


def test_model_defaults_the_engine_does_not_apply_reach_the_summary_and_the_manifest(tiny_llama_dir, tmp_path):
    import shutil

    from runner.driver.progress import ProgressBar

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "typical_p": 0.5, "no_repeat_ngram_size": 3}))
    (tmp_path / "out").mkdir()
    gen = make_generator(str(folder), tmp_path / "out")
    assert gen.ignored == ("typical_p=0.5",)  # no_repeat_ngram_size is applied
    assert gen.engine.decoding.rules.no_repeat_ngram_size == 3
    task = shard_task(
        0, "part-0.parquet", [(0, 0, 1)], ["x"], ["hi"], [gen.tokenizer.encode("hi")], pa.table({"topic": ["t"]})
    )
    done = list(gen.run_shard(task))[-1]
    assert isinstance(done, ShardDone) and done.ignored_settings == ("typical_p=0.5",)
    bar = ProgressBar(1, enabled=False)
    bar(done)
    assert bar.totals.as_dict()["ignored_model_settings"] == ["typical_p=0.5"]  # the manifest's this_run
