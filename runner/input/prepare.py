"""Turn one raw chunk of input rows into what workers generate from: the unit of parallel preparation.

`prepare_chunk` parses and checks the rows, renders the prompt text (chat template),
tokenizes it and fits it to the model's context. It runs in preparer actors spread over
the cluster (`runner.cluster.preparers` starts them); the driver gets back only a `ChunkMeta` (lengths and
hashes: 20 bytes a row), while the prepared rows stay in the object store until the
worker that generates them fetches them.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from runner import faults
from runner.config import DatasetConfig, GenerationSettings, ModelConfig
from runner.errors import ConfigError
from runner.input import openai_batch
from runner.input.models import load_tokenizer
from runner.input.render import cut_user_text, render_and_tokenize, user_text
from runner.input.rows import Prompts, parse_chunk, prompts_from_table
from runner.input.settings import SETTINGS, check_settings, from_columns, row_schemas, samples_per_row
from runner.secrets import apply_submitted_env

LONGEST = 5  # longest prompts each chunk reports (the dry run shows them)
TOKENS = "__input_ids"  # the prepared rows' token ids; a carried input column of this name gets a prefix
ADAPTER = "__adapter"  # with model.adapters: each row's adapter (its name; null: the base model)
PREPARED_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field(TOKENS, pa.list_(pa.int32()), nullable=False),
    pa.field("truncated_tokens", pa.int32(), nullable=False),
]


@dataclass(frozen=True)
class PrepareSpec:
    """What preparing any chunk of one job needs: the same for every chunk."""

    dataset: DatasetConfig
    model_path: str
    model: ModelConfig
    max_new_tokens: int
    context: int | None  # the model's context window, if known
    reserved_columns: frozenset[str]
    generation: GenerationSettings = field(default_factory=GenerationSettings)  # what rows' own settings are held to


@dataclass
class ChunkMeta:
    """What the driver learns of a prepared chunk: enough to plan it, check ids and fingerprint it."""

    rows: int
    lengths: np.ndarray  # int32 prompt tokens per row (after any truncation)
    row_hashes: np.ndarray  # uint64 per row: id, rendered prompt and carried columns
    id_hashes: np.ndarray  # uint64 per row: the id alone (uniqueness across chunks)
    carry_schema: pa.Schema
    file: str
    first_row: int
    problems: list[str] = field(default_factory=list)
    problem_title: str = "bad input"
    too_long: list[tuple[str, int]] = field(default_factory=list)  # (id, tokens) over the context, too_long=refuse
    truncated: int = 0  # rows cut from the left to fit (too_long=truncate_left)
    longest: list[tuple[int, str]] = field(default_factory=list)  # (tokens, id) of its longest prompts
    samples: np.ndarray | None = None  # int32 sequences per row, where rows have settings of their own
    groups: np.ndarray | None = None  # int16 per row with model.adapters: its adapter (-1: none), planned apart


class ChunkPreparer:
    """Holds one job's tokenizer and prepares its chunks (a Ray actor in a job; plain Python in tests)."""

    def __init__(self, spec: PrepareSpec):
        apply_submitted_env()  # a submitted job's credentials for reading its input, if any
        self.spec = spec
        self._tokenizer: Any = None

    def prepare(self, chunk: Any, background: bool = False) -> tuple[ChunkMeta, pa.Table | None]:
        """Args: background: from now on, run only on CPU time that workers leave idle (chunks prepared
        while workers generate beside this actor); the first window's chunks are not: no worker runs yet.
        """
        if background:
            _yield_cpu()
        faults.on_prepare()
        if self._tokenizer is None:
            try:
                self._tokenizer = load_tokenizer(self.spec.model_path, self.spec.model)
            except ConfigError as e:
                return _failed(chunk, e.problems, e.title), None
        return prepare_chunk(chunk, self.spec, self._tokenizer)

    def take(self, rows: pa.Table, index: Any) -> pa.Table:
        """The rows at `index` of a chunk this actor prepared: what one shard needs of it (served on the
        chunk's node, beside preparing, so a worker elsewhere copies only these)."""
        return rows.take(index)


