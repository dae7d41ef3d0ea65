"""A run report: the figures a user checks first, as SVG plots and one self-contained HTML page.

SVG, not PNG: a run directory holding more images than Parquet files would be read as an
image folder by HF datasets, which picks a directory's format by its most common extension.

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

from runner import store
from runner.report.plots import make_plots, seconds, setting_label

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
    settings: list[dict[str, Any]] = field(default_factory=list)  # one line per run: its setting and figures

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
    names = (store.MANIFEST, store.LEGACY_MANIFEST)
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


def load_manifests(runs: list[Path]) -> list[dict[str, Any]]:
    manifests = []
    for run in runs:
        path = run / store.MANIFEST if (run / store.MANIFEST).exists() else run / store.LEGACY_MANIFEST
        manifests.append(json.loads(path.read_text()))
    return manifests


def run_figures(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """What the workers reported, summed over the runs' manifests: tokens, engine steps, busy time per worker.

    The rows cannot tell these: the engine's planned batches overlap in time, and it spends no
    step on an ended row (a static batch's rows x longest would overstate the cost).
    """
    completion, steps, busy, retries = 0, 0, {}, 0
    for manifest in manifests:
        retries += (manifest.get("this_run") or {}).get("retries", 0)
        this_run = manifest.get("this_run") or {}
        if this_run.get("sequences") != (manifest.get("totals") or {}).get("rows"):
            return {}  # resumed: the last invocation made only part of the rows, and nothing counted the rest
        completion += this_run.get("completion_tokens", 0)
        steps += this_run.get("generated_steps", 0)
        for worker, busy_s in (this_run.get("worker_busy_s") or {}).items():
            busy[worker] = busy.get(worker, 0.0) + busy_s
    return {"completion_tokens": completion, "generated_steps": steps, "worker_busy_s": busy, "retries": retries}


def summarize(rows: Any, batches: Any, figures: dict[str, Any] | None = None) -> dict[str, Any]:
    figures = figures or {}
    start = (batches["created_at"] - batches["latency_s"].map(seconds)).min()
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
        "errors": int((rows["finish_reason"] == "error").sum()),
        "retries": figures.get("retries"),
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


def settings_table(rows: Any) -> list[dict[str, Any]]:
    """Each run's (a sweep point's) sampling setting and what it produced, side by side."""
    table = []
    for run, group in rows.groupby("run"):
        reasons = group["finish_reason"].value_counts()
        table.append(
            {
                "setting": setting_label(group, run),
                "rows": int(len(group)),
                "mean completion tokens": round(float(group["completion_tokens"].fillna(0).mean()), 1),
                **{f"{k} share": round(float(v) / len(group), 3) for k, v in sorted(reasons.items())},
            }
        )
    return table


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
            ("error rows", f"{s['errors']}" + (" (rerun with output.retry_errors=true)" if s["errors"] else "")),
            ("shards retried", "n/a" if s.get("retries") is None else s["retries"]),
            ("prompt-side padding efficiency", f"{s['prompt_padding_efficiency']:.3f}"),
            ("generation-side efficiency", _figure(s["generation_efficiency"])),
        ]
    )
    workers = "".join(
        f"<tr><td>{html.escape(w)}</td><td>{v['tokens']}</td><td>{v['busy_s']:.1f}</td><td>{v['idle_s']:.1f}</td></tr>"
        for w, v in sorted(s["workers"].items())
    )
    columns = sorted({k for line in report.settings for k in line}, key=lambda k: (k != "setting", k != "rows", k))
    settings = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    settings += "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(line.get(c, 0)))}</td>" for c in columns) + "</tr>"
        for line in report.settings
    )
    images = "".join(
        f"<h2>{html.escape(name.replace('_', ' '))}</h2><img alt='{name}' "
        f"src='data:image/svg+xml;base64,{base64.b64encode(path.read_bytes()).decode()}'>"
        for name, path in report.plots.items()
    )
    page = (
        f"<!doctype html><meta charset='utf-8'><title>runner report</title>"
        f"<style>body{{font-family:sans-serif;max-width:1000px;margin:auto}}td{{padding:2px 10px}}</style>"
        f"<h1>Run report</h1><table>{rows}</table><h2>workers</h2><table><tr><th>worker</th><th>tokens</th>"
        f"<th>busy s</th><th>idle s</th></tr>{workers}</table>"
        f"<h2>settings side by side</h2><table>{settings}</table>{images}"
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
    manifests = load_manifests(runs)
    report = Report([str(r) for r in runs], summarize(rows, batches, run_figures(manifests)))
    report.settings = settings_table(rows)
    report.plots = make_plots(rows, batches, target, manifests)
    report.html_path = write_html(report, target)
    return report
