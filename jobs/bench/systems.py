"""The systems the throughput benchmark compares, each written the way its user would write it.

Every system gets the same rendered prompt texts, model folder, quantization,
greedy decoding and max_new_tokens, and returns a `bench.SystemResult`. Wall
time runs from loading the model (and starting Ray, where the system uses it)
to having every completion. The baselines' `model.generate` is wrapped only to
record what each call held; the wrapper adds no work to the call.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from runner.config import ModelConfig
from runner.generation import Row

from .figures import BatchRecord, SystemResult, completion_length, fixed_batches

JOBS = Path(__file__).resolve().parents[1]  # jobs/: where `bench` is importable from


def load(model_path: str, quantization: str) -> tuple[Any, Any]:
    """Tokenizer (left padding) and model, as the runner's workers load them."""
    from runner.generation import load_model, pick_device
    from runner.input import load_tokenizer

    config = ModelConfig(name_or_path=model_path, quantization=quantization)
    tokenizer = load_tokenizer(model_path, config)
    return tokenizer, load_model(model_path, config, pick_device())


class GenerateRecorder:
    """Wraps `model.generate` to note each call's rows, widths and generated tokens."""

    def __init__(self, model: Any, end_ids: set[int], started: float):
        self.model = model
        self.inner = model.generate
        self.end_ids = end_ids
        self.started = started
        self.calls: list[dict[str, Any]] = []
        model.generate = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        mask = kwargs["attention_mask"]
        width = mask.shape[1]
        sequences = out.sequences if hasattr(out, "sequences") else out
        new = sequences[:, width:].tolist()
        self.calls.append(
            {
                "prompt_tokens": mask.sum(dim=1).tolist(),
                "padded_length": int(width),
                "completion_tokens": [completion_length(t, self.end_ids) for t in new],
                "end_s": time.perf_counter() - self.started,
            }
        )
        return out

    def restore(self) -> None:
        self.model.generate = self.inner


def _end_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    return ids | {tokenizer.pad_token_id} if ids else {tokenizer.eos_token_id, tokenizer.pad_token_id}


def fixed_size(
    name: str,
    ids: list[str],
    texts: list[str],
    order: list[int],
    model_path: str,
    quantization: str,
    batch_size: int,
    max_new_tokens: int,
) -> SystemResult:
    """The transformers tutorial's loop: left-padded batches of `batch_size` rows taken in `order`."""
    import torch

    started = time.perf_counter()
    tokenizer, model = load(model_path, quantization)
    recorder = GenerateRecorder(model, _end_ids(model, tokenizer), started)
    results: dict[int, str] = {}
    for rows in fixed_batches(order, batch_size):
        enc = tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        results.update(zip(rows, decoded))
    wall = time.perf_counter() - started
    recorder.restore()
    batches = []
    for rows, call in zip(fixed_batches(order, batch_size), recorder.calls):
        batches.append(_record([ids[i] for i in rows], [results[i] for i in rows], call))
    return SystemResult(name, wall, batches, notes=f"batch_size={batch_size}")


def _record(row_ids: list[str], completions: list[str], call: dict[str, Any], worker: str = "main") -> BatchRecord:
    return BatchRecord(
        ids=row_ids,
        prompt_tokens=call["prompt_tokens"],
        padded_prompt_tokens=call["padded_length"] * len(row_ids),
        completion_tokens=call["completion_tokens"],
        completions=completions,
        worker=worker,
        end_s=call["end_s"],
    )


def pipeline(
    ids: list[str], texts: list[str], model_path: str, quantization: str, batch_size: int, max_new_tokens: int
) -> SystemResult:
    """`transformers.pipeline("text-generation", batch_size=...)` over the texts in input order."""
    import transformers

    started = time.perf_counter()
    tokenizer, model = load(model_path, quantization)
    recorder = GenerateRecorder(model, _end_ids(model, tokenizer), started)
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer, batch_size=batch_size)
    outputs = pipe(texts, max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False)
    wall = time.perf_counter() - started
    recorder.restore()
    completions = [o[0]["generated_text"] for o in outputs]
    batches = []
    for k, call in enumerate(recorder.calls):
        rows = list(range(k * batch_size, min((k + 1) * batch_size, len(texts))))
        batches.append(_record([ids[i] for i in rows], [completions[i] for i in rows], call))
    return SystemResult("pipeline", wall, batches, notes=f"batch_size={batch_size}")


