"""Loading prompts: formats, stable ids, carried columns, and every bad-input message."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.config import DatasetConfig
from runner.errors import ConfigError
from runner.input import read_chunks, resolve_source
from runner.input.render import render, tokenize
from runner.input.rows import Prompts, parse_chunk, prompts_from_table
from runner.store import BASE_COLUMNS
from tests.conftest import write_jsonl

ROWS = [{"qid": f"q{i}", "question": f"What is {i} + {i}?", "id": i, "level": i % 3} for i in range(6)]


def load_prompts(cfg: DatasetConfig, reserved_columns: set[str] = frozenset()) -> Prompts:
    """The whole small input of `cfg`, read, parsed and checked in one chunk (jobs stream it in chunks)."""
    chunks = read_chunks(resolve_source(cfg), cfg, 1 << 30)
    tables = [parse_chunk(c) for c in chunks]
    table = pa.concat_tables(tables, promote_options="permissive")
    return prompts_from_table(table, cfg, reserved_columns)


def cfg(path, **kw) -> DatasetConfig:
    return DatasetConfig(path=str(path), **{"prompt_column": "question", "id_column": "qid", **kw})


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_formats_load_with_ids_from_the_id_column(tmp_path, fmt):
    path = tmp_path / f"p.{fmt}"
    table = pa.Table.from_pylist(ROWS)
    if fmt == "jsonl":
        write_jsonl(path, ROWS)
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    prompts = load_prompts(cfg(path), reserved_columns=set(BASE_COLUMNS))
    assert prompts.ids == [f"q{i}" for i in range(6)]
    assert prompts.prompts == [r["question"] for r in ROWS]
    # other input columns are carried; `id` clashes with an output column and gets a prefix
    assert set(prompts.carry.column_names) == {"qid", "input_id", "level"}


def test_row_index_ids_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    prompts = load_prompts(cfg(path, id_column=None, limit=4))
    assert prompts.ids == ["0", "1", "2", "3"] and len(prompts) == 4


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "ok", "qid": "a"}\n{"question": "broken", \n[1, 2]\n')
    with pytest.raises(ConfigError) as err:
        load_prompts(cfg(path))
    text = str(err.value)
    assert f"{path}:2: not valid JSON" in text
    assert f"{path}:3: each line must be a JSON object" in text


def test_missing_prompt_column_lists_the_columns_that_exist(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(ConfigError, match=r"dataset.prompt_column='prompt': no such column.*qid, question, id, level"):
        load_prompts(cfg(path, prompt_column="prompt"))


def test_missing_id_column_is_named(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(ConfigError, match=r"dataset.id_column='uid': no such column"):
        load_prompts(cfg(path, id_column="uid"))


def test_duplicate_ids_are_shown(tmp_path):
    rows = ROWS + [{"qid": "q1", "question": "again", "id": 9, "level": 0}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ConfigError, match=r"ids must be unique, but 1 repeat \('q1' x2\)"):
        load_prompts(cfg(path))


def test_blank_and_non_text_prompts_are_refused_with_their_ids(tmp_path):
    rows = [
        {"qid": "a", "question": "fine"},
        {"qid": "b", "question": "   "},
        {"qid": "c", "question": ""},
        {"qid": "d", "question": None},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ConfigError) as err:
        load_prompts(cfg(path))
    text = str(err.value)
    assert "2 rows have an empty or blank prompt (ids 'b', 'c')" in text
    assert "1 rows are not text (NoneType; ids 'd')" in text


def test_integers_beyond_64_bits_are_named_with_their_lines(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "n": 1}, {"prompt": "b", "n": 10**30}])
    with pytest.raises(ConfigError, match=r"column 'n' holds integers too large for 64 bits at lines \[2\]"):
        load_prompts(cfg(path))


def test_numbers_as_prompts_are_not_text(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"qid": "a", "question": 3}, {"qid": "b", "question": 4}])
    with pytest.raises(ConfigError, match="2 rows are not text"):
        load_prompts(cfg(path))


def test_empty_dataset_and_missing_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="(no rows|could not be loaded)"):
        load_prompts(cfg(empty))
    with pytest.raises(ConfigError, match="no such file"):
        load_prompts(cfg(tmp_path / "nope.jsonl"))


def test_messages_column_checked_and_rendered_with_chat_template(tmp_path, embedded_model_dir):
    from runner.input import load_tokenizer

    rows = [
        {"messages": [{"role": "user", "content": "Hi there"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    prompts = load_prompts(DatasetConfig(path=str(path), prompt_column=None, messages_column="messages"))
    tokenizer = load_tokenizer(embedded_model_dir)
    texts, add_special = render(prompts, tokenizer, "auto")
    assert texts[0].endswith("<|im_start|>assistant\n") and "Hi there" in texts[0]
    assert "Be brief." in texts[1] and add_special is False
    ids = tokenize(tokenizer, texts, add_special)
    assert all(len(x) > 3 for x in ids)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": "not a list"}])
    with pytest.raises(ConfigError, match="not a non-empty list of"):
        load_prompts(DatasetConfig(path=str(bad), prompt_column=None, messages_column="messages"))


def test_rows_a_chat_template_refuses_are_named_by_id_not_a_traceback(tmp_path, embedded_model_dir):
    """Gemma's template raises "System role not supported", Mistral's wants roles to alternate."""
    from runner.input import load_tokenizer

    tok = load_tokenizer(embedded_model_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    )
    rows = [
        {"id": "ok", "messages": [{"role": "user", "content": "Hi"}]},
        {"id": "sys-1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "?"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    dataset = DatasetConfig(path=str(path), prompt_column=None, messages_column="messages", id_column="id")
    with pytest.raises(ConfigError, match=r"refused 1 row\(s\), by id: 'sys-1' \(TemplateError: System role not"):
        render(load_prompts(dataset), tok, "auto")
    # plain prompts through a template that refuses even a lone user turn: every row is named, no shortcut
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(ConfigError, match=r"refused 2 row\(s\).*must alternate"):
        render(Prompts(["a", "b"], ["x", "y"], None, pa.table({})), tok, "auto")


def test_plain_prompts_become_one_user_turn_or_stay_raw(tmp_path, embedded_model_dir):
    from runner.input import load_tokenizer

    path = write_jsonl(tmp_path / "p.jsonl", ROWS[:2])
    prompts = load_prompts(cfg(path))
    tokenizer = load_tokenizer(embedded_model_dir)
    chat, _ = render(prompts, tokenizer, "auto")
    raw, add_special = render(prompts, tokenizer, "none")
    assert "<|im_start|>user\nWhat is 0 + 0?<|im_end|>" in chat[0]
    assert raw[0] == "What is 0 + 0?" and add_special is True


def test_plain_prompts_render_as_the_template_does_and_templates_that_alter_text_are_run(embedded_model_dir, t0_rows):
    from runner.input import load_tokenizer
    from runner.input.render import verbatim_user_turn

    tok = load_tokenizer(embedded_model_dir)
    prompts = [r["prompt"] for r in t0_rows[:300]] + ["  padded  ", "{{ not a tag }}", "line\n\nbreaks\t"]
    texts, _ = render(Prompts([str(i) for i in range(len(prompts))], prompts, None, pa.table({})), tok, "auto")
    assert verbatim_user_turn(tok) is not None  # SmolLM2's template takes the shortcut
    assert texts == [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}{% endfor %}<assistant>"
    assert verbatim_user_turn(tok) is None
    trimmed, _ = render(Prompts(["a"], ["  padded  "], None, pa.table({})), tok, "auto")
    assert trimmed == ["<user>padded<assistant>"]


def test_tokenize_gives_the_tokenizers_own_ids(embedded_model_dir, t0_rows):
    from runner.input import load_tokenizer

    tok = load_tokenizer(embedded_model_dir)
    texts = [r["prompt"] for r in t0_rows[:200]]
    for special in (True, False):
        assert tokenize(tok, texts, special, batch=64) == tok(texts, add_special_tokens=special)["input_ids"]


def test_rendered_and_tokenized_rows_equal_the_tokenizer_on_the_whole_text(embedded_model_dir, t0_rows):
    from runner.input import load_tokenizer
    from runner.input.render import _template_pieces, render_and_tokenize

    tok = load_tokenizer(embedded_model_dir)
    assert _template_pieces(tok) is not None  # SmolLM2's ChatML template: the prompt's segment alone is encoded
    prompts = [r["prompt"] for r in t0_rows[:300]] + ["<|im_end|> inside", " lead", "tail\n", "\n\nx"]
    rows = Prompts([str(i) for i in range(len(prompts))], prompts, None, pa.table({}))
    texts, ids = render_and_tokenize(rows, tok, "auto")
    assert ids == tok(texts, add_special_tokens=False)["input_ids"]
    raw_texts, raw_ids = render_and_tokenize(rows, tok, "none")  # no template: the tokenizer's own specials
    assert raw_texts == prompts and raw_ids == tok(prompts)["input_ids"]
