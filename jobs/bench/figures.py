"""Throughput benchmark arithmetic: the workload, per-system figures, agreement, the table.

Pure functions over plain data. Every system (the plain recipe, sorted fixed
batches, the transformers pipeline, a Ray Data peer, the runner) reports what
each of its generate calls held (`BatchRecord`) and its wall time; the figures
are computed here the same way for all of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BatchRecord:
    """One generate call: its rows, their real prompt lengths, the padded width, what each row generated."""

    ids: list[str]
    prompt_tokens: list[int]
    padded_prompt_tokens: int  # prompt positions the model read, padding included
    completion_tokens: list[int]  # tokens each row generated, EOS included, padding after EOS not
    completions: list[str]
    worker: str = "main"
    end_s: float | None = None  # seconds since the system started, when this call finished
    row_steps: int | None = None  # tokens computed for its rows, when the system reports it (else rows x longest)


@dataclass
class SystemResult:
    name: str
    wall_s: float
    batches: list[BatchRecord]
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    row_steps: int | None = None  # tokens the system computed for all its rows, when it counts them itself

    def completions(self) -> dict[str, str]:
        return {i: c for b in self.batches for i, c in zip(b.ids, b.completions)}


def select_workload(lengths: Sequence[int], count: int, max_prompt_tokens: int | None) -> list[int]:
    """Indices of the first `count` rows whose prompt has at most `max_prompt_tokens` tokens (None: any)."""
    picked = [i for i, n in enumerate(lengths) if max_prompt_tokens is None or n <= max_prompt_tokens]
    return picked[:count]


def fixed_batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive slices of `order`, `batch_size` rows each (the last may be short)."""
    return [list(order[k : k + batch_size]) for k in range(0, len(order), batch_size)]


def completion_length(tokens: Sequence[int], end_ids: set[int]) -> int:
    """Tokens a row generated: up to and including its first end token; every token when it never ended."""
    for k, token in enumerate(tokens):
        if token in end_ids:
            return k + 1
    return len(tokens)


def figures(result: SystemResult) -> dict[str, Any]:
    """Generated tokens/s, wall time and both padding efficiencies of one system's run."""
    rows = sum(len(b.ids) for b in result.batches)
    generated = sum(sum(b.completion_tokens) for b in result.batches)
    real_prompt = sum(sum(b.prompt_tokens) for b in result.batches)
    padded_prompt = sum(b.padded_prompt_tokens for b in result.batches)
    # A static batch runs every row until its longest row ends: rows x that many steps. Systems that
    # drop ended rows (continuous batching) report what they computed.
    row_steps = result.row_steps
    if row_steps is None:
        row_steps = sum(
            b.row_steps if b.row_steps is not None else len(b.ids) * max(b.completion_tokens, default=0)
            for b in result.batches
        )
    return {
        "system": result.name,
        "rows": rows,
        "batches": len(result.batches),
        "wall_s": result.wall_s,
        "generated_tokens": generated,
        "tokens_per_s": generated / result.wall_s if result.wall_s > 0 else 0.0,
        "prompt_tokens": real_prompt,
        "padded_prompt_tokens": padded_prompt,
        "prompt_efficiency": real_prompt / padded_prompt if padded_prompt else 1.0,
        "generation_efficiency": generated / row_steps if row_steps else 1.0,
        "notes": result.notes,
        **result.extra,
    }


def agreement(reference: dict[str, str], other: dict[str, str]) -> tuple[float, list[str]]:
    """Share of the reference's ids whose completion `other` reproduced exactly; the ids that differ."""
    if not reference:
        return 1.0, []
    differ = sorted(i for i, text in reference.items() if other.get(i) != text)
    return 1 - len(differ) / len(reference), differ


def worker_idle_at_end(batches: Iterable[BatchRecord]) -> dict[str, float]:
    """Per worker: seconds between its last finished batch and the last batch of the whole run."""
    last: dict[str, float] = {}
    for b in batches:
        if b.end_s is not None:
            last[b.worker] = max(last.get(b.worker, 0.0), b.end_s)
    if not last:
        return {}
    end = max(last.values())
    return {w: end - t for w, t in sorted(last.items())}


