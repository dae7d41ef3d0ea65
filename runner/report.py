"""A run report: the figures a user checks first, as PNG plots and one self-contained HTML page.

Works on a run directory (one manifest) and on a sweep directory (several run
directories below it; plots then compare the sampling settings side by side).
Everything is computed from the Parquet files themselves, so the report says
what is in the output, not what a run believed it wrote.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from runner import output

COLUMNS = [
    "id",
    "sample_index",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "temperature",
    "top_p",
    "shard_id",
    "batch_id",
    "batch_size",
    "padded_length",
    "worker",
    "latency_s",
    "created_at",
]


@dataclass
class Report:
    runs: list[str]
    summary: dict[str, Any]
    plots: dict[str, Path] = field(default_factory=dict)
    html_path: Path | None = None

    def describe(self) -> str:
        s = self.summary
        lines = [
            f"report over {len(self.runs)} run(s), {s['rows']} rows",
            f"prompt tokens:     mean {s['prompt_tokens_mean']:.1f}, max {s['prompt_tokens_max']}",
            f"completion tokens: mean {s['completion_tokens_mean']:.1f}, total {s['completion_tokens_total']}",
            "finish reasons:    " + ", ".join(f"{k} {v}" for k, v in sorted(s["finish_reasons"].items())),
            f"padding:           prompt side {s['prompt_padding_efficiency']:.3f}, "
            f"generation side {_figure(s['generation_efficiency'])}",
        ]
        for worker, w in sorted(s["workers"].items()):
            lines.append(f"worker {worker}: {w['tokens']} tokens, busy {w['busy_s']:.1f}s, idle {w['idle_s']:.1f}s")
        if self.html_path:
            lines.append(f"report:            {self.html_path}")
        return "\n".join(lines)


REPORT_DIR = "_report"  # a leading underscore: Parquet readers pointed at the run directory skip it


def find_runs(root: str | Path) -> list[Path]:
    """The run directories at or below `root` (each holds a `_manifest.json`, or an older `manifest.json`)."""
    base = Path(root)
    names = (output.MANIFEST, output.LEGACY_MANIFEST)
    if any((base / n).exists() for n in names):
        return [base]
    return sorted({p.parent for n in names for p in base.rglob(n)})


def load_rows(runs: list[Path]) -> Any:
    """One pandas frame over every run, with the run's folder name in `run`."""
    import pandas as pd

    frames = []
    for run in runs:
        for f in sorted(run.glob("*.parquet")):
            frame = pq.read_table(f, columns=COLUMNS).to_pandas()
            frame["run"] = run.name
            frames.append(frame)
    if not frames:
        raise FileNotFoundError("no finished run (_manifest.json beside Parquet files) in that directory")
    return pd.concat(frames, ignore_index=True)


def batch_table(rows: Any) -> Any:
    """One line per generate call: its rows, real and padded tokens on both sides, worker and timing."""
    calls = rows.groupby(["run", "worker", "batch_id", "created_at"], sort=False)
    batches = calls.agg(
        rows=("id", "nunique"),
        sequences=("id", "size"),
        batch_size=("batch_size", "first"),
        padded_length=("padded_length", "max"),
        latency_s=("latency_s", "first"),
        completion_tokens=("completion_tokens", "sum"),
        longest=("completion_tokens", "max"),
    ).reset_index()
    first_samples = rows[rows["sample_index"] == 0].groupby(["run", "worker", "batch_id", "created_at"], sort=False)
    batches["prompt_tokens"] = first_samples["prompt_tokens"].sum().values
    # each row's prompt was padded to its padded_length when read (rows of one batch may be read in groups)
    batches["padded_prompt_tokens"] = first_samples["padded_length"].sum().values
    batches["prompt_efficiency"] = batches["prompt_tokens"] / batches["padded_prompt_tokens"]
    return batches.sort_values("created_at").reset_index(drop=True)


