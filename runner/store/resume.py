"""What an output directory already holds, for a rerun: committed shards, damaged files, error rows.

A rerun finds its committed shards from one listing of the directory (the file names hold
shard numbers and fingerprints); only one footer is read, to check the config hash. Files
a crash or a power loss cut short are reported and removed, so their shards run again.
With `output.retry_errors`, the files' footers say which hold error rows, and only those
files' columns are read.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from runner.errors import ConfigError, listing
from runner.secrets import redact
from runner.store.output import (
    LEGACY_MANIFEST,
    MANIFEST,
    META_CONFIG_HASH,
    META_MODEL_REVISION,
    META_TOTALS,
    SHARD_NAME,
    OutputDir,
    delete_if_exists,
    is_data_file,
    list_all,
    read_file_metadata,
    shard_totals,
)

log = logging.getLogger(__name__)
# What a file's totals are counted from when its footer does not record them (files of older runs).
TOTALS_COLUMNS = ("prompt_tokens", "completion_tokens", "sample_index", "run_id", "finish_reason")


PARQUET_MAGIC = b"PAR1"


def damaged(out: OutputDir, info: pafs.FileInfo) -> str | None:
    """Why a committed data file cannot be a whole Parquet file, or None.

    Every file: too short for Parquet's header and footer (a zero-length file after a power
    loss). On a local disk also: no Parquet magic at its end (cheap; on object storage that
    would cost a request per file, and uploads there appear whole or not at all).
    """
    if info.size is not None and info.size < 2 * len(PARQUET_MAGIC) + 4:
        return f"{info.size} bytes"
    if isinstance(out.fs, pafs.LocalFileSystem):
        try:
            with open(info.path, "rb") as f:
                f.seek(-len(PARQUET_MAGIC), os.SEEK_END)
                if f.read() != PARQUET_MAGIC:
                    return "no Parquet footer"
        except OSError as e:
            return f"unreadable ({e})"
    return None


@dataclass
class Existing:
    """What an output directory already holds for this job, from one listing of it."""

    files: dict[str, int]  # committed data file name -> size in bytes
    by_shard: dict[int, str]  # shard number -> file name
    redo: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # file -> row id -> error samples

    def committed(self, shard_id: int, name: str) -> bool:
        """Whether the planned shard is already in the directory.

        Raises:
            ConfigError: the directory holds this shard number for other rows: the input changed.
        """
        theirs = self.by_shard.get(shard_id)
        if theirs is None or theirs == name:
            return theirs is not None
        raise ConfigError(
            [
                f"the output directory already holds shard {shard_id} for other input rows ({theirs}; this job "
                f"plans {name}): the prompts, their order or the batching changed since that run. Write elsewhere "
                "with output.dir=..., or replace the old results with output.overwrite=true"
            ],
            title="output.dir holds results of different input",
        )


def written_here(out: OutputDir, info: pafs.FileInfo) -> bool:
    """A data file this runner wrote: its name is a shard's, and its footer holds the run's config hash
    (or it is a shard file cut short by a crash, which has no footer to read)."""
    if not info.base_name.startswith("part-"):  # this layout's names, and older layouts' (part-00000-of-00001-...)
        return False
    if damaged(out, info):
        return bool(SHARD_NAME.match(info.base_name))
    try:
        return META_CONFIG_HASH in read_file_metadata(out, info.path)
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        log.warning("%s: its footer could not be read (%s); it is left in place", info.base_name, e)
        return False


def scan_existing(out: OutputDir, config_hash: str, overwrite: bool, model_revision: str | None = None) -> Existing:
    """List `out` once: drop dead runs' temporaries, clear it (overwrite), or check what it holds is ours.

    Only one footer is read (the config hash of one file): what is committed comes from
    the file names, so resuming 10,000 shards on object storage costs one listing.

    Args:
        model_revision: what this job's workers load; results of another revision are refused
            (None: not checked).

    Raises:
        ConfigError: the directory holds another config's (or model revision's) results, or files of an
            older layout.
    """
    infos = list_all(out)
    for info in infos:
        if info.base_name.startswith(".") and ".tmp-" in info.base_name:
            out.fs.delete_file(info.path)
    data = [i for i in infos if is_data_file(i)]
    ours = {i.path for i in data if written_here(out, i)} if overwrite else set()
    # Without overwrite, a shard-named file of another run is judged below (config hash, damage).
    foreign = sorted(
        i.base_name for i in data if i.path not in ours and (overwrite or not SHARD_NAME.match(i.base_name))
    )
    if foreign:
        raise ConfigError(
            [
                f"output.dir={redact(out.uri)!r} holds data files this runner did not write ({listing(foreign, 3)}): "
                "another tool's files, or yours. Readers of the output would read them as results, and "
                "output.overwrite removes only files this runner wrote: move them away, or write elsewhere "
                "with output.dir=..."
            ]
        )
    if overwrite:
        for path in sorted(ours):
            out.fs.delete_file(path)
        for name in (MANIFEST, LEGACY_MANIFEST):
            delete_if_exists(out, out.join(name))
        if ours:
            log.warning("output.overwrite: removed %d data file(s) of an earlier run", len(ours))
        return Existing({}, {})
    broken = {i.base_name: problem for i in data if (problem := damaged(out, i))}
    whole = [i for i in data if i.base_name not in broken]
    if whole:
        meta = read_file_metadata(out, whole[0].path)
        theirs = meta.get(META_CONFIG_HASH, b"?").decode()
        if theirs != config_hash:
            raise ConfigError(
                [
                    f"output.dir={redact(out.uri)!r} already holds results of another config (config hash "
                    f"mismatch: it has {theirs}, this job is {config_hash}, in {whole[0].base_name}); write "
                    "elsewhere with output.dir=..., or replace them with output.overwrite=true"
                ]
            )
        recorded = meta.get(META_MODEL_REVISION, b"").decode()
        if model_revision is not None and recorded != model_revision:
            pin = (
                "restore the folder's files"
                if model_revision.startswith("local:")
                else "pin model.revision to the old commit"
            )
            raise ConfigError(
                [
                    f"output.dir={redact(out.uri)!r} holds results of model revision "
                    f"{recorded or '(none recorded: an older version of this runner)'} ({whole[0].base_name}); "
                    f"the model resolves to {model_revision} now: it changed since that run, and the two must not "
                    f"mix in one output. Write elsewhere with output.dir=..., {pin}, or generate everything again "
                    "with output.overwrite=true"
                ]
            )
    for info in data:  # our shards, cut short by a crash or a power loss: generated again
        if info.base_name in broken:
            log.warning(
                "%s is damaged (%s): removing it; its shard will be generated again",
                info.base_name,
                broken[info.base_name],
            )
            out.fs.delete_file(info.path)
    files = {i.base_name: i.size for i in whole}
    return Existing(files, {int(SHARD_NAME.match(n).group(1)): n for n in files})


def read_shard_totals(out: OutputDir, names: list[str], threads: int = 16) -> list[dict[str, Any]]:
    """The totals each file's footer records (older files: counted from their columns), read in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> dict[str, Any]:
        with out.fs.open_input_file(out.join(name)) as f:
            parquet = pq.ParquetFile(f)
            meta = parquet.schema_arrow.metadata or {}
            if META_TOTALS not in meta:
                return shard_totals(parquet.read(columns=[*TOTALS_COLUMNS]))
            totals = json.loads(meta[META_TOTALS])
            if "errors" not in totals:  # footers of older runs did not count error rows
                reasons = parquet.read(columns=["finish_reason"]).column("finish_reason")
                totals["errors"] = reasons.to_pylist().count("error")
            return totals

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, names))


def error_rows(out: OutputDir, names: list[str], threads: int = 16) -> dict[str, dict[str, list[int]]]:
    """The error rows (finish_reason=error) of committed files: file -> row id -> sample indices.

    Footers say which files hold any (one small read each); only those files' columns are read.
    """
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.compute as pc

    with_errors = [n for n, t in zip(names, read_shard_totals(out, names, threads)) if t.get("errors")]

    def one(name: str) -> dict[str, list[int]]:
        with out.fs.open_input_file(out.join(name)) as f:
            table = pq.read_table(f, columns=["id", "sample_index", "finish_reason"])
        table = table.filter(pc.equal(table.column("finish_reason"), "error"))
        found: dict[str, list[int]] = {}
        for row_id, k in zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist()):
            found.setdefault(row_id, []).append(k)
        return found

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return {n: rows for n, rows in zip(with_errors, pool.map(one, with_errors)) if rows}
