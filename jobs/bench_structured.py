"""Benchmark: structured output's cost, and the grammar libraries it could be built on.

Usage:
    python jobs/bench_structured.py [--rows 32] [--new-tokens 64] [--repeats 3] [--out outputs/bench]

1. Libraries. For each constraint (a nested JSON schema with enums and arrays, a regex, a choice) and
   each grammar library installed (llguidance, which the runner uses; xgrammar, if installed:
   `pip install xgrammar==0.2.9`), on the embedded model's tokenizer: the time to build the
   library's tokenizer view, to compile the grammar, and per token of a document that matches it
   the time to fill the next-token bitmask and take the token.

2. The engine. The same rows (T0 prompts of the shared mix), decoded by the engine on the embedded
   model (fp32, greedy, no EOS: every row runs all its new tokens, so both runs do the same steps
   at the same batch sizes) without and with a JSON schema that no row completes within its new
   tokens (an array of at least 1,000 strings). Generated tokens per second of each, their ratio,
   and how long the masks took to compute per step against how long a step waited for them after
   the model's forward (the masks are computed beside the forward: `runner.generation.structured`).

Prints both tables and writes them to OUT/structured.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PLACE = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["city", "river", "mountain", "person"]},
        "facts": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "location": {
            "type": "object",
            "properties": {"country": {"type": "string"}, "population": {"type": "integer"}},
            "required": ["country"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "facts", "location"],
    "additionalProperties": False,
}
PLACE_DOC = {
    "name": "Paris",
    "kind": "city",
    "facts": ["capital of France", "on the Seine"],
    "location": {"country": "France", "population": 2102650},
}
REGEX = r"[A-Z][a-z]+, [0-9]{4}-[0-9]{2}-[0-9]{2}"
CHOICES = ["entailment", "neutral", "contradiction"]
ENDLESS = {"type": "array", "items": {"type": "string"}, "minItems": 1000}  # no row completes it


def cases() -> list[tuple[str, str, object, str]]:
    """(name, kind, value, a matching text written as the runner's JSON options write it)."""
    doc = json.dumps(PLACE_DOC, separators=(", ", ": "))
    return [
        ("json_schema", "json_schema", PLACE, doc),
        ("regex", "regex", REGEX, "Paris, 2024-05-17"),
        ("choice", "choice", CHOICES, "contradiction"),
    ]


def with_llguidance(tok, kind: str, value, ids: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    from runner.constraints import Constraint

    t = time.perf_counter()
    lt = llguidance.hf.from_tokenizer(tok, eos_token=tok.eos_token_id)
    tokenizer_s = time.perf_counter() - t
    constraint = Constraint(kind, json.dumps(value))
    t = time.perf_counter()
    matcher = llguidance.LLMatcher(lt, constraint.grammar(), log_level=0)
    compile_s = time.perf_counter() - t
    mask = llguidance.torch.allocate_token_bitmask(1, lt.vocab_size)
    t = time.perf_counter()
    for i in ids:
        llguidance.torch.fill_next_token_bitmask(matcher, mask)
        assert matcher.consume_token(i), matcher.get_error()
    per_token = (time.perf_counter() - t) / len(ids)
    return {"tokenizer_s": tokenizer_s, "compile_s": compile_s, "mask_us_per_token": per_token * 1e6}


def with_xgrammar(tok, kind: str, value, ids: list[int]) -> dict | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info)
    tokenizer_s = time.perf_counter() - t
    t = time.perf_counter()
    if kind == "json_schema":
        compiled = compiler.compile_json_schema(json.dumps(value), any_whitespace=False, separators=(", ", ": "))
    elif kind == "regex":
        compiled = compiler.compile_regex(value)
    else:
        compiled = compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in value))
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    t = time.perf_counter()
    for i in ids:
        matcher.fill_next_token_bitmask(mask)
        assert matcher.accept_token(i)
    per_token = (time.perf_counter() - t) / len(ids)
    return {"tokenizer_s": tokenizer_s, "compile_s": compile_s, "mask_us_per_token": per_token * 1e6}


def installed_mb(*packages: str) -> float:
    """Disk taken by these packages' folders in site-packages (MB)."""
    import importlib.util

    total = 0
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root, _, files in os.walk(next(iter(spec.submodule_search_locations))):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 1e6


def libraries(tok) -> list[dict]:
    results = []
    for name, kind, value, text in cases():
        ids = tok.encode(text, add_special_tokens=False)
        for library, run in (("llguidance", with_llguidance), ("xgrammar", with_xgrammar)):
            found = run(tok, kind, value, ids)
            if found is not None:
                results.append({"constraint": name, "library": library, "tokens": len(ids), **found})
    return results