def compare(results: list[SystemResult], baseline: str = "plain") -> list[dict[str, Any]]:
    """One row of figures per system, with its speed-up over `baseline` and its agreement with it."""
    rows = [figures(r) for r in results]
    base = next((r for r in results if r.name == baseline), results[0] if results else None)
    base_rate = figures(base)["tokens_per_s"] if base else 0.0
    reference = base.completions() if base else {}
    for result, row in zip(results, rows):
        row["speedup"] = row["tokens_per_s"] / base_rate if base_rate else None
        row["agreement"], differ = agreement(reference, result.completions())
        row["differing_ids"] = differ[:20]
        row["missing_rows"] = len(set(reference) - set(result.completions()))
    return rows


def markdown_table(rows: list[dict[str, Any]], baseline: str = "plain") -> str:
    header = (
        f"| system | wall s | generated tok/s | vs {baseline} | prompt padding eff. | generation eff. | batches "
        f"| same completions as {baseline} |"
    )
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        lines.append(
            f"| {r['system']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | {speedup} "
            f"| {r['prompt_efficiency']:.3f} | {r['generation_efficiency']:.3f} | {r['batches']} "
            f"| {r['agreement'] * 100:.1f}% |"
        )
    return "\n".join(lines)


# Per workload: (system, baseline, minimum speed-up), the least prompt-side and generation-side efficiency
SPEEDUP_TARGETS = {
    "short": [("runner", "plain", 2.0), ("runner", "ray_data", 1.2), ("runner", "sorted", 1.1)],
    "long": [("runner", "sorted", 1.5), ("runner", "plain", 3.0), ("runner", "generate_batch", 1.2)],
    "fewshot": [("runner", "sorted", 3.0), ("runner", "generate_batch", 1.5)],
}
PROMPT_EFFICIENCY_TARGET = {"short": 0.9, "long": 0.95, "fewshot": 0.9}
COMPUTED_PROMPT_TARGET = 1.2  # few-shot: prompt tokens the runner computes / the prompts' unshared tokens
GENERATION_EFFICIENCY_TARGET = {"long": 0.95}


def verdicts(rows: list[dict[str, Any]], workload: str = "short") -> list[str]:
    """One line per target (met or MISSED) and, for a run with several workers, each one's idle time at the end."""
    by_name = {r["system"]: r for r in rows}
    lines = []
    for system, baseline, minimum in SPEEDUP_TARGETS[workload]:
        if system in by_name and baseline in by_name and by_name[baseline]["tokens_per_s"]:
            ratio = by_name[system]["tokens_per_s"] / by_name[baseline]["tokens_per_s"]
            verdict = "met" if ratio >= minimum else "MISSED"
            lines.append(f"- {system} / {baseline}: {ratio:.2f}x (target >= {minimum}x) {verdict}")
    for name in ("runner", "runner_2w"):
        if name not in by_name:
            continue
        eff, least = by_name[name]["prompt_efficiency"], PROMPT_EFFICIENCY_TARGET[workload]
        lines.append(f"- {name} prompt padding efficiency: {eff:.3f} (target >= {least}) {_met(eff >= least)}")
        if workload in GENERATION_EFFICIENCY_TARGET:
            eff, least = by_name[name]["generation_efficiency"], GENERATION_EFFICIENCY_TARGET[workload]
            lines.append(f"- {name} generation-side efficiency: {eff:.3f} (target >= {least}) {_met(eff >= least)}")
        idle = by_name[name].get("worker_idle_at_end_s") or {}
        if len(idle) > 1:
            shown = ", ".join(f"{w.split('/')[-1]} {s:.1f}s" for w, s in idle.items())
            lines.append(f"- {name} idle at the end per worker: {shown} (run {by_name[name]['wall_s']:.1f}s)")
    return lines


def computed_verdicts(rows: list[dict[str, Any]], unshared: int) -> list[str]:
    """The prompt tokens each runner system computed against the prompts' unshared tokens."""
    lines = []
    for r in rows:
        computed = r.get("computed_prompt_tokens")
        if computed is None or not unshared:
            continue
        ratio = computed / unshared
        lines.append(
            f"- {r['system']} computed prompt tokens: {computed:,} = {ratio:.2f}x the prompts' {unshared:,} unshared "
            f"tokens (target <= {COMPUTED_PROMPT_TARGET}x) {_met(ratio <= COMPUTED_PROMPT_TARGET)}"
        )
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def to_json(rows: list[dict[str, Any]], workload: dict[str, Any]) -> str:
    return json.dumps({"workload": workload, "systems": rows}, indent=2, default=str)
