"""Where prompts live: local files, folders and globs, object-store URIs, Hub datasets.

`resolve` turns `dataset.path` into a list of files on one pyarrow filesystem (or a Hub
dataset name); `read_chunks` streams them as `RawChunk`s of at most `chunk_rows` rows,
files in name order, never holding more than one read block: JSONL as raw lines (parsed
where the chunk is prepared, in parallel, not on the driver), Parquet and CSV as Arrow
record batches (CSV cells as the text they hold, never a guessed type), `datasets`' `save_to_disk`
folders as their Arrow files' record batches, Hub datasets (and clones of their repositories) streamed
by `datasets`, JSON arrays as slices of a table read whole. No Ray, no torch.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from runner.config import DatasetConfig
from runner.errors import ConfigError, first_line
from runner.secrets import redact

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
GLOB_CHARS = "*?["
BLOCK_BYTES = 8 << 20  # what one read of a JSONL file asks for


@dataclass(frozen=True)
class InputFile:
    path: str  # inside the filesystem
    shown: str  # as error messages name it (credentials masked)
    fmt: str


@dataclass
class Source:
    """The resolved input: files on one filesystem, or a Hub dataset (`files` empty)."""

    fs: pafs.FileSystem | None
    files: list[InputFile]
    hub_name: str | None = None


@dataclass
class RawChunk:
    """Consecutive input rows, not yet parsed or checked.

    Exactly one of `lines` (JSONL: the raw lines joined by newlines, blank lines dropped)
    and `table` (every other format) is set.
    """

    file: str  # shown name of the file it came from
    first_row: int  # row number of its first row in the whole input (ids when there is no id column)
    rows: int
    lines: bytes | None = None
    line_numbers: np.ndarray | None = None  # per JSONL row, its line in `file` (1-based)
    table: pa.Table | None = None
    first_file_row: int = 0  # row number of its first row inside `file` (0-based), for messages
    extra: dict[str, Any] = field(default_factory=dict)


def chunk_digest(chunk: RawChunk, h: Any = None) -> Any:
    """A blake2b hash of a chunk's raw rows and where they sit in the input (`h`: one to go on updating)."""
    import hashlib

    h = h or hashlib.blake2b(digest_size=16)
    h.update(f"{chunk.file}\0{chunk.first_row}\0{chunk.first_file_row}\0{chunk.rows}\0".encode())
    if chunk.lines is not None:
        h.update(chunk.lines)
    else:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, chunk.table.schema) as writer:
            writer.write_table(chunk.table)
        h.update(sink.getvalue())
    return h


def resolve(cfg: DatasetConfig) -> Source:
    """Find the input files `dataset.path` names.

    Raises:
        ConfigError: nothing matches, the files are of an unknown or mixed format, or the store refuses.
    """
    path = cfg.path
    if "://" in path:
        return _resolve_uri(path)
    local = os.path.expanduser(path)
    if any(c in local for c in GLOB_CHARS):
        matches = sorted(p for p in glob.glob(local, recursive=True) if os.path.isfile(p))
        if not matches:
            raise ConfigError([f"dataset.path={path!r}: no file matches this pattern (relative to {Path.cwd()})"])
        return Source(pafs.LocalFileSystem(), _typed(path, [(os.path.abspath(m), m) for m in matches]))
    p = Path(local)
    if p.is_dir():
        saved = _saved_dataset(p, cfg.split, path)
        if saved is not None:
            return Source(pafs.LocalFileSystem(), saved)
        found = sorted(str(c) for c in p.iterdir() if c.is_file() and _is_data_name(c.name))
        if not found and _hub_clone(p):
            return Source(None, [], hub_name=str(p))  # a Hub dataset's repository, cloned: read as the Hub's are
        return Source(pafs.LocalFileSystem(), _typed(path, [(os.path.abspath(f), f) for f in found], folder=True))
    if p.exists() or p.suffix.lower() in FORMATS:
        if not p.exists():
            raise ConfigError(
                [f"dataset.path={path!r}: no such file; check the path (relative paths are read from {Path.cwd()})"]
            )
        return Source(pafs.LocalFileSystem(), _typed(path, [(os.path.abspath(p), str(p))]))
    return Source(None, [], hub_name=path)


