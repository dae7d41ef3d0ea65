"""Benchmark: the engine's own work per decode step, apart from the model's forward.

Usage:
    python jobs/bench_engine.py [--sizes 32,128,256] [--models tiny,embedded] [--steps 60] [--out outputs/bench]
                                [--repetition-penalty 1.05] [--stop-strings '###']

For each model and each running-set size N, the engine decodes a stream of rows (4N rows, short
prompts, sampling at temperature 1) with room for N sequences at once. Rows end at spread-out
steps: a random 1/32 of the vocabulary counts as EOS, so each sequence ends with probability about
1/32 a step, and the running set refills as they leave. Per decode step it measures wall time,
time inside the model's forward, host time outside it (wall - forward), and, in a second pass of
the same rows under torch.profiler, the torch operations launched outside the forward; each apart
for steps where rows end, steps where the cache's empty rows are dropped (`compacting`: once a
quarter of its rows are empty, when no join drops them first) and steps where no row ends.

With `--repetition-penalty` (on by default in some models' own generation config, e.g. 1.05 for
Qwen2.5 instruct models) and `--stop-strings`, the engine also applies those each step.

Models: `tiny`, a random 8-layer Llama (hidden 64, vocabulary 512) whose forward costs almost
nothing, so what is left is the engine's own work; `embedded`, SmolLM2-135M-Instruct in fp32.
Prints one table and writes it to OUT/engine.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_VOCAB = 512
FORWARD = "bench::model_forward"
STEP = "bench::engine_step"


@dataclass
class StepTimes:
    wall: list[float] = field(default_factory=list)
    forward: list[float] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)
    compacted: list[int] = field(default_factory=list)  # selections of the cache's rows during the step


def tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def embedded_model():
    from runner.config import ModelConfig
    from runner.generation import load_model
    from runner.input import resolve_model_path

    path = resolve_model_path("embedded:SmolLM2-135M-Instruct")
    return load_model(path, ModelConfig(name_or_path=path, quantization="none"), "cpu")


def tokenizer():
    from runner.input import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path("embedded:SmolLM2-135M-Instruct"))


def make_engine(model, tok, size: int, max_new_tokens: int, penalty: float | None = None, stops: tuple = ()):
    import random

    from runner.generation import Decoding, Engine, Limits

    vocab = model.config.vocab_size
    eos = frozenset(random.Random(1).sample(range(3, vocab), max(1, vocab // 32)))
    decoding = Decoding(
        max_new_tokens=max_new_tokens,
        eos_ids=eos,
        pad_id=0,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=penalty,
        stop_strings=stops,
    )
    return Engine(model, tok, decoding, Limits(max_sequences=size))


def make_rows(size: int, vocab: int):
    import random

    from runner.generation import Row

    rng = random.Random(size)
    return [Row(k, f"r{k}", [rng.randrange(3, vocab) for _ in range(rng.randint(8, 48))]) for k in range(4 * size)]


def instrument(engine, times: StepTimes):
    """Time the model's forward and each decode step (admission and prefill are not decode steps)."""
    import torch

    model_call = engine.model.__call__
    forward_s = [0.0]

    def timed_model(*args, **kwargs):
        started = time.perf_counter()
        with torch.profiler.record_function(FORWARD):
            out = model_call(*args, **kwargs)
        forward_s[0] += time.perf_counter() - started
        return out

    engine.model = _Callable(engine.model, timed_model)
    step, select, selections = engine._step, engine._select, [0]

    def counted_select(keep):
        selections[0] += 1
        return select(keep)

    def timed_step(waiting):
        running, before, selected = len(engine.seqs), forward_s[0], selections[0]
        started = time.perf_counter()
        with torch.profiler.record_function(STEP):
            finished = list(step(waiting))
        times.wall.append(time.perf_counter() - started)
        times.forward.append(forward_s[0] - before)
        times.running.append(running)
        times.ended.append(len(finished))
        times.compacted.append(selections[0] - selected)
        yield from finished

    engine._select = counted_select
    engine._step = timed_step


