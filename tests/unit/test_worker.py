"""The worker's generate path, without Ray: padding, finish reasons, token counts, config."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.config import DatasetConfig, GenerationSettings, JobConfig, ModelConfig, OutputConfig
from runner.prepare import PREPARED_FIELDS, TOKENS
from runner.worker import ShardGenerator, ShardTask, WorkerSetup, finish, left_pad


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
    """A worker without Ray, as the scheduler would build it."""
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


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from runner.model import load_tokenizer

    return load_tokenizer(embedded_model_dir)


def test_left_pad_puts_padding_and_zero_mask_on_the_left():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_finish_reasons_and_token_counts_exclude_padding(tokenizer):
    eos = tokenizer.eos_token_id
    words = tokenizer.encode("Paris is the capital", add_special_tokens=False)
    end_ids = ({eos}, tokenizer.pad_token_id)
    stopped = finish(words + [eos, eos, eos], end_ids, tokenizer, [])
    assert (stopped.completion, stopped.completion_tokens, stopped.finish_reason) == (
        "Paris is the capital",
        len(words) + 1,
        "stop",
    )
    full = finish(words, end_ids, tokenizer, [])
    assert (full.completion_tokens, full.finish_reason) == (len(words), "length")
    at_string = finish(words, end_ids, tokenizer, [" the"])
    assert (at_string.completion, at_string.finish_reason) == ("Paris is", "stop")
    # a pad distinct from EOS after a stop string is filler, not a generated token
    padded = finish(words + [99999, 99999], ({eos}, 99999), tokenizer, [])
    assert (padded.completion_tokens, padded.finish_reason) == (len(words), "stop")


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
    assert [e["event"] for e in events] == ["batch", "batch", "shard"]
    table = pq.read_table(tmp_path / "part-3.parquet")
    rows = table.to_pylist()
    assert [(r["id"], r["sample_index"]) for r in rows] == [("x", 0), ("x", 1), ("y", 0), ("y", 1), ("z", 0), ("z", 1)]
    assert [r["topic"] for r in rows] == ["t1", "t1", "t2", "t2", "t3", "t3"]
    assert [r["prompt_tokens"] for r in rows] == [len(input_ids[i // 2]) for i in range(6)]
    assert all(1 <= r["completion_tokens"] <= 6 for r in rows)
    assert [r["batch_id"] for r in rows] == [7, 7, 7, 7, 8, 8] and rows[0]["batch_size"] == 2
    assert rows[0]["padded_length"] == max(len(x) for x in input_ids[:2])
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
    rows = task.gather(pa.schema([("n", pa.string())]))  # carried columns take the run's types
    assert rows.column("id").to_pylist() == ["c", "b", "a"]
    assert rows.column("n").to_pylist() == [None, "2", "1"] and rows.column("truncated_tokens").to_pylist() == [1, 0, 0]


def test_sampling_with_a_seed_is_reproducible(tiny_llama_dir, tmp_path):
    gen = make_generator(tiny_llama_dir, tmp_path, max_new_tokens=8, do_sample=True, seed=7)
    ids = [gen.tokenizer.encode("the quick brown fox")]
    first = [r.completion for r in gen.generate_batch(ids, batch_id=1)[0]]
    again = [r.completion for r in gen.generate_batch(ids, batch_id=1)[0]]
    assert first == again


class OutOfMemoryAbove:
    """Wraps model.generate: raises torch's real OutOfMemoryError for batches larger than `max_rows`."""

    def __init__(self, generate, max_rows: int):
        self.generate, self.max_rows, self.sizes, self.failed = generate, max_rows, [], []

    def __call__(self, input_ids, **kwargs):
        import torch

        rows = input_ids.shape[0]
        self.sizes.append(rows)
        if rows > self.max_rows:
            self.failed.append(rows)
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {rows} rows")
        return self.generate(input_ids=input_ids, **kwargs)