def _resolve_uri(uri: str) -> Source:
    shown = redact(uri)
    base, pattern = uri, None
    scheme, rest = uri.split("://", 1)
    query = ""
    if "?" in rest:
        rest, query = rest.split("?", 1)
        query = "?" + query
    if any(c in rest for c in GLOB_CHARS):
        parts = rest.split("/")
        first = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
        base, pattern = f"{scheme}://{'/'.join(parts[:first])}{query}", "/".join(parts[first:])
    try:
        fs, root = pafs.FileSystem.from_uri(base)
        info = fs.get_file_info(root)
        if pattern is not None or info.type == pafs.FileType.Directory:
            selector = pafs.FileSelector(root, recursive=pattern is not None and "/" in pattern, allow_not_found=True)
            infos = [i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
            if pattern is not None:
                matches = _glob_regex(pattern).fullmatch
                infos = [i for i in infos if matches(i.path[len(root) :].lstrip("/"))]
            else:
                infos = [i for i in infos if _is_data_name(i.base_name)]
            files = sorted(i.path for i in infos)
        elif info.type == pafs.FileType.File:
            files = [root]
        else:
            raise ConfigError([f"dataset.path={shown!r}: no such file or folder in the store; check the URI"])
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(
            [
                f"dataset.path={shown!r}: the store could not be read ({redact(first_line(e))}); check the URI, the "
                "credentials in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "GOOGLE_APPLICATION_CREDENTIALS) and, for an S3-compatible server, ?endpoint_override=HOST:PORT"
            ]
        ) from e
    if not files:
        raise ConfigError([f"dataset.path={shown!r}: no data file there (looked for {', '.join(FORMATS)})"])
    prefix = shown.split("://", 1)[0] + "://"
    return Source(fs, _typed(shown, [(f, prefix + f) for f in files], folder=pattern is None and len(files) > 1))


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob as local globs read it: `*` and `?` stay inside a folder, `**/` spans any number of folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _hub_clone(folder: Path) -> bool:
    """Whether a folder without data files at its top is a clone of a Hub dataset's repository: a card whose
    YAML header names its configs, or a `data/` folder of data files (what the Hub itself reads)."""
    card = folder / "README.md"
    if card.is_file():
        text = card.read_text(errors="replace")
        if text.startswith("---") and "\nconfigs:" in text.split("\n---", 1)[0]:
            return True
    data = folder / "data"
    return data.is_dir() and any(_is_data_name(c.name) for c in data.rglob("*") if c.is_file())


def _saved_dataset(folder: Path, split: str, path: str) -> list[InputFile] | None:
    """The Arrow files of a `datasets` `save_to_disk` folder, in order (a DatasetDict's: `split`'s); None if
    `folder` is not one.

    Raises:
        ConfigError: a DatasetDict without that split, or a folder `datasets` did not finish writing.
    """
    import json

    if (folder / "dataset_dict.json").is_file():
        try:
            splits = list(json.loads((folder / "dataset_dict.json").read_text()).get("splits", []))
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise ConfigError([f"dataset.path={path!r}: its dataset_dict.json is not readable ({e})"]) from None
        if split not in splits:
            raise ConfigError(
                [f"dataset.split={split!r}: the saved dataset {path!r} has the splits {', '.join(splits)}; pick one"]
            )
        folder = folder / split
        if not (folder / "state.json").is_file():
            raise ConfigError([f"dataset.path={path!r}: split {split!r} has no state.json; save the dataset again"])
    state = folder / "state.json"
    if not state.is_file() or not (folder / "dataset_info.json").is_file():
        return None
    try:
        files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError([f"dataset.path={path!r}: {state} is not a datasets state file ({e})"]) from None
    missing = [f for f in files if not (folder / f).is_file()]
    if missing or not files:
        raise ConfigError(
            [f"dataset.path={path!r}: the saved dataset lacks {missing or 'its Arrow files'}; save it again"]
        )
    return [InputFile(str((folder / f).resolve()), str(folder / f), "arrow") for f in files]


def _is_data_name(name: str) -> bool:
    # Hidden and underscore names are not data, as Spark and pyarrow read folders.
    return not name.startswith((".", "_")) and Path(name).suffix.lower() in FORMATS


