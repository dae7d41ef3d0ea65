"""What a job knows before any input row is read: checked config, output directory, model, preparation spec.

The run (`runner.driver.job`) and the dry run (`runner.driver.dryrun`) both begin here.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from runner import input as input_lib
from runner import store
from runner.config import JobConfig, config_hash, has_row_settings, has_structured_output, validate
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
    model_revision: str  # what every worker loads: a Hub commit, or local:<hash of the folder>
    adapter: str | None = None  # model.adapter's name@hash of its weights (what the `adapter` column says)
    adapters: dict[str, str] | None = None  # model.adapters: each name -> its name@hash

    @property
    def adapter_key(self) -> str | None:
        return self.adapter or (json.dumps(self.adapters, sort_keys=True) if self.adapters else None)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _refuse_overlap(source: input_lib.Source, out: store.OutputDir, job: JobConfig) -> None:
    """Input files inside output.dir would be read back as results, and overwrite would delete them."""
    if source.fs is None or type(source.fs) is not type(out.fs):
        return
    root = out.path.rstrip("/") + "/"
    inside = [f.shown for f in source.files if f.path.startswith(root)]
    if inside:
        raise ConfigError(
            [
                f"dataset.path={job.dataset.path!r} and output.dir={store.open_output_dir(job.output.dir).display!r} "
                f"overlap: the input file(s) {', '.join(inside[:3])} lie inside the output directory, where readers "
                "of the results would read them as results (and output.overwrite would remove them). Move the "
                "input out of it, or write to another output.dir"
            ]
        )


def start(job: JobConfig, dry_run: bool = False) -> JobStart:
    """Check the config, the input's location, the output directory and the model; read no row.

    Raises:
        ConfigError: anything wrong with the config, the input path, the output directory or the model.
    """
    validate(job)
    source = input_lib.resolve_source(job.dataset)  # a wrong path fails here, before Ray or a model starts
    out = None
    if not dry_run:
        out = store.open_output_dir(job.output.dir)
        _refuse_overlap(source, out, job)
        store.ensure_writable(out)
    model_path = input_lib.resolve_model_path(job.model.name_or_path)
    revision = input_lib.resolve_revision(model_path, job.model)
    context = input_lib.context_length(model_path, job.model)
    if context and context - job.generation.max_new_tokens < 1:
        raise ConfigError(
            [
                f"generation.max_new_tokens={job.generation.max_new_tokens}: the model's context is "
                f"{context} tokens, leaving no room for a prompt; lower it"
            ]
        )
    adapter = None
    if job.model.adapter:  # checked against the base here, loaded by every worker from its absolute path
        found = input_lib.read_adapter(job.model.adapter)
        input_lib.check_fits(found, model_path)
        adapter = found.label
        job = dataclasses.replace(job, model=dataclasses.replace(job.model, adapter=found.path))
    adapters: dict[str, str] | None = None
    if job.model.adapters:
        found_all = {name: input_lib.read_adapter(folder) for name, folder in job.model.adapters.items()}
        for found in found_all.values():
            input_lib.check_fits(found, model_path)
        adapters = {name: found.label for name, found in found_all.items()}
        folders = {name: found.path for name, found in found_all.items()}
        job = dataclasses.replace(job, model=dataclasses.replace(job.model, adapters=folders))
    reserved = store.reserved_columns(
        job.generation.logprobs is not None,
        adapter is not None or adapters is not None,
        has_row_settings(job),
        job.generation.prompt_logprobs,
        has_structured_output(job),
    ) | {input_lib.TOKENS, input_lib.SETTINGS, input_lib.ADAPTER}
    # Preparers tokenize with the tokenizer of the revision the workers load (a Hub commit, pinned here).
    model = job.model if revision.startswith("local:") else dataclasses.replace(job.model, revision=revision)
    spec = input_lib.PrepareSpec(
        job.dataset, model_path, model, job.generation.max_new_tokens, context, reserved, job.generation
    )
    adapter_digest = adapter.rsplit("@", 1)[1] if adapter else None  # what it holds, not what its folder is called
    digests = {name: label.rsplit("@", 1)[1] for name, label in adapters.items()} if adapters else None
    job_hash = config_hash(job, adapter_digest, input_lib.applied_model_defaults(model_path, revision), digests)
    return JobStart(job, out, model_path, spec, job_hash, new_run_id(), revision, adapter, adapters)
