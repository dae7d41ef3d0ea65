"""Benchmark: a Hydra sweep (one process, models loaded once) against the same points as separate runs.

Usage:
    python jobs/bench_sweep.py [--rows 32] [--max-new-tokens 16] [--temperatures 0.3,0.7,1.0] [--out outputs/bench]

Both ways run the same prompts (the demo set), model and settings, in this one invocation,
each as the user would type it (a fresh process per command). Prints wall times and the
ratio, and writes them to OUT/sweep.json.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "jobs/generate.py", *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"benchmark run failed: {' '.join(args)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperatures", default="0.3,0.7,1.0")
    parser.add_argument("--out", default="outputs/bench")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    shutil.rmtree(out / "sweep-runs", ignore_errors=True)
    common = [
        f"dataset.limit={args.rows}",
        f"generation.max_new_tokens={args.max_new_tokens}",
        "generation.do_sample=true",
        "cluster.num_workers=1",
    ]
    points = args.temperatures.split(",")

    separate = [
        timed([*common, f"generation.temperature={t}", f"output.dir={out}/sweep-runs/separate/{i}"])
        for i, t in enumerate(points)
    ]
    sweep = timed(
        ["-m", *common, f"generation.temperature={args.temperatures}", f"hydra.sweep.dir={out}/sweep-runs/sweep"]
    )
    result = {
        "points": len(points),
        "rows_per_point": args.rows,
        "max_new_tokens": args.max_new_tokens,
        "separate_runs_s": [round(s, 2) for s in separate],
        "separate_total_s": round(sum(separate), 2),
        "sweep_s": round(sweep, 2),
        "speedup": round(sum(separate) / sweep, 3),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    print(f"{len(points)} points x {args.rows} rows, max_new_tokens={args.max_new_tokens}")
    print(f"separate runs: {result['separate_total_s']:.1f}s ({', '.join(f'{s:.1f}' for s in separate)})")
    print(f"one sweep:     {sweep:.1f}s")
    print(f"sweep is {result['speedup']:.2f}x faster (written to {out / 'sweep.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
