"""Progress on the driver: a live bar while the run goes, totals for the summary."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from runner.tasks import BatchDone, Event, ShardDone, ShardRetried

MAX_RETRIES_LISTED = 1000


@dataclass
class RunTotals:
    """What this invocation generated (committed shards of earlier runs are not counted here)."""

    rows: int = 0
    sequences: int = 0
    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0
    computed_prompt_tokens: int = 0  # prompt positions the prefills computed: padding in, shared prefixes once
    completion_tokens: int = 0
    generated_steps: int = 0
    batches: int = 0
    shards: int = 0
    retries: int = 0
    retried: list[dict[str, Any]] = field(default_factory=list)  # which shard, why, when (epoch seconds)
    busy_s: dict[str, float] = field(default_factory=dict)
    ignored_settings: set[str] = field(default_factory=set)  # model defaults the engine did not apply
    started: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.time()) - self.started

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def prompt_padding_efficiency(self) -> float:
        """Real / padded prompt tokens."""
        return self.prompt_tokens / self.padded_prompt_tokens if self.padded_prompt_tokens else 1.0

    @property
    def generation_efficiency(self) -> float:
        """Useful decode steps / steps run (rows that finished early still occupy their slot)."""
        return self.completion_tokens / self.generated_steps if self.generated_steps else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "sequences": self.sequences,
            "batches": self.batches,
            "shards": self.shards,
            "prompt_tokens": self.prompt_tokens,
            "padded_prompt_tokens": self.padded_prompt_tokens,
            "computed_prompt_tokens": self.computed_prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "generated_steps": self.generated_steps,
            "retries": self.retries,
            "retried": self.retried,
            "started_at": self.started,
            "elapsed_s": round(self.elapsed_s, 3),
            "generated_tokens_per_s": round(self.tokens_per_s, 3),
            "prompt_padding_efficiency": round(self.prompt_padding_efficiency, 4),
            "generation_efficiency": round(self.generation_efficiency, 4),
            "worker_busy_s": {k: round(v, 3) for k, v in sorted(self.busy_s.items())},
            "ignored_model_settings": sorted(self.ignored_settings),
        }


class ProgressBar:
    """Counts rows as batches finish; shows generated tokens/s and the ETA."""

    def __init__(self, total_rows: int, already_done: int = 0, enabled: bool | None = None):
        from tqdm import tqdm

        self.totals = RunTotals()
        self.bar = tqdm(
            total=total_rows,
            initial=already_done,
            unit="row",
            desc="generating",
            disable=not (sys.stderr.isatty() if enabled is None else enabled),
            dynamic_ncols=True,
        )
        self._last_log = 0.0
        self._total = total_rows
        self._done = already_done
        self._committed = 0
        self._sent: dict[int, list[BatchDone]] = {}  # shard -> batch events of its running attempt
        self.shard_files: dict[str, dict[str, Any]] = {}  # file committed by this run -> its totals

    def planned(self, rows: int, committed_rows: int) -> None:
        """The input rows planned so far (it streams in) and those an earlier run already committed."""
        self._total = rows
        self.bar.total = rows
        if committed_rows > self._committed:
            self.bar.update(committed_rows - self._committed)
            self._done += committed_rows - self._committed
            self._committed = committed_rows
        self.bar.refresh()

    def __call__(self, event: Event) -> None:
        t = self.totals
        if isinstance(event, BatchDone):
            self._add(event, +1)
            self._sent.setdefault(event.shard_id, []).append(event)
            self._done += event.rows
            self.bar.update(event.rows)
            self.bar.set_postfix(tok_s=f"{t.tokens_per_s:.1f}", refresh=False)
            self._log_line()
        elif isinstance(event, ShardDone):
            t.shards += 1
            t.ignored_settings.update(event.ignored_settings)
            self._sent.pop(event.shard_id, None)
            self.shard_files[event.file] = event.figures()
        elif isinstance(event, ShardRetried):
            # The shard is redone from its start: what its failed attempt reported (rows, tokens, steps,
            # busy time) is taken back, so the totals count each row once and tokens/s only what was kept.
            rows = 0
            for sent in self._sent.pop(event.shard_id, []):
                self._add(sent, -1)
                rows += sent.rows
            self._done -= rows
            self.bar.update(-rows)
            t.retries += 1
            if len(t.retried) < MAX_RETRIES_LISTED:
                t.retried.append({"shard_id": event.shard_id, "error": event.error, "at": time.time()})
            self.bar.write(f"shard {event.shard_id} failed; retrying it ({event.error})")

    def _add(self, event: BatchDone, sign: int) -> None:
        t = self.totals
        t.rows += sign * event.rows
        t.sequences += sign * event.sequences
        t.prompt_tokens += sign * event.prompt_tokens
        t.padded_prompt_tokens += sign * event.padded_prompt_tokens
        t.computed_prompt_tokens += sign * event.computed_prompt_tokens
        t.completion_tokens += sign * event.completion_tokens
        t.generated_steps += sign * (event.generated_steps + event.empty_row_steps)  # empty rows decode too
        t.batches += sign
        t.busy_s[event.worker] = t.busy_s.get(event.worker, 0.0) + sign * event.latency_s

    @property
    def rows_done(self) -> int:
        """Rows in the output so far, earlier runs' included (what the bar and the ETA show)."""
        return self._done

    def _log_line(self) -> None:
        # Without a terminal (CI, `ray job submit` logs) print a plain line every few seconds instead.
        if not self.bar.disable or time.time() - self._last_log < 5:
            return
        self._last_log = time.time()
        t = self.totals
        rate = t.rows / t.elapsed_s if t.elapsed_s else 0
        eta = (self._total - self._done) / rate if rate else float("nan")
        print(
            f"[progress] {self._done}/{self._total} rows, {t.tokens_per_s:.1f} generated tok/s, ETA {eta:.0f}s",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> RunTotals:
        self.totals.finished = time.time()
        self.bar.close()
        return self.totals
