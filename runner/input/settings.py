"""Per-row generation settings: each row's own values of the settings a job lets rows choose, checked.

They come from input columns (`dataset.settings_columns` maps a setting to the column holding it)
or from an OpenAI Batch line's body (`runner.input.openai_batch`). A null value is the job's
setting. Every value is checked here, before any model loads, and a bad one is named by its row's
id and where it came from. The checked values travel with the prepared rows as one struct column
(`SETTINGS`); the worker turns each into that row's `Decoding` (`runner.generation.row_settings`).
No torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from runner.config import GenerationSettings, default_samples
from runner.errors import SHOW, listing

SETTINGS = "__settings"  # the prepared rows' column of their own settings (null fields: the job's)
SETTING_TYPES = {
    "max_new_tokens": pa.int32(),
    "temperature": pa.float64(),
    "top_p": pa.float64(),
    "top_k": pa.int32(),
    "seed": pa.int64(),
    "stop_strings": pa.list_(pa.string()),
    "num_return_sequences": pa.int32(),
    "json_schema": pa.string(),  # its own schema (runner.constraints), as canonical JSON text
}
SETTINGS_TYPE = pa.struct([pa.field(k, t) for k, t in SETTING_TYPES.items()])
MAX_SEED = 2**63 - 1


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _stops(value: Any) -> bool:
    return (
        isinstance(value, str)
        and value != ""
        or (isinstance(value, list) and all(isinstance(s, str) and s for s in value))
    )


def _checks(gen: GenerationSettings) -> dict[str, tuple[Callable[[Any], bool], str]]:
    """Per setting: whether a value is good, and what a good one is (with the fix, where there is one)."""
    return {
        "max_new_tokens": (
            lambda v: _integer(v) and 1 <= v <= gen.max_new_tokens,
            f"an integer from 1 to generation.max_new_tokens={gen.max_new_tokens} (the most any row may ask for: "
            "raise it to let rows ask for more)",
        ),
        "temperature": (lambda v: _number(v) and v >= 0, "a number >= 0 (0: greedy decoding for this row)"),
        "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "top_k": (lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: no top-k)"),
        "seed": (lambda v: _integer(v) and 0 <= v <= MAX_SEED, "an integer >= 0"),
        "stop_strings": (_stops, "a non-empty string or a list of them ([]: none)"),
        "num_return_sequences": (
            lambda v: _integer(v) and 1 <= v <= gen.num_return_sequences,
            f"an integer from 1 to generation.num_return_sequences={gen.num_return_sequences} (the most any row "
            "may ask for: raise it, with generation.do_sample=true, to let rows ask for more)",
        ),
        "json_schema": (lambda v: isinstance(v, str), "a JSON schema"),  # read and compiled by `row_schemas`
    }


def from_columns(table: pa.Table, mapping: dict[str, str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each row's values of the mapped settings, from `dataset.settings_columns` (setting -> column).

    Text is read as the setting's type (CSV columns are text): `"0.7"` as a number, `""` as null; a
    stop string as it is.
    Returns the values and the problems (a mapped column that is not there).
    """
    missing = [f"dataset.settings_columns.{k}={c!r}" for k, c in mapping.items() if c not in table.column_names]
    if missing:
        return [], [f"{m}: no such column; the columns are {', '.join(table.column_names)}" for m in missing]
    columns = {k: [_from_text(k, v) for v in table.column(c).to_pylist()] for k, c in mapping.items()}
    return [dict(zip(columns, values)) for values in zip(*columns.values())] if columns else [], []


def row_schemas(values: list[Any], ids: list[str], source: str) -> tuple[list[str | None], list[str]]:
    """Each row's own JSON schema (`runner.constraints.row_schema`) as canonical text (None: the job's), and
    the problems: rows whose value is not a schema llguidance compiles, by id, with the first one's reason.

    `source`: where the values come from, for messages. Each distinct schema is compiled once.
    """
    from runner.constraints import row_schema

    checked: dict[str, str | None] = {}  # canonical text -> why it does not compile (None: it does)
    out: list[str | None] = []
    bad: list[str] = []
    reason = ""
    for row_id, value in zip(ids, values):
        try:
            constraint = row_schema(value)
        except ValueError as e:
            constraint, problem = None, str(e)
        else:
            problem = None
            if constraint is not None:
                if constraint.value not in checked:
                    checked[constraint.value] = constraint.problem()
                problem = checked[constraint.value]
        if problem:
            bad.append(repr(row_id))
            reason = reason or f"{row_id!r}: {problem}"
        out.append(constraint.value if constraint is not None and not problem else None)
    if not bad:
        return out, []
    return out, [
        f"{source}: {len(bad)} rows hold a value that is not a JSON schema llguidance compiles, by id: "
        f"{listing(bad, SHOW)} (the first: {reason}); give each row a JSON schema object, as JSON text or an "
        "object, or null for the job's"
    ]


def _from_text(setting: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not value or not text and setting != "stop_strings":  # a stop string may be whitespace: "\n"
        return None
    if setting == "stop_strings":
        return value
    try:
        return int(text) if SETTING_TYPES[setting] in (pa.int32(), pa.int64()) else float(text)
    except ValueError:
        return value  # refused by the check, with the text shown


def check_settings(
    values: list[dict[str, Any]], ids: list[str], gen: GenerationSettings, source: Callable[[str], str]
) -> tuple[pa.Array, list[str]]:
    """Each row's settings as a `SETTINGS_TYPE` array, and the problems found (none: the array is good).

    Args:
        values: per row, setting name -> its value (None or absent: the job's).
        source: a setting's name -> where its values come from, for messages (a column, a body key).
    """
    checks = _checks(gen)
    bad: dict[str, list[str]] = {}
    greedy_many: list[str] = []
    rows = []
    for row_id, row in zip(ids, values):
        kept: dict[str, Any] = {}
        for name, value in row.items():
            if value is None:  # the job's ([] for stop_strings: none for this row)
                continue
            good, _ = checks[name]
            if not good(value):
                bad.setdefault(name, []).append(f"{row_id!r} ({value!r})")
                continue
            kept[name] = [value] if name == "stop_strings" and isinstance(value, str) else value
        temperature = kept.get("temperature")
        sampled = gen.do_sample if temperature is None else temperature > 0
        if not sampled and kept.get("num_return_sequences", default_samples(gen)) > 1:
            greedy_many.append(repr(row_id))
        rows.append(kept)  # {}: every setting the job's
    problems = [
        f"{source(name)}: {len(rows_)} rows hold a value that is not {checks[name][1]}, by id: {listing(rows_, SHOW)}"
        for name, rows_ in bad.items()
    ]
    if greedy_many:
        problems.append(
            f"{len(greedy_many)} rows ask for several samples with greedy decoding (temperature 0, or the job's "
            f"do_sample=false), which returns the same text every time, by id: {listing(greedy_many, SHOW)}; give "
            "them a temperature > 0 or one sample"
        )
    return pa.array(rows, type=SETTINGS_TYPE), problems


def samples_per_row(settings: pa.Array | None, rows: int, gen: GenerationSettings) -> Any:
    """Sequences each row asks for (its num_return_sequences, or the job's), as int32 numpy values."""
    import numpy as np

    if settings is None:
        return np.full(rows, default_samples(gen), dtype=np.int32)
    own = settings.field("num_return_sequences").fill_null(default_samples(gen))
    return own.to_numpy(zero_copy_only=False).astype(np.int32)
