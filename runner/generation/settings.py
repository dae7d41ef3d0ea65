"""The job's generation settings on a worker: the GenerationConfig it decodes with, and the columns it fixes."""

from __future__ import annotations

import json
from typing import Any

from runner.config import JobConfig, default_samples, has_row_settings, has_structured_output
from runner.constraints import job_constraint
from runner.generation.sampling import SAMPLING_DEFAULTS, Decoding
from runner.tasks import WorkerSetup


def build_generation_config(model_defaults: Any, job: JobConfig, tokenizer: Any) -> Any:
    """The job's generation settings over the model's own defaults; max_new_tokens always explicit."""
    import copy

    gen = job.generation
    config = copy.deepcopy(model_defaults)
    settings: dict[str, Any] = {
        "max_new_tokens": gen.max_new_tokens or 1,  # a scoring job's 0 is no GenerationConfig's (nothing decodes)
        "do_sample": gen.do_sample,
        "num_return_sequences": default_samples(gen),
        "max_length": None,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if gen.do_sample:
        settings.update({k: getattr(gen, k) for k in ("temperature", "top_p", "top_k") if getattr(gen, k) is not None})
    else:  # sampling knobs do nothing in greedy decoding; unset them so nothing warns or misleads
        settings.update({"temperature": None, "top_p": None, "top_k": None})
    if gen.repetition_penalty is not None:
        settings["repetition_penalty"] = gen.repetition_penalty
    if gen.stop_strings:
        settings["stop_strings"] = list(gen.stop_strings)
    if config.eos_token_id is None:
        settings["eos_token_id"] = tokenizer.eos_token_id
    config.update(**settings)
    return config


def static_columns(setup: WorkerSetup, generation_config: Any, device: str, name: str) -> dict[str, Any]:
    """Columns that hold the same value for every row a worker writes in this job."""
    gen = setup.job.generation
    sampled = {
        k: (getattr(generation_config, k) if getattr(generation_config, k) is not None else default)
        for k, default in SAMPLING_DEFAULTS.items()
    }
    config = {k: v for k, v in generation_config.to_dict().items() if v is not None}
    if gen.prompt_logprobs:  # a scoring job: what it was asked
        config.update(max_new_tokens=0, prompt_logprobs=True)
    constraint = job_constraint(gen)
    if constraint is not None:
        config["structured_output"] = json.loads(constraint.text)
    config_json = json.dumps(config, sort_keys=True, default=str)
    columns = {
        "model": setup.job.model.name_or_path,
        "quantization": setup.job.model.quantization,
        "model_revision": setup.model_revision,
        "adapter": setup.adapter,
        "temperature": sampled["temperature"] if gen.do_sample else None,
        "top_p": sampled["top_p"] if gen.do_sample else None,
        "top_k": sampled["top_k"] if gen.do_sample else None,
        "repetition_penalty": sampled["repetition_penalty"],
        "do_sample": gen.do_sample,
        "max_new_tokens": gen.max_new_tokens,
        "seed": gen.seed,
        "generation_config": config_json,
        "run_id": setup.run_id,
        "config_hash": setup.config_hash,
        "worker": name,
        "device": device,
    }
    if has_structured_output(setup.job):
        columns["structured_output"] = constraint.text if constraint is not None else None
    if has_row_settings(setup.job):
        stops = generation_config.stop_strings or []
        columns["stop_strings"] = [stops] if isinstance(stops, str) else list(stops)
        columns["num_return_sequences"] = default_samples(gen)
    return columns


def row_columns(static: dict[str, Any], d: Decoding) -> dict[str, Any]:
    """The settings columns of a row decoded with its own settings `d`, over the job's (`static`): what it used.

    Its `generation_config` is the job's with the row's values in place.
    """
    sampled = {k: getattr(d, k) if d.do_sample else None for k in ("temperature", "top_p", "top_k")}
    config = json.loads(static["generation_config"])
    config.update(
        {k: v for k, v in sampled.items() if v is not None},
        do_sample=d.do_sample,
        max_new_tokens=d.max_new_tokens,
        num_return_sequences=d.samples,
        stop_strings=list(d.stop_strings),
    )
    for k, v in sampled.items():
        if v is None:
            config.pop(k, None)
    config.pop("structured_output", None)  # the row's own, where it has one (a Batch line's response_format)
    if d.constraint is not None:
        config["structured_output"] = json.loads(d.constraint.text)
    if not d.stop_strings:
        config.pop("stop_strings")
    own = {"structured_output": d.constraint.text if d.constraint is not None else None}
    if "structured_output" not in static:
        own = {}
    return {
        **own,
        **sampled,
        "do_sample": d.do_sample,
        "max_new_tokens": d.max_new_tokens,
        "seed": d.seed,
        "stop_strings": list(d.stop_strings),
        "num_return_sequences": d.samples,
        "generation_config": json.dumps(config, sort_keys=True, default=str),
    }
