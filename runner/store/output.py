"""The output contract: Arrow schema, atomic shard files, the manifest.

A finished run's directory is a Parquet dataset: `part-*.parquet` files (never a
partial file under a `.parquet` name), and everything else named with a leading
underscore, which readers skip: `_manifest.json`, written last, and the report in
`_report/`. Files are written under a hidden temporary name and renamed into place,
so a reader or a rerun only ever sees whole shards. A shard's file name holds its
number and its fingerprint (content, batching and config), so a rerun finds what is
committed from one listing of the directory (`runner.store.resume`). `output.dir` is a local path
or any URI that pyarrow's filesystems accept (file://, s3://, gs://).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from runner.errors import ConfigError, first_line
from runner.secrets import mask_text, redact

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"  # what runs before the Parquet-dataset layout wrote
SHARD_NAME = re.compile(r"^part-(\d{6})-([0-9a-f]{12})\.parquet$")
META_CONFIG = b"runner.config"
META_CONFIG_HASH = b"runner.config_hash"
META_PLAN = b"runner.plan_fingerprint"
META_RUN_ID = b"runner.run_id"
META_MODEL_REVISION = b"runner.model_revision"
META_TOTALS = b"runner.shard_totals"  # rows and token counts of the file, so a manifest needs no column reads

BASE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("completion", pa.string()),
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("truncated_tokens", pa.int32(), nullable=False),
    pa.field("completion_tokens", pa.int32()),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("model", pa.string(), nullable=False),
    pa.field("quantization", pa.string(), nullable=False),
    pa.field("model_revision", pa.string(), nullable=False),
    pa.field("temperature", pa.float64()),
    pa.field("top_p", pa.float64()),
    pa.field("top_k", pa.int32()),
    pa.field("repetition_penalty", pa.float64()),
    pa.field("do_sample", pa.bool_(), nullable=False),
    pa.field("max_new_tokens", pa.int32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("generation_config", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("config_hash", pa.string(), nullable=False),
    pa.field("shard_id", pa.int32(), nullable=False),
    pa.field("batch_id", pa.int32(), nullable=False),
    pa.field("batch_size", pa.int32(), nullable=False),
    pa.field("padded_length", pa.int32(), nullable=False),
    pa.field("worker", pa.string(), nullable=False),
    pa.field("device", pa.string(), nullable=False),
    pa.field("latency_s", pa.float64(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
]
TOP_LOGPROB = pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())])
# Only with generation.logprobs: one value per generated token (EOS included), null on error rows.
LOGPROB_FIELDS = [
    pa.field("token_logprobs", pa.list_(pa.float32())),
    pa.field("top_logprobs", pa.list_(pa.list_(TOP_LOGPROB))),
    pa.field("cumulative_logprob", pa.float64()),
]
# Only in scoring jobs (generation.prompt_logprobs): log p of each prompt token after the first, and their sum.
PROMPT_LOGPROB_FIELDS = [
    pa.field("prompt_logprobs", pa.list_(pa.float32())),
    pa.field("prompt_logprob_sum", pa.float64()),
]
BASE_COLUMNS = frozenset(f.name for f in BASE_FIELDS)
ADAPTER_FIELD = pa.field("adapter", pa.string(), nullable=False)  # only with model.adapter: name@hash of its weights
ADAPTERS_FIELD = pa.field("adapter", pa.string())  # with model.adapters: each row's, null for the base model alone
# Only in jobs whose rows have settings of their own (dataset.settings_columns, an OpenAI Batch file): with
# the sampling columns above, what each row used.
SETTINGS_FIELDS = [
    pa.field("stop_strings", pa.list_(pa.string()), nullable=False),
    pa.field("num_return_sequences", pa.int32(), nullable=False),
]
# Only in jobs with structured output: each row's constraint, {"json_schema" | "regex" | "choice": ...}
# as JSON text (null: its completion was free).
STRUCTURED_FIELD = pa.field("structured_output", pa.string())


def contract_fields(
    logprobs: bool = False,
    adapter: bool = False,
    settings: bool = False,
    many_adapters: bool = False,
    scoring: bool = False,
    structured: bool = False,
) -> list[pa.Field]:
    """The runner's own columns of a data file, in order (the optional ones where the job has them)."""
    return (
        BASE_FIELDS
        + (SETTINGS_FIELDS if settings else [])
        + ([STRUCTURED_FIELD] if structured else [])
        + ([ADAPTERS_FIELD] if many_adapters else [ADAPTER_FIELD] if adapter else [])
        + (LOGPROB_FIELDS if logprobs else [])
        + (PROMPT_LOGPROB_FIELDS if scoring else [])
    )


