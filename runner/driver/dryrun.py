"""See the plan before paying for it: read, prepare and plan the whole input, load no model.

`jobs/plan.py` (the same overrides as `jobs/generate.py`) prints rows, prompt tokens,
batches, shards, padding efficiency of the streamed, windowed plan (and, with
--compare-global-sort, of one global sort of the same rows) and the longest prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from runner import plan
from runner.cluster import Session
from runner.config import JobConfig, has_row_settings, planned_batch_rows
from runner.driver.start import start
from runner.driver.stream import JobStream, PlanStats


@dataclass
class DryRun:
    job: JobConfig
    stats: PlanStats
    global_padding_efficiency: float | None
    seconds: float  # reading, preparing and planning (the dry run itself)
    compare_s: float = 0.0  # planning the same rows with one global sort, when asked

    def describe(self) -> str:
        s, b = self.stats, self.job.batching
        samples = self.job.generation.num_return_sequences
        lines = [
            f"rows:        {s.rows} ({s.outputs} output rows"
            + (", with their own settings" if has_row_settings(self.job) else f" with {samples} sample(s) each")
            + ")",
            f"prompt:      {s.prompt_tokens} tokens, {s.prompt_tokens / max(s.rows, 1):.1f} per row"
            + (f"; {s.truncated} prompts cut from the left to fit the context" if s.truncated else ""),
            f"plan:        {s.batches} batches in {s.shards} shards (shard_size={b.shard_size}, "
            f"max_batch_size={planned_batch_rows(b)}), {s.windows} sort window(s) of {b.sort_window} rows",
            f"padding:     prompt-side efficiency {s.padding_efficiency:.4f} sorted in windows"
            + (
                f", {self.global_padding_efficiency:.4f} with one global sort (compared in {self.compare_s:.1f}s)"
                if self.global_padding_efficiency is not None
                else ""
            ),
            f"generation:  at most {s.outputs * self.job.generation.max_new_tokens} new tokens "
            f"(max_new_tokens={self.job.generation.max_new_tokens})",
            f"prepared:    in {self.seconds:.1f}s ({s.rows / max(self.seconds, 1e-9):.0f} rows/s)",
            "longest prompts: " + ", ".join(f"{i!r} ({n} tokens)" for n, i in s.longest),
        ]
        return "\n".join(lines)


def dry_run(job: JobConfig, compare_global: bool = False) -> DryRun:
    """Plan the job as a run would, without a model or an output directory.

    Raises:
        ConfigError: anything a run would refuse before generating (config, input, too-long prompts).
    """
    started = time.time()
    st = start(job, dry_run=True)
    session = Session()
    try:
        session.connect(job.cluster)
        stream = JobStream(job, st.spec, st.config_hash, None, keep_lengths=compare_global)
        for _ in stream.windows():  # plan every window and drop its tasks: prepared rows are freed as it goes
            pass
    finally:
        session.close()
    seconds = time.time() - started
    global_eff = None
    if compare_global and stream.stats.lengths:
        lengths = np.concatenate(stream.stats.lengths).tolist()
        g, b = job.generation, job.batching
        whole = plan.plan_shards(
            range(len(lengths)),
            lengths,
            g.max_new_tokens,
            g.num_return_sequences,
            b.max_batch_tokens,
            planned_batch_rows(b),
            b.shard_size,
        )
        global_eff = plan.padding_efficiency(whole, lengths, b.step_cost_tokens)
    return DryRun(job, stream.stats, global_eff, seconds, time.time() - started - seconds)
