"""Structured output: what a job or a row constrains its completions to, checked, as a grammar.

A constraint is a JSON schema (`generation.json_schema`, inline or a path to a `.json` file, or
a row's own from `dataset.schema_column`), a regular expression (`generation.regex`) or a list of
strings (`generation.choice`). Each becomes an llguidance grammar (`grammar`), which the engine
matches token by token (`runner.generation.structured`). Everything here is checked on the driver,
before any model loads, with no tokenizer: a schema that does not compile is refused with its key
or its rows' ids. No torch.

JSON is generated compact but readable: `", "` between items, `": "` after keys, no other
whitespace (flexible whitespace lets a small model pad a document with newlines until its
`max_new_tokens` run out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import ConfigError

KINDS = ("json_schema", "regex", "choice")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """One constraint: its kind (one of KINDS) and its value as canonical JSON text (what rows record)."""

    kind: str
    value: str  # JSON text: the schema (its keys in their order), the pattern as a string, the list of choices

    @property
    def text(self) -> str:
        """What the `structured_output` column holds: {"<kind>": <value>}."""
        return f'{{"{self.kind}": {self.value}}}'

    def grammar(self) -> str:
        """The llguidance grammar of this constraint (a JSON string llguidance's matcher compiles)."""
        from llguidance import LLMatcher

        value = json.loads(self.value)
        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(value, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(value)
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))

    def problem(self) -> str | None:
        """Why llguidance cannot compile it (None: it compiles)."""
        from llguidance import LLMatcher

        try:
            message = LLMatcher.validate_grammar(self.grammar())
        except (ValueError, TypeError) as e:
            message = str(e)
        if not message:
            return None
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        return " ".join(lines[:1] + [line for line in lines[1:] if line.startswith("error:")])


def schema_constraint(schema: Any) -> Constraint:
    """A JSON schema (an object) as a constraint. Raises ValueError if it is not an object."""
    if isinstance(schema, bool) or not isinstance(schema, dict):
        raise ValueError(f"a JSON schema is an object ({{...}}), not {type(schema).__name__}")
    return Constraint("json_schema", json.dumps(schema, ensure_ascii=False))  # its keys' order: the output's


def job_constraint(gen: Any) -> Constraint | None:
    """The job's constraint from its generation settings (None: completions are free).

    `gen.json_schema` is a schema already read (`read_schema`), as `validate` leaves it.
    """
    if gen.json_schema is not None:
        return schema_constraint(gen.json_schema)
    if gen.regex is not None:
        return Constraint("regex", json.dumps(gen.regex))
    if gen.choice is not None:
        return Constraint("choice", json.dumps(list(gen.choice), ensure_ascii=False))
    return None


def read_schema(value: Any) -> Any:
    """`generation.json_schema` as a schema: an object as it is, JSON text parsed, or a path's file read.

    Raises:
        ConfigError: the file is missing or is not JSON, or the text is not JSON.
    """
    if not isinstance(value, str):
        return value
    text, where = value, "generation.json_schema"
    if not value.lstrip().startswith(("{", "[")):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(
                [
                    f"generation.json_schema={value!r}: no such file; give a path to a .json file, or the schema "
                    "inline ('generation.json_schema={type: object, properties: {...}}')"
                ]
            )
        text, where = path.read_text(encoding="utf-8"), f"generation.json_schema={value!r}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError([f"{where}: not JSON ({e})"]) from None


def problems(gen: Any) -> list[str]:
    """What is wrong with the job's constraint keys (json_schema already read, see `read_schema`)."""
    given = [k for k in KINDS if getattr(gen, k) is not None]
    if len(given) > 1:
        return [f"{' and '.join('generation.' + k for k in given)}: give one constraint, not several"]
    if not given:
        return []
    key = given[0]
    if key == "choice" and (
        not isinstance(gen.choice, (list, tuple))
        or not gen.choice
        or not all(isinstance(c, str) and c for c in gen.choice)
    ):
        return [f"generation.choice={gen.choice!r}: must be a non-empty list of non-empty strings, e.g. [yes, no]"]
    if key == "regex" and (not isinstance(gen.regex, str) or not gen.regex):
        return [f"generation.regex={gen.regex!r}: must be a non-empty regular expression"]
    try:
        constraint = job_constraint(gen)
    except ValueError as e:
        return [f"generation.json_schema: {e}"]
    problem = constraint.problem() if constraint is not None else None
    if problem:
        return [f"generation.{key}: llguidance cannot compile it: {problem}"]
    return []


def row_schema(value: Any) -> Constraint | None:
    """A row's own schema from `dataset.schema_column`: JSON text or an object (None, "": the job's).

    An object read from Parquet or JSON Lines comes as a struct holding every row's keys; the keys a row
    does not have come back null and are dropped, so a schema's explicit nulls need the text form.
    Raises ValueError naming what is wrong.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e})") from None
    else:
        value = _without_nulls(value)
    return schema_constraint(value)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