def generate_batch(
    ids: list[str], texts: list[str], model_path: str, quantization: str, max_new_tokens: int, max_batch_tokens: int
) -> SystemResult:
    """Transformers' own continuous batching: `model.generate_batch(token ids, generation_config)` (paged attention).

    It runs every request to its end and drops it, as the runner's engine does: its row-steps
    are the tokens its rows generated.
    """
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    started = time.perf_counter()
    tokenizer, model = load(model_path, quantization)
    inputs = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.inference_mode():
        outputs = model.generate_batch(
            inputs=inputs,
            generation_config=config,
            continuous_batching_config=ContinuousBatchingConfig(max_batch_tokens=max_batch_tokens),
            warmup=False,
        )
    wall = time.perf_counter() - started
    end_ids = _end_ids(model, tokenizer)
    by_request = sorted(outputs.values(), key=lambda o: int(str(o.request_id).rsplit("_", 1)[-1]))
    records = []
    for row_id, prompt, out in zip(ids, inputs, by_request):
        tokens = list(out.generated_tokens)
        n = completion_length(tokens, end_ids)
        text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        records.append(BatchRecord([row_id], [len(prompt)], len(prompt), [n], [text], row_steps=len(tokens)))
    return SystemResult("generate_batch", wall, records, notes=f"max_batch_tokens={max_batch_tokens}")


def engine(ids: list[str], texts: list[str], model_path: str, quantization: str, max_new_tokens: int) -> SystemResult:
    """The runner's engine alone, as a worker drives it (no Ray, no Parquet): the running set sized from
    the memory budget, greedy, the model's own end-of-sequence ids."""
    import torch

    from runner.generation import Decoding, Engine, Limits, memory_budget, running_rows

    started = time.perf_counter()
    tokenizer, model = load(model_path, quantization)
    device = str(model.device)
    budget, note = memory_budget(model, device, 1, None)
    eos = model.generation_config.eos_token_id
    decoding = Decoding(
        max_new_tokens=max_new_tokens,
        eos_ids=frozenset(eos if isinstance(eos, list) else [eos]) - {None},
        pad_id=tokenizer.pad_token_id,
    )
    limits = Limits(max_sequences=running_rows(None, device, budget), max_tokens=budget)
    rows = [Row(k, ids[k], tokenizer(t, add_special_tokens=False).input_ids) for k, t in enumerate(texts)]
    records = []
    engine_ = Engine(model, tokenizer, decoding, limits)
    with torch.inference_mode():
        for done in engine_.generate(rows):
            n = done.result.completion_tokens or 0
            prompt = len(rows[done.key].input_ids)
            records.append(
                BatchRecord(
                    [ids[done.key]], [prompt], done.padded_length, [n], [done.result.completion or ""],
                    end_s=time.perf_counter() - started, row_steps=done.steps,
                )
            )  # fmt: skip
    wall = time.perf_counter() - started
    steps = sum(r.row_steps for r in records) + engine_.empty_row_steps  # the empty rows of ended ones decode too
    return SystemResult(
        "engine",
        wall,
        records,
        notes=f"{limits.max_sequences} rows at most; {note}",
        row_steps=steps,
        extra={"computed_prompt_tokens": engine_.prompt_positions},
    )


class RayDataGenerator:
    """The callable class a Ray Data user hands to `map_batches`: load once, generate each batch."""

    def __init__(self, model_path: str, quantization: str, max_new_tokens: int):
        self.started = time.perf_counter()
        self.tokenizer, self.model = load(model_path, quantization)
        self.end_ids = _end_ids(self.model, self.tokenizer)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        enc = self.tokenizer(list(batch["text"]), return_tensors="pt", padding=True).to(self.model.device)
        width = enc["input_ids"].shape[1]
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, width:]
        rows = len(batch["id"])
        # Bookkeeping columns for the benchmark's figures; a user's version would return only the completions.
        return {
            "id": batch["id"],
            "completion": np.array(self.tokenizer.batch_decode(new, skip_special_tokens=True), dtype=object),
            "prompt_tokens": enc["attention_mask"].sum(dim=1).numpy(),
            "completion_tokens": np.array([completion_length(t, self.end_ids) for t in new.tolist()]),
            "padded_length": np.full(rows, width),
            "batch_key": np.full(rows, f"{id(self)}-{time.perf_counter()}"),
            "end_s": np.full(rows, time.time()),
        }


