"""Check a run directory against its manifest: files, row counts, uniqueness, schema."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from runner.store import output


@dataclass
class Verdict:
    rows: int = 0
    files: int = 0
    errors: int = 0  # rows with finish_reason=error
    error_examples: list[tuple[str, int]] = field(default_factory=list)  # (id, sample_index) of a few
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_run(uri: str) -> Verdict:
    """Every check a user relies on; the verdict lists each problem found."""
    out = output.open_output_dir(uri)
    verdict = Verdict()
    manifest = output.read_manifest(out)
    if manifest is None:
        verdict.problems.append(
            f"no {output.MANIFEST} in {out.display}: the run has not finished; rerun the same command to finish it"
        )
        return verdict
    listed = {f["path"]: f["rows"] for f in manifest.get("files", [])}
    present = {i.base_name for i in output.list_data_files(out)}
    for name in sorted(present - set(listed)):
        verdict.problems.append(f"{name}: a data file the manifest does not list")
    for name in sorted(set(listed) - present):
        verdict.problems.append(f"{name}: listed in the manifest but missing")
    keys = _Keys()
    samples = manifest.get("config", {}).get("generation", {}).get("num_return_sequences", 1)
    config = manifest.get("config", {})
    # the contract's columns, the optional ones where the run has them (logprobs, an adapter)
    dataset = config.get("dataset", {})
    own_settings = bool(dataset.get("settings_columns")) or dataset.get("format") == "openai_batch"
    expected = output.contract_fields(
        config.get("generation", {}).get("logprobs") is not None,
        bool(config.get("model", {}).get("adapter")),
        own_settings,
        bool(config.get("model", {}).get("adapters")),
        bool(config.get("generation", {}).get("prompt_logprobs")),
        any(config.get("generation", {}).get(k) is not None for k in ("json_schema", "regex", "choice"))
        or bool(dataset.get("schema_column")),
    )
    readable = []
    for name in sorted(set(listed) & present):
        table = _read(out, name, verdict)
        if table is None:
            continue
        verdict.files += 1
        verdict.rows += table.num_rows
        if table.num_rows != listed[name]:
            verdict.problems.append(f"{name}: {table.num_rows} rows, the manifest says {listed[name]}")
        _check_schema(name, table.schema, manifest["config_hash"], verdict, expected)
        if "id" in table.column_names and "sample_index" in table.column_names:
            readable.append(name)
            ids, indices = table.column("id").to_pylist(), table.column("sample_index").to_pylist()
            wants = _wants(table, samples, own_settings)
            keys.add(ids, indices, wants)
            bad = sorted({k for k, n in zip(indices, wants) if not 0 <= k < n})
            verdict.problems += [f"{name}: sample_index values {bad[:5]} outside 0..{samples - 1}"] if bad else []
            if "finish_reason" in table.column_names:
                reasons = table.column("finish_reason").to_pylist()
                failed = [(i, k) for i, k, r in zip(ids, indices, reasons) if r == "error"]
                verdict.errors += len(failed)
                verdict.error_examples += failed[: 3 - len(verdict.error_examples)]
        del table
    repeated, short = keys.suspects()
    if repeated or short:  # hashes can collide: the suspects are counted exactly, in a second pass
        repeated, short = _exact(out, readable, repeated, short, samples, own_settings)
    if repeated:
        verdict.problems.append(f"{len(repeated)} (id, sample_index) pairs appear more than once, e.g. {repeated[:3]}")
    if short:
        each = "their own num_return_sequences" if own_settings else samples
        verdict.problems.append(f"{len(short)} ids do not have exactly {each} samples, e.g. {short[:3]}")
    counted = manifest.get("totals", {}).get("errors")
    if counted is not None and counted != verdict.errors:
        verdict.problems.append(f"{verdict.errors} error rows in the files, the manifest totals say {counted}")
    expected = manifest.get("totals", {}).get("rows")
    if expected is not None and verdict.rows != expected:
        verdict.problems.append(f"{verdict.rows} rows in the files, the manifest totals say {expected}")
    return verdict


SAMPLES = "num_return_sequences"  # the column of each row's own number of samples, where rows have settings


class _Keys:
    """Every (id, sample_index) pair and every id seen, as 64-bit hashes: 16 bytes a row, not Python tuples.

    Python's own string hash (randomized per process, stable within one) is enough: a collision only
    makes a pair a suspect, and suspects are counted exactly from the files again (`_exact`).
    """

    def __init__(self) -> None:
        self.pairs: list[Any] = []
        self.ids: list[Any] = []
        self.wants: list[Any] = []

    def add(self, ids: list[str], indices: list[int], wants: Any) -> None:
        """`wants`: each row's id's number of samples (int32 values)."""
        self.pairs.append(np.fromiter((hash((i, k)) for i, k in zip(ids, indices)), np.int64, len(ids)))
        self.ids.append(np.fromiter((hash(i) for i in ids), np.int64, len(ids)))
        self.wants.append(np.asarray(wants, dtype=np.int32))

    def suspects(self) -> tuple[set[int], set[int]]:
        """Hashes of pairs seen more than once, and of ids with other than the samples they want."""
        pairs = np.concatenate(self.pairs) if self.pairs else np.zeros(0, np.int64)
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)
        wants = np.concatenate(self.wants) if self.wants else np.zeros(0, np.int32)
        values, first, counts = np.unique(pairs, return_index=True, return_counts=True)
        # each distinct pair once, then per id: how many, and what its first row wants
        id_values, where, per_id = np.unique(ids[first], return_index=True, return_counts=True)
        return set(values[counts > 1].tolist()), set(id_values[per_id != wants[first][where]].tolist())


def _exact(
    out: output.OutputDir,
    names: list[str],
    pair_hashes: set[int],
    id_hashes: set[int],
    samples: int,
    own_settings: bool = False,
) -> tuple[list[tuple[str, int]], list[str]]:
    """The pairs that really repeat and the ids that really lack samples, among the suspects' hashes."""
    pairs: Counter = Counter()
    per_id: dict[str, set[int]] = {}
    want: dict[str, int] = {}
    for name in names:
        with out.fs.open_input_file(out.join(name)) as f:
            schema = pq.read_schema(f)
            columns = [
                c for c in ("id", "sample_index", SAMPLES) if c in schema.names and (own_settings or c != SAMPLES)
            ]
            table = pq.read_table(f, columns=columns)
        wants = _wants(table, samples, own_settings)
        rows = zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist(), wants)
        for i, k, n in rows:
            if hash((i, k)) in pair_hashes:
                pairs[(i, k)] += 1
            if hash(i) in id_hashes:
                per_id.setdefault(i, set()).add(k)
                want.setdefault(i, int(n))
    return [p for p, n in pairs.items() if n > 1], [i for i, ks in per_id.items() if len(ks) != want[i]]


