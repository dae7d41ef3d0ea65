"""One generation job end to end: check, plan as the input streams in, run on the pool, commit the manifest."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from runner import store
from runner.cluster import Session
from runner.config import JobConfig, as_dict
from runner.driver.feed import TaskFeed
from runner.driver.manifest import commit_manifest
from runner.driver.progress import ProgressBar, RunTotals
from runner.driver.start import JobStart, start
from runner.driver.stream import JobStream
from runner.errors import JobFailedError
from runner.tasks import ShardTask, WorkerSetup

log = logging.getLogger(__name__)


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
    scoring: bool = False  # a scoring job (generation.prompt_logprobs): prompts read, nothing generated

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
            (
                f"throughput:  {t.prompt_tokens / max(t.elapsed_s, 1e-9):.1f} prompt tokens scored/s over "
                f"{t.elapsed_s:.1f}s"
                if self.scoring
                else f"throughput:  {t.tokens_per_s:.1f} generated tokens/s over {t.elapsed_s:.1f}s"
            ),
            f"padding:     prompt-side efficiency {t.prompt_padding_efficiency:.3f} "
            f"(plan {self.plan_padding_efficiency:.3f}), generation-side {t.generation_efficiency:.3f}",
            *(
                [
                    f"not applied: {', '.join(sorted(t.ignored_settings))} (from the model's own generation "
                    "config; the engine does not apply these)"
                ]
                if t.ignored_settings
                else []
            ),
            f"output:      {self.output_dir}",
            f"manifest:    {self.manifest_path}",
        ]
        return "\n".join(lines)


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
        lease = store.acquire_lease(st.out, st.run_id, job.output.lease_timeout_s)  # before touching any file
        existing = _existing(st)
        session.warm_workers(st.job, st.model_path, st.model_revision, st.adapter_key)
        records = store.WindowRecords(st.out, st.config_hash, st.model_revision)
        stream = JobStream(job, st.spec, st.config_hash, existing, cached=session.cached_chunks(job), records=records)
        bar = ProgressBar(0, enabled=progress)
        _generate(st, stream, bar, session, lease.check)
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
    return RunSummary(
        output_dir=st.out.display,
        output_uri=st.out.uri,
        manifest_path=manifest_path,
        rows_total=stream.stats.outputs,
        rows_skipped=stream.stats.committed_outputs,
        rows_redone=stream.stats.redo_rows,
        errors=manifest["totals"]["errors"],
        totals=totals,
        plan_padding_efficiency=stream.stats.padding_efficiency,
        scoring=job.generation.prompt_logprobs,
    )


def _existing(st: JobStart) -> store.Existing:
    """What output.dir already holds of this job: shards to skip and, with retry_errors, rows to redo."""
    existing = store.scan_existing(st.out, st.config_hash, st.job.output.overwrite, st.model_revision)
    if existing.files:
        log.warning("resuming: %d shard files already in %s are kept and skipped", len(existing.files), st.out.display)
    if st.job.output.retry_errors and existing.files:
        existing.redo = store.error_rows(st.out, sorted(existing.files))
        count = sum(len(k) for rows in existing.redo.values() for k in rows.values())
        log.warning("retry_errors: %d error rows in %d files will be generated again", count, len(existing.redo))
    return existing


def _generate(st: JobStart, stream: JobStream, bar: ProgressBar, session: Session, check: Callable[[], None]) -> None:
    """Plan the windows as they are prepared and run their shards on the session's pool until both end."""
    try:
        _run_windows(st, stream, bar, session, check)
    finally:
        stream.close()


def _run_windows(
    st: JobStart, stream: JobStream, bar: ProgressBar, session: Session, check: Callable[[], None]
) -> None:
    windows = _tracked(stream.windows(), stream, bar)
    first: list[ShardTask] = []
    for first in windows:  # the first window with work; its carried columns fix the output schema
        if first:
            break
    if not first:
        return  # every shard is committed already
    setup = WorkerSetup(
        job=st.job,
        model_path=st.model_path,
        run_id=st.run_id,
        config_hash=st.config_hash,
        carry_schema=stream.carry_schema,
        file_metadata=store.file_metadata(as_dict(st.job), st.config_hash, st.run_id, st.model_revision),
        model_revision=st.model_revision,
        adapter=st.adapter,
        adapters=st.adapters,
    )
    known_shards = len(first) if stream.stats.prepared_s is not None else None  # the input ended in one window
    b = st.job.batching
    feed = TaskFeed(windows, first, max_queued=2 * -(-b.sort_window // b.shard_size) + 8)
    del first  # the feed holds the tasks now: prepared rows are freed as their shards finish
    try:
        pool = session.workers(st.job, setup, known_shards)
        pool.run(setup, feed, bar, check=check)
    except BaseException:
        session.drop_workers()  # a sweep's next point starts with no shard of this one still running
        raise
    finally:
        feed.close()
    if not (feed.finished and stream.finished):
        raise JobFailedError("planning stopped before the end of the input; rerun the same command")


def _tracked(windows: Iterator[list[ShardTask]], stream: JobStream, bar: ProgressBar) -> Iterator[list[ShardTask]]:
    """The stream's windows, telling the progress bar how many rows are planned so far."""
    for tasks in windows:
        bar.planned(stream.stats.rows, stream.stats.committed_rows)
        yield tasks