def _yield_cpu() -> None:
    """Preparing ahead must not slow the workers generating on the same cores: schedule this thread
    only on CPU time they leave idle (SCHED_IDLE; Linux sets it per thread), or at the lowest priority."""
    import os

    try:
        if os.sched_getscheduler(0) != os.SCHED_IDLE:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(19 - os.nice(0))
        except OSError:
            pass


def prepare_chunk(chunk: Any, spec: PrepareSpec, tokenizer: Any) -> tuple[ChunkMeta, pa.Table | None]:
    """Parse, check, render, tokenize and fit one `sources.RawChunk`.

    Bad input does not raise: the meta lists the problems (the driver reports every
    chunk's at once) and the table is None.
    """
    try:
        if spec.dataset.format == "openai_batch":
            read = _read_batch(chunk, spec, tokenizer)
        else:
            read = _read_rows(chunk, spec, tokenizer)
    except ConfigError as e:
        rows = f"rows {chunk.first_file_row}-{chunk.first_file_row + chunk.rows - 1}"
        return _failed(chunk, e.problems, f"bad input in {chunk.file} ({rows})"), None
    ids, texts, input_ids, carry, settings, cut = read
    try:
        adapters = _row_adapters(carry, ids, spec)
    except ConfigError as e:
        return _failed(chunk, e.problems, f"bad input in {chunk.file}"), None
    new_tokens = None
    if settings is not None:
        new_tokens = settings.field("max_new_tokens").fill_null(spec.max_new_tokens).to_pylist()
    truncated, too_long = fit_context(input_ids, texts, spec, cut, new_tokens)
    meta = ChunkMeta(
        rows=len(texts),
        lengths=np.fromiter((len(x) for x in input_ids), dtype=np.int32, count=len(input_ids)),
        row_hashes=_row_hashes(ids, texts, chunk, carry),
        id_hashes=_hashes(ids),
        carry_schema=carry.schema,
        file=chunk.file,
        first_row=chunk.first_row,
        too_long=[(ids[i], n) for i, n in too_long],
        truncated=sum(1 for t in truncated if t),
    )
    meta.longest = heapq.nlargest(LONGEST, zip(meta.lengths.tolist(), ids))
    if settings is not None:
        meta.samples = samples_per_row(settings, len(texts), spec.generation)
    columns = {
        "id": pa.array(ids, pa.string()),
        "prompt": pa.array(texts, pa.string()),
        TOKENS: pa.array(input_ids, pa.list_(pa.int32())),
        "truncated_tokens": pa.array(truncated, pa.int32()),
    }
    rows = pa.Table.from_arrays(list(columns.values()), schema=pa.schema(PREPARED_FIELDS))
    if settings is not None:
        rows = rows.append_column(SETTINGS, settings)
    if adapters is not None:
        rows = rows.append_column(ADAPTER, adapters)
        code = {name: i for i, name in enumerate(sorted(spec.model.adapters))}
        meta.groups = np.array([code.get(v, -1) for v in adapters.to_pylist()], dtype=np.int16)
    for name in carry.column_names:
        rows = rows.append_column(name, carry.column(name))
    return meta, rows


Read = tuple[list[str], list[str], list[list[int]], pa.Table, Any, Callable[[int, int], Any]]


def _read_rows(chunk: Any, spec: PrepareSpec, tokenizer: Any) -> Read:
    """A chunk of plain rows: (ids, texts, token ids, carried columns, own settings or None, the cut of a row)."""
    table = parse_chunk(chunk)
    prompts = prompts_from_table(table, spec.dataset, spec.reserved_columns, chunk.first_row)
    settings = _row_settings(table, prompts.ids, spec)
    texts, input_ids = render_and_tokenize(prompts, tokenizer, spec.model.chat_template)
    return (
        prompts.ids,
        texts,
        input_ids,
        prompts.carry,
        settings,
        lambda i, limit: _cut(texts, prompts, tokenizer, spec, i, limit),
    )


