"""The checks a window of prepared chunks passes before it is planned: the chunks' own problems, prompts
too long for the context, carried columns that keep their first rows' names and types, ids named.

Pure functions over chunk metas (and, to name repeated ids, their prepared rows); no torch.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from runner import cluster
from runner.config import JobConfig
from runner.errors import ConfigError, listing
from runner.input import ChunkMeta
from runner.secrets import redact


def raise_chunk_problems(metas: list[ChunkMeta], job: JobConfig, context: int) -> None:
    """Every problem of the chunks in one error, then the prompts too long for the model's context.

    Raises:
        ConfigError: naming each bad row.
    """
    problems = [p for m in metas for p in m.problems]
    if problems:
        titles = sorted({m.problem_title for m in metas if m.problems})
        raise ConfigError(problems, title="; ".join(titles))
    too_long = [x for m in metas for x in m.too_long]
    if too_long:
        g = job.generation
        shown = listing(f"{i!r} ({n} tokens)" for i, n in too_long)
        raise ConfigError(
            [
                f"{len(too_long)} prompts are longer than the model's context ({context} tokens) minus "
                f"generation.max_new_tokens={g.max_new_tokens}: {shown}; shorten them, lower max_new_tokens, "
                + (
                    "or set dataset.too_long=truncate_left to keep their ends"
                    if job.dataset.too_long == "refuse"
                    else "or shorten what the chat template puts around them (system prompt, earlier turns): "
                    "with too_long=truncate_left only the user's own text is cut, and that alone is not enough"
                )
            ],
            title=f"bad input in {redact(job.dataset.path)}",
        )


def carried_schema(schema: pa.Schema | None, metas: list[ChunkMeta], path: str) -> pa.Schema:
    """The carried columns' schema after these chunks: the first chunk's (a column of nulls as text), which
    every later chunk keeps.

    Raises:
        ConfigError: a column first appears after the first rows, or changes its type.
    """
    for m in metas:
        if schema is None:
            # A column with no value in the first chunk is carried as text.
            schema = pa.schema(
                [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in m.carry_schema]
            )
            continue
        _check_types(schema, m, path)
        new = [n for n in m.carry_schema.names if n not in schema.names]
        if new:
            raise ConfigError(
                [
                    f"{m.file}: column(s) {', '.join(map(repr, new))} first appear at row {m.first_row} of the "
                    f"input; the columns carried to the output are those of its first rows "
                    f"({', '.join(schema.names) or 'none'}). Add them (null) to the first rows, or "
                    "drop them"
                ],
                title=f"bad input in {redact(path)}",
            )
    return schema


def _check_types(schema: pa.Schema, m: ChunkMeta, path: str) -> None:
    """A carried column keeps the type of the first rows (null, or anything as text, aside)."""
    for f in m.carry_schema:
        if f.name not in schema.names:
            continue
        want = schema.field(f.name).type
        nested = pa.types.is_nested(f.type)  # lists, objects: no text to carry them as
        if f.type == want or pa.types.is_null(f.type) or (pa.types.is_string(want) and not nested):
            continue
        if nested and pa.types.is_string(want):
            raise ConfigError(
                [
                    f"{m.file}: column {f.name!r} holds {f.type} values from row {m.first_row} of the input on, "
                    "but only nulls or text in its first rows, which fixed it as a text column; give its first "
                    "rows a value of that shape, put those rows first, or drop the column"
                ],
                title=f"bad input in {redact(path)}",
            )
        if pa.types.is_integer(f.type) and pa.types.is_floating(want):
            continue
        raise ConfigError(
            [
                f"{m.file}: column {f.name!r} holds {f.type} values from row {m.first_row} of the input on, "
                f"but {want} in its first rows; give the column one type in every file"
            ],
            title=f"bad input in {redact(path)}",
        )


def name_ids(window: list[tuple[ChunkMeta, Any]], hashes: set[int]) -> str:
    """The ids (and rows) of a window's rows whose id hashes are `hashes`, listed for a message."""
    named = []
    for meta, rows_ref in window:
        hits = [i for i, h in enumerate(meta.id_hashes.tolist()) if h in hashes]
        if hits:
            rows = rows_ref if isinstance(rows_ref, pa.Table) else cluster.fetch(rows_ref)
            ids = rows.column("id").to_pylist()
            named += [f"{ids[i]!r} (row {meta.first_row + i})" for i in hits]
    return listing(named)
