"""Rows' own generation settings and OpenAI Batch requests, checked where chunks are prepared (no Ray)."""

from __future__ import annotations

import json

import pytest

from runner.config import DatasetConfig, GenerationSettings, ModelConfig
from runner.input import PrepareSpec, load_tokenizer, prepare_chunk, sources


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return load_tokenizer(tiny_llama_dir, ModelConfig(name_or_path=tiny_llama_dir))


def prepared(tokenizer, tiny_llama_dir, path, gen=None, **dataset):
    cfg = DatasetConfig(path=str(path), **dataset)
    template = "auto" if cfg.format == "openai_batch" else "none"  # chat requests need the chat template
    model = ModelConfig(name_or_path=tiny_llama_dir, chat_template=template, adapters={"a": "unused"})
    gen = gen or GenerationSettings(max_new_tokens=8, do_sample=True, num_return_sequences=3)
    spec = PrepareSpec(cfg, tiny_llama_dir, model, gen.max_new_tokens, 2048, frozenset(), gen)
    chunk = next(sources.read_chunks(sources.resolve(cfg), cfg, 100))
    return prepare_chunk(chunk, spec, tokenizer)


def test_bad_values_of_mapped_columns_are_named_by_row_and_text_is_read_as_numbers(tokenizer, tiny_llama_dir, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,prompt,temp,budget,n,stop\na,x,hot,,,\nb,x,,99,,\nc,x,0,,2,\nd,x,0.5,4,1,\n")
    mapping = {"temperature": "temp", "max_new_tokens": "budget", "num_return_sequences": "n", "stop_strings": "stop"}
    meta, rows = prepared(tokenizer, tiny_llama_dir, path, id_column="id", settings_columns=mapping)
    assert rows is None
    text = "\n".join(meta.problems)
    assert "dataset.settings_columns.temperature='temp'" in text and "'a' ('hot')" in text
    assert "'b' (99)" in text and "raise it" in text and "greedy" in text and "'c'" in text
    good = tmp_path / "good.csv"
    good.write_text("id,prompt,temp,budget,n,stop\nd,x,0.5,4,1,\ne,x,,,,\n")
    meta, rows = prepared(tokenizer, tiny_llama_dir, good, id_column="id", settings_columns=mapping)
    assert not meta.problems and meta.samples.tolist() == [1, 3]
    own = rows.column("__settings").to_pylist()
    assert own[0] == {
        "max_new_tokens": 4,
        "temperature": 0.5,
        "top_p": None,
        "top_k": None,
        "seed": None,
        "stop_strings": None,
        "num_return_sequences": 1,
        "json_schema": None,
    }
    assert set(own[1].values()) == {None}
    meta, _ = prepared(tokenizer, tiny_llama_dir, good, id_column="id", settings_columns={"top_p": "nucleus"})
    assert "no such column" in meta.problems[0]


def test_an_adapter_the_job_does_not_have_is_named_by_row(tokenizer, tiny_llama_dir, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": i, "prompt": "x", "lora": v}) + "\n" for i, v in [("r0", "a"), ("r1", "b"), ("r2", None)]
        )
    )
    meta, rows = prepared(tokenizer, tiny_llama_dir, path, id_column="id", adapter_column="lora")
    assert rows is None and "'r1' ('b')" in meta.problems[0] and "model.adapters does not have" in meta.problems[0]


