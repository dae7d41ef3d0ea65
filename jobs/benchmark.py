"""Throughput benchmark: the same prompts through the plain recipe, sorted batches, the pipeline,
a Ray Data peer, transformers' continuous batching and the runner, in one invocation.

Usage:
    python jobs/benchmark.py                          # short workload: 32 new tokens (about 30 minutes on 2 CPU cores)
    python jobs/benchmark.py --workload long          # T0 and chat prompts mixed, 256 new tokens
    python jobs/benchmark.py --workload fewshot       # one block of worked examples before every question
    python jobs/benchmark.py --n 32 --systems plain,runner          # a quick look
    python jobs/benchmark.py --max-prompt-tokens 0    # the uncapped mix (prompts up to 4,000 tokens)

The long workload mixes answers of very different lengths: T0 prompts (a label or a few words)
and chat requests (essays, stories, guides) that run to the 256-token limit, in turn.

The few-shot workload puts the same block of eight worked examples (T0 prompts with their answers,
about 1,000 tokens) before each of 256 short T0 questions, in one chat message each: what the
runner's shared prefixes are for. It also prints the prompt tokens the runner computed against the
prompts' unshared tokens (the shared block counted once).

Every system runs greedy decoding with the same model, quantization and max_new_tokens on the
same rendered prompts. Prints a table (generated tokens/s, wall time, both padding efficiencies,
speed-up over the plain recipe, agreement of completions with it) and writes it to
OUT/benchmark.json and OUT/benchmark.md.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("plain", "sorted", "pipeline", "ray_data", "generate_batch", "runner", "runner_2w")
DEFAULTS = {  # per workload: prompts, new tokens, systems
    "short": {"n": 256, "max_new_tokens": 32, "systems": "plain,sorted,pipeline,ray_data,runner,runner_2w"},
    "long": {"n": 64, "max_new_tokens": 256, "systems": "plain,sorted,generate_batch,runner"},
    "fewshot": {"n": 256, "max_new_tokens": 32, "systems": "sorted,generate_batch,runner"},
}
# The few-shot workload's eight worked examples: T0 prompts of the shared mix and their answers.
FEW_SHOT_EXAMPLES = {
    "t0-00015": "Science and Technology",
    "t0-00030": "company",
    "t0-00124": "Yes",
    "t0-00132": "Business",
    "t0-00137": "Yes",
    "t0-00327": "They did not enjoy it.",
    "t0-00357": "Negative",
    "t0-00232": "Negative",
}
FEW_SHOT_QUESTION_TOKENS = 64  # the questions: T0 prompts of at most this many tokens
CHAT_TOPICS = [
    "the history of the printing press",
    "how vaccines train the immune system",
    "a lighthouse keeper's last night",
    "why the sky is blue",
    "planning a vegetable garden",
    "the water cycle",
    "a robot learning to paint",
    "how a bill becomes a law",
    "the life of honey bees",
    "learning a second language as an adult",
    "a journey across the Sahara",
    "how compilers turn code into programs",
    "the causes of the First World War",
    "a city that floats on the sea",
    "how to train for a first marathon",
    "the invention of the telephone",
]
CHAT_FORMS = [
    "Write a detailed essay about {}.",
    "Explain {} to a curious teenager, with examples, in several paragraphs.",
    "Write a short story about {}.",
    "Give a step-by-step guide to {}, explaining each step.",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default=str(REPO.parent / "shared" / "data" / "t0_mix_2k.jsonl"))
    parser.add_argument("--workload", default="short", choices=sorted(DEFAULTS), help="short (default), long, fewshot")
    parser.add_argument("--n", type=int, help="prompts to take (default: short 256, long 64)")
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=1024, help="skip longer prompts; 0 takes every prompt (default 1024)"
    )
    parser.add_argument("--max-new-tokens", type=int, help="default: short 32, long 256")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "fp4", "int8", "none"])
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct")
    parser.add_argument("--systems", help=f"comma-separated, from {', '.join(SYSTEMS)} (default: per workload)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch of the fixed-size systems")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPU threads every system gets")
    parser.add_argument("--out", default="outputs/benchmark")
    parser.add_argument(
        "--runner-override", action="append", default=[], help="extra Hydra override for the runner (repeatable)"
    )
    args = parser.parse_args()
    for key, value in DEFAULTS[args.workload].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown system(s) {', '.join(sorted(unknown))}; choose from {', '.join(SYSTEMS)}")
    if not Path(args.prompts).exists():
        parser.error(f"--prompts {args.prompts}: no such file; give a JSONL file with id and prompt fields")
    return args


def write_workload(args: argparse.Namespace, model_path: str, out: Path) -> tuple[list[str], list[str], list[int]]:
    """Render the chosen prompts with the chat template once; every system gets these exact texts."""
    from bench import figures as bench

    from runner.config import ModelConfig
    from runner.input import load_tokenizer

    tokenizer = load_tokenizer(model_path, ModelConfig(name_or_path=model_path))
    with open(args.prompts, encoding="utf-8") as f:  # not splitlines(): prompts may hold U+2028
        rows = [json.loads(line) for line in f if line.strip()]
    if args.workload == "long":  # a chat request after every T0 prompt
        chat = [{"id": f"chat-{k}", "prompt": form.format(t)} for k, (t, form) in enumerate(_chat_requests())]
        t0 = iter(rows)
        rows = [r for pair in zip(t0, chat * (len(rows) // len(chat) + 1)) for r in pair]
        rows = [dict(r, id=f"{r['id']}-{i}") if str(r["id"]).startswith("chat-") else r for i, r in enumerate(rows)]
    if args.workload == "fewshot":
        rows = _few_shot_rows(rows, tokenizer)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        for r in rows
    ]
    lengths = [len(x) for x in tokenizer(texts)["input_ids"]]
    if args.workload == "fewshot":  # every question is short; the shared block makes each prompt long
        picked = list(range(min(args.n, len(rows))))
    else:
        picked = bench.select_workload(lengths, args.n, args.max_prompt_tokens or None)
    ids = [str(rows[i]["id"]) for i in picked]
    texts = [texts[i] for i in picked]
    with (out / "workload.jsonl").open("w") as f:
        for i, t in zip(ids, texts):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    return ids, texts, [lengths[i] for i in picked]


def unshared_tokens(model_path: str, texts: list[str]) -> int:
    """The prompts' tokens with the prefix all of them share counted once."""
    from runner.config import ModelConfig
    from runner.input import load_tokenizer

    tokenizer = load_tokenizer(model_path, ModelConfig(name_or_path=model_path))
    ids = tokenizer(texts)["input_ids"]
    shared = len(os.path.commonprefix(ids))
    return shared + sum(len(x) - shared for x in ids)