def reserved_columns(
    logprobs: bool = False,
    adapter: bool = False,
    settings: bool = False,
    scoring: bool = False,
    structured: bool = False,
) -> frozenset[str]:
    """Names no carried input column may keep (it is carried as input_NAME): the job's own columns only,
    so an input column named like an optional one stays as it is in jobs without that option."""
    return frozenset(
        f.name for f in contract_fields(logprobs, adapter, settings, scoring=scoring, structured=structured)
    )


def output_schema(
    carry_schema: pa.Schema,
    metadata: dict[bytes, bytes] | None = None,
    logprobs: bool = False,
    adapter: bool = False,
    settings: bool = False,
    many_adapters: bool = False,
    scoring: bool = False,
    structured: bool = False,
) -> pa.Schema:
    """The explicit schema of every data file: contract columns, then the carried input columns."""
    reserved = reserved_columns(logprobs, adapter or many_adapters, settings, scoring, structured)
    clash = [n for n in carry_schema.names if n in reserved]
    if clash:
        raise ValueError(f"carried input columns clash with output columns: {clash}")
    fields = contract_fields(logprobs, adapter, settings, many_adapters, scoring, structured)
    return pa.schema(fields + list(carry_schema), metadata=metadata)


def file_metadata(config: dict[str, Any], config_hash: str, run_id: str, model_revision: str) -> dict[bytes, bytes]:
    """Key-value metadata stored in each Parquet file (the resolved config, secrets redacted).

    Each file adds its shard's fingerprint (META_PLAN) and its totals (META_TOTALS).
    """
    return {
        META_CONFIG: json.dumps(redact(config), sort_keys=True, default=str).encode(),
        META_CONFIG_HASH: config_hash.encode(),
        META_RUN_ID: run_id.encode(),
        META_MODEL_REVISION: model_revision.encode(),
    }


