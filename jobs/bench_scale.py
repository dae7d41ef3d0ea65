"""Scale benchmark: how fast a job over N prompts starts, and what memory the driver and the job take.

For each N it writes N unique synthetic prompts (the shared T0 mix, each with a suffix that
makes it unique), then:
  1. the dry run (`jobs/plan.py`): the whole input read, prepared and planned; wall time,
     preparation throughput, driver peak RSS, prompt-side padding efficiency of the windowed
     plan and of one global sort;
  2. the real job (`jobs/generate.py`, max_new_tokens=4, shard_size=100): seconds until the
     first shard file is committed, then it runs --run-seconds more and is stopped; the
     driver's peak RSS and the whole job's peak memory (PSS summed over the driver and every
     process it started: Ray's servers, preparers, workers, so shared memory counts once).
  3. with --resume (the resume at scale): the job on the tiny random model of the tests (its forward costs
     nothing: what is timed is the data path), until every shard of its first window is committed (the
     window's record, `_windows/window-000000.rec`, names them), then killed and run again: seconds until
     the rerun commits its first new shard, against the fresh job's first shard.
Prints a table and writes it as JSON and markdown.

Usage:
    python jobs/bench_scale.py                                  # N = 10k, 100k, 1M
    python jobs/bench_scale.py --sizes 10000 --run-seconds 20   # a quick look
    python jobs/bench_scale.py --sizes 1000000 --skip dry,job --resume
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
T0 = Path(os.environ.get("RUNNER_T0_DATA", REPO.parent / "shared" / "data" / "t0_mix_2k.jsonl"))
MAX_PROMPT_CHARS = 1000  # T0 prompts up to this long: about 120 tokens each with the chat template
SETTLE_S = 5.0  # after a run is stopped, before the next one starts


def write_prompts(path: Path, n: int) -> Path:
    """N unique prompts cycling through the T0 mix (reused when the file already holds N rows)."""
    if path.exists() and path.with_suffix(".count").exists() and path.with_suffix(".count").read_text() == str(n):
        return path
    with open(T0, encoding="utf-8") as f:  # by "\n" only: prompts hold other line separators
        base = [json.loads(line)["prompt"] for line in f]
    base = [p for p in base if len(p) < MAX_PROMPT_CHARS]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"s{i}", "prompt": f"{base[i % len(base)]} (variant {i})"}) + "\n")
    path.with_suffix(".count").write_text(str(n))
    return path


class Watch:
    """Peak memory of a process (RSS) and of it with every process it started (PSS), sampled."""

    PSS_EVERY_S = 5.0  # reading every process's smaps is not free: the whole job's memory less often

    def __init__(self, proc: subprocess.Popen):
        self.root = psutil.Process(proc.pid)
        self.driver_rss = self.job_pss = 0
        self._last_pss = 0.0

    def sample(self) -> None:
        try:
            self.driver_rss = max(self.driver_rss, self.root.memory_info().rss)
            if time.time() - self._last_pss < self.PSS_EVERY_S:
                return
            self._last_pss = time.time()
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        for p in tree:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.job_pss = max(self.job_pss, total)


def stop_tree(proc: subprocess.Popen) -> None:
    """Kill the driver and every process it started (Ray's servers run in sessions of their own)."""
    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=60)
    time.sleep(SETTLE_S)


def dry_run(prompts: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "jobs/plan.py", "--compare-global-sort", f"dataset.path={prompts}", "dataset.id_column=id"]
    cmd += overrides
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch = Watch(proc)
    while proc.poll() is None:
        watch.sample()
        time.sleep(1.0)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"dry run failed:\n{err[-3000:]}")
    eff = re.search(
        r"efficiency ([\d.]+) sorted in windows, ([\d.]+) with one global sort \(compared in ([\d.]+)s", out
    )
    rate = re.search(r"prepared:\s+in ([\d.]+)s \((\d+) rows/s\)", out)
    return {  # the dry run as a user runs it: without the global-sort comparison it adds here
        "dry_run_s": round(time.time() - started - float(eff.group(3)), 1),
        "compare_global_s": float(eff.group(3)),
        "prepare_s": float(rate.group(1)),
        "prepare_rows_per_s": int(rate.group(2)),
        "dry_run_driver_rss_mib": watch.driver_rss >> 20,
        "dry_run_job_pss_mib": watch.job_pss >> 20,
        "padding_windowed": float(eff.group(1)),
        "padding_global": float(eff.group(2)),
        "plan": re.search(r"plan:\s+(.*)", out).group(1),
    }


def job_command(prompts: Path, out_dir: Path, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "jobs/generate.py",
        f"dataset.path={prompts}",
        "dataset.id_column=id",
        f"output.dir={out_dir}",
        *overrides,
    ]