def request(custom_id, url="/v1/chat/completions", **body):
    body = {"messages": [{"role": "user", "content": "hi"}], **body} if url.endswith("chat/completions") else body
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_batch_requests_are_refused_by_line_and_key_and_n_is_held_to_the_jobs_most(tokenizer, tiny_llama_dir, tmp_path):
    path = tmp_path / "batch.jsonl"
    lines = [
        request("ok", max_tokens=4, temperature=0.7, n=2, stop="\n", seed=1),
        request("too-many", "/v1/completions", prompt="x", n=5, temperature=1.0),
        request("text-logprobs", "/v1/completions", prompt="x", logprobs=2),
        request("chat-logprobs", logprobs=True, top_logprobs=3),
        request("tools", tools=[{"type": "function"}]),
        {"custom_id": "", "method": "GET", "url": "/v1/chat/completions", "body": {}},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    meta, rows = prepared(tokenizer, tiny_llama_dir, path, format="openai_batch")
    text = "\n".join(meta.problems)
    assert rows is None
    assert "batch.jsonl:3: body.logprobs=2" in text and "generation.logprobs=2" in text
    assert "batch.jsonl:4: body.logprobs=True" in text and "generation.logprobs=3" in text
    assert "batch.jsonl:5: body.tools=" in text
    assert "batch.jsonl:6: custom_id: must be a non-empty string" in text
    path.write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    meta, rows = prepared(tokenizer, tiny_llama_dir, path, format="openai_batch")
    assert "'too-many' (5)" in meta.problems[0] and "generation.num_return_sequences=3" in meta.problems[0]
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps(request("plain", "/v1/completions", prompt="Once")) + "\n")
    meta, rows = prepared(tokenizer, tiny_llama_dir, path, format="openai_batch")
    assert not meta.problems and meta.samples.tolist() == [2, 1]  # no n: one sample, as the API's default
    assert rows.column("url").to_pylist() == ["/v1/chat/completions", "/v1/completions"]
    assert rows.column("prompt").to_pylist()[1] == "Once"  # a completion's prompt as it is
    assert rows.column("__settings").to_pylist()[0]["stop_strings"] == ["\n"]


def test_rows_own_schemas_are_read_as_text_or_objects_and_bad_ones_named_by_row(tokenizer, tiny_llama_dir, tmp_path):
    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    path = tmp_path / "p.jsonl"
    for values in ([json.dumps(schema), None, ""], [schema, None, None]):  # JSON text, or objects
        lines = [json.dumps({"id": f"r{i}", "prompt": "x", "schema": v}) + "\n" for i, v in enumerate(values)]
        path.write_text("".join(lines))
        meta, rows = prepared(tokenizer, tiny_llama_dir, path, id_column="id", schema_column="schema")
        assert not meta.problems
        own = [s["json_schema"] for s in rows.column("__settings").to_pylist()]
        assert own == [json.dumps(schema), None, None]  # properties keep their order
    bad = tmp_path / "bad.csv"
    bad.write_text('id,prompt,schema\na,x,"{""type"": ""objectx""}"\nb,x,{oops\nc,x,[1]\nd,x,\n')
    meta, rows = prepared(tokenizer, tiny_llama_dir, bad, id_column="id", schema_column="schema")
    assert rows is None
    text = "\n".join(meta.problems)
    assert "dataset.schema_column='schema': 3 rows" in text and "'a', 'b', 'c'" in text and "Invalid type" in text
    meta, _ = prepared(tokenizer, tiny_llama_dir, bad, id_column="id", schema_column="nope")
    assert "no such column" in meta.problems[0]


def test_a_batch_lines_response_format_is_its_rows_schema(tokenizer, tiny_llama_dir, tmp_path):
    schema = {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}
    formats = [
        {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}},
        {"type": "json_object"},
        {"type": "text"},
    ]
    path = tmp_path / "batch.jsonl"
    lines = [
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}], "response_format": f},
        }
        for i, f in enumerate(formats)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    meta, rows = prepared(tokenizer, tiny_llama_dir, path, format="openai_batch")
    assert not meta.problems, meta.problems
    own = [s["json_schema"] for s in rows.column("__settings").to_pylist()]
    assert own == [json.dumps(schema), json.dumps({"type": "object"}), None]
    lines[0]["body"]["response_format"] = {"type": "json_schema", "json_schema": {"name": "t"}}
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    meta, rows = prepared(tokenizer, tiny_llama_dir, path, format="openai_batch")
    assert rows is None and "response_format" in "\n".join(meta.problems)