def _wants(table: pa.Table, samples: int, own_settings: bool) -> Any:
    """Samples each row's id wants: its num_return_sequences column where rows have their own, else the job's
    (elsewhere a column of that name is a carried input column)."""
    if own_settings and SAMPLES in table.column_names:
        return table.column(SAMPLES).fill_null(samples).to_numpy(zero_copy_only=False)
    return np.full(table.num_rows, samples, dtype=np.int32)


def _read(out: output.OutputDir, name: str, verdict: Verdict) -> pa.Table | None:
    try:
        with out.fs.open_input_file(out.join(name)) as f:
            return pq.read_table(f)
    except (OSError, pa.ArrowException) as e:
        verdict.problems.append(f"{name}: unreadable ({e})")
        return None


def _check_schema(name: str, schema: pa.Schema, config_hash: str, verdict: Verdict, fields: list[pa.Field]) -> None:
    for expected in fields:
        if expected.name not in schema.names:
            verdict.problems.append(f"{name}: column {expected.name!r} is missing")
        elif schema.field(expected.name).type != expected.type:
            verdict.problems.append(
                f"{name}: column {expected.name!r} is {schema.field(expected.name).type}, expected {expected.type}"
            )
    theirs = (schema.metadata or {}).get(output.META_CONFIG_HASH, b"").decode()
    if theirs != config_hash:
        verdict.problems.append(f"{name}: config hash {theirs or 'missing'} differs from the manifest's {config_hash}")
