"""One generation job end to end: check, load, plan, run on Ray, commit the manifest."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from runner import __version__, data, output, plan
from runner.config import ConfigError, JobConfig, as_dict, config_hash, validate
from runner.progress import ProgressBar, RunTotals
from runner.session import Session, TokenizedInput

log = logging.getLogger(__name__)


@dataclass
class PreparedJob:
    """Everything known before any worker starts."""

    job: JobConfig
    out: output.OutputDir
    prompts: data.Prompts
    texts: list[str]
    input_ids: list[list[int]]
    truncated: list[int]
    plan: plan.Plan
    model_path: str
    config_hash: str
    run_id: str


@dataclass
class RunSummary:
    output_dir: str
    manifest_path: str
    rows_total: int
    rows_skipped: int  # committed by an earlier run and not redone
    totals: RunTotals
    plan_padding_efficiency: float

    def describe(self) -> str:
        t = self.totals
        lines = [
            f"rows:        {self.rows_total} in the output ({t.rows} generated now"
            + (f", {self.rows_skipped} from an earlier run" if self.rows_skipped else "")
            + ")",
            f"tokens:      {t.prompt_tokens} prompt, {t.completion_tokens} generated",
            f"throughput:  {t.tokens_per_s:.1f} generated tokens/s over {t.elapsed_s:.1f}s",
            f"padding:     prompt-side efficiency {t.prompt_padding_efficiency:.3f} "
            f"(plan {self.plan_padding_efficiency:.3f}), generation-side {t.generation_efficiency:.3f}",
            f"output:      {self.output_dir}",
            f"manifest:    {self.manifest_path}",
        ]
        return "\n".join(lines)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def prepare(job: JobConfig, session: Session | None = None) -> PreparedJob:
    """Validate, load and tokenize the input, and plan; no model weights are loaded.

    Raises:
        ConfigError: anything wrong with the config, the input or the output directory.
    """
    from runner import model as model_lib

    validate(job)
    out = output.open_output_dir(job.output.dir)
    tokenized = session.cached_input(job) if session else None
    if tokenized is None:
        prompts = data.load_prompts(job.dataset, reserved_columns=set(output.BASE_COLUMNS))
    output.ensure_writable(out)
    model_path = model_lib.resolve_model_path(job.model.name_or_path)
    if tokenized is None:
        tokenizer = model_lib.load_tokenizer(model_path, job.model)
        texts, add_special = data.render(prompts, tokenizer, job.model.chat_template)
        tokenized = TokenizedInput(prompts, texts, data.tokenize(tokenizer, texts, add_special))
        if session:
            session.keep_input(job, tokenized)
    input_ids = list(tokenized.input_ids)  # fit_context replaces the rows it cuts, never the cached ones
    truncated = fit_context(tokenized.prompts.ids, input_ids, job, model_lib.context_length(model_path, job.model))
    g, b = job.generation, job.batching
    the_plan = plan.plan_shards(
        tokenized.prompts.ids,
        [len(x) for x in input_ids],
        g.max_new_tokens,
        g.num_return_sequences,
        b.max_batch_tokens,
        b.max_batch_size,
        b.shard_size,
    )
    return PreparedJob(
        job,
        out,
        tokenized.prompts,
        tokenized.texts,
        input_ids,
        truncated,
        the_plan,
        model_path,
        config_hash(job),
        new_run_id(),
    )


def fit_context(ids: list[str], input_ids: list[list[int]], job: JobConfig, context: int | None) -> list[int]:
    """Make every prompt leave room for max_new_tokens in the model's context window.

    Returns:
        Tokens cut from the left of each prompt (all 0 unless dataset.too_long=truncate_left).

    Raises:
        ConfigError: prompts too long and dataset.too_long=refuse, or max_new_tokens alone fills the context.
    """
    truncated = [0] * len(input_ids)
    if not context:
        return truncated
    limit = context - job.generation.max_new_tokens
    if limit < 1:
        raise ConfigError(
            [
                f"generation.max_new_tokens={job.generation.max_new_tokens}: the model's context is "
                f"{context} tokens, leaving no room for a prompt; lower it"
            ]
        )
    too_long = [i for i, x in enumerate(input_ids) if len(x) > limit]
    if too_long and job.dataset.too_long == "refuse":
        shown = ", ".join(f"{ids[i]!r} ({len(input_ids[i])} tokens)" for i in too_long[:5])
        shown += ", ..." if len(too_long) > 5 else ""
        raise ConfigError(
            [
                f"{len(too_long)} prompts are longer than the model's context ({context} tokens) minus "
                f"generation.max_new_tokens={job.generation.max_new_tokens}: {shown}; "
                "shorten them, lower max_new_tokens, or set dataset.too_long=truncate_left to keep their ends"
            ],
            title=f"bad input in {job.dataset.path}",
        )
    for i in too_long:
        truncated[i] = len(input_ids[i]) - limit
        input_ids[i] = input_ids[i][-limit:]
    if too_long:
        log.warning(
            "%d prompts were cut from the left to fit the context (%d tokens); the truncated_tokens "
            "column says by how much",
            len(too_long),
            context,
        )
    return truncated


def shard_tasks(prep: PreparedJob, done: set[str]):
    """Tasks for every shard not yet committed, largest first."""
    from runner.worker import ShardTask

    tasks = []
    num_shards = len(prep.plan.shards)
    for shard in plan.schedule_order(prep.plan):
        name = output.shard_file_name(shard.shard_id, num_shards, prep.plan.fingerprint)
        if name in done:
            continue
        rows = shard.rows
        batches, start = [], 0
        for batch in shard.batches:
            batches.append((batch.batch_id, start, start + len(batch.rows)))
            start += len(batch.rows)
        tasks.append(
            ShardTask(
                shard_id=shard.shard_id,
                file_name=name,
                batches=batches,
                ids=[prep.prompts.ids[r] for r in rows],
                prompts=[prep.texts[r] for r in rows],
                input_ids=[prep.input_ids[r] for r in rows],
                truncated=[prep.truncated[r] for r in rows],
                carry=prep.prompts.carry.take(pa.array(rows, pa.int64())),
            )
        )
    return tasks


def run_job(job: JobConfig, progress: bool | None = None, session: Session | None = None) -> RunSummary:
    """Run the job; resume from committed shards in output.dir. Returns the summary.

    Args:
        job: the validated-or-not job config.
        progress: show a progress bar (default: when stderr is a terminal).
        session: keep Ray, the loaded workers and the tokenized input for the next job
            (a sweep); without one, everything is started for this job and stopped after it.
    """
    from runner.worker import WorkerSetup

    own_session = session is None
    session = session or Session()
    try:
        prep = prepare(job, session)
        state = output.check_existing(prep.out, prep.config_hash, prep.plan.fingerprint, job.output.overwrite)
        tasks = shard_tasks(prep, state.done)
        samples = job.generation.num_return_sequences
        bar = ProgressBar(prep.plan.num_rows, already_done=state.rows // samples, enabled=progress)
        if state.done:
            log.warning(
                "resuming: %d of %d shards already committed in %s",
                len(state.done),
                len(prep.plan.shards),
                prep.out.display,
            )
        if tasks:
            setup = WorkerSetup(
                job=job,
                model_path=prep.model_path,
                run_id=prep.run_id,
                config_hash=prep.config_hash,
                plan_fingerprint=prep.plan.fingerprint,
                carry_schema=prep.prompts.carry.schema,
                file_metadata=output.file_metadata(as_dict(job), prep.config_hash, prep.plan.fingerprint, prep.run_id),
            )
            session.workers(job, setup, len(tasks)).run(setup, tasks, bar)
        totals = bar.close()
    finally:
        if own_session:
            session.close()
    manifest_path = commit_manifest(prep, totals)
    return RunSummary(
        output_dir=prep.out.display,
        manifest_path=manifest_path,
        rows_total=prep.plan.num_rows * samples,
        rows_skipped=state.rows,
        totals=totals,
        plan_padding_efficiency=plan.padding_efficiency(
            prep.plan, [len(x) for x in prep.input_ids], job.batching.step_cost_tokens
        ),
    )


def commit_manifest(prep: PreparedJob, totals: RunTotals) -> str:
    """Check the directory holds every planned row once, then write manifest.json (last)."""
    files = output.describe_files(prep.out)
    expected = {
        output.shard_file_name(s.shard_id, len(prep.plan.shards), prep.plan.fingerprint) for s in prep.plan.shards
    }
    missing = expected - {f["path"] for f in files}
    if missing:
        raise RuntimeError(
            f"{len(missing)} shard files are missing after the run: {sorted(missing)[:5]}; "
            "rerun the same command to finish them"
        )
    counts = read_totals(prep.out, [f["path"] for f in files])
    samples = prep.job.generation.num_return_sequences
    if counts["rows"] != prep.plan.num_rows * samples:
        raise RuntimeError(f"the output holds {counts['rows']} rows, expected {prep.plan.num_rows * samples}")
    manifest: dict[str, Any] = {
        "run_id": prep.run_id,
        "run_ids": counts["run_ids"],
        "config_hash": prep.config_hash,
        "plan_fingerprint": prep.plan.fingerprint,
        "runner_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "config": as_dict(prep.job),
        "files": files,
        "totals": {k: v for k, v in counts.items() if k != "run_ids"},
        "this_run": totals.as_dict(),
        "host": os.uname().nodename,
    }
    return output.write_manifest(prep.out, manifest)


def read_totals(out: output.OutputDir, names: list[str]) -> dict[str, Any]:
    """Row and token totals over the committed files (earlier runs' shards included)."""
    rows = prompt_tokens = completion_tokens = 0
    run_ids: set[str] = set()
    for name in names:
        with out.fs.open_input_file(out.join(name)) as f:
            t = pq.read_table(f, columns=["prompt_tokens", "completion_tokens", "run_id", "sample_index"])
        rows += t.num_rows
        first = pc.equal(t.column("sample_index"), 0)
        prompt_tokens += pc.sum(t.filter(first).column("prompt_tokens")).as_py() or 0
        completion_tokens += pc.sum(t.column("completion_tokens")).as_py() or 0
        run_ids.update(t.column("run_id").unique().to_pylist())
    return {
        "rows": rows,
        "files": len(names),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "run_ids": sorted(run_ids),
    }
