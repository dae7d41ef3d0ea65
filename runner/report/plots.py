"""The report's plots: lengths, finish reasons, throughput, the worker timeline and padding over the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def seconds(value: float) -> Any:
    import pandas as pd

    return pd.Timedelta(seconds=float(value))


def make_plots(rows: Any, batches: Any, out: Path, manifests: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Write the SVG plots into `out`; return them by name.

    Time runs along the x axis of the run plots (seconds since the first batch started), so a
    62-row demo and a 100,000-row job read the same way: every planned batch is drawn over
    its span, each shard over its span, a retried shard where it was retried.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifests = manifests or []
    start = (batches["created_at"] - batches["latency_s"].map(seconds)).min()
    spans = batches.assign(end=(batches["created_at"] - start).dt.total_seconds())
    spans["begin"] = spans["end"] - spans["latency_s"]
    shards = _shard_spans(manifests, start)
    figures = {
        "lengths": _lengths(rows),
        "finish_reasons": _finish_reasons(rows),
        "throughput": _throughput(spans),
        "timeline": _timeline(spans, shards, _retried(manifests, start)),
        "padding": _padding(spans, shards),
    }
    plots: dict[str, Path] = {}
    for name, fig in figures.items():
        plots[name] = out / f"{name}.svg"
        fig.tight_layout()
        fig.savefig(plots[name])
        plt.close(fig)
    return plots


def _lengths(rows: Any) -> Any:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    prompt_lengths = rows.loc[rows["sample_index"] == 0, "prompt_tokens"]
    axes[0].hist(prompt_lengths, bins=_int_bins(prompt_lengths), color="tab:blue")
    axes[0].set(title="prompt length", xlabel="tokens", ylabel="rows")
    completions = rows["completion_tokens"].fillna(0)
    for run, group in rows.groupby("run"):
        values = group["completion_tokens"].fillna(0)
        axes[1].hist(values, bins=_int_bins(completions), alpha=0.6, label=setting_label(group, run))
    axes[1].set(title="completion length", xlabel="tokens", ylabel="rows")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def _finish_reasons(rows: Any) -> Any:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    reasons = rows.groupby(["run", "finish_reason"]).size().unstack(fill_value=0)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    reasons.index = [setting_label(rows[rows["run"] == r], r) for r in reasons.index]
    reasons.plot.bar(ax=ax, stacked=True, rot=0)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title="finish reasons per setting", ylabel="rows", xlabel="")
    return fig


def _throughput(spans: Any) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.5))
    grid, total = _rate_grid(spans)
    for worker, group in spans.groupby("worker"):
        ax.plot(grid, _rate_grid(group, grid)[1], label=worker)
    if spans["worker"].nunique() > 1:
        ax.plot(grid, total, color="black", linestyle="--", label="all workers")
    ax.set(title="generated tokens/s over the run, per worker", xlabel="seconds since start", ylabel="tokens/s")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    return fig


def _timeline(spans: Any, shards: list[dict[str, Any]], retried: list[tuple[float, int]]) -> Any:
    import matplotlib.pyplot as plt

    workers = sorted(set(spans["worker"]) | {s["worker"] for s in shards})
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * len(workers)))
    for row, worker in enumerate(workers):
        group = spans[spans["worker"] == worker]
        ax.broken_barh(list(zip(group["begin"], group["latency_s"])), (row + 0.35, 0.5), color="tab:blue")
        mine = [s for s in shards if s["worker"] == worker]
        ax.broken_barh([(s["begin"], s["end"] - s["begin"]) for s in mine], (row + 0.1, 0.2), color="tab:gray")
    for at, shard_id in retried:
        ax.axvline(at, color="tab:red", linestyle=":")
        ax.text(at, len(workers), f" shard {shard_id} retried", color="tab:red", fontsize=7, va="top")
    ax.set_yticks([i + 0.5 for i in range(len(workers))], labels=workers, fontsize=7)
    ax.set_ylim(0, max(1, len(workers)))
    ax.set(
        title="worker timeline: batches (blue), shards (gray), idle (gaps), retried shards (red)",
        xlabel="seconds since start",
    )
    return fig


def _padding(spans: Any, shards: list[dict[str, Any]]) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.hlines(
        spans["prompt_efficiency"], spans["begin"], spans["end"], color="tab:blue", label="prompt side, per batch"
    )
    generation = [s for s in shards if s.get("generated_steps")]
    if generation:
        values = [s["completion_tokens"] / s["generated_steps"] for s in generation]
        begins, ends = [s["begin"] for s in generation], [s["end"] for s in generation]
        ax.hlines(values, begins, ends, color="tab:orange", linewidth=3, label="generation side, per shard")
    ax.set(
        title="padding efficiency over the run (real / padded prompt tokens; useful / computed decode steps)",
        xlabel="seconds since start",
        ylim=(0, 1.05),
    )
    ax.legend(fontsize=7, loc="lower right")
    return fig


def _int_bins(values: Any, most: int = 30) -> Any:
    """Histogram bin edges on whole numbers: token counts are integers."""
    import numpy as np

    low, high = int(values.min()), int(values.max())
    step = max(1, -(-(high - low + 1) // most))
    return np.arange(low, high + step + 1, step) - 0.5


def _rate_grid(spans: Any, grid: Any = None) -> tuple[Any, Any]:
    """Tokens/s over time: each batch's tokens spread evenly over its span, summed, on a grid of instants."""
    import numpy as np

    if grid is None:
        grid = np.linspace(float(spans["begin"].min()), float(spans["end"].max()), 300)
    rate = np.zeros(len(grid))
    for begin, end, tokens in zip(spans["begin"], spans["end"], spans["completion_tokens"]):
        width = max(end - begin, 1e-3)
        rate += np.where((grid >= begin) & (grid <= end), tokens / width, 0.0)
    return grid, rate


def _shard_spans(manifests: list[dict[str, Any]], start: Any) -> list[dict[str, Any]]:
    """Each shard file the runs' last invocations wrote: its worker, its span (seconds since `start`) and figures."""
    import pandas as pd

    spans = []
    for manifest in manifests:
        for f in manifest.get("files", []):
            if "started_at" in f and "ended_at" in f:
                begin = (pd.Timestamp(f["started_at"], unit="s", tz="UTC") - start).total_seconds()
                end = (pd.Timestamp(f["ended_at"], unit="s", tz="UTC") - start).total_seconds()
                spans.append({**f, "begin": begin, "end": end, "completion_tokens": f.get("completion_tokens", 0)})
    return spans


def _retried(manifests: list[dict[str, Any]], start: Any) -> list[tuple[float, int]]:
    import pandas as pd

    return [
        ((pd.Timestamp(r["at"], unit="s", tz="UTC") - start).total_seconds(), r["shard_id"])
        for manifest in manifests
        for r in (manifest.get("this_run") or {}).get("retried", [])
    ]


def setting_label(group: Any, run: str) -> str:
    temperature, top_p = group["temperature"].iloc[0], group["top_p"].iloc[0]
    if temperature != temperature or temperature is None:  # NaN: greedy
        return f"{run}: greedy"
    return f"{run}: T={temperature:g}, top_p={top_p:g}"
