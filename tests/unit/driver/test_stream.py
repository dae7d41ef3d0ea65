"""The streaming data path without Ray: windows, checks across chunks, fingerprints, resume from names."""

from __future__ import annotations

import time

import pytest

from runner import store
from runner.config import DatasetConfig, GenerationSettings, JobConfig, ModelConfig, OutputConfig
from runner.driver import stream
from runner.driver.feed import TaskFeed
from runner.errors import ConfigError
from runner.generation.worker import gather
from runner.input import TOKENS, PrepareSpec
from runner.store import output, resume
from tests.conftest import write_jsonl


def make_stream(
    tmp_path, embedded_model_dir, rows, existing=None, chunk_rows=3, records=None, **batching
) -> stream.JobStream:
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    job = JobConfig(
        dataset=DatasetConfig(path=str(path), id_column="id"),
        model=ModelConfig(name_or_path=embedded_model_dir),
        generation=GenerationSettings(max_new_tokens=8),
        output=OutputConfig(dir=str(tmp_path / "out")),
    )
    for key, value in {"shard_size": 2, "sort_window": 4, **batching}.items():
        setattr(job.batching, key, value)
    spec = PrepareSpec(job.dataset, embedded_model_dir, job.model, 8, 8192, frozenset(output.BASE_COLUMNS | {TOKENS}))
    s = stream.JobStream(job, spec, "cfg", existing, use_ray=False, records=records)
    s.chunk_rows = chunk_rows
    return s


def rows_of(n, **extra):
    return [{"id": f"r{i}", "prompt": "word " * (1 + (i * 7) % 11), **extra} for i in range(n)]


def test_windows_are_sorted_and_planned_on_their_own_and_cover_every_row(tmp_path, embedded_model_dir):
    s = make_stream(tmp_path, embedded_model_dir, rows_of(10))
    windows = list(s.windows())
    assert len(windows) == 2  # chunks of 3 rows (3, 3, 3, 1) gathered into windows of at least 4 rows
    assert [len(w) for w in windows] == [3, 2]  # shards of 2 rows
    seen = []
    for tasks in windows:
        for task in tasks:
            rows = gather(task, s.carry_schema)
            lengths = [len(x) for x in rows.column(TOKENS).to_pylist()]
            assert lengths == sorted(lengths, reverse=True)  # longest first inside a shard
            seen += rows.column("id").to_pylist()
    assert sorted(seen) == sorted(f"r{i}" for i in range(10))
    assert [p.shard_id for p in s.shards] == list(range(len(s.shards))) and s.stats.rows == 10
    assert s.stats.windows == 2 and 0 < s.stats.padding_efficiency <= 1


def test_the_same_input_plans_the_same_files_and_edited_prompts_plan_others(tmp_path, embedded_model_dir):
    rows = rows_of(8)
    first = make_stream(tmp_path, embedded_model_dir, rows)
    list(first.windows())
    again = make_stream(tmp_path, embedded_model_dir, rows)
    list(again.windows())
    assert [p.name for p in first.shards] == [p.name for p in again.shards]
    # same ids, same token lengths, other text: the fingerprint sees the content
    edited = [dict(r, prompt=r["prompt"].replace("word", "bird")) if r["id"] == "r3" else r for r in rows]
    changed = make_stream(tmp_path, embedded_model_dir, edited)
    list(changed.windows())
    differ = [a.name for a, b in zip(first.shards, changed.shards) if a.name != b.name]
    assert len(differ) == 1


def test_committed_shards_are_skipped_and_changed_ones_refused(tmp_path, embedded_model_dir):
    rows = rows_of(8)
    first = make_stream(tmp_path, embedded_model_dir, rows)
    planned = [t for tasks in first.windows() for t in tasks]
    done = {planned[0].file_name: 1}
    existing = resume.Existing(done, {planned[0].shard_id: planned[0].file_name})
    resumed = make_stream(tmp_path, embedded_model_dir, rows, existing=existing)
    left = [t.file_name for tasks in resumed.windows() for t in tasks]
    assert sorted(left) == sorted(t.file_name for t in planned[1:])
    assert resumed.stats.committed_shards == 1
    edited = [dict(r, prompt=r["prompt"] + "!") for r in rows]
    with pytest.raises(ConfigError, match="for other input rows"):
        list(make_stream(tmp_path, embedded_model_dir, edited, existing=existing).windows())


