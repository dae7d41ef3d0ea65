"""The GPU check: a Llama-3-8B-shaped model with random weights, the long workload through the runner's
engine, sorted static `model.generate` batches and transformers' `generate_batch`, in NF4 and bfloat16,
then the tests marked `gpu`. One table, also written as JSON. Needs no Ray, Hydra, datasets or network.

Usage:
    python jobs/bench_gpu.py --bundle .gpu            # here: write the workload, tokenizer and wheels it needs
    python jobs/bench_gpu.py --from .gpu              # on the GPU machine (make gpu-check): about 6 minutes
    python jobs/bench_gpu.py --from .gpu --shape 3b   # quicker
    python jobs/bench_gpu.py --device cpu --shape tiny --n 8 --max-new-tokens 16   # the script itself, on a CPU

The model is built from a config (random weights, the bundle's SmolLM2 tokenizer and vocabulary), saved
once, and loaded by each system as the runner's workers load models. Random weights never pick an EOS on
their own, so 1 in 64 token ids end a row (the same ids for every system): rows end at spread-out steps,
as real answers do. Figures: generated tokens/s, generation-side efficiency (tokens kept / row-steps
computed), peak GPU memory, seconds to the first finished row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHAPES: dict[str, dict[str, Any]] = {  # Llama-3 shapes (vocabulary: the bundle's tokenizer)
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
WHEELS = ("bitsandbytes==0.50.2", "omegaconf==2.3.0", "antlr4-python3-runtime==4.9.3")  # what a bare GPU box lacks
WHEEL_LIMIT = 60 << 20  # the device machine takes 64 MiB a call, the tree included
SYSTEMS = ("engine", "sorted", "generate_batch")
END_EVERY = 64  # 1 in this many token ids ends a row


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="write the workload, tokenizer and wheels into this folder, then stop")
    parser.add_argument("--from", dest="source", help="a folder --bundle wrote (default: make one under --out)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--quantizations", default="nf4,none", help="comma-separated: nf4, none (bfloat16)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--n", type=int, default=256, help="prompts of the long workload")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per static batch (sorted)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the tests marked gpu")
    parser.add_argument("--out", default="outputs/gpu_check")
    parser.add_argument("--no-wheels", action="store_true", help="--bundle without downloading wheels")
    return parser.parse_args()


def bundle(folder: Path, n: int, wheels: bool) -> None:
    """What the check needs beside the tree: the rendered long workload, the tokenizer, the missing wheels."""
    from benchmark import write_workload

    from runner.input import resolve_model_path

    folder.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model_path("embedded:SmolLM2-135M-Instruct")
    args = argparse.Namespace(
        prompts=str(REPO.parent / "shared" / "data" / "t0_mix_2k.jsonl"), workload="long", n=n, max_prompt_tokens=1024
    )
    if not Path(args.prompts).exists():
        sys.exit(f"{args.prompts}: the shared prompt mix is not there; the long workload is made from it")
    write_workload(args, model_path, folder)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_path).save_pretrained(folder / "tokenizer")
    if wheels:
        target = folder / "wheels"
        target.mkdir(exist_ok=True)
        platforms = [
            f"--platform={p}" for p in ("manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
        ]
        pure = [w for w in WHEELS if not w.startswith("bitsandbytes")]
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run(
            [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version=3.12", "--implementation=cp",
             *platforms, "-d", str(target), WHEELS[0]],
            check=True,
        )  # fmt: skip
        subprocess.run([*pip, "wheel", "--no-deps", "-w", str(target), *pure], check=True)
        size = sum(f.stat().st_size for f in target.glob("*.whl"))
        print(f"wheels: {', '.join(sorted(f.name for f in target.glob('*.whl')))} ({size / 2**20:.1f} MiB)")
        if size > WHEEL_LIMIT:
            sys.exit(f"the wheels take {size / 2**20:.1f} MiB, over the {WHEEL_LIMIT >> 20} MiB a device call carries")
    print(f"bundle written: {folder} (carry it to the GPU machine; run: python jobs/bench_gpu.py --from {folder})")


def build_model(shape: str, tokenizer_dir: Path, folder: Path, device: str) -> dict[str, Any]:
    """A Llama of `shape` with random weights, saved with the tokenizer; 1 in END_EVERY ids end a row."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = (len(tokenizer) + 63) // 64 * 64
    config = LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **SHAPES[shape],
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda:0" if device == "cuda" else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    ends = sorted(random.Random(0).sample(range(3, len(tokenizer)), len(tokenizer) // END_EVERY))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *ends]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"shape": shape, "parameters": params, "vocab": vocab, "build_s": time.perf_counter() - started}


def run_system(name: str, quantization: str, model_path: str, ids, texts, lengths, args) -> dict[str, Any]:
    import torch
    from bench import figures, systems

    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    common = {"model_path": model_path, "quantization": quantization, "max_new_tokens": args.max_new_tokens}
    if name == "engine":
        result = systems.engine(ids, texts, **common)
    elif name == "sorted":
        order = sorted(range(len(ids)), key=lambda i: -lengths[i])
        result = systems.fixed_size("sorted", ids, texts, order, batch_size=args.batch_size, **common)
    else:
        result = systems.generate_batch(ids, texts, max_batch_tokens=args.batch_size * 512, **common)
    row = figures.figures(result)
    ends = [b.end_s for b in result.batches if b.end_s is not None]
    row.update(
        quantization=quantization,
        peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
        first_row_s=min(ends) if ends else None,
    )
    row["completions"] = result.completions()
    return row