def _typed(path: str, files: list[tuple[str, str]], folder: bool = False) -> list[InputFile]:
    if not files:
        raise ConfigError([f"dataset.path={path!r}: the folder holds no {', '.join(FORMATS)} file"])
    kinds = {Path(shown).suffix.lower() for _, shown in files}
    unknown = sorted(k or "no suffix" for k in kinds if k not in FORMATS)
    if unknown:
        raise ConfigError(
            [
                f"dataset.path={path!r}: expected files ending in {', '.join(FORMATS)}; got {', '.join(unknown)}"
                + (" (a pattern like data/*.jsonl picks one kind)" if len(files) > 1 else "")
            ]
        )
    if len(kinds) > 1:
        raise ConfigError(
            [
                f"dataset.path={path!r}: {'the folder' if folder else 'the pattern'} mixes {', '.join(sorted(kinds))} "
                "files; point it at one kind, e.g. with a pattern like prompts/*.jsonl"
            ]
        )
    return [InputFile(p, shown, FORMATS[Path(shown).suffix.lower()]) for p, shown in files]


def read_chunks(source: Source, cfg: DatasetConfig, chunk_rows: int) -> Iterator[RawChunk]:
    """The input's rows in order, `chunk_rows` at a time (fewer at a file's end), up to `dataset.limit`.

    Raises:
        ConfigError: a file cannot be read, or the input has no rows.
    """
    left = cfg.limit if cfg.limit is not None else None
    row = 0
    chunks = _hub_chunks(source, cfg, chunk_rows) if source.hub_name else _file_chunks(source, chunk_rows)
    for chunk in chunks:
        if left is not None and chunk.rows > left:
            chunk = _head(chunk, left)
        if chunk.rows == 0:
            continue
        chunk.first_row = row
        row += chunk.rows
        yield chunk
        if left is not None:
            left -= chunk.rows
            if left <= 0:
                break
    if row == 0:
        raise ConfigError([f"dataset.path={redact(cfg.path)!r}: the dataset has no rows; point it at prompts"])


def _head(chunk: RawChunk, n: int) -> RawChunk:
    if chunk.table is not None:
        chunk.table = chunk.table.slice(0, n)
    else:
        chunk.lines = b"\n".join(chunk.lines.split(b"\n")[:n])
        chunk.line_numbers = chunk.line_numbers[:n]
    chunk.rows = n
    return chunk


def _file_chunks(source: Source, chunk_rows: int) -> Iterator[RawChunk]:
    for f in source.files:
        try:
            if f.fmt == "jsonl":
                yield from _jsonl_chunks(source.fs, f, chunk_rows)
            elif f.fmt == "parquet":
                import pyarrow.parquet as pq

                with source.fs.open_input_file(f.path) as handle:
                    yield from _table_chunks(f, pq.ParquetFile(handle).iter_batches(batch_size=chunk_rows))
            elif f.fmt == "arrow":  # a save_to_disk folder's files: Arrow IPC streams, read batch by batch
                with source.fs.open_input_file(f.path) as handle:
                    yield from _table_chunks(f, _rebatched(pa.ipc.open_stream(handle), chunk_rows), chunk_rows)
            elif f.fmt == "csv":
                yield from _table_chunks(f, _csv_as_text(source.fs, f), chunk_rows)
            else:
                yield from _table_chunks(f, [_read_json_array(source.fs, f)], chunk_rows)
        except ConfigError:
            raise
        except (OSError, pa.ArrowException, ValueError) as e:
            raise ConfigError([f"{f.shown}: could not be read as {f.fmt} ({redact(first_line(e))})"]) from e


def _table_chunks(f: InputFile, batches: Any, chunk_rows: int | None = None) -> Iterator[RawChunk]:
    done = 0
    for batch in batches:
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        for start in range(0, table.num_rows, chunk_rows or table.num_rows or 1):
            piece = table.slice(start, chunk_rows or table.num_rows)
            yield RawChunk(f.shown, 0, piece.num_rows, table=piece, first_file_row=done)
            done += piece.num_rows


def _rebatched(batches: Any, rows: int) -> Iterator[pa.Table]:
    """Record batches joined into tables of `rows` rows (a `datasets` Arrow file's batches hold 1,000)."""
    held, count = [], 0
    for batch in batches:
        held.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield pa.Table.from_batches(held)
            held, count = [], 0
    if held:
        yield pa.Table.from_batches(held)


