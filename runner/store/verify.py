"""Check a run directory against its manifest: files, row counts, uniqueness, schema."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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
    keys: Counter = Counter()
    samples = manifest.get("config", {}).get("generation", {}).get("num_return_sequences", 1)
    config = manifest.get("config", {})
    # the contract's columns, the optional ones where the run has them (logprobs, an adapter)
    expected = output.contract_fields(
        config.get("generation", {}).get("logprobs") is not None, bool(config.get("model", {}).get("adapter"))
    )
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
            pairs = list(zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist()))
            keys.update(pairs)
            if "finish_reason" in table.column_names:
                failed = [p for p, r in zip(pairs, table.column("finish_reason").to_pylist()) if r == "error"]
                verdict.errors += len(failed)
                verdict.error_examples += failed[: 3 - len(verdict.error_examples)]
    repeated = [k for k, n in keys.items() if n > 1]
    if repeated:
        verdict.problems.append(f"{len(repeated)} (id, sample_index) pairs appear more than once, e.g. {repeated[:3]}")
    bad_samples = sorted({s for _, s in keys if not 0 <= s < samples})
    if bad_samples:
        verdict.problems.append(f"sample_index values {bad_samples[:5]} outside 0..{samples - 1}")
    per_id = Counter(i for i, _ in keys)
    short = [i for i, n in per_id.items() if n != samples]
    if short:
        verdict.problems.append(f"{len(short)} ids do not have exactly {samples} samples, e.g. {short[:3]}")
    counted = manifest.get("totals", {}).get("errors")
    if counted is not None and counted != verdict.errors:
        verdict.problems.append(f"{verdict.errors} error rows in the files, the manifest totals say {counted}")
    expected = manifest.get("totals", {}).get("rows")
    if expected is not None and verdict.rows != expected:
        verdict.problems.append(f"{verdict.rows} rows in the files, the manifest totals say {expected}")
    return verdict


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