def ray_data(
    workload: Path,
    model_path: str,
    quantization: str,
    batch_size: int,
    max_new_tokens: int,
    cpus: int,
    out_dir: Path,
) -> SystemResult:
    """`ray.data.read_json(...).map_batches(<generator class>, batch_size=..., compute=<1 actor>).write_parquet()`."""
    import os
    import shutil

    import pyarrow.parquet as pq
    import ray

    from runner.cluster import keep_loopback_addresses

    shutil.rmtree(out_dir, ignore_errors=True)
    started = time.perf_counter()
    wall_start = time.time()
    with keep_loopback_addresses():
        # One logical CPU beyond the actor's, so Ray Data's read and write tasks can run beside it.
        ray.init(
            address="local",
            num_cpus=cpus + 1,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            logging_level="ERROR",
            runtime_env={
                "env_vars": {
                    "TOKENIZERS_PARALLELISM": "false",
                    "OMP_NUM_THREADS": str(cpus),
                    # the generator class is pickled by reference: its actor imports this module
                    "PYTHONPATH": os.pathsep.join([str(JOBS), str(JOBS.parent), os.environ.get("PYTHONPATH", "")]),
                }
            },
        )
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.read_json(str(workload))
        ds = ds.map_batches(
            RayDataGenerator,
            fn_constructor_kwargs={
                "model_path": model_path,
                "quantization": quantization,
                "max_new_tokens": max_new_tokens,
            },
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=cpus,
        )
        ds.write_parquet(str(out_dir))
        wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    table = pq.read_table(str(out_dir)).to_pylist()
    os.environ.pop("RAY_ADDRESS", None)  # ray.init exports it; the runner's own Ray start must not join this one
    batches: dict[str, list[dict[str, Any]]] = {}
    for row in table:
        batches.setdefault(row["batch_key"], []).append(row)
    records = [
        BatchRecord(
            ids=[r["id"] for r in rows],
            prompt_tokens=[r["prompt_tokens"] for r in rows],
            padded_prompt_tokens=sum(r["padded_length"] for r in rows),
            completion_tokens=[r["completion_tokens"] for r in rows],
            completions=[r["completion"] for r in rows],
            end_s=rows[0]["end_s"] - wall_start,
        )
        for rows in batches.values()
    ]
    return SystemResult("ray_data", wall, records, notes=f"batch_size={batch_size}, 1 actor x {cpus} CPUs")


def runner_job(
    workload: Path,
    quantization: str,
    max_new_tokens: int,
    workers: int,
    cpus: int,
    out_dir: Path,
    overrides: list[str],
    name: str = "runner",
) -> SystemResult:
    """The runner's real job path (Ray actors, planned shards, Parquet), composed as the CLI composes it."""
    import pyarrow.parquet as pq
    from hydra import compose, initialize_config_dir

    from runner.config import register_configs, to_job_config
    from runner.driver import run_job

    register_configs()
    conf = JOBS.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                f"dataset.path={workload}",
                "dataset.prompt_column=text",
                "dataset.id_column=id",
                "model.chat_template=none",  # the texts are already rendered with the chat template
                f"model.quantization={quantization}",
                f"generation.max_new_tokens={max_new_tokens}",
                f"cluster.num_workers={workers}",
                f"cluster.cpus_per_worker={max(1, cpus // workers)}",
                f"output.dir={out_dir}",
                "output.overwrite=true",
                *overrides,
            ],
        )
    job = to_job_config(cfg)
    started = time.perf_counter()
    summary = run_job(job, progress=False)
    wall = time.perf_counter() - started
    rows = [r for f in sorted(out_dir.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    first = min(r["created_at"] - _delta(r["latency_s"]) for r in rows)
    calls: dict[tuple[str, int, Any], list[dict[str, Any]]] = {}
    for r in rows:
        calls.setdefault((r["worker"], r["batch_id"], r["created_at"]), []).append(r)
    records = [
        BatchRecord(
            ids=[r["id"] for r in group],
            prompt_tokens=[r["prompt_tokens"] for r in group],
            padded_prompt_tokens=sum(r["padded_length"] for r in group if r["sample_index"] == 0),
            completion_tokens=[r["completion_tokens"] for r in group],
            completions=[r["completion"] for r in group],
            worker=worker,
            end_s=(created - first).total_seconds(),
        )
        for (worker, _, created), group in calls.items()
    ]
    return SystemResult(
        name,
        wall,
        records,
        notes=f"{workers} worker(s) x {max(1, cpus // workers)} CPUs, output {summary.output_dir}",
        row_steps=summary.totals.generated_steps,  # what the engine computed, as its workers reported
        extra={"computed_prompt_tokens": summary.totals.computed_prompt_tokens},
    )


def _delta(seconds: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=seconds)