@pytest.mark.parametrize(
    "bad,fragment",
    [
        ({"id": "r1", "prompt": "again"}, "ids must be unique, but these repeat: 'r1'"),
        ({"id": "x", "prompt": "   "}, "empty or blank prompt"),
        ({"id": "x", "prompt": "p", "new_column": 1}, "'new_column' first appear"),
    ],
)
def test_bad_rows_in_a_later_window_are_named(tmp_path, embedded_model_dir, bad, fragment):
    rows = rows_of(12) + [bad]  # row 12: in the third window, after two were planned
    s = make_stream(tmp_path, embedded_model_dir, rows)
    with pytest.raises(ConfigError, match=fragment):
        list(s.windows())


def test_a_column_of_nulls_then_lists_is_refused_before_a_worker_fails_on_it(tmp_path, embedded_model_dir):
    rows = [dict(r, tags=None) for r in rows_of(12)] + [{"id": "x", "prompt": "p", "tags": ["a", "b"]}]
    s = make_stream(tmp_path, embedded_model_dir, rows)
    with pytest.raises(ConfigError, match=r"column 'tags' holds list<item: string> values from row 12 .*text column"):
        list(s.windows())


def test_malformed_jsonl_names_file_and_line(tmp_path, embedded_model_dir):
    s = make_stream(tmp_path, embedded_model_dir, rows_of(5))
    path = tmp_path / "in.jsonl"
    path.write_text(path.read_text() + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"in.jsonl:7: not valid JSON"):
        list(s.windows())


def test_too_long_prompts_are_refused_or_cut_from_the_left_of_the_users_text(tmp_path, embedded_model_dir):
    from runner.input import load_tokenizer

    rows = [{"id": "short", "prompt": "short one"}, {"id": "long", "prompt": "word " * 9000}]  # context: 8192
    refuse = make_stream(tmp_path, embedded_model_dir, rows)
    with pytest.raises(ConfigError, match=r"1 prompts are longer than the model's context \(8192 tokens\).*'long'"):
        list(refuse.windows())
    cut = make_stream(tmp_path, embedded_model_dir, rows)
    cut.spec.dataset.too_long = "truncate_left"
    table = gather(next(t for tasks in cut.windows() for t in tasks), cut.carry_schema)
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert by_id["short"]["truncated_tokens"] == 0 and by_id["long"]["truncated_tokens"] > 0
    assert len(by_id["long"][TOKENS]) == 8192 - 8
    # the user's text is cut from its left; the chat template's system header and assistant turn stay whole
    short, long = by_id["short"][TOKENS], by_id["long"][TOKENS]
    head = len(short) - 2 - 6  # the short row: system header and user role, "short one", the assistant turn
    assert long[:head] == short[:head] and long[-6:] == short[-6:]
    tokenizer = load_tokenizer(embedded_model_dir, cut.job.model)
    assert set(tokenizer.decode(long[head:-6]).split()) == {"word"}  # what is left of the user's text
    assert cut.stats.truncated == 1
    # `prompt` is the text the kept tokens stand for, not the whole of the user's text
    prompt = by_id["long"]["prompt"]
    assert 8000 < prompt.count("word") < 9000 and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer(prompt, add_special_tokens=False).input_ids == long


def test_the_feed_hands_out_tasks_then_raises_what_planning_raised():
    def windows():
        yield ["t1", "t2"]
        raise ConfigError(["bad row in window 2"])

    feed = TaskFeed(windows(), ["t0"], max_queued=1)
    got = []
    with pytest.raises(ConfigError, match="bad row in window 2"):
        deadline = time.time() + 10
        while time.time() < deadline:
            task = feed.next()
            if task is not None:
                got.append(task)
            elif feed.exhausted:
                break
    assert got[0] == "t0" and not feed.finished  # an error never reads as the end of the input


def test_the_feed_ends_when_the_windows_do():
    feed = TaskFeed(iter([["a"], [], ["b", "c"]]), [], max_queued=1)
    got, deadline = [], time.time() + 10
    while not feed.exhausted and time.time() < deadline:
        task = feed.next()
        if task is not None:
            got.append(task)
    assert got == ["a", "b", "c"] and feed.finished


