"""What each planned window of a run was: the digest of its raw input and the shards it planned.

A rerun reads the raw input again but need not prepare (render, tokenize) a window whose raw
rows are what an earlier run of the same config and model revision planned, when every shard
that window planned is committed: the window is skipped with what its record says (shard names,
row and token counts, its ids' hashes for the check of repeated ids, the carried columns' schema).
A 90%-done job then starts its workers after reading its input, not after preparing 90% of it.

Records live in `_windows/` of the run directory (skipped by every Parquet reader), one JSON file
per window (`window-NNNNNN.rec`) and one `.npy` array of its sorted id hashes (`window-NNNNNN.ids`),
each written atomically. A record of another
config, revision or input is not used and is written over when that window is planned again.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from runner.store.output import OutputDir

FOLDER = "_windows"
VERSION = 1
# Names no dataset reader takes for data: HF datasets picks its reader by the commonest extension in a
# directory, subfolders included, and one `.json` per window would outnumber the Parquet files.
RECORD = ".rec"  # the record, as JSON
IDS = ".ids"  # the window's sorted unique id hashes, as a .npy array


@dataclass
class WindowRecord:
    index: int
    digest: str  # of the window's raw input rows (`runner.input.chunk_digest`)
    config_hash: str
    model_revision: str
    first_batch: int  # its first batch id (the windows before it planned that many batches)
    batches: int
    shards: list[list[Any]]  # [shard_id, file name, input rows, output rows] of each shard it planned
    counts: dict[str, int] = field(default_factory=dict)  # rows, prompt_tokens, padded_prompt_tokens, ...
    carry_schema: str = ""  # the carried columns' Arrow schema (IPC, base64)
    ids_digest: str = ""  # of its `.ids` file: ids written by another run of this window are not used
    version: int = VERSION

    def schema(self) -> pa.Schema:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.carry_schema)))

    @staticmethod
    def encode_schema(schema: pa.Schema) -> str:
        return base64.b64encode(schema.serialize().to_pybytes()).decode()


class WindowRecords:
    """The window records of one run directory, for one config hash and model revision."""

    def __init__(self, out: OutputDir, config_hash: str, model_revision: str):
        self.out = out
        self.config_hash = config_hash
        self.model_revision = model_revision
        self._found = self._read_all()

    def _path(self, index: int, suffix: str) -> str:
        return self.out.join(f"{FOLDER}/window-{index:06d}{suffix}")

    def _read_all(self) -> dict[int, WindowRecord]:
        """Every readable record of this config and revision (others, and unreadable ones, are not used)."""
        try:
            infos = self.out.fs.get_file_info(pafs.FileSelector(self.out.join(FOLDER), allow_not_found=True))
        except OSError:
            return {}
        found = {}
        for info in infos:
            if not (info.base_name.startswith("window-") and info.base_name.endswith(RECORD)):
                continue
            try:
                with self.out.fs.open_input_stream(info.path) as f:
                    record = WindowRecord(**json.loads(f.read()))
            except (OSError, ValueError, TypeError):
                continue
            if (record.version, record.config_hash, record.model_revision) == (
                VERSION,
                self.config_hash,
                self.model_revision,
            ):
                found[record.index] = record
        return found

    def has(self, index: int) -> bool:
        """Whether an earlier run of this config and revision recorded window `index`."""
        return index in self._found

    def get(self, index: int, digest: str) -> WindowRecord | None:
        """The record of window `index` if it planned exactly this raw input."""
        record = self._found.get(index)
        return record if record is not None and record.digest == digest else None

    def ids(self, record: WindowRecord) -> np.ndarray | None:
        """The window's sorted unique id hashes (None: unreadable, so the window is prepared again)."""
        try:
            with self.out.fs.open_input_stream(self._path(record.index, IDS)) as f:
                data = f.read()
            if _digest(data) != record.ids_digest:
                raise ValueError("the ids file is not this record's")
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError):
            self._found.pop(record.index, None)  # written again when the window is planned
            return None

    def write(self, record: WindowRecord, ids: np.ndarray) -> None:
        """Record a planned window (ids first, and their digest in the record: a record is used with its ids)."""
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(ids, dtype=np.uint64), allow_pickle=False)
        record.ids_digest = _digest(buffer.getvalue())
        if self._found.get(record.index) == record:
            return  # planned again as it was: nothing new to say
        self.out.fs.create_dir(self.out.join(FOLDER), recursive=True)
        self._put(self._path(record.index, IDS), buffer.getvalue())
        self._put(self._path(record.index, RECORD), json.dumps(asdict(record), sort_keys=True).encode())
        self._found[record.index] = record

    def _put(self, path: str, data: bytes) -> None:
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"  # hidden, as the shard files' temporaries are
        with self.out.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.out.fs.move(tmp, path)


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.blake2b(data, digest_size=16).hexdigest()
