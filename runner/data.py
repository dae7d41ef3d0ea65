"""Load prompts, give every row a stable id, render the text the tokenizer sees.

Loading and checking need no model: every problem with the input is found
and reported before anything heavy starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from runner.config import ConfigError, DatasetConfig
from runner.secrets import redact

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
    """Load and check the whole dataset described by `cfg` in memory (small inputs, tests).

    Jobs do not call this: they stream the input chunk by chunk (`runner.prepare`).

    Raises:
        ConfigError: the input cannot be read, is malformed, a column is missing,
            ids repeat, prompts are empty or not text, or no row is left.
    """
    from runner import sources

    tables = [parse_chunk(c) for c in sources.read_chunks(sources.resolve(cfg), cfg, 1 << 30)]
    table = pa.concat_tables(tables, promote_options="permissive")
    return prompts_from_table(table, cfg, reserved_columns)


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
    except (pa.ArrowException, TypeError, ValueError):
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
        wrap = verbatim_user_turn(tokenizer)
        if wrap is not None:
            prefix, suffix = wrap
            return [prefix + p + suffix for p in prompts.prompts], False
        conversations = [[{"role": "user", "content": p}] for p in prompts.prompts]
    texts = [_apply_template(tokenizer, c) for c in conversations]
    return texts, False


# Texts that a template which alters or inspects a message (trims it, escapes it, branches on it)
# would not return verbatim between the same two pieces.
PROBES = ("probe text", "  \n{{ probe }} {% raw %} <|im_end|>\n\t\"quoted\" 'x' \\ ß 中  ", "/probe? \n\n")


def verbatim_user_turn(tokenizer: Any) -> tuple[str, str] | None:
    """(prefix, suffix) when the chat template renders a lone user turn as prefix + text + suffix.

    Checked on probe texts of awkward content; rendering a million prompts as string
    concatenation instead of one template run each saves about a fifth of preparing them.
    None when the template does anything else with the text (then every prompt is rendered).
    """
    rendered = [_apply_template(tokenizer, [{"role": "user", "content": p}]) for p in PROBES]
    at = rendered[0].find(PROBES[0])
    if at < 0:
        return None
    prefix, suffix = rendered[0][:at], rendered[0][at + len(PROBES[0]) :]
    if all(text == prefix + probe + suffix for text, probe in zip(rendered, PROBES)):
        return prefix, suffix
    return None


def user_text(prompts: Prompts, row: int) -> str:
    """The user's own text of a row: its prompt, or its last user message (what a cut may shorten)."""
    if prompts.prompts is not None:
        return prompts.prompts[row]
    users = [m["content"] for m in prompts.messages[row] if m["role"] == "user"]
    return users[-1] if users else prompts.messages[row][-1]["content"]


def cut_user_text(tokenizer: Any, text: str, user: str, add_special: bool, limit: int) -> list[int] | None:
    """Token ids of `text` cut to `limit` by dropping the start of the user's text inside it.

    What the chat template puts around the user's text (system prompt, role headers, the
    assistant turn) is kept whole, as are the tokenizer's own special tokens. None when the
    user's text cannot be found in `text`, or what surrounds it alone does not fit.
    """
    at = text.rfind(user) if user else -1
    if at < 0 and user.strip():  # templates that trim the message
        user = user.strip()
        at = text.rfind(user)
    if at < 0:
        return None
    head = tokenize(tokenizer, [text[:at]], add_special)[0]
    tail = tokenize(tokenizer, [text[at + len(user) :]], False)[0] if at + len(user) < len(text) else []
    room = limit - len(head) - len(tail)
    if room < 1:
        return None
    middle = tokenize(tokenizer, [user], False)[0]
    return head + middle[-room:] + tail


def render_and_tokenize(prompts: Prompts, tokenizer: Any, chat_template: str) -> tuple[list[str], list[list[int]]]:
    """The text given to the tokenizer and its token ids, for every row (what `render` + `tokenize` give).

    When the chat template wraps a plain prompt verbatim between a fixed prefix and suffix
    that meet the prompt at special tokens, only the prompt's own segment is tokenized per
    row: a tokenizer splits its input at special tokens first and encodes the pieces
    between them independently, so the pieces' ids can be reused. Checked on probe texts;
    any difference and every text is tokenized whole.
    """
    texts, add_special = render(prompts, tokenizer, chat_template)
    pieces = _template_pieces(tokenizer) if prompts.prompts is not None and not add_special else None
    if pieces is None:
        return texts, tokenize(tokenizer, texts, add_special)
    head, lead, tail = pieces
    middle = tokenize(tokenizer, [lead + p for p in prompts.prompts], False)
    return texts, [head + m + tail for m in middle]


def _template_pieces(tokenizer: Any) -> tuple[list[int], str, list[int]] | None:
    """(ids of the prefix up to its last special token, the rest of the prefix, ids of the suffix), or None."""
    wrap = verbatim_user_turn(tokenizer)
    added = {t.content: t for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    if wrap is None or not added:
        return None
    prefix, suffix = wrap
    ends = [(prefix.rfind(a) + len(a), a) for a in added if a in prefix]
    starts = [a for a in added if suffix.startswith(a)]
    if not ends or not starts:
        return None
    cut, before = max(ends)
    after = max(starts, key=len)
    if added[before].rstrip or added[after].lstrip:  # they would eat whitespace across the cut
        return None
    head, tail = tokenize(tokenizer, [prefix[:cut], suffix], False)
    lead = prefix[cut:]
    for probe in PROBES:
        whole = tokenize(tokenizer, [prefix + probe + suffix], False)[0]
        if whole != head + tokenize(tokenizer, [lead + probe], False)[0] + tail:
            return None
    return head, lead, tail


def _apply_template(tokenizer: Any, conversation: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def tokenize(tokenizer: Any, texts: list[str], add_special_tokens: bool, batch: int = 1024) -> list[list[int]]:
    """Token ids of every text, unpadded, in input order."""
    backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's Rust side: what __call__ runs, less copying
    ids: list[list[int]] = []
    for start in range(0, len(texts), batch):
        part = texts[start : start + batch]
        if backend is not None:
            # encode_batch_fast (tokenizers >= 0.20) skips character offsets: a quarter less time
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            ids.extend(e.ids for e in encode(part, add_special_tokens=add_special_tokens))
        else:
            enc = tokenizer(part, add_special_tokens=add_special_tokens, padding=False, truncation=False)
            ids.extend(enc["input_ids"])
    return ids