@dataclass(frozen=True)
class OutputDir:
    """A run directory on some pyarrow filesystem."""

    fs: pafs.FileSystem
    path: str  # path inside `fs`
    uri: str  # as the user wrote it

    @property
    def display(self) -> str:
        """Where the results are, as a user would type it (absolute for local paths, secrets masked)."""
        return self.path if isinstance(self.fs, pafs.LocalFileSystem) else redact(self.uri)

    def join(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"


def open_output_dir(uri: str) -> OutputDir:
    """Resolve `output.dir` (local path or URI) to a filesystem and a path."""
    try:
        if "://" in uri:
            fs, path = pafs.FileSystem.from_uri(uri)
        else:
            fs, path = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise ConfigError([f"output.dir={redact(uri)!r}: not a usable path or URI ({mask_text(first_line(e))})"]) from e
    return OutputDir(fs, path, uri)


def ensure_writable(out: OutputDir) -> None:
    """Create the directory and prove we can write into it, before any model loads."""
    probe = out.join(f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        out.fs.create_dir(out.path, recursive=True)
        with out.fs.open_output_stream(probe) as f:
            f.write(b"ok")
        out.fs.delete_file(probe)
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(
            [
                f"output.dir={redact(out.uri)!r}: cannot write there ({mask_text(first_line(e))}); choose a writable "
                "directory or fix its permissions"
            ]
        ) from e


def shard_file_name(shard_id: int, fingerprint: str) -> str:
    return f"part-{shard_id:06d}-{fingerprint[:12]}.parquet"


WRITE_ATTEMPTS = 4
WRITE_BACKOFF_S = 1.0  # doubled after each failed attempt: 1, 2, 4 s


def write_shard(out: OutputDir, name: str, table: pa.Table, backoff_s: float = WRITE_BACKOFF_S) -> str:
    """Write one shard as zstd Parquet under a temporary name, then rename it into place.

    On a local disk the file's bytes are flushed to the disk (fsync) before the rename and the
    directory after it, so a power loss leaves either no file or a whole one under the name.
    A failed write (a storage error, a dropped connection) is tried again with back-off;
    the last failure is raised (the pool then retries the shard).
    """
    from runner import faults

    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            faults.on_write(name)
            return _write_once(out, name, table)
        except (OSError, pa.ArrowException) as e:
            if attempt == WRITE_ATTEMPTS:
                raise
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning(
                "writing %s failed (attempt %d of %d: %s); trying again in %.0fs",
                name,
                attempt,
                WRITE_ATTEMPTS,
                mask_text(str(e).splitlines()[0] if str(e) else type(e).__name__),
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _write_once(out: OutputDir, name: str, table: pa.Table) -> str:
    final = out.join(name)
    tmp = out.join(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if isinstance(out.fs, pafs.LocalFileSystem):
            with open(tmp, "wb") as f:
                pq.write_table(table, f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(out.path)
            return final
        with out.fs.open_output_stream(tmp) as sink:  # object stores: the upload appears whole or not at all
            pq.write_table(table, sink, compression="zstd")
        out.fs.move(tmp, final)
        return final
    except BaseException:
        _delete_quietly(out, tmp)
        raise


def _delete_quietly(out: OutputDir, path: str) -> None:
    try:
        out.fs.delete_file(path)
    except (OSError, pa.ArrowException):
        pass


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_data_files(out: OutputDir) -> list[pafs.FileInfo]:
    """Committed data files (`*.parquet`, not hidden temporaries)."""
    return sorted((i for i in list_all(out) if is_data_file(i)), key=lambda i: i.base_name)


def read_file_metadata(out: OutputDir, path: str) -> dict[bytes, bytes]:
    with out.fs.open_input_file(path) as f:
        return pq.read_schema(f).metadata or {}


def list_all(out: OutputDir) -> list[pafs.FileInfo]:
    """Everything directly in `out` (nothing when it does not exist yet)."""
    try:
        return out.fs.get_file_info(pafs.FileSelector(out.path, allow_not_found=True))
    except (OSError, pa.ArrowException):
        return []


def is_data_file(info: pafs.FileInfo) -> bool:
    return info.is_file and info.base_name.endswith(".parquet") and not info.base_name.startswith((".", "_"))


def shard_totals(table: pa.Table) -> dict[str, Any]:
    """Rows, error rows, prompt tokens (once per input row), generated tokens and run ids of a shard's table."""
    import pyarrow.compute as pc

    first = pc.equal(table.column("sample_index"), 0)
    return {
        "rows": table.num_rows,
        "errors": pc.sum(pc.equal(table.column("finish_reason"), "error")).as_py() or 0,
        "prompt_tokens": pc.sum(table.filter(first).column("prompt_tokens")).as_py() or 0,
        "completion_tokens": pc.sum(table.column("completion_tokens")).as_py() or 0,
        "run_ids": sorted(table.column("run_id").unique().to_pylist()),
    }


def delete_if_exists(out: OutputDir, path: str) -> None:
    if out.fs.get_file_info(path).type != pafs.FileType.NotFound:
        out.fs.delete_file(path)


def write_manifest(out: OutputDir, manifest: dict[str, Any]) -> str:
    """Write manifest.json atomically (temporary name, then rename); it is the last thing a run writes."""
    final = out.join(MANIFEST)
    tmp = out.join(f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}")
    with out.fs.open_output_stream(tmp) as f:
        f.write(json.dumps(redact(manifest), indent=2, sort_keys=True, default=str).encode())
    out.fs.move(tmp, final)
    return final


def read_manifest(out: OutputDir) -> dict[str, Any] | None:
    """The run's manifest (`_manifest.json`, or `manifest.json` in directories of older runs)."""
    for name in (MANIFEST, LEGACY_MANIFEST):
        path = out.join(name)
        if out.fs.get_file_info(path).type != pafs.FileType.NotFound:
            with out.fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
    return None
