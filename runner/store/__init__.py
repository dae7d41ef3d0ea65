"""The output contract: the Arrow schema, atomic writes, resume, the lease, verify.

What the driver and the workers use of a run directory; no torch, no Ray.
"""

from runner.store.lease import Lease
from runner.store.lease import acquire as acquire_lease
from runner.store.openai_batch import BATCH_SHAPES, batch_lines, batch_shape
from runner.store.output import (
    BASE_COLUMNS,
    BASE_FIELDS,
    LEGACY_MANIFEST,
    LOGPROB_FIELDS,
    MANIFEST,
    META_CONFIG_HASH,
    META_PLAN,
    META_TOTALS,
    OutputDir,
    contract_fields,
    ensure_writable,
    file_metadata,
    list_data_files,
    open_output_dir,
    output_schema,
    read_manifest,
    reserved_columns,
    shard_file_name,
    shard_totals,
    write_manifest,
    write_shard,
)
from runner.store.resume import Existing, error_rows, read_shard_totals, scan_existing
from runner.store.verify import Verdict, verify_run
from runner.store.windows import WindowRecord, WindowRecords

__all__ = [
    "BATCH_SHAPES",
    "BASE_COLUMNS",
    "BASE_FIELDS",
    "LEGACY_MANIFEST",
    "LOGPROB_FIELDS",
    "MANIFEST",
    "META_CONFIG_HASH",
    "META_PLAN",
    "META_TOTALS",
    "Existing",
    "Lease",
    "OutputDir",
    "Verdict",
    "WindowRecord",
    "WindowRecords",
    "acquire_lease",
    "batch_lines",
    "batch_shape",
    "contract_fields",
    "ensure_writable",
    "error_rows",
    "file_metadata",
    "list_data_files",
    "open_output_dir",
    "output_schema",
    "read_manifest",
    "reserved_columns",
    "read_shard_totals",
    "scan_existing",
    "shard_file_name",
    "shard_totals",
    "verify_run",
    "write_manifest",
    "write_shard",
]