def _csv_as_text(fs: pafs.FileSystem, f: InputFile) -> Iterator[pa.RecordBatch]:
    """A CSV file's record batches, every column as the text its cells hold: `00123` stays `00123`, `1.10`
    stays `1.10`, an empty cell is "" (no type is inferred, so no later block can contradict the first)."""
    import pyarrow.csv as pacsv

    with fs.open_input_stream(f.path) as handle:
        names = pacsv.open_csv(handle).schema.names  # the header (and one block) only
    text = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False)
    with fs.open_input_stream(f.path) as handle:
        yield from pacsv.open_csv(handle, convert_options=text)


def _read_json_array(fs: pafs.FileSystem, f: InputFile) -> pa.Table:
    import json

    with fs.open_input_stream(f.path) as handle:
        try:
            value = json.loads(handle.read().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError([f"{f.shown}: not valid JSON ({e}); a .json file holds one list of objects"]) from e
    if isinstance(value, dict) and all(isinstance(v, list) for v in value.values()):
        return pa.table(value)  # {"column": [values], ...}
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise ConfigError([f"{f.shown}: a .json file must hold a list of objects (or use .jsonl, one per line)"])
    return pa.Table.from_pylist(value)


def _jsonl_chunks(fs: pafs.FileSystem, f: InputFile, chunk_rows: int) -> Iterator[RawChunk]:
    lines: list[bytes] = []
    numbers: list[int] = []
    number, first_file_row = 0, 0
    with fs.open_input_stream(f.path) as handle:
        tail = b""
        while True:
            block = handle.read(BLOCK_BYTES)
            data = tail + block
            if block:
                cut = data.rfind(b"\n")
                if cut < 0:
                    tail = data
                    continue
                data, tail = data[:cut], data[cut + 1 :]
            elif not data:
                break  # the file ended with a newline
            for line in data.split(b"\n"):
                number += 1
                if line.strip():
                    lines.append(line)
                    numbers.append(number)
                    if len(lines) == chunk_rows:
                        yield _jsonl_chunk(f, lines, numbers, first_file_row)
                        first_file_row += len(lines)
                        lines, numbers = [], []
            if not block:
                break
    if lines:
        yield _jsonl_chunk(f, lines, numbers, first_file_row)


def _jsonl_chunk(f: InputFile, lines: list[bytes], numbers: list[int], first_file_row: int) -> RawChunk:
    return RawChunk(
        f.shown,
        0,
        len(lines),
        lines=b"\n".join(lines),
        line_numbers=np.array(numbers, dtype=np.int64),
        first_file_row=first_file_row,
    )


def _hub_chunks(source: Source, cfg: DatasetConfig, chunk_rows: int) -> Iterator[RawChunk]:
    import datasets

    datasets.disable_progress_bars()
    f = InputFile(source.hub_name, source.hub_name, "hub")
    try:  # streaming: rows arrive as they are read, the dataset is never held whole (nor downloaded first)
        ds = datasets.load_dataset(source.hub_name, name=cfg.name, split=cfg.split, streaming=True)
        tables = ds.with_format("arrow").iter(batch_size=chunk_rows)
        first = next(tables, None)
    except Exception as e:  # datasets raises many types; the user needs one clear line
        raise ConfigError(
            [
                f"dataset.path={cfg.path!r}: not a local file, folder or URI, and it could not be loaded as a "
                f"Hub dataset ({type(e).__name__}: {redact(first_line(e))}). Use a .jsonl/.json/.csv/.parquet file, "
                "a folder or pattern of them, an s3://, gs:// or file:// URI, or a Hub dataset name when the "
                "Hub is reachable"
            ]
        ) from e
    if first is None:
        return

    def stream() -> Iterator[pa.Table]:
        yield first
        try:
            yield from tables
        except Exception as e:  # a stream broken after its first rows: named; the run resumes from its shards
            raise ConfigError(
                [f"{redact(cfg.path)}: reading the Hub dataset failed ({type(e).__name__}: {redact(first_line(e))})"]
            ) from e

    yield from _table_chunks(f, stream(), chunk_rows)