def _few_shot_rows(rows: list[dict], tokenizer) -> list[dict]:
    """Each short T0 question after the same block of eight worked examples."""
    by_id = {r["id"]: r for r in rows}
    block = "\n\n".join(
        f"Example {k}:\n{by_id[i]['prompt'].strip()}\nAnswer: {answer}"
        for k, (i, answer) in enumerate(FEW_SHOT_EXAMPLES.items(), 1)
    )
    intro = "Here are worked examples of tasks and their answers.\n\n"
    questions = [
        r
        for r in rows
        if r["id"] not in FEW_SHOT_EXAMPLES and len(tokenizer.encode(r["prompt"])) <= FEW_SHOT_QUESTION_TOKENS
    ]
    return [
        {"id": r["id"], "prompt": f"{intro}{block}\n\nNow the task to answer:\n{r['prompt'].strip()}\nAnswer:"}
        for r in questions
    ]


def _chat_requests() -> list[tuple[str, str]]:
    return [(topic, form) for form in CHAT_FORMS for topic in CHAT_TOPICS]


def run_system(name: str, args: argparse.Namespace, model_path: str, out: Path, ids, texts, lengths):
    from bench import systems

    common = {"model_path": model_path, "quantization": args.quantization, "max_new_tokens": args.max_new_tokens}
    if name == "plain":
        return systems.fixed_size("plain", ids, texts, list(range(len(ids))), batch_size=args.batch_size, **common)
    if name == "sorted":
        order = sorted(range(len(ids)), key=lambda i: -lengths[i])
        return systems.fixed_size("sorted", ids, texts, order, batch_size=args.batch_size, **common)
    if name == "pipeline":
        return systems.pipeline(ids, texts, batch_size=args.batch_size, **common)
    if name == "generate_batch":
        return systems.generate_batch(ids, texts, max_batch_tokens=args.batch_size * 512, **common)
    if name == "ray_data":
        return systems.ray_data(
            out / "workload.jsonl", batch_size=args.batch_size, cpus=args.cpus, out_dir=out / "ray_data", **common
        )
    workers = 2 if name == "runner_2w" else 1
    # One worker: shards of 128 rows, one batch each. Two workers: shards (and so batches) of 32 rows,
    # so a 256-row job makes enough units of work for both (README, "Throughput").
    shard_size = 32 if workers > 1 else 128
    return systems.runner_job(
        out / "workload.jsonl",
        args.quantization,
        args.max_new_tokens,
        workers=workers,
        cpus=args.cpus,
        out_dir=out / name,
        overrides=[f"model.name_or_path={args.model}", f"batching.shard_size={shard_size}", *args.runner_override],
        name=name,
    )