def run_gpu_tests(out: Path, model_source: Path) -> dict[str, Any]:
    """The tests marked gpu, in a process of their own; their counts."""
    import importlib.util
    import xml.etree.ElementTree as ET

    if importlib.util.find_spec("pytest") is None:
        print("the tests marked gpu need pytest, which this machine lacks: they were not run")
        return {"passed": 0, "failed": 0, "skipped": 0, "seconds": 0.0, "exit_status": None, "not_run": "no pytest"}
    report = out / "gpu_tests.xml"
    env = dict(
        os.environ,
        RUNNER_GPU_TOKENIZER=str(model_source),
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         str(REPO / "tests" / "gpu")],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    counts = {"passed": 0, "failed": 0, "skipped": 0, "seconds": time.perf_counter() - started}
    if report.exists():
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        counts.update(passed=total - failed - skipped, failed=failed, skipped=skipped)
    counts["exit_status"] = proc.returncode
    return counts


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    env = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        env["bitsandbytes"] = None
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        env.update(
            gpu=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gib=round(total / 2**30, 1),
            free_at_start_gib=round(free / 2**30, 1),
        )
    return env


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| quantization | system | rows | generated tok/s | vs sorted | generation eff. | peak GPU GiB "
        "| first row s | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = f"{r['peak_gpu_gib']:.1f}" if r.get("peak_gpu_gib") is not None else "-"
        first = f"{r['first_row_s']:.1f}" if r.get("first_row_s") is not None else "at the end"
        vs = f"{r['vs_sorted']:.2f}x" if r.get("vs_sorted") else "-"
        lines.append(
            f"| {r['quantization']} | {r['system']} | {r['rows']} | {r['tokens_per_s']:.0f} | {vs} | "
            f"{r['generation_efficiency']:.2f} | {peak} | {first} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    sys.path.insert(0, str(REPO))
    if args.bundle:
        bundle(Path(args.bundle), args.n, not args.no_wheels)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a GPU machine, or with --device cpu --shape tiny to test the script")
    started = time.perf_counter()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.source) if args.source else out / "bundle"
    if not args.source:
        bundle(source, args.n, wheels=False)
    workload = [json.loads(line) for line in (source / "workload.jsonl").read_text().splitlines() if line.strip()]
    workload = workload[: args.n]
    ids, texts = [w["id"] for w in workload], [w["text"] for w in workload]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source / "tokenizer")
    lengths = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    env = environment(args.device)
    print(json.dumps(env), flush=True)
    model_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"runner-gpu-check-{args.shape}"
    shutil.rmtree(model_dir, ignore_errors=True)
    model = build_model(args.shape, source / "tokenizer", model_dir, args.device)
    print(f"model: {json.dumps(model)}", flush=True)
    rows = []
    for quantization in args.quantizations.split(","):
        if quantization != "none" and env["bitsandbytes"] is None:
            print(f"skipping {quantization}: bitsandbytes is not installed (carry its wheel: --bundle)", flush=True)
            continue
        for name in args.systems.split(","):
            print(f"running {name} ({quantization}) ...", flush=True)
            row = run_system(name, quantization, str(model_dir), ids, texts, lengths, args)
            rows.append(row)
            print(f"  {row['tokens_per_s']:.0f} generated tok/s, {row['wall_s']:.1f}s", flush=True)
    for r in rows:
        base = next((b for b in rows if b["system"] == "sorted" and b["quantization"] == r["quantization"]), None)
        r["vs_sorted"] = r["tokens_per_s"] / base["tokens_per_s"] if base and base["tokens_per_s"] else None
        if base:
            same = sum(base["completions"].get(i) == c for i, c in r["completions"].items())
            r["same_completions_as_sorted"] = same / max(1, len(r["completions"]))
    tests = None if args.skip_tests else run_gpu_tests(out, source / "tokenizer")
    shown = table(rows)
    print("\n" + shown)
    if tests:
        print(f"\ntests marked gpu: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped")
    result = {
        "environment": env,
        "model": model,
        "workload": {"prompts": len(ids), "prompt_tokens": sum(lengths), "max_new_tokens": args.max_new_tokens},
        "rows": [{k: v for k, v in r.items() if k != "completions"} for r in rows],
        "gpu_tests": tests,
        "total_s": time.perf_counter() - started,
    }
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "gpu_check.md").write_text(f"{json.dumps(env)}\n\n{shown}\n")
    print(f"\nwritten: {out / 'gpu_check.json'} ({result['total_s']:.0f}s in all)")
    shutil.rmtree(model_dir, ignore_errors=True)
    failed = tests and tests["exit_status"] is not None and (tests["failed"] or tests["exit_status"] not in (0, 5))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
