"""The output contract: Arrow schema, atomic shard files, the manifest, resume.

A finished run's directory holds `part-*.parquet` files (never a partial file
under a `.parquet` name) and `manifest.json`, written last. Files are written
under a hidden temporary name and renamed into place, so a reader or a rerun
only ever sees whole shards. `output.dir` is a local path or any URI that
pyarrow's filesystems accept (file://, s3://, gs://).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from runner.config import ConfigError

MANIFEST = "manifest.json"
META_CONFIG = b"runner.config"
META_CONFIG_HASH = b"runner.config_hash"
META_PLAN = b"runner.plan_fingerprint"
META_RUN_ID = b"runner.run_id"
# "hf_token" or "api_key" are secrets; "max_new_tokens" is not.
SECRET_KEY = re.compile(r"(^|_)token$|secret|passw|api_?key|credential|auth", re.IGNORECASE)

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
BASE_COLUMNS = frozenset(f.name for f in BASE_FIELDS)


def output_schema(carry_schema: pa.Schema, metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    """The explicit schema of every data file: contract columns, then the carried input columns."""
    clash = [n for n in carry_schema.names if n in BASE_COLUMNS]
    if clash:
        raise ValueError(f"carried input columns clash with output columns: {clash}")
    return pa.schema(BASE_FIELDS + list(carry_schema), metadata=metadata)


def file_metadata(config: dict[str, Any], config_hash: str, plan_fingerprint: str, run_id: str) -> dict[bytes, bytes]:
    """Key-value metadata stored in each Parquet file (the resolved config, secrets redacted)."""
    return {
        META_CONFIG: json.dumps(redact(config), sort_keys=True, default=str).encode(),
        META_CONFIG_HASH: config_hash.encode(),
        META_PLAN: plan_fingerprint.encode(),
        META_RUN_ID: run_id.encode(),
    }


def redact(value: Any) -> Any:
    """Mask secret-looking keys and credentials embedded in URIs, recursively."""
    if isinstance(value, dict):
        return {k: ("***" if SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str) and "@" in value and "://" in value:
        parts = urlsplit(value)
        if parts.password or parts.username:
            host = parts.hostname or ""
            return urlunsplit(parts._replace(netloc=f"***@{host}" + (f":{parts.port}" if parts.port else "")))
    return value


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
        raise ConfigError([f"output.dir={redact(uri)!r}: not a usable path or URI ({e})"]) from e
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
                f"output.dir={redact(out.uri)!r}: cannot write there ({e}); choose a writable "
                "directory or fix its permissions"
            ]
        ) from e


def shard_file_name(shard_id: int, num_shards: int, plan_fingerprint: str) -> str:
    return f"part-{shard_id:05d}-of-{num_shards:05d}-{plan_fingerprint[:8]}.parquet"


def write_shard(out: OutputDir, name: str, table: pa.Table) -> str:
    """Write one shard as zstd Parquet under a temporary name, then rename it into place."""
    final = out.join(name)
    tmp = out.join(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    with out.fs.open_output_stream(tmp) as sink:
        pq.write_table(table, sink, compression="zstd")
    out.fs.move(tmp, final)
    return final


def list_data_files(out: OutputDir) -> list[pafs.FileInfo]:
    """Committed data files (`*.parquet`, not hidden temporaries)."""
    try:
        infos = out.fs.get_file_info(pafs.FileSelector(out.path, allow_not_found=True))
    except (OSError, pa.ArrowException):
        return []
    return sorted(
        (i for i in infos if i.is_file and i.base_name.endswith(".parquet") and not i.base_name.startswith(".")),
        key=lambda i: i.base_name,
    )


def read_file_metadata(out: OutputDir, path: str) -> dict[bytes, bytes]:
    with out.fs.open_input_file(path) as f:
        return pq.read_schema(f).metadata or {}


@dataclass
class ResumeState:
    """What an existing output directory already holds for this job."""

    done: set[str]  # file names of committed shards of this plan
    rows: int


def check_existing(out: OutputDir, config_hash: str, plan_fingerprint: str, overwrite: bool) -> ResumeState:
    """Decide what to do with files already in `out`: resume, refuse, or clear them.

    Raises:
        ConfigError: the directory holds another config's (or another input's) results.
    """
    _remove_stale_temporaries(out)
    files = list_data_files(out)
    if overwrite:
        for info in files:
            out.fs.delete_file(info.path)
        _delete_if_exists(out, out.join(MANIFEST))
        return ResumeState(set(), 0)
    done, rows = set(), 0
    for info in files:
        meta = read_file_metadata(out, info.path)
        theirs = meta.get(META_CONFIG_HASH, b"?").decode()
        their_plan = meta.get(META_PLAN, b"?").decode()
        if theirs != config_hash or their_plan != plan_fingerprint:
            what = "another config" if theirs != config_hash else "the same config over different input data"
            raise ConfigError(
                [
                    f"output.dir={redact(out.uri)!r} already holds results of {what} "
                    f"(config hash mismatch: it has {theirs}/{their_plan[:8]}, this job is "
                    f"{config_hash}/{plan_fingerprint[:8]}, in {info.base_name}); "
                    "write elsewhere with output.dir=..., or replace them with output.overwrite=true"
                ]
            )
        done.add(info.base_name)
        with out.fs.open_input_file(info.path) as f:
            rows += pq.ParquetFile(f).metadata.num_rows
    return ResumeState(done, rows)


def _remove_stale_temporaries(out: OutputDir) -> None:
    """Drop half-written files of a run that died; one run at a time owns an output directory."""
    try:
        infos = out.fs.get_file_info(pafs.FileSelector(out.path, allow_not_found=True))
    except (OSError, pa.ArrowException):
        return
    for info in infos:
        if info.is_file and info.base_name.startswith(".") and ".tmp-" in info.base_name:
            out.fs.delete_file(info.path)


def _delete_if_exists(out: OutputDir, path: str) -> None:
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
    path = out.join(MANIFEST)
    if out.fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with out.fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def describe_files(out: OutputDir) -> list[dict[str, Any]]:
    """Name and row count of every committed data file (what the manifest lists)."""
    described = []
    for info in list_data_files(out):
        with out.fs.open_input_file(info.path) as f:
            described.append({"path": info.base_name, "rows": pq.ParquetFile(f).metadata.num_rows, "bytes": info.size})
    return described