def run_figures(runs: list[Path]) -> dict[str, Any]:
    """What the workers reported, summed over the runs' manifests: tokens, engine steps, busy time per worker.

    The rows cannot tell these: the engine's planned batches overlap in time, and it spends no
    step on an ended row (a static batch's rows x longest would overstate the cost).
    """
    completion, steps, busy = 0, 0, {}
    for run in runs:
        path = run / output.MANIFEST if (run / output.MANIFEST).exists() else run / output.LEGACY_MANIFEST
        manifest = json.loads(path.read_text())
        this_run = manifest.get("this_run") or {}
        if this_run.get("sequences") != (manifest.get("totals") or {}).get("rows"):
            return {}  # resumed: the last invocation made only part of the rows, and nothing counted the rest
        completion += this_run.get("completion_tokens", 0)
        steps += this_run.get("generated_steps", 0)
        for worker, seconds in (this_run.get("worker_busy_s") or {}).items():
            busy[worker] = busy.get(worker, 0.0) + seconds
    return {"completion_tokens": completion, "generated_steps": steps, "worker_busy_s": busy}


def summarize(rows: Any, batches: Any, figures: dict[str, Any] | None = None) -> dict[str, Any]:
    figures = figures or {}
    start = (batches["created_at"] - batches["latency_s"].map(_seconds)).min()
    end = batches["created_at"].max()
    span = (end - start).total_seconds()
    workers = {}
    for worker, group in batches.groupby("worker"):
        busy = float(figures.get("worker_busy_s", {}).get(worker, group["latency_s"].sum()))
        workers[worker] = {
            "tokens": int(group["completion_tokens"].sum()),
            "busy_s": busy,
            "idle_s": max(0.0, span - busy),
        }
    return {
        "rows": int(len(rows)),
        "prompt_tokens_mean": float(rows.loc[rows["sample_index"] == 0, "prompt_tokens"].mean()),
        "prompt_tokens_max": int(rows["prompt_tokens"].max()),
        "completion_tokens_mean": float(rows["completion_tokens"].fillna(0).mean()),
        "completion_tokens_total": int(rows["completion_tokens"].fillna(0).sum()),
        "finish_reasons": {str(k): int(v) for k, v in rows["finish_reason"].value_counts().items()},
        "prompt_padding_efficiency": float(batches["prompt_tokens"].sum() / batches["padded_prompt_tokens"].sum()),
        # None where no manifest counted every row's steps (a resumed run): the rows cannot tell it
        "generation_efficiency": (
            figures["completion_tokens"] / figures["generated_steps"] if figures.get("generated_steps") else None
        ),
        "span_s": span,
        "workers": workers,
    }


def _figure(value: float | None) -> str:
    return "n/a (a resumed run: only its last invocation was counted)" if value is None else f"{value:.3f}"


def _seconds(value: float) -> Any:
    import pandas as pd

    return pd.Timedelta(seconds=float(value))


