"""The run's last act: check the directory holds every planned shard and nothing else, then write
`_manifest.json`.

Row and token totals come from this run's workers and, for shards of earlier runs, from
their files' footers (read in parallel): no data file is read in full.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone
from typing import Any

from runner import __version__, store
from runner.config import as_dict
from runner.driver.progress import RunTotals
from runner.driver.start import JobStart
from runner.driver.stream import JobStream
from runner.errors import ConfigError, JobFailedError, listing

REPORTED = ("worker", "started_at", "ended_at", "generated_steps")  # what only this run's workers know of a file


def commit_manifest(
    st: JobStart, stream: JobStream, totals: RunTotals, written: dict[str, dict]
) -> tuple[str, dict[str, Any]]:
    """Write the manifest of a finished run; returns its path and content.

    Args:
        written: the figures of each file this run committed (`ShardDone.figures`), by name.

    Raises:
        JobFailedError: a planned shard is missing, or a file does not hold its planned rows.
        ConfigError: the directory holds data files this job did not plan.
    """
    present = {i.base_name: i.size for i in store.list_data_files(st.out)}
    expected = {s.name: s.outputs for s in stream.shards}
    _check_present(st, expected, present)
    earlier = [n for n in expected if n not in written]
    per_file = dict(written) | dict(zip(earlier, store.read_shard_totals(st.out, earlier)))
    wrong = [n for n, rows in expected.items() if per_file[n]["rows"] != rows]
    if wrong:
        raise JobFailedError(
            f"{len(wrong)} files do not hold their planned rows: {listing(wrong, 3)}; rerun with overwrite"
        )
    files = [_file_entry(n, per_file[n], present[n], written.get(n, {})) for n in sorted(expected)]
    manifest = _manifest(st, stream, totals, files, per_file)
    return store.write_manifest(st.out, manifest), manifest


def _check_present(st: JobStart, expected: dict[str, int], present: dict[str, int]) -> None:
    missing = sorted(set(expected) - set(present))
    if missing:
        raise JobFailedError(
            f"{len(missing)} shard files are missing after the run: {listing(missing)}; "
            "rerun the same command to finish them"
        )
    extra = sorted(set(present) - set(expected))
    if extra:
        raise ConfigError(
            [
                f"output.dir={st.out.display!r} holds {len(extra)} data files this job did not plan "
                f"({listing(extra, 3)}): results of a run over more input rows. Remove them, or rerun with "
                "output.overwrite=true"
            ],
            title="output.dir holds results of different input",
        )


def _file_entry(name: str, figures: dict[str, Any], size: int, reported: dict[str, Any]) -> dict[str, Any]:
    entry = {
        "path": name,
        "rows": figures["rows"],
        "errors": figures.get("errors", 0),
        "completion_tokens": figures["completion_tokens"],
        "bytes": size,
    }
    return entry | {k: reported[k] for k in REPORTED if k in reported}


def _manifest(
    st: JobStart, stream: JobStream, totals: RunTotals, files: list[dict], per_file: dict[str, dict]
) -> dict[str, Any]:
    return {
        "run_id": st.run_id,
        "run_ids": sorted({r for t in per_file.values() for r in t.get("run_ids", [])}),
        "config_hash": st.config_hash,
        "model_revision": st.model_revision,
        "adapter": st.adapter,
        "adapters": st.adapters,
        "plan_fingerprint": plan_fingerprint(stream),
        "runner_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "config": as_dict(st.job),
        "files": files,
        "totals": {
            "rows": sum(f["rows"] for f in files),
            "files": len(files),
            "errors": sum(f["errors"] for f in files),
            "prompt_tokens": sum(t["prompt_tokens"] for t in per_file.values()),
            "completion_tokens": sum(t["completion_tokens"] for t in per_file.values()),
        },
        "plan": {
            "rows": stream.stats.rows,
            "shards": stream.stats.shards,
            "batches": stream.stats.batches,
            "windows": stream.stats.windows,
            "sort_window": st.job.batching.sort_window,
            "prompt_padding_efficiency": round(stream.stats.padding_efficiency, 4),
        },
        "this_run": totals.as_dict(),
        "host": os.uname().nodename,
    }


def plan_fingerprint(stream: JobStream) -> str:
    digest = hashlib.sha256()
    for shard in stream.shards:
        digest.update(shard.name.encode())
    return digest.hexdigest()[:16]