def _read_batch(chunk: Any, spec: PrepareSpec, tokenizer: Any) -> Read:
    """A chunk of OpenAI Batch requests: chat requests through the chat template, completions as they are.

    The carried `url` column says which each row was (what `jobs/export.py` answers it with).
    """
    batch = openai_batch.parse(chunk, spec.generation)
    schemas, problems = row_schemas([s.get("json_schema") for s in batch.settings], batch.ids, "body.response_format")
    for row, schema in zip(batch.settings, schemas):
        row["json_schema"] = schema
    if problems:
        raise ConfigError(problems)
    settings, problems = check_settings(batch.settings, batch.ids, spec.generation, batch.source)
    if problems:
        raise ConfigError(problems)
    texts: list[str] = [""] * len(batch.ids)
    input_ids: list[list[int]] = [[] for _ in batch.ids]
    cuts: dict[int, Callable[[int], Any]] = {}
    empty = pa.table({})
    for chat in (True, False):
        rows = [i for i, c in enumerate(batch.chat) if c == chat]
        if not rows:
            continue
        ids = [batch.ids[i] for i in rows]
        if chat:
            group = Prompts(ids, None, [batch.messages[i] for i in rows], empty)
            got = render_and_tokenize(group, tokenizer, spec.model.chat_template)
        else:
            group = Prompts(ids, [batch.prompts[i] for i in rows], None, empty)
            got = render_and_tokenize(group, tokenizer, "none")
        for j, (i, text, tokens) in enumerate(zip(rows, *got)):
            texts[i], input_ids[i] = text, tokens
            cuts[i] = lambda limit, j=j, i=i, group=group, chat=chat: cut_user_text(
                tokenizer, texts[i], user_text(group, j), not chat, limit
            )
    carry = pa.table({"url": pa.array(batch.urls, pa.string())})
    if "url" in spec.reserved_columns:
        carry = carry.rename_columns(["input_url"])
    return batch.ids, texts, input_ids, carry, settings, lambda i, limit: cuts[i](limit)


def _row_adapters(carry: pa.Table, ids: list[str], spec: PrepareSpec) -> pa.Array | None:
    """Each row's adapter from dataset.adapter_column (one of model.adapters' names; null or "": the base model).

    Raises:
        ConfigError: the column is missing, or rows name an adapter the job does not have.
    """
    column = spec.dataset.adapter_column
    if not column:
        return None
    names = set(spec.model.adapters)
    found = [c for c in (column, f"input_{column}") if c in carry.column_names]
    if not found:
        raise ConfigError([f"dataset.adapter_column={column!r}: no such column; the columns are {carry.column_names}"])
    values = [None if v in (None, "") else str(v) for v in carry.column(found[0]).to_pylist()]
    unknown = [f"{i!r} ({v!r})" for i, v in zip(ids, values) if v is not None and v not in names]
    if unknown:
        raise ConfigError(
            [
                f"dataset.adapter_column={column!r}: {len(unknown)} rows name an adapter that model.adapters does "
                f"not have ({', '.join(sorted(names))}), by id: {', '.join(unknown[:5])}; add it "
                "(+model.adapters.NAME=FOLDER) or fix those rows (null or empty: the base model alone)"
            ]
        )
    return pa.array(values, pa.string())