def main() -> int:
    args = parse_args()
    from bench import figures as bench

    from runner.input import quiet_transformers, resolve_model_path

    quiet_transformers()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model_path(args.model)
    ids, texts, lengths = write_workload(args, model_path, out)
    workload = {
        "workload": args.workload,
        "prompts": len(ids),
        "source": args.prompts,
        "max_prompt_tokens": args.max_prompt_tokens or None,
        "prompt_tokens": {"total": sum(lengths), "min": min(lengths), "max": max(lengths)},
        "max_new_tokens": args.max_new_tokens,
        "quantization": args.quantization,
        "model": args.model,
        "batch_size_of_fixed_systems": args.batch_size,
        "cpus": args.cpus,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
    }
    print(
        f"workload: {len(ids)} prompts, {min(lengths)}..{max(lengths)} tokens ({sum(lengths)} in all), "
        f"max_new_tokens={args.max_new_tokens}, {args.quantization}, greedy",
        flush=True,
    )
    # torch and transformers imported before any clock starts, so no in-process system pays for them
    import torch  # noqa: F401
    import transformers  # noqa: F401

    results = []
    for name in args.systems.split(","):
        started = time.perf_counter()
        print(f"running {name} ...", flush=True)
        result = run_system(name, args, model_path, out, ids, texts, lengths)
        results.append(result)
        row = bench.figures(result)
        print(
            f"  {name}: {row['tokens_per_s']:.1f} generated tok/s, {row['wall_s']:.1f}s "
            f"(benchmark step {time.perf_counter() - started:.1f}s)",
            flush=True,
        )
    names = [r.name for r in results]
    baseline = "plain" if "plain" in names else names[0]  # the few-shot workload compares with sorted batches
    rows = bench.compare(results, baseline)
    for result, row in zip(results, rows):
        if result.name.startswith("runner"):
            row["worker_idle_at_end_s"] = bench.worker_idle_at_end(result.batches)
        row["computed_prompt_tokens"] = result.extra.get("computed_prompt_tokens")  # the runner's and its engine's
    lines = bench.verdicts(rows, args.workload)
    if args.workload == "fewshot":
        unshared = unshared_tokens(model_path, texts)
        workload["unshared_prompt_tokens"] = unshared
        lines += bench.computed_verdicts(rows, unshared)
    report = "\n".join([bench.markdown_table(rows, baseline), "", *lines])
    print("\n" + report)
    (out / "benchmark.json").write_text(bench.to_json(rows, workload))
    (out / "benchmark.md").write_text(f"Workload: {json.dumps(workload)}\n\n{report}\n")
    print(f"\nwritten: {out / 'benchmark.json'}, {out / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