class _Callable:
    """The model, with its call timed (attributes pass through: config, device, generation_config)."""

    def __init__(self, model, call):
        self._model, self._call = model, call

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def ops_per_step(prof) -> list[int]:
    """Top-level aten ops launched inside each engine step and outside the forward, in step order."""
    counts = []

    def walk(event) -> int:
        if event.name == FORWARD:
            return 0
        if event.name.startswith("aten::"):
            return 1  # one launched op; what it calls inside is part of it
        return sum(walk(c) for c in event.cpu_children)

    for event in sorted((e for e in prof.events() if e.name == STEP), key=lambda e: e.time_range.start):
        counts.append(sum(walk(c) for c in event.cpu_children))
    return counts


def measure(model, tok, size: int, steps: int, penalty: float | None = None, stops: tuple = ()) -> dict:
    import torch

    rows = make_rows(size, model.config.vocab_size)
    times = StepTimes()
    engine = make_engine(model, tok, size, steps, penalty, stops)
    instrument(engine, times)
    engine.generate_all(rows)
    profiled = StepTimes()
    engine = make_engine(model, tok, size, steps, penalty, stops)
    instrument(engine, profiled)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        engine.generate_all(rows)
    ops = ops_per_step(prof)
    full = [i for i, n in enumerate(times.running) if n >= 0.75 * size]  # steps with the running set near N
    result = {
        "size": size,
        "steps": len(full),
        "mean_running": round(statistics.mean(times.running[i] for i in full), 1),
    }
    kinds = (
        ("ending", lambda i: times.ended[i] > 0 and not times.compacted[i]),
        ("compacting", lambda i: times.compacted[i] > 0),
        ("none_ending", lambda i: times.ended[i] == 0 and not times.compacted[i]),
    )
    for kind, keep in kinds:
        chosen = [i for i in full if keep(i)]
        if not chosen:
            continue
        wall = statistics.mean(times.wall[i] for i in chosen)
        forward = statistics.mean(times.forward[i] for i in chosen)
        result[kind] = {
            "steps": len(chosen),
            "wall_ms": round(1000 * wall, 3),
            "forward_ms": round(1000 * forward, 3),
            "host_ms": round(1000 * (wall - forward), 3),
            "host_share": round((wall - forward) / wall, 4) if wall else 0.0,
            "ops_outside_forward": round(statistics.mean(ops[i] for i in chosen if i < len(ops)), 1),
            "ended_per_step": round(statistics.mean(times.ended[i] for i in chosen), 2),
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,128,256")
    parser.add_argument("--models", default="tiny,embedded")
    parser.add_argument("--steps", type=int, default=60, help="max_new_tokens of every row")
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--stop-strings", default="", help="comma-separated; \\n for a newline")
    args = parser.parse_args()
    stops = tuple(s.replace("\\n", "\n") for s in args.stop_strings.split(",") if s)
    import torch

    torch.set_num_threads(2)
    tok = tokenizer()
    results = []
    for name in args.models.split(","):
        model = {"tiny": tiny_model, "embedded": embedded_model}[name]()
        with torch.inference_mode():
            for size in (int(s) for s in args.sizes.split(",")):
                result = {"model": name, **measure(model, tok, size, args.steps, args.repetition_penalty, stops)}
                results.append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
    header = ("model", "N", "kind", "steps", "wall ms", "fwd ms", "host ms", "host %", "ops")
    print("{:9} {:>4} {:12} {:>5} {:>8} {:>8} {:>8} {:>6} {:>7}".format(*header))
    for r in results:
        for kind in ("ending", "compacting", "none_ending"):
            if kind in r:
                k = r[kind]
                print(
                    f"{r['model']:9} {r['size']:>4} {kind:12} {k['steps']:>5} {k['wall_ms']:>8.2f} "
                    f"{k['forward_ms']:>8.2f} {k['host_ms']:>8.2f} {100 * k['host_share']:>5.1f}% "
                    f"{k['ops_outside_forward']:>7.1f}"
                )
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {out / 'engine.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