def make_plots(rows: Any, batches: Any, out: Path) -> dict[str, Path]:
    """Write the PNG plots into `out`; return them by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, Path] = {}

    def save(name: str, fig: Any) -> None:
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        plots[name] = path

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].hist(rows.loc[rows["sample_index"] == 0, "prompt_tokens"], bins=30, color="tab:blue")
    axes[0].set(title="prompt length", xlabel="tokens", ylabel="rows")
    for run, group in rows.groupby("run"):
        axes[1].hist(group["completion_tokens"].fillna(0), bins=30, alpha=0.6, label=_setting(group, run))
    axes[1].set(title="completion length", xlabel="tokens", ylabel="rows")
    axes[1].legend(fontsize=7)
    save("lengths", fig)

    reasons = rows.groupby(["run", "finish_reason"]).size().unstack(fill_value=0)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    reasons.index = [_setting(rows[rows["run"] == r], r) for r in reasons.index]
    reasons.plot.bar(ax=ax, stacked=True)
    ax.set(title="finish reasons per setting", ylabel="rows", xlabel="")
    save("finish_reasons", fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    start = (batches["created_at"] - batches["latency_s"].map(_seconds)).min()
    labels = []
    for row, (worker, group) in enumerate(batches.groupby("worker")):
        t = (group["created_at"] - start).dt.total_seconds()
        axes[0].plot(t, group["completion_tokens"] / group["latency_s"], marker="o", label=worker)
        axes[1].broken_barh(list(zip(t - group["latency_s"], group["latency_s"])), (row, 0.8))
        labels.append(worker)
    axes[0].set(title="generated tokens/s per batch", xlabel="seconds since start", ylabel="tokens/s")
    axes[0].legend(fontsize=7)
    axes[1].set(title="worker busy (bars) and idle (gaps)", xlabel="seconds since start")
    axes[1].set_yticks([i + 0.4 for i in range(len(labels))], labels=labels, fontsize=7)
    save("workers", fig)

    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot(batches.index, batches["prompt_efficiency"], marker=".", label="prompt side")
    ax.set(
        title="prompt-side padding efficiency per planned batch (real / padded prompt tokens)",
        xlabel="batch, in finishing order",
        ylim=(0, 1.05),
    )
    ax.legend()
    save("padding", fig)
    return plots


def _setting(group: Any, run: str) -> str:
    temperature, top_p = group["temperature"].iloc[0], group["top_p"].iloc[0]
    if temperature != temperature or temperature is None:  # NaN: greedy
        return f"{run}: greedy"
    return f"{run}: T={temperature:g}, top_p={top_p:g}"


def write_html(report: Report, out: Path) -> Path:
    """One page with the plots embedded, so it can be mailed or opened anywhere."""
    s = report.summary
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>"
        for k, v in [
            ("runs", ", ".join(html.escape(r) for r in report.runs)),
            ("rows", s["rows"]),
            ("completion tokens", s["completion_tokens_total"]),
            ("finish reasons", ", ".join(f"{k}: {v}" for k, v in sorted(s["finish_reasons"].items()))),
            ("prompt-side padding efficiency", f"{s['prompt_padding_efficiency']:.3f}"),
            ("generation-side efficiency", _figure(s["generation_efficiency"])),
        ]
    )
    workers = "".join(
        f"<tr><td>{html.escape(w)}</td><td>{v['tokens']}</td><td>{v['busy_s']:.1f}</td><td>{v['idle_s']:.1f}</td></tr>"
        for w, v in sorted(s["workers"].items())
    )
    images = "".join(
        f"<h2>{html.escape(name.replace('_', ' '))}</h2><img alt='{name}' "
        f"src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"
        for name, path in report.plots.items()
    )
    page = (
        f"<!doctype html><meta charset='utf-8'><title>runner report</title>"
        f"<style>body{{font-family:sans-serif;max-width:1000px;margin:auto}}td{{padding:2px 10px}}</style>"
        f"<h1>Run report</h1><table>{rows}</table><h2>workers</h2><table><tr><th>worker</th><th>tokens</th>"
        f"<th>busy s</th><th>idle s</th></tr>{workers}</table>{images}"
    )
    path = out / "report.html"
    path.write_text(page)
    return path


def build_report(root: str | Path, out: str | Path | None = None) -> Report:
    """Read every run at or below `root`, write plots and report.html into `out` (default: `root`/_report)."""
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no _manifest.json at or below {root}: is the run finished?")
    rows = load_rows(runs)
    batches = batch_table(rows)
    target = Path(out or Path(root) / REPORT_DIR)
    target.mkdir(parents=True, exist_ok=True)
    report = Report([str(r) for r in runs], summarize(rows, batches, run_figures(runs)))
    report.plots = make_plots(rows, batches, target)
    report.html_path = write_html(report, target)
    return report
