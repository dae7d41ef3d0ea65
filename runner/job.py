"""One generation job end to end: check, load, plan, run on Ray, commit the manifest."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from runner import __version__, output, resume, sources
from runner import lease as lease_lib
from runner.config import ConfigError, JobConfig, JobFailedError, as_dict, config_hash, validate
from runner.prepare import TOKENS, PrepareSpec
from runner.progress import ProgressBar, RunTotals
from runner.session import Session
from runner.stream import JobStream, TaskFeed
from runner.worker import WorkerSetup

log = logging.getLogger(__name__)


@dataclass
class JobStart:
    """What is known before any input row is read: checked config, output, model, preparation spec."""

    job: JobConfig
    out: output.OutputDir | None  # None for a dry run
    model_path: str
    spec: PrepareSpec
    config_hash: str
    run_id: str


@dataclass
class RunSummary:
    output_dir: str  # as shown: credentials in a URI masked
    output_uri: str  # as given, to open it again (never printed)
    manifest_path: str
    rows_total: int
    rows_skipped: int  # committed by an earlier run and not redone
    rows_redone: int  # error rows of an earlier run generated again (output.retry_errors)
    errors: int  # rows in the output with finish_reason=error
    totals: RunTotals
    plan_padding_efficiency: float

    def describe(self) -> str:
        t = self.totals
        lines = [
            f"rows:        {self.rows_total} in the output ({t.rows} generated now"
            + (f", {self.rows_skipped} from an earlier run" if self.rows_skipped else "")
            + ")",
            f"tokens:      {t.prompt_tokens} prompt, {t.completion_tokens} generated",
            f"errors:      {self.errors} rows with finish_reason=error"
            + (" (rerun with output.retry_errors=true to generate them again)" if self.errors else "")
            + (f"; {self.rows_redone} error rows of an earlier run generated again" if self.rows_redone else ""),
            f"throughput:  {t.tokens_per_s:.1f} generated tokens/s over {t.elapsed_s:.1f}s",
            f"padding:     prompt-side efficiency {t.prompt_padding_efficiency:.3f} "
            f"(plan {self.plan_padding_efficiency:.3f}), generation-side {t.generation_efficiency:.3f}",
            f"output:      {self.output_dir}",
            f"manifest:    {self.manifest_path}",
        ]
        return "\n".join(lines)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def start(job: JobConfig, dry_run: bool = False) -> JobStart:
    """Check the config, the input's location, the output directory and the model; read no row.

    Raises:
        ConfigError: anything wrong with the config, the input path, the output directory or the model.
    """
    from runner import model as model_lib

    validate(job)
    sources.resolve(job.dataset)  # a wrong path fails here, before Ray or a model starts
    out = None
    if not dry_run:
        out = output.open_output_dir(job.output.dir)
        output.ensure_writable(out)
    model_path = model_lib.resolve_model_path(job.model.name_or_path)
    context = model_lib.context_length(model_path, job.model)
    if context and context - job.generation.max_new_tokens < 1:
        raise ConfigError(
            [
                f"generation.max_new_tokens={job.generation.max_new_tokens}: the model's context is "
                f"{context} tokens, leaving no room for a prompt; lower it"
            ]
        )
    reserved = frozenset(output.BASE_COLUMNS | {TOKENS})
    spec = PrepareSpec(job.dataset, model_path, job.model, job.generation.max_new_tokens, context, reserved)
    return JobStart(job, out, model_path, spec, config_hash(job), new_run_id())


def run_job(job: JobConfig, progress: bool | None = None, session: Session | None = None) -> RunSummary:
    """Run the job; resume from committed shards in output.dir. Returns the summary.

    Args:
        job: the validated-or-not job config.
        progress: show a progress bar (default: when stderr is a terminal).
        session: keep Ray, the loaded workers and the prepared input for the next job
            (a sweep); without one, everything is started for this job and stopped after it.
    """
    own_session = session is None
    session = session or Session()
    lease = None
    try:
        st = start(job)
        lease = lease_lib.acquire(st.out, st.run_id, job.output.lease_timeout_s)  # before touching any file
        existing = resume.scan_existing(st.out, st.config_hash, job.output.overwrite)
        if existing.files:
            log.warning(
                "resuming: %d shard files already in %s are kept and skipped", len(existing.files), st.out.display
            )
        if job.output.retry_errors and existing.files:
            existing.redo = resume.error_rows(st.out, sorted(existing.files))
            count = sum(len(k) for rows in existing.redo.values() for k in rows.values())
            log.warning("retry_errors: %d error rows in %d files will be generated again", count, len(existing.redo))
        session.connect(job.cluster)
        stream = JobStream(job, st.spec, st.config_hash, existing, cached=session.cached_chunks(job))
        bar = ProgressBar(0, enabled=progress)
        windows = _tracked(stream.windows(), stream, bar)
        first: list = []
        for first in windows:  # the first window with work; its carried columns fix the output schema
            if first:
                break
        if first:
            setup = WorkerSetup(
                job=job,
                model_path=st.model_path,
                run_id=st.run_id,
                config_hash=st.config_hash,
                carry_schema=stream.carry_schema,
                file_metadata=output.file_metadata(as_dict(job), st.config_hash, st.run_id),
            )
            ended = stream.stats.prepared_s is not None
            feed = TaskFeed(windows, first, max_queued=2 * -(-job.batching.sort_window // job.batching.shard_size) + 8)
            known_shards = len(first) if ended else None
            del first  # the feed holds the tasks now: prepared rows are freed as their shards finish
            try:
                pool = session.workers(job, setup, known_shards)
                pool.run(setup, feed, bar, check=lease.check)
            except BaseException:
                session.drop_workers()  # a sweep's next point starts with no shard of this one still running
                raise
            finally:
                feed.close()
            if not (feed.finished and stream.finished):
                raise JobFailedError("planning stopped before the end of the input; rerun the same command")
        if stream.single_window is not None:
            session.keep_chunks(job, stream.single_window)
        totals = bar.close()
        lease.check()
        manifest_path, manifest = commit_manifest(st, stream, totals, bar.shard_files)
    finally:
        try:
            if own_session:
                session.close()
        finally:
            if lease is not None:
                lease.release()
    samples = job.generation.num_return_sequences
    return RunSummary(
        output_dir=st.out.display,
        output_uri=st.out.uri,
        manifest_path=manifest_path,
        rows_total=stream.stats.rows * samples,
        rows_skipped=stream.stats.committed_rows * samples,
        rows_redone=stream.stats.redo_rows,
        errors=manifest["totals"]["errors"],
        totals=totals,
        plan_padding_efficiency=stream.stats.padding_efficiency,
    )


def _tracked(windows, stream: JobStream, bar: ProgressBar):
    """The stream's windows, telling the progress bar how many rows are planned so far."""
    for tasks in windows:
        bar.planned(stream.stats.rows, stream.stats.committed_rows)
        yield tasks


