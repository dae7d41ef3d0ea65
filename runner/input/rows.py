"""Parse a chunk's rows, give every row a stable id, check its prompt or chat messages.

Checking needs no model: every problem with the input is found and reported before
anything heavy starts. Rendering the text the tokenizer sees is `runner.input.render`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from runner.config import DatasetConfig
from runner.errors import SHOW, ConfigError, listing
from runner.secrets import redact


@dataclass
class Prompts:
    """The loaded input: ids, the source of the prompt, and the columns carried to the output."""

    ids: list[str]
    prompts: list[str] | None  # plain prompt column values
    messages: list[list[dict[str, str]]] | None  # chat messages column values
    carry: pa.Table  # input columns other than the prompt, named as they appear in the output

    def __len__(self) -> int:
        return len(self.ids)


def parse_chunk(chunk: Any) -> pa.Table:
    """The rows of a `sources.RawChunk` as a table (JSONL lines parsed here, with line numbers on error).

    Raises:
        ConfigError: malformed JSONL lines (each named by file and line), or values of one
            column whose types cannot share a column.
    """
    if chunk.table is not None:
        return chunk.table
    rows, bad = [], []
    for number, line in zip(chunk.line_numbers.tolist(), chunk.lines.split(b"\n")):
        try:
            value = json.loads(line)
        except UnicodeDecodeError as e:
            bad.append(f"{chunk.file}:{number}: not UTF-8 text ({e.reason}); re-encode the file as UTF-8")
            continue
        except json.JSONDecodeError as e:
            bad.append(f"{chunk.file}:{number}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(value, dict):
            bad.append(f"{chunk.file}:{number}: each line must be a JSON object, got {type(value).__name__}")
        rows.append(value)
    if bad:
        shown = bad[:SHOW] + ([f"... and {len(bad) - SHOW} more bad lines"] if len(bad) > SHOW else [])
        raise ConfigError(
            shown + ["fix or remove these lines; every line must be one JSON object"],
            title=f"malformed JSONL in {chunk.file}",
        )
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        raise ConfigError(_mixed_type_problems(rows, chunk), title=f"bad input in {chunk.file}") from None


def _mixed_type_problems(rows: list[dict], chunk: Any) -> list[str]:
    """Name each column whose values cannot share one type, with the lines of its odd values."""
    problems = []
    names = list(dict.fromkeys(k for r in rows for k in r))
    for name in names:
        values = [r.get(name) for r in rows]
        try:
            pa.array(values)
            continue
        except OverflowError:
            huge = [n for n, v in zip(chunk.line_numbers.tolist(), values) if isinstance(v, int) and abs(v) >= 2**63]
            problems.append(
                f"column {name!r} holds integers too large for 64 bits at lines {huge[:SHOW]} (in {chunk.file}); "
                "write such numbers as strings"
            )
            continue
        except (pa.ArrowException, TypeError, ValueError):
            pass
        kinds: dict[str, list[int]] = {}
        for number, value in zip(chunk.line_numbers.tolist(), values):
            if value is not None:
                kinds.setdefault(type(value).__name__, []).append(number)
        common = max(kinds, key=lambda k: len(kinds[k]))
        odd = [f"{k} at lines {v[:SHOW]}" for k, v in kinds.items() if k != common]
        problems.append(
            f"column {name!r} holds values of several types: mostly {common}, but {'; '.join(odd)} "
            f"(in {chunk.file}); give every row the same type"
            + ("; prompts must be strings" if common == "str" else "")
        )
    return problems or [f"{chunk.file}: the rows cannot be read as one table; give each column one type"]


def prompts_from_table(
    table: pa.Table, cfg: DatasetConfig, reserved_columns: set[str] = frozenset(), first_row: int = 0
) -> Prompts:
    """Check rows read from the input and pick out ids, prompts and carried columns.

    Args:
        first_row: row number of the table's first row in the whole input (ids without an id column).

    Raises:
        ConfigError: a column is missing, ids are missing or repeat, prompts are empty or not text.
    """
    source_column = cfg.prompt_column or cfg.messages_column
    _require_columns(table, cfg, [c for c in (source_column, cfg.id_column) if c])
    ids = _ids(table, cfg, first_row)
    problems = []
    prompts = messages = None
    if cfg.prompt_column:
        prompts, problems = _check_prompts(table.column(cfg.prompt_column).to_pylist(), ids, cfg.prompt_column)
    else:
        messages, problems = _check_messages(table.column(cfg.messages_column).to_pylist(), ids, cfg.messages_column)
    if problems:
        raise ConfigError(problems, title=f"bad input in {redact(cfg.path)}")
    carry = table.drop_columns([cfg.prompt_column] if cfg.prompt_column else [])
    carry = carry.rename_columns([f"input_{c}" if c in reserved_columns else c for c in carry.column_names])
    return Prompts(ids=ids, prompts=prompts, messages=messages, carry=carry)


def _require_columns(table: pa.Table, cfg: DatasetConfig, needed: list[str]) -> None:
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        keys = {
            cfg.prompt_column: "dataset.prompt_column",
            cfg.messages_column: "dataset.messages_column",
            cfg.id_column: "dataset.id_column",
        }
        raise ConfigError(
            [
                f"{keys[c]}={c!r}: no such column in {redact(cfg.path)}; "
                f"the columns are {', '.join(table.column_names)}"
                for c in missing
            ]
        )


def _ids(table: pa.Table, cfg: DatasetConfig, first_row: int = 0) -> list[str]:
    if not cfg.id_column:
        return [str(i) for i in range(first_row, first_row + table.num_rows)]
    column = table.column(cfg.id_column)
    null_rows = [i for i, v in enumerate(column.is_null().to_pylist()) if v]
    if null_rows:
        raise ConfigError(
            [
                f"dataset.id_column={cfg.id_column!r}: {len(null_rows)} rows have no id "
                f"(row numbers {[first_row + r for r in null_rows[:SHOW]]}); fill them in, or set "
                "dataset.id_column=null to use row numbers"
            ]
        )
    ids = [str(v) for v in column.to_pylist()]
    counts = pc.value_counts(pa.array(ids))
    dupes = [(d["values"], d["counts"]) for d in counts.to_pylist() if d["counts"] > 1]
    if dupes:
        shown = listing(f"{v!r} x{n}" for v, n in dupes)
        raise ConfigError(
            [
                f"dataset.id_column={cfg.id_column!r}: ids must be unique, but {len(dupes)} repeat "
                f"({shown}); deduplicate the input, or set "
                "dataset.id_column=null to use row numbers"
            ]
        )
    return ids


def _check_prompts(values: list[Any], ids: list[str], column: str) -> tuple[list[str], list[str]]:
    not_text = [i for i, v in zip(ids, values) if not isinstance(v, str)]
    blank = [i for i, v in zip(ids, values) if isinstance(v, str) and not v.strip()]
    problems = []
    if not_text:
        kinds = sorted({type(v).__name__ for v in values if not isinstance(v, str)})
        problems.append(
            f"dataset.prompt_column={column!r}: {len(not_text)} rows are not text "
            f"({', '.join(kinds)}; ids {_show(not_text)}); prompts must be strings"
        )
    if blank:
        problems.append(
            f"dataset.prompt_column={column!r}: {len(blank)} rows have an empty or blank prompt "
            f"(ids {_show(blank)}); remove them or fill them in"
        )
    return values, problems


def _check_messages(values: list[Any], ids: list[str], column: str) -> tuple[list[Any], list[str]]:
    bad = [i for i, v in zip(ids, values) if not _is_chat(v)]
    if bad:
        return values, [
            f"dataset.messages_column={column!r}: {len(bad)} rows are not a non-empty list of "
            f"{{role, content}} messages with text content (ids {_show(bad)})"
        ]
    return [[{"role": m["role"], "content": m["content"]} for m in v] for v in values], []


def _is_chat(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
        and any(m["content"].strip() for m in value)
    )


def _show(ids: list[str]) -> str:
    return listing(repr(i) for i in ids)