def engine_run(model, tok, rows, new_tokens: int, constraint) -> dict:
    """Tokens per second of one run, and the masks' compute and wait time per decode step."""
    from runner.generation import Decoding, Engine, Limits

    decoding = Decoding(max_new_tokens=new_tokens, eos_ids=frozenset(), pad_id=tok.pad_token_id, constraint=constraint)
    engine = Engine(model, tok, decoding, Limits(max_sequences=len(rows)))
    t = time.perf_counter()
    done = engine.generate_all(rows)
    seconds = time.perf_counter() - t
    computing, waiting = engine.mask_seconds()
    tokens = sum(f.result.completion_tokens for f in done)
    assert tokens == len(rows) * new_tokens, "every row runs all its new tokens"
    steps = new_tokens  # every row decodes together, from the prefill's token to the last
    return {
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
        "mask_compute_ms_per_step": 1000 * computing / steps,
        "mask_wait_ms_per_step": 1000 * waiting / steps,
    }


def engine_figures(tok, args) -> dict:
    import torch

    from runner.config import ModelConfig
    from runner.constraints import schema_constraint
    from runner.generation import Row, load_model
    from runner.input import resolve_model_path

    path = resolve_model_path("embedded:SmolLM2-135M-Instruct")
    model = load_model(path, ModelConfig(name_or_path=path, quantization="none"), "cpu")
    with open(args.prompts) as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    prompts = [p for p in prompts if len(tok.encode(p)) <= 96][: args.rows]
    rows = [Row(i, f"r{i}", tok.encode(p)) for i, p in enumerate(prompts)]
    constraint = schema_constraint(ENDLESS)
    runs: dict[str, list[dict]] = {"free": [], "schema": []}
    with torch.inference_mode():
        engine_run(model, tok, rows[:4], 4, constraint)  # warm-up: the first forward and the first grammar
        for _ in range(args.repeats):  # alternated, so both see the machine alike
            runs["free"].append(engine_run(model, tok, rows, args.new_tokens, None))
            runs["schema"].append(engine_run(model, tok, rows, args.new_tokens, constraint))
    best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in runs.items()}
    return {
        "rows": len(rows),
        "new_tokens": args.new_tokens,
        "free": best["free"],
        "schema": best["schema"],
        "slowdown": best["free"]["tokens_per_s"] / best["schema"]["tokens_per_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default=str(REPO.parent / "shared" / "data" / "t0_mix_2k.jsonl"))
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="outputs/bench")
    args = parser.parse_args()
    import torch

    from runner.input import load_tokenizer, resolve_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    tok = load_tokenizer(resolve_model_path("embedded:SmolLM2-135M-Instruct"))
    libs = libraries(tok)
    header = ("constraint", "library", "tokens", "tokenizer s", "compile ms", "mask us/token")
    print("{:12} {:11} {:>6} {:>11} {:>10} {:>13}".format(*header))
    for r in libs:
        print(
            f"{r['constraint']:12} {r['library']:11} {r['tokens']:>6} {r['tokenizer_s']:>11.2f} "
            f"{1000 * r['compile_s']:>10.2f} {r['mask_us_per_token']:>13.1f}"
        )
    sizes = {"llguidance": installed_mb("llguidance")}
    if any(r["library"] == "xgrammar" for r in libs):
        sizes["xgrammar"] = installed_mb("xgrammar", "tvm_ffi", "triton")
    print("installed MB (with what torch does not bring): " + ", ".join(f"{k} {v:.0f}" for k, v in sizes.items()))
    figures = engine_figures(tok, args)
    print(f"\nengine, {figures['rows']} rows x {figures['new_tokens']} new tokens, embedded model fp32, greedy:")
    print(f"{'run':8} {'tokens/s':>9} {'mask compute ms/step':>21} {'waited ms/step':>15}")
    for name in ("free", "schema"):
        r = figures[name]
        computing, waiting = r["mask_compute_ms_per_step"], r["mask_wait_ms_per_step"]
        print(f"{name:8} {r['tokens_per_s']:>9.1f} {computing:>21.2f} {waiting:>15.2f}")
    print(f"with a schema: {figures['slowdown']:.3f}x the time per token (target: at most 1.3x)")
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    found = {"libraries": libs, "installed_mb": sizes, "engine": figures}
    (out / "structured.json").write_text(json.dumps(found, indent=2))
    print(f"\nwritten: {out / 'structured.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