def real_job(prompts: Path, out_dir: Path, overrides: list[str], run_seconds: float, timeout: float) -> dict:
    cmd = job_command(prompts, out_dir, overrides)
    shutil.rmtree(out_dir, ignore_errors=True)  # the first shard seen must be this run's
    started = time.time()
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    watch = Watch(proc)
    first = None
    while proc.poll() is None and time.time() - started < timeout:
        watch.sample()
        if first is None and any(out_dir.glob("part-*.parquet")):
            first = time.time() - started
        if first is not None and time.time() - started > first + run_seconds:
            break
        time.sleep(0.5)
    finished = proc.poll() is not None
    if not finished:
        stop_tree(proc)
    proc.wait()
    if finished and proc.returncode:
        raise RuntimeError(f"the job failed:\n{proc.stderr.read()[-3000:]}")
    return {
        "first_shard_s": round(first, 1) if first is not None else None,
        "shards_committed": len(list(out_dir.glob("part-*.parquet"))),
        "job_finished": finished,
        "driver_rss_mib": watch.driver_rss >> 20,
        "job_pss_mib": watch.job_pss >> 20,
        "observed_s": round(time.time() - started, 1),
    }


def resume_at_scale(prompts: Path, out_dir: Path, overrides: list[str], timeout: float) -> dict:
    """The fresh job until its first window is committed, killed; then the rerun until its first new shard."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import tiny_llama

    cmd = job_command(prompts, out_dir, [f"model.name_or_path={tiny_llama()}", "model.quantization=none", *overrides])
    shutil.rmtree(out_dir, ignore_errors=True)
    record = out_dir / "_windows" / "window-000000.rec"

    def run(until) -> tuple[float | None, float]:
        started = time.time()
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        first, seen = None, {f.name for f in out_dir.glob("part-*.parquet")}
        while proc.poll() is None and time.time() - started < timeout:
            if first is None and any(f.name not in seen for f in out_dir.glob("part-*.parquet")):
                first = time.time() - started
            if first is not None and until():
                break
            time.sleep(0.2)
        if proc.poll() is not None and proc.returncode:
            raise RuntimeError(f"the job failed:\n{proc.stderr.read()[-3000:]}")
        stop_tree(proc)
        return first, time.time() - started

    def first_window_committed() -> bool:
        if not record.exists():
            return False
        names = [shard[1] for shard in json.loads(record.read_text())["shards"]]
        return all((out_dir / name).exists() for name in names)

    fresh_first, fresh_s = run(first_window_committed)
    committed = len(list(out_dir.glob("part-*.parquet")))
    resumed_first, _ = run(lambda: True)
    return {
        "fresh_first_shard_s": round(fresh_first, 1) if fresh_first is not None else None,
        "first_window_committed_s": round(fresh_s, 1),
        "shards_committed_before_kill": committed,
        "resumed_first_new_shard_s": round(resumed_first, 1) if resumed_first is not None else None,
        "resume_ratio": round(resumed_first / fresh_first, 2) if fresh_first and resumed_first else None,
    }


def table(results: list[dict]) -> str:
    head = (
        "| prompts | dry run s | prepare rows/s | dry-run driver RSS MiB | padding windowed | padding global "
        "| first shard s | job driver RSS MiB | job PSS MiB |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in results:
        lines.append(
            f"| {r['prompts']:,} | {r.get('dry_run_s', '-')} | {r.get('prepare_rows_per_s', '-')} "
            f"| {r.get('dry_run_driver_rss_mib', '-')} | {r.get('padding_windowed', '-')} "
            f"| {r.get('padding_global', '-')} | {r.get('first_shard_s', '-')} | {r.get('driver_rss_mib', '-')} "
            f"| {r.get('job_pss_mib', '-')} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--run-seconds", type=float, default=30.0, help="how long the job runs after its first shard")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up on a first shard after this long")
    parser.add_argument("--skip", default="", help="dry,job: parts not to run")
    parser.add_argument("--resume", action="store_true", help="also time a resume after the first window")
    parser.add_argument("--out", default="outputs/bench_scale")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"generation.max_new_tokens={args.max_new_tokens}", f"batching.shard_size={args.shard_size}"]
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        prompts = write_prompts(out / f"prompts-{n}.jsonl", n)
        result = {"prompts": n, "input_mib": prompts.stat().st_size >> 20}
        if "dry" not in args.skip:
            result.update(dry_run(prompts, overrides))
        if "job" not in args.skip:
            result.update(real_job(prompts, out / f"run-{n}", overrides, args.run_seconds, args.timeout))
        if args.resume:
            result.update(resume_at_scale(prompts, out / f"resume-{n}", overrides, 4 * args.timeout))
        results.append(result)
        print(json.dumps(result), flush=True)
    text = table(results)
    if args.resume:
        text += "\n\n| prompts | fresh: first shard s | first window committed s | rerun: first new shard s | ratio |\n"
        text += "|---|---|---|---|---|\n" + "\n".join(
            f"| {r['prompts']:,} | {r['fresh_first_shard_s']} | {r['first_window_committed_s']} "
            f"| {r['resumed_first_new_shard_s']} | {r['resume_ratio']}x |"
            for r in results
        )
    print("\n" + text)
    (out / "bench_scale.json").write_text(json.dumps(results, indent=2))
    (out / "bench_scale.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