def commit_manifest(
    st: JobStart, stream: JobStream, totals: RunTotals, written: dict[str, dict]
) -> tuple[str, dict[str, Any]]:
    """Check the directory holds every planned shard and nothing else, then write `_manifest.json` (last).

    Row and token totals come from this run's workers and, for shards of earlier runs, from
    their files' footers (read in parallel): no data file is read in full.
    """
    out = st.out
    present = {i.base_name: i.size for i in output.list_data_files(out)}
    expected = {s.name: s.rows for s in stream.shards}
    missing = sorted(set(expected) - set(present))
    if missing:
        raise JobFailedError(
            f"{len(missing)} shard files are missing after the run: {missing[:5]}; "
            "rerun the same command to finish them"
        )
    extra = sorted(set(present) - set(expected))
    if extra:
        raise ConfigError(
            [
                f"output.dir={out.display!r} holds {len(extra)} data files this job did not plan "
                f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}): results of a run over more input "
                "rows. Remove them, or rerun with output.overwrite=true"
            ],
            title="output.dir holds results of different input",
        )
    earlier = [n for n in expected if n not in written]
    per_file = dict(written) | dict(zip(earlier, resume.read_shard_totals(out, earlier)))
    samples = st.job.generation.num_return_sequences
    wrong = [n for n, rows in expected.items() if per_file[n]["rows"] != rows * samples]
    if wrong:
        raise JobFailedError(
            f"{len(wrong)} files do not hold their planned rows, e.g. {wrong[:3]}; rerun with overwrite"
        )
    files = [
        {
            "path": n,
            "rows": per_file[n]["rows"],
            "errors": per_file[n].get("errors", 0),
            "completion_tokens": per_file[n]["completion_tokens"],
            "bytes": present[n],
        }
        | {k: written[n][k] for k in ("worker", "started_at", "ended_at", "generated_steps") if k in written.get(n, {})}
        for n in sorted(expected)
    ]
    run_ids = sorted({r for t in per_file.values() for r in t.get("run_ids", [])})
    manifest: dict[str, Any] = {
        "run_id": st.run_id,
        "run_ids": run_ids,
        "config_hash": st.config_hash,
        "plan_fingerprint": _plan_fingerprint(stream),
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
    return output.write_manifest(out, manifest), manifest


def _plan_fingerprint(stream: JobStream) -> str:
    digest = hashlib.sha256()
    for shard in stream.shards:
        digest.update(shard.name.encode())
    return digest.hexdigest()[:16]
