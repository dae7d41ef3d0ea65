"""Load prompts, give every row a stable id, render the text the tokenizer sees.

Loading and checking need no model: every problem with the input is found
and reported before anything heavy starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from runner.config import ConfigError, DatasetConfig

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SHOW = 5  # how many offending ids an error message lists


@dataclass
class Prompts:
    """The loaded input: ids, the source of the prompt, and the columns carried to the output."""

    ids: list[str]
    prompts: list[str] | None  # plain prompt column values
    messages: list[list[dict[str, str]]] | None  # chat messages column values
    carry: pa.Table  # input columns other than the prompt, named as they appear in the output

    def __len__(self) -> int:
        return len(self.ids)


def load_prompts(cfg: DatasetConfig, reserved_columns: set[str] = frozenset()) -> Prompts:
    """Load and check the dataset described by `cfg`.

    Args:
        cfg: the dataset section of the job config.
        reserved_columns: output column names; a carried input column with such a
            name gets an `input_` prefix.

    Raises:
        ConfigError: the file is unreadable or malformed, a column is missing,
            ids repeat, prompts are empty or not text, or no row is left.
    """
    table = read_table(cfg)
    if cfg.limit is not None:
        table = table.slice(0, cfg.limit)
    if table.num_rows == 0:
        raise ConfigError([f"dataset.path={cfg.path!r}: the dataset has no rows; point it at a file with prompts"])
    source_column = cfg.prompt_column or cfg.messages_column
    _require_columns(table, cfg, [c for c in (source_column, cfg.id_column) if c])
    ids = _ids(table, cfg)
    problems = []
    prompts = messages = None
    if cfg.prompt_column:
        prompts, problems = _check_prompts(table.column(cfg.prompt_column).to_pylist(), ids, cfg.prompt_column)
    else:
        messages, problems = _check_messages(table.column(cfg.messages_column).to_pylist(), ids, cfg.messages_column)
    if problems:
        raise ConfigError(problems, title=f"bad input in {cfg.path}")
    carry = table.drop_columns([cfg.prompt_column] if cfg.prompt_column else [])
    carry = carry.rename_columns([f"input_{c}" if c in reserved_columns else c for c in carry.column_names])
    return Prompts(ids=ids, prompts=prompts, messages=messages, carry=carry)


def read_table(cfg: DatasetConfig) -> pa.Table:
    """Read the source with `datasets`: a local JSONL/JSON/CSV/Parquet file or a Hub dataset."""
    path = Path(cfg.path).expanduser()
    suffix = path.suffix.lower()
    if suffix in LOCAL_FORMATS or path.exists():
        if not path.exists():
            raise ConfigError(
                [f"dataset.path={cfg.path!r}: no such file; check the path (relative paths are read from {Path.cwd()})"]
            )
        if path.is_dir() or suffix not in LOCAL_FORMATS:
            raise ConfigError(
                [
                    f"dataset.path={cfg.path!r}: expected a file ending in "
                    f"{', '.join(LOCAL_FORMATS)}; got {'a folder' if path.is_dir() else suffix or 'no suffix'}"
                ]
            )
        if suffix == ".jsonl":
            check_jsonl(path)
        return _load_with_datasets(LOCAL_FORMATS[suffix], cfg, data_files=str(path), split="train")
    return _load_with_datasets(cfg.path, cfg, name=cfg.name, split=cfg.split)


def _load_with_datasets(source: str, cfg: DatasetConfig, **kwargs: Any) -> pa.Table:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(source, **kwargs)
    except Exception as e:  # datasets raises many types; the user needs one clear line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            [
                f"dataset.path={cfg.path!r}: could not be loaded ({type(e).__name__}: {msg}). "
                "Use a local .jsonl/.json/.csv/.parquet file, or a Hub dataset name when the "
                "Hub is reachable"
            ]
        ) from e
    return ds.with_format("arrow")[:]


def check_jsonl(path: Path) -> None:
    """Find malformed JSONL lines and report them with their line numbers."""
    bad = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    bad.append(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(value, dict):
                    bad.append(f"{path}:{number}: each line must be a JSON object, got {type(value).__name__}")
        except UnicodeDecodeError as e:
            bad.append(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode it as UTF-8")
    if bad:
        shown = bad[:SHOW] + ([f"... and {len(bad) - SHOW} more bad lines"] if len(bad) > SHOW else [])
        raise ConfigError(
            shown + ["fix or remove these lines; every line must be one JSON object"],
            title=f"malformed JSONL in {path}",
        )


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
                f"{keys[c]}={c!r}: no such column in {cfg.path}; the columns are {', '.join(table.column_names)}"
                for c in missing
            ]
        )


def _ids(table: pa.Table, cfg: DatasetConfig) -> list[str]:
    if not cfg.id_column:
        return [str(i) for i in range(table.num_rows)]
    column = table.column(cfg.id_column)
    null_rows = [i for i, v in enumerate(column.is_null().to_pylist()) if v]
    if null_rows:
        raise ConfigError(
            [
                f"dataset.id_column={cfg.id_column!r}: {len(null_rows)} rows have no id "
                f"(row numbers {null_rows[:SHOW]}); fill them in, or set dataset.id_column=null "
                "to use row numbers"
            ]
        )
    ids = [str(v) for v in column.to_pylist()]
    counts = pc.value_counts(pa.array(ids))
    dupes = [(d["values"], d["counts"]) for d in counts.to_pylist() if d["counts"] > 1]
    if dupes:
        shown = ", ".join(f"{v!r} x{n}" for v, n in dupes[:SHOW])
        raise ConfigError(
            [
                f"dataset.id_column={cfg.id_column!r}: ids must be unique, but {len(dupes)} repeat "
                f"({shown}{', ...' if len(dupes) > SHOW else ''}); deduplicate the input, or set "
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
    return ", ".join(repr(i) for i in ids[:SHOW]) + (", ..." if len(ids) > SHOW else "")


def render(prompts: Prompts, tokenizer: Any, chat_template: str) -> tuple[list[str], bool]:
    """Build the exact text given to the tokenizer for every row.

    Returns:
        The texts, and whether the tokenizer should add its special tokens
        (False once a chat template has placed them).

    Raises:
        ConfigError: chat messages with chat_template=none, or a model without a chat template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompts.messages is not None:
        if chat_template == "none":
            raise ConfigError(
                [
                    "model.chat_template=none with dataset.messages_column: messages need a chat "
                    "template; use model.chat_template=auto or give a Jinja template"
                ]
            )
        if not has_template:
            raise ConfigError(
                [
                    "dataset.messages_column is set but the model's tokenizer has no chat template; "
                    "set model.chat_template to a Jinja template"
                ]
            )
        conversations = prompts.messages
    elif chat_template == "none" or not has_template:
        return list(prompts.prompts), True
    else:
        conversations = [[{"role": "user", "content": p}] for p in prompts.prompts]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    return texts, False


def tokenize(tokenizer: Any, texts: list[str], add_special_tokens: bool, batch: int = 1024) -> list[list[int]]:
    """Token ids of every text, unpadded, in input order."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), batch):
        enc = tokenizer(
            texts[start : start + batch], add_special_tokens=add_special_tokens, padding=False, truncation=False
        )
        ids.extend(enc["input_ids"])
    return ids
