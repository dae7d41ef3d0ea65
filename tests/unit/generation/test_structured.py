"""Constrained decoding on a tiny random Llama: every completion that stops matches its constraint."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from runner import constraints
from runner.config import GenerationSettings
from runner.errors import ConfigError
from runner.generation.sampling import Decoding
from runner.generation.sequences import Row
from runner.generation.structured import unpack
from tests.unit.generation.test_engine import engine, rows_of, tiny  # noqa: F401 (tiny: the fixture)

CHOICES = ("positive", "negative", "neutral, or mixed")
EOS = (2,)  # the SmolLM2 tokenizer's <|im_end|>, which the tiny model shares


def test_unpacking_llguidance_bitmasks():
    import torch

    mask = torch.tensor([[0b101, -1], [0, -(1 << 31)]], dtype=torch.int32)
    allowed = unpack(mask, 70)  # a model's vocabulary wider than the tokenizer's 64: the rest is not allowed
    assert allowed.shape == (2, 70)
    assert allowed[0].nonzero().flatten().tolist() == [0, 2, *range(32, 64)]
    assert allowed[1].nonzero().flatten().tolist() == [63]
    assert unpack(mask, 40).shape == (2, 40)


def constraint(kind: str, value) -> constraints.Constraint:
    return constraints.job_constraint(GenerationSettings(**{kind: value}))


@pytest.mark.parametrize(
    "kind,value,check",
    [
        ("regex", r"[A-Z][a-z]{2,5} [0-9]{3}", lambda t: re.fullmatch(r"[A-Z][a-z]{2,5} [0-9]{3}", t)),
        ("choice", list(CHOICES), lambda t: t in CHOICES),
        (
            "json_schema",
            {
                "type": "object",
                "properties": {
                    "label": {"enum": ["yes", "no"]},
                    "score": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["label", "score"],
                "additionalProperties": False,
            },
            lambda t: set(json.loads(t)) == {"label", "score"} and json.loads(t)["label"] in ("yes", "no"),
        ),
    ],
)
def test_every_stopped_completion_matches_its_constraint_greedy_and_sampled(tiny, kind, value, check):  # noqa: F811
    model, tokenizer = tiny
    c = constraint(kind, value)
    for sampled in ({}, {"do_sample": True, "temperature": 1.0, "samples": 3}):
        constrained = engine(tiny, max_new_tokens=40, eos=EOS, constraint=c, **sampled)
        found = constrained.generate_all(rows_of(tokenizer, [3, 9, 17]))
        assert len(found) == 3 * sampled.get("samples", 1)
        for f in found:
            assert f.result.finish_reason == "stop", f.result
            assert check(f.result.completion), f.result.completion


def test_constrained_and_free_rows_decode_together_each_as_alone(tiny):  # noqa: F811
    """fp32, exact: a free row beside constrained ones is what it is alone, and each constrained row too."""
    model, tokenizer = tiny
    c = constraint("regex", "[0-9]{4}")
    free = engine(tiny, max_new_tokens=6, eos=EOS)
    d = dataclasses.replace(free.decoding, constraint=c)
    rows = rows_of(tokenizer, [4, 11, 7])
    mixed = [Row(r.key, r.row_id, r.input_ids, decoding=d if r.key != 1 else None) for r in rows]
    together = free.generate_all(mixed)
    alone_free = engine(tiny, max_new_tokens=6, eos=EOS).generate_all([rows[1]])[0].result
    assert together[1].result.tokens == alone_free.tokens
    for i in (0, 2):
        alone = engine(tiny, max_new_tokens=6, eos=EOS, constraint=c).generate_all([rows[i]])[0].result
        assert together[i].result.tokens == alone.tokens
        assert re.fullmatch("[0-9]{4}", together[i].result.completion)


def test_a_grammar_the_tokenizer_cannot_match_fails_its_row_alone(tiny):  # noqa: F811
    model, tokenizer = tiny
    bad = constraints.Constraint("regex", json.dumps("[0-9]{3"))  # the driver refuses it; here it reached a worker
    free = engine(tiny, max_new_tokens=4, eos=EOS)
    rows = rows_of(tokenizer, [5, 6])
    d = dataclasses.replace(free.decoding, constraint=bad)
    found = free.generate_all([Row(0, "a", rows[0].input_ids, decoding=d), rows[1]])
    assert found[0].result.finish_reason == "error" and "structured output" in found[0].result.error
    assert found[1].result.finish_reason == "length"


def test_constraint_keys_are_checked_and_read(tmp_path):
    gen = GenerationSettings
    assert constraints.problems(gen(regex="a", choice=["b"])) == [
        "generation.regex and generation.choice: give one constraint, not several"
    ]
    assert "non-empty list" in constraints.problems(gen(choice=[]))[0]
    assert "unclosed counted repetition" in constraints.problems(gen(regex="[0-9]{3"))[0]
    assert "cannot compile" in constraints.problems(gen(json_schema={"type": "objectx"}))[0]
    path = tmp_path / "s.json"
    path.write_text('{"type": "object"}')
    assert constraints.read_schema(str(path)) == {"type": "object"}
    assert constraints.read_schema('{"type": "string"}') == {"type": "string"}
    with pytest.raises(ConfigError, match="no such file"):
        constraints.read_schema(str(tmp_path / "missing.json"))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        constraints.read_schema(str(path))
    a = constraints.schema_constraint({"b": 1, "a": {"d": 2, "c": 3}})
    assert a == constraints.row_schema('{"b": 1,\n "a": {"d": 2, "c": 3}}')  # one text, whatever the spacing
    assert a != constraints.row_schema('{"a": {"d": 2, "c": 3}, "b": 1}')  # properties are written in their order
    assert constraints.row_schema({"type": "object", "enum": None}) == constraints.row_schema('{"type": "object"}')
    assert constraints.row_schema("") is None and constraints.row_schema(None) is None
    with pytest.raises(ValueError, match="not JSON"):
        constraints.row_schema("{")
    assert a.text == '{"json_schema": {"b": 1, "a": {"d": 2, "c": 3}}}'


def test_a_rows_own_schema_becomes_its_decodings_constraint_over_the_jobs():
    from runner.generation.row_settings import RowDecodings

    job = Decoding(max_new_tokens=2, eos_ids=frozenset({2}), pad_id=0, constraint=constraint("choice", ["a"]))
    made = RowDecodings(job, job)
    schema = json.dumps({"type": "object"})
    own = made.of({"json_schema": schema})
    assert own.constraint == constraints.Constraint("json_schema", schema) and own is made.of({"json_schema": schema})
    assert made.of({"json_schema": None}) is None  # the job's constraint


def test_stop_strings_do_not_cut_a_constrained_completion(tiny):  # noqa: F811
    model, tokenizer = tiny
    c = constraint("choice", ["one, two", "three, four"])
    rows = rows_of(tokenizer, [6, 13])
    found = engine(tiny, max_new_tokens=12, eos=EOS, constraint=c, stop_strings=(",",)).generate_all(rows)
    assert {f.result.completion for f in found} <= {"one, two", "three, four"}
    assert all(f.result.finish_reason == "stop" for f in found)