def oom_task(gen, n: int) -> ShardTask:
    texts = [f"prompt number {i} " + "word " * (n - i) for i in range(n)]
    input_ids = [gen.tokenizer.encode(t) for t in texts]
    batches = [(0, 0, n // 2), (1, n // 2, n)]
    return shard_task(
        0, "part-0.parquet", batches, [str(i) for i in range(n)], texts, input_ids, pa.table({"topic": ["t"] * n})
    )


def test_out_of_memory_splits_the_batch_and_the_budget_adapts(tiny_llama_dir, tmp_path):
    gen = make_generator(tiny_llama_dir, tmp_path, max_new_tokens=4)
    fake = OutOfMemoryAbove(gen.model.generate, max_rows=2)
    gen.model.generate = fake
    events = [e for e in gen.run_shard(oom_task(gen, 16)) if e["event"] == "batch"]
    rows = pq.read_table(tmp_path / "part-0.parquet").to_pylist()
    assert sorted(int(r["id"]) for r in rows) == list(range(16))  # nothing lost, nothing twice
    assert all(r["finish_reason"] in ("stop", "length") and r["batch_size"] <= 2 for r in rows)
    # the first batch of 8 failed at 8 and 4 rows; after that the learned budget splits before trying
    assert fake.failed == [8, 4]
    assert max(fake.sizes[len(fake.failed) + 4 :]) <= 2 and gen.token_limit is not None
    assert sum(e["oom_splits"] for e in events) == 2


def test_a_row_that_fails_alone_is_written_as_an_error_or_fails_the_job(tiny_llama_dir, tmp_path):
    from runner.worker import RowFailedError

    gen = make_generator(tiny_llama_dir, tmp_path, max_new_tokens=4)
    gen.model.generate = OutOfMemoryAbove(gen.model.generate, max_rows=0)
    list(gen.run_shard(oom_task(gen, 4)))
    rows = pq.read_table(tmp_path / "part-0.parquet").to_pylist()
    assert len(rows) == 4 and {r["finish_reason"] for r in rows} == {"error"}
    assert all("out of memory even alone" in r["error"] and r["completion"] is None for r in rows)

    strict = make_generator(tiny_llama_dir, tmp_path / "strict", max_new_tokens=4)
    strict.setup.job.output.on_row_error = "fail"
    strict.model.generate = OutOfMemoryAbove(strict.model.generate, max_rows=0)
    with pytest.raises(RowFailedError, match="out of memory even alone"):
        list(strict.run_shard(oom_task(strict, 4)))


def test_a_stop_string_ends_the_completion_just_before_it(embedded_model_dir, tmp_path):
    plain = make_generator(embedded_model_dir, tmp_path, quantization="nf4", chat_template="auto", max_new_tokens=24)
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    text = plain.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = plain.tokenizer(text, add_special_tokens=False).input_ids
    full = plain.generate_batch([prompt], batch_id=0)[0][0].completion
    words = full.split()
    assert len(words) > 3, full
    stop = " " + words[2]
    stopped = make_generator(
        embedded_model_dir, tmp_path, quantization="nf4", chat_template="auto", max_new_tokens=24, stop_strings=[stop]
    )
    result = stopped.generate_batch([prompt], batch_id=0)[0][0]
    assert result.finish_reason == "stop"
    assert result.completion == full[: full.index(stop)]
    assert result.completion_tokens < len(plain.tokenizer.encode(full, add_special_tokens=False))


def test_prompts_read_in_groups_decode_exactly_as_one_padded_batch(embedded_model_dir, tmp_path):
    """Joined per-group KV caches give the same greedy tokens as reading the whole batch at once."""
    words = "the history of the city and its river, told in many small parts " * 12
    input_ids_of = [len(words) // k for k in (1, 2, 5, 9, 30)]
    grouped = make_generator(embedded_model_dir, tmp_path / "a", max_new_tokens=6, chat_template="none")
    grouped.setup.job.batching.step_cost_tokens = 0  # padding only: every distinct length is a group
    tok = grouped.tokenizer
    input_ids = [tok.encode(words[:n]) for n in input_ids_of]
    by_groups, stats = grouped.generate_batch(input_ids, 0)
    assert len(set(stats.row_padded)) == len(input_ids)  # really read in five groups
    assert stats.row_padded == [len(x) for x in input_ids]
    assert stats.padded_prompt_tokens == sum(len(x) for x in input_ids)
    grouped.setup.job.batching.step_cost_tokens = 10**9  # one group: the plain left-padded batch
    at_once, plain = grouped.generate_batch(input_ids, 0)
    assert set(plain.row_padded) == {max(len(x) for x in input_ids)}
    assert [(r.completion, r.completion_tokens) for r in by_groups] == [
        (r.completion, r.completion_tokens) for r in at_once
    ]


def test_several_samples_per_row_decode_from_joined_caches(tiny_llama_dir, tmp_path):
    gen = make_generator(tiny_llama_dir, tmp_path, max_new_tokens=5, do_sample=True, num_return_sequences=2, seed=3)
    gen.setup.job.batching.step_cost_tokens = 0
    input_ids = [gen.tokenizer.encode("word " * n) for n in (30, 12, 3)]
    results, stats = gen.generate_batch(input_ids, 0)
    assert len(set(stats.row_padded)) == 3 and len(results) == 6 and stats.sequences == 6
    assert all(r.finish_reason in ("stop", "length") and r.completion_tokens >= 1 for r in results)
    again, _ = gen.generate_batch(input_ids, 0)  # the batch's seed makes sampling repeatable
    assert [r.completion for r in again] == [r.completion for r in results]