def _row_settings(table: pa.Table, ids: list[str], spec: PrepareSpec) -> pa.Array | None:
    """The rows' own generation settings, checked (None: the job has no per-row settings).

    Raises:
        ConfigError: a mapped column is missing, or rows hold values that are not good settings.
    """
    mapping, column = spec.dataset.settings_columns, spec.dataset.schema_column
    if not mapping and not column:
        return None
    values, problems = from_columns(table, mapping) if mapping else ([{} for _ in ids], [])
    if column and not problems:
        if column not in table.column_names:
            problems = [f"dataset.schema_column={column!r}: no such column; the columns are {table.column_names}"]
        else:
            schemas, problems = row_schemas(table.column(column).to_pylist(), ids, f"dataset.schema_column={column!r}")
            for row, schema in zip(values, schemas):
                row["json_schema"] = schema
    if not problems:
        settings, problems = check_settings(
            values, ids, spec.generation, lambda k: f"dataset.settings_columns.{k}={mapping[k]!r}"
        )
    if problems:
        raise ConfigError(problems)
    return settings


def _failed(chunk: Any, problems: list[str], title: str) -> ChunkMeta:
    empty = np.zeros(0, dtype=np.uint64)
    return ChunkMeta(
        0, np.zeros(0, np.int32), empty, empty, pa.schema([]), chunk.file, chunk.first_row, problems, title
    )


def fit_context(
    input_ids: list[list[int]],
    texts: list[str],
    spec: PrepareSpec,
    cut: Callable[[int, int], tuple[list[int], str] | None],
    new_tokens: list[int] | None = None,
) -> tuple[list[int], list[tuple[int, int]]]:
    """Make every prompt leave room for max_new_tokens in the model's context window.

    A cut row's ids and text (the `prompt` column) are replaced by the cut ones.

    Args:
        cut: (row, limit) -> the row's ids cut to `limit` from the left of the user's text (the
            chat template's pieces kept) and the text they stand for, or None when that cannot be done.
        new_tokens: each row's own max_new_tokens, where rows have their own (else the job's).

    Returns:
        Tokens cut from each prompt (all 0 unless dataset.too_long=truncate_left), and (row, tokens)
        of each prompt that does not fit (too_long=refuse, or no cut possible): the driver refuses them.
    """
    truncated = [0] * len(input_ids)
    if not spec.context:
        return truncated, []
    limits = [spec.context - n for n in new_tokens] if new_tokens else None
    limit = spec.context - spec.max_new_tokens
    too_long = [(i, len(x)) for i, x in enumerate(input_ids) if len(x) > (limits[i] if limits else limit)]
    if spec.dataset.too_long == "refuse":
        return truncated, too_long
    uncut = []
    for i, n in too_long:
        done = cut(i, limits[i] if limits else limit)
        if done is None:
            uncut.append((i, n))
            continue
        shorter, texts[i] = done
        truncated[i] = n - len(shorter)
        input_ids[i] = shorter
    return truncated, uncut


def _cut(
    texts: list[str], prompts: Any, tokenizer: Any, spec: PrepareSpec, row: int, limit: int
) -> tuple[list[int], str] | None:
    add_special = prompts.messages is None and (
        spec.model.chat_template == "none" or not getattr(tokenizer, "chat_template", None)
    )
    return cut_user_text(tokenizer, texts[row], user_text(prompts, row), add_special, limit)


def _hashes(values: list[str]) -> np.ndarray:
    out = np.empty(len(values), dtype=np.uint64)
    for i, v in enumerate(values):
        out[i] = int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little")
    return out


def _row_hashes(ids: list[str], texts: list[str], chunk: Any, carry: pa.Table) -> np.ndarray:
    """A hash of each row's whole content: a rerun over edited prompts or columns plans other shards."""
    if chunk.lines is not None:
        raw = chunk.lines.split(b"\n")  # the whole JSON line: prompt, id and every carried value
    else:
        raw = [repr(sorted(r.items())).encode() for r in carry.to_pylist()] if carry.num_columns else [b""] * len(ids)
    out = np.empty(len(ids), dtype=np.uint64)
    for i, (row_id, text, extra) in enumerate(zip(ids, texts, raw)):
        h = hashlib.blake2b(digest_size=8)
        h.update(row_id.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\0")
        h.update(extra)
        out[i] = int.from_bytes(h.digest(), "little")
    return out
