"""What a job knows before any input row is read: checked config, output directory, model, preparation spec.

The run (`runner.driver.job`) and the dry run (`runner.driver.dryrun`) both begin here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from runner import input as input_lib
from runner import store
from runner.config import JobConfig, config_hash, validate
from runner.errors import ConfigError


@dataclass
class JobStart:
    """A job checked and ready to read its input."""

    job: JobConfig
    out: store.OutputDir | None  # None for a dry run
    model_path: str
    spec: input_lib.PrepareSpec
    config_hash: str
    run_id: str


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def start(job: JobConfig, dry_run: bool = False) -> JobStart:
    """Check the config, the input's location, the output directory and the model; read no row.

    Raises:
        ConfigError: anything wrong with the config, the input path, the output directory or the model.
    """
    validate(job)
    input_lib.resolve_source(job.dataset)  # a wrong path fails here, before Ray or a model starts
    out = None
    if not dry_run:
        out = store.open_output_dir(job.output.dir)
        store.ensure_writable(out)
    model_path = input_lib.resolve_model_path(job.model.name_or_path)
    context = input_lib.context_length(model_path, job.model)
    if context and context - job.generation.max_new_tokens < 1:
        raise ConfigError(
            [
                f"generation.max_new_tokens={job.generation.max_new_tokens}: the model's context is "
                f"{context} tokens, leaving no room for a prompt; lower it"
            ]
        )
    reserved = frozenset(store.BASE_COLUMNS | {input_lib.TOKENS})
    spec = input_lib.PrepareSpec(job.dataset, model_path, job.model, job.generation.max_new_tokens, context, reserved)
    return JobStart(job, out, model_path, spec, config_hash(job), new_run_id())