def test_a_rerun_skips_committed_windows_unprepared_and_plans_the_rest_as_before(
    tmp_path, embedded_model_dir, monkeypatch
):
    out = output.open_output_dir(str(tmp_path / "out"))
    rows = rows_of(13)  # chunks of 3 rows, windows of at least 4: (3+3), (3+3), (1)

    def records():
        return store.WindowRecords(out, "cfg", "rev-1")

    first = make_stream(tmp_path, embedded_model_dir, rows, records=records(), existing=resume.Existing({}, {}))
    planned = [list(tasks) for tasks in first.windows()]
    assert len(planned) == 3 and (tmp_path / "out" / "_windows" / "window-000002.rec").exists()
    committed = [t for tasks in planned[:2] for t in tasks]  # the first two windows were committed
    existing = resume.Existing({t.file_name: 1 for t in committed}, {t.shard_id: t.file_name for t in committed})
    prepared = []
    prepare = stream.ChunkPreparer.prepare
    monkeypatch.setattr(
        stream.ChunkPreparer, "prepare", lambda self, c: prepared.append(c.first_row) or prepare(self, c)
    )
    again = make_stream(tmp_path, embedded_model_dir, rows, records=records(), existing=existing)
    left = [list(tasks) for tasks in again.windows()]
    assert prepared == [12]  # only the last window's chunk was read into the preparer
    assert left[:2] == [[], []] and [t.file_name for t in left[2]] == [t.file_name for t in planned[2]]
    assert [p.name for p in again.shards] == [p.name for p in first.shards]
    for key in ("rows", "prompt_tokens", "padded_prompt_tokens", "batches", "shards", "outputs"):
        assert getattr(again.stats, key) == getattr(first.stats, key), key
    assert again.stats.skipped_windows == 2 and again.stats.committed_shards == len(committed)
    assert again.carry_schema == first.carry_schema
    # an edited row in a committed window: that window is prepared again, and its changed shard refused
    edited = [dict(r, prompt="bird " + r["prompt"]) if r["id"] == "r4" else r for r in rows]
    prepared.clear()
    with pytest.raises(ConfigError, match="holds shard"):
        list(make_stream(tmp_path, embedded_model_dir, edited, records=records(), existing=existing).windows())
    assert prepared[:2] == [0, 3]
    # another model revision's records are not used
    prepared.clear()
    other = make_stream(
        tmp_path, embedded_model_dir, rows, records=store.WindowRecords(out, "cfg", "rev-2"), existing=existing
    )
    list(other.windows())
    assert prepared == [0, 3, 6, 9, 12]


def test_an_id_of_a_skipped_window_repeated_later_is_still_refused(tmp_path, embedded_model_dir):
    out = output.open_output_dir(str(tmp_path / "out"))
    rows = rows_of(8)
    first = make_stream(
        tmp_path,
        embedded_model_dir,
        rows,
        records=store.WindowRecords(out, "cfg", "r"),
        existing=resume.Existing({}, {}),
    )
    planned = [list(tasks) for tasks in first.windows()]
    committed = planned[0]
    existing = resume.Existing({t.file_name: 1 for t in committed}, {t.shard_id: t.file_name for t in committed})
    repeated = rows + [{"id": "r1", "prompt": "again"}]
    again = make_stream(
        tmp_path, embedded_model_dir, repeated, records=store.WindowRecords(out, "cfg", "r"), existing=existing
    )
    with pytest.raises(ConfigError, match="ids must be unique"):
        list(again.windows())


def test_only_the_leading_committed_windows_are_skipped(tmp_path, embedded_model_dir, monkeypatch):
    """A window's shard and batch ids follow from the windows before it: once one is prepared, the rest are
    too (an edit there may change how many shards it plans), and the usual checks name what changed."""
    out = output.open_output_dir(str(tmp_path / "out"))
    rows = rows_of(13)
    prepared = []
    prepare = stream.ChunkPreparer.prepare
    monkeypatch.setattr(
        stream.ChunkPreparer, "prepare", lambda self, c: prepared.append(c.first_row) or prepare(self, c)
    )

    def run(rows, existing):
        s = make_stream(
            tmp_path, embedded_model_dir, rows, records=store.WindowRecords(out, "cfg", "r"), existing=existing
        )
        return [list(tasks) for tasks in s.windows()], s

    planned, first = run(rows, resume.Existing({}, {}))
    second = planned[1]  # only the second window was committed
    existing = resume.Existing({t.file_name: 1 for t in second}, {t.shard_id: t.file_name for t in second})
    prepared.clear()
    left, again = run(rows, existing)
    assert prepared == [0, 3, 6, 9, 12] and again.stats.skipped_windows == 0  # its digest matches, yet prepared
    assert [p.name for p in again.shards] == [p.name for p in first.shards] and left[1] == []
    edited = [dict(r, id="r7") if r["id"] == "r2" else r for r in rows]  # r7 is a row of the second window
    with pytest.raises(ConfigError, match="ids must be unique, but these repeat: 'r7'"):
        run(edited, existing)
