"""Structured job configs and their validation.

The dataclasses here are the schema Hydra composes `conf/` against, so a
misspelled key fails at compose time. `validate()` then checks values and
raises one `ConfigError` naming every bad field, its value and what is
accepted. Nothing here imports torch, Ray or Hydra at module level.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from runner.errors import ConfigError

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
TOO_LONG = ("refuse", "truncate_left")
# (section, key, default): keys added after runs were written, left out of the config hash while at their default
ADDED_KEYS = (
    ("generation", "logprobs", None),
    ("dataset", "settings_columns", {}),
    ("dataset", "format", "auto"),
    ("dataset", "adapter_column", None),
    ("generation", "prompt_logprobs", False),
    ("generation", "json_schema", None),
    ("generation", "regex", None),
    ("generation", "choice", None),
    ("dataset", "schema_column", None),
)
# Generation settings a row may hold its own value of (dataset.settings_columns, an OpenAI Batch body).
ROW_SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop_strings", "num_return_sequences")
FORMATS = ("auto", "openai_batch")
MAX_LOGPROBS = 20  # top logprobs per step (as vLLM allows by default): each is a (token_id, token, logprob) per token
ON_ROW_ERROR = ("write", "fail")
DTYPES = ("auto", "bfloat16", "float16", "float32")
CHAT_TEMPLATE_MODES = ("auto", "none")
DEVICES = ("auto", "cuda", "cpu")
PLANNED_BATCH_ROWS = 128  # rows per planned batch when batching.max_batch_size is unset
EMBEDDED_PREFIX = "embedded:"


@dataclass
class DatasetConfig:
    path: str = MISSING
    split: str = "train"
    prompt_column: str | None = "prompt"
    messages_column: str | None = None
    id_column: str | None = None
    limit: int | None = None
    # Hub dataset config name (the second argument of datasets.load_dataset).
    name: str | None = None
    # A prompt longer than the model's context minus max_new_tokens: `refuse` the job, or
    # `truncate_left` (keep its end, record the cut in the truncated_tokens column).
    too_long: str = "refuse"
    # Per-row generation settings: a setting (one of ROW_SETTINGS) -> the input column holding each row's
    # value; a null value is the job's setting. E.g. {temperature: temp, max_new_tokens: budget}.
    settings_columns: dict[str, str] = field(default_factory=dict)
    # The column naming each row's adapter (one of model.adapters; null or "": the base model alone).
    adapter_column: str | None = None
    # The column holding each row's own JSON schema (JSON text or an object; null or "": the job's constraint).
    schema_column: str | None = None
    # `auto`: files by their extension; `openai_batch`: OpenAI Batch API input JSONL (custom_id, url, body):
    # ids, prompts and settings come from each line, and prompt_column, messages_column and id_column are unused.
    format: str = "auto"


@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    quantization: str = "nf4"
    dtype: str = "auto"
    # "auto": the tokenizer's own chat template (plain prompts become one user
    # turn); "none": prompts go to the tokenizer as they are; anything else is
    # a Jinja chat template used instead of the tokenizer's.
    chat_template: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    # A PEFT LoRA adapter folder applied to the (quantized) base on every worker: QLoRA's result.
    adapter: str | None = None
    # Several adapters in one job: a name -> its folder; each row names its own (dataset.adapter_column).
    adapters: dict[str, str] = field(default_factory=dict)


@dataclass
class GenerationSettings:
    """GenerationConfig fields; None means "the model's own default"."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    num_return_sequences: int = 1
    stop_strings: list[str] = field(default_factory=list)
    seed: int = 0
    # Log-probabilities of the generated tokens (the model's own distribution, before penalties and
    # warpers): null off; 0 the chosen token's; K also the K most likely tokens at each step.
    logprobs: int | None = None
    # A scoring job (with max_new_tokens=0): each prompt's own tokens' log-probabilities, nothing generated.
    prompt_logprobs: bool = False
    # Structured output (runner.constraints), at most one: a JSON schema (inline, or a path to a .json
    # file), a regular expression, or a list of strings every completion is one of.
    json_schema: Any = None
    regex: str | None = None
    choice: list[str] | None = None


@dataclass
class BatchingConfig:
    # Padded tokens (prompt + max_new_tokens, per returned sequence) in one batch. None: each
    # worker derives it from its device's free memory and the model's KV-cache size per token.
    max_batch_tokens: int | None = None
    # Rows per planned batch, and the most the engine runs at once. None: batches of 128 rows; the
    # engine runs 128 at once on the CPU, on a GPU as many as the memory budget holds (up to 1024).
    max_batch_size: int | None = None
    shard_size: int = 1000
    # What one more forward pass costs, in prompt tokens: a batch's prompts are read in groups of
    # similar length, and another group is started only where it saves more padding than this.
    step_cost_tokens: int = 64
    # Read the longest token prefix the rows admitted together share (a system prompt, few-shot examples)
    # once, and prefill each row's own part against it (runner.generation.prefix).
    share_prefix: bool = True
    # Rows sorted by length together: the input streams through in windows of this many rows,
    # each sorted and planned on its own (a global sort would hold every prompt's length first).
    sort_window: int = 65536


@dataclass
class ClusterConfig:
    address: str | None = None
    # None: one worker per GPU, or on a CPU-only cluster total CPUs // cpus_per_worker.
    num_workers: int | None = None
    # CPUs (and torch threads) of a CPU worker; None: 2, or fewer where every node is smaller.
    cpus_per_worker: int | None = None
    # A busy worker that reports no progress (a planned batch ended) for this long is killed, its shard requeued.
    hang_timeout_s: float = 1800.0
    # Fail when no live node can hold even one worker for this long (the only node gone, no resources at all).
    resources_timeout_s: float = 60.0
    # Which workers start: `cuda` GPU workers only (waiting up to resources_timeout_s for GPU nodes),
    # `cpu` CPU workers only, `auto` GPU workers where the cluster has (or its autoscaler offers) GPUs,
    # CPU workers otherwise, and GPU workers for GPU nodes that join later.
    device: str = "auto"
    # GPUs of one node a worker holds, its model spread over them (for models larger than one GPU).
    gpus_per_worker: int = 1


@dataclass
class OutputConfig:
    dir: str = MISSING
    # Replace results of another config found in `dir` instead of refusing to run.
    overwrite: bool = False
    # A row that fails even alone (out of memory): `write` it with finish_reason=error, or `fail` the job.
    on_row_error: str = "write"
    # Generate the error rows (finish_reason=error) of committed files again, and nothing else.
    retry_errors: bool = False
    # A run holds output.dir through `_lease.json`, renewed every lease_timeout_s / 4; another run takes
    # over a lease not renewed for lease_timeout_s (its holder is presumed dead).
    lease_timeout_s: float = 120.0


@dataclass
class JobConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (called by the entry points)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)


def to_job_config(cfg: DictConfig | JobConfig) -> JobConfig:
    """Turn a composed DictConfig into a JobConfig, reporting missing keys as ConfigError."""
    if isinstance(cfg, JobConfig):
        return cfg
    missing = sorted(_missing_keys(cfg))
    if missing:
        raise ConfigError([f"{k}: required, but not set (add `{k}=...` to the command)" for k in missing])
    job = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), cfg))
    assert isinstance(job, JobConfig)  # to_object of a JobConfig schema; not user input
    return job


def _missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    found = []
    for key in cfg:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            found.append(full)
            continue
        value = cfg._get_node(key)
        if isinstance(value, DictConfig):
            found += _missing_keys(value, full + ".")
    return found


def validate(job: JobConfig) -> JobConfig:
    """Check every value; raise one ConfigError listing all problems."""
    problems: list[str] = []
    problems += _dataset_problems(job.dataset)
    problems += _model_problems(job.model)
    if bool(job.model.adapters) != bool(job.dataset.adapter_column):
        problems.append(
            "model.adapters and dataset.adapter_column go together: name the adapters "
            "(+model.adapters.NAME=FOLDER) and the column that picks each row's "
            "(dataset.adapter_column=COLUMN); for one adapter on every row, use model.adapter=FOLDER"
        )
    problems += _generation_problems(job.generation, has_row_settings(job))
    problems += _structured_problems(job)
    problems += _batching_problems(job.batching, job.generation)
    problems += _cluster_problems(job.cluster)
    if job.output.on_row_error not in ON_ROW_ERROR:
        problems.append(
            f"output.on_row_error={job.output.on_row_error!r}: accepted values are {', '.join(ON_ROW_ERROR)}"
        )
    if not job.output.lease_timeout_s >= 5:
        problems.append(f"output.lease_timeout_s={job.output.lease_timeout_s}: must be >= 5 (seconds)")
    if not str(job.output.dir).strip():
        problems.append("output.dir='': must name a directory or a URI (file://, s3://, gs://)")
    if problems:
        raise ConfigError(problems)
    return job


def _dataset_problems(d: DatasetConfig) -> list[str]:
    problems = []
    if not str(d.path).strip():
        problems.append(
            "dataset.path='': must be a .jsonl/.json/.csv/.parquet file, a folder or pattern of them, an "
            "s3://, gs:// or file:// URI, or a Hub dataset name"
        )
    if d.prompt_column and d.messages_column:
        problems.append(
            f"dataset.prompt_column={d.prompt_column!r} and dataset.messages_column={d.messages_column!r}: "
            "set only one (set the other to null)"
        )
    if not d.prompt_column and not d.messages_column:
        problems.append("dataset.prompt_column and dataset.messages_column are both null: set one of them")
    if d.too_long not in TOO_LONG:
        problems.append(f"dataset.too_long={d.too_long!r}: accepted values are {', '.join(TOO_LONG)}")
    for setting, column in d.settings_columns.items():
        if setting not in ROW_SETTINGS:
            problems.append(
                f"dataset.settings_columns.{setting}: not a setting rows can hold; the settings are "
                f"{', '.join(ROW_SETTINGS)}"
            )
        if not isinstance(column, str) or not column.strip():
            problems.append(f"dataset.settings_columns.{setting}={column!r}: must name an input column")
        elif column in (d.prompt_column, d.messages_column, d.id_column):
            problems.append(
                f"dataset.settings_columns.{setting}={column!r}: that column is the prompt, messages or id column"
            )
    if d.format not in FORMATS:
        problems.append(f"dataset.format={d.format!r}: accepted values are {', '.join(FORMATS)}")
    if d.format == "openai_batch" and d.adapter_column:
        problems.append(
            f"dataset.adapter_column={d.adapter_column!r} with dataset.format=openai_batch: a Batch line has no "
            "columns of its own; run each adapter's requests as a job with model.adapter=FOLDER"
        )
    if d.format == "openai_batch" and d.settings_columns:
        problems.append(
            "dataset.settings_columns with dataset.format=openai_batch: a Batch line's settings are its body's; "
            "leave dataset.settings_columns unset"
        )
    if d.limit is not None and d.limit <= 0:
        problems.append(f"dataset.limit={d.limit}: must be a positive number of rows, or null for all rows")
    return problems


def _model_problems(m: ModelConfig) -> list[str]:
    problems = []
    if not str(m.name_or_path).strip():
        problems.append("model.name_or_path='': must be a local model folder, a Hub model id or embedded:NAME")
    if m.quantization not in QUANTIZATIONS:
        problems.append(f"model.quantization={m.quantization!r}: accepted values are {', '.join(QUANTIZATIONS)}")
    if m.dtype not in DTYPES:
        problems.append(f"model.dtype={m.dtype!r}: accepted values are {', '.join(DTYPES)}")
    if m.adapter and m.adapters:
        problems.append(
            "model.adapter and model.adapters are both set: give one adapter for every row, or named adapters "
            "that rows choose from (dataset.adapter_column)"
        )
    for name, folder in m.adapters.items():
        if not str(name).strip() or not isinstance(folder, str) or not folder.strip():
            problems.append(f"model.adapters.{name}={folder!r}: each adapter needs a name and a folder")
    if m.chat_template is None or not str(m.chat_template).strip():
        problems.append("model.chat_template is empty: use auto, none, or a Jinja chat template")
    return problems


def _generation_problems(g: GenerationSettings, row_settings: bool = False) -> list[str]:
    """`row_settings`: rows may hold their own settings, num_return_sequences is then the most a row asks for."""
    problems = []
    if g.prompt_logprobs:
        problems += _scoring_problems(g, row_settings)
    elif g.max_new_tokens == 0:
        problems.append(
            "generation.max_new_tokens=0: nothing would be generated; for a scoring job (each prompt's token "
            "log-probabilities) add generation.prompt_logprobs=true, else give a positive number"
        )
    elif g.max_new_tokens < 0:
        problems.append(f"generation.max_new_tokens={g.max_new_tokens}: must be a positive integer")
    if g.temperature is not None and (not math.isfinite(g.temperature) or g.temperature < 0):
        problems.append(f"generation.temperature={g.temperature}: must be >= 0")
    if g.temperature == 0 and g.do_sample:
        problems.append(
            "generation.temperature=0 with generation.do_sample=true: use do_sample=false for greedy "
            "decoding, or a temperature > 0"
        )
    if g.top_p is not None and not (0 < g.top_p <= 1):
        problems.append(f"generation.top_p={g.top_p}: must be in (0, 1]")
    if g.top_k is not None and g.top_k < 0:
        problems.append(f"generation.top_k={g.top_k}: must be >= 0 (0 disables top-k)")
    if g.repetition_penalty is not None and g.repetition_penalty <= 0:
        problems.append(f"generation.repetition_penalty={g.repetition_penalty}: must be > 0 (1.0 = off)")
    if g.num_return_sequences < 1:
        problems.append(f"generation.num_return_sequences={g.num_return_sequences}: must be >= 1")
    if g.num_return_sequences > 1 and not g.do_sample and not row_settings:
        problems.append(
            f"generation.num_return_sequences={g.num_return_sequences} with do_sample=false: greedy decoding "
            "returns the same text every time; set generation.do_sample=true"
        )
    bad_stops = [s for s in g.stop_strings if not isinstance(s, str) or s == ""]
    if bad_stops:
        problems.append(f"generation.stop_strings={list(g.stop_strings)!r}: every stop string must be non-empty")
    if g.seed < 0:
        problems.append(f"generation.seed={g.seed}: must be >= 0")
    if g.logprobs is not None and not 0 <= g.logprobs <= MAX_LOGPROBS:
        problems.append(
            f"generation.logprobs={g.logprobs}: must be between 0 (the chosen token's only) and {MAX_LOGPROBS} "
            "(the most likely tokens per step), or null for none"
        )
    return problems


def _structured_problems(job: JobConfig) -> list[str]:
    """The constraint keys' problems; `generation.json_schema` given as a path or text is read in place."""
    from runner import constraints

    g, d = job.generation, job.dataset
    try:
        g.json_schema = constraints.read_schema(g.json_schema)
    except ConfigError as e:
        return e.problems
    problems = constraints.problems(g)
    if g.prompt_logprobs and has_structured_output(job):
        problems.append(
            "generation.prompt_logprobs=true with structured output (generation.json_schema, regex, choice or "
            "dataset.schema_column): a scoring job generates nothing to constrain; leave them unset"
        )
    if d.schema_column is not None and (not isinstance(d.schema_column, str) or not d.schema_column.strip()):
        problems.append(f"dataset.schema_column={d.schema_column!r}: must name an input column, or be null")
    elif d.schema_column and d.format == "openai_batch":
        problems.append(
            f"dataset.schema_column={d.schema_column!r} with dataset.format=openai_batch: a Batch line's schema "
            "is its body's response_format; leave dataset.schema_column unset"
        )
    elif d.schema_column in (d.prompt_column, d.messages_column, d.id_column) and d.schema_column:
        problems.append(f"dataset.schema_column={d.schema_column!r}: that column is the prompt, messages or id column")
    return problems


def _scoring_problems(g: GenerationSettings, row_settings: bool) -> list[str]:
    """What a scoring job (generation.prompt_logprobs=true) cannot have: it reads prompts, generates nothing."""
    problems = []
    if g.max_new_tokens != 0:
        problems.append(
            f"generation.prompt_logprobs=true with generation.max_new_tokens={g.max_new_tokens}: a scoring job "
            "generates nothing; set generation.max_new_tokens=0 (prompt log-probabilities of generating jobs "
            "are not offered)"
        )
    if g.num_return_sequences != 1 or g.logprobs is not None:
        problems.append(
            "generation.prompt_logprobs=true with generation.num_return_sequences or generation.logprobs: a "
            "scoring job has no samples or generated tokens; leave them unset"
        )
    if row_settings:
        problems.append(
            "generation.prompt_logprobs=true with per-row settings (dataset.settings_columns or "
            "dataset.format=openai_batch): a scoring job generates nothing, so rows have no settings to give"
        )
    return problems


def _batching_problems(b: BatchingConfig, g: GenerationSettings) -> list[str]:
    problems = []
    if b.max_batch_size is not None and b.max_batch_size < 1:
        problems.append(f"batching.max_batch_size={b.max_batch_size}: must be >= 1, or null to size it from the device")
    if b.shard_size < 1:
        problems.append(f"batching.shard_size={b.shard_size}: must be >= 1")
    if b.sort_window < 1:
        problems.append(f"batching.sort_window={b.sort_window}: must be >= 1 (rows sorted by length together)")
    if b.step_cost_tokens < 0:
        problems.append(f"batching.step_cost_tokens={b.step_cost_tokens}: must be >= 0 (0 counts padding only)")
    if b.max_batch_tokens is None:
        pass
    elif b.max_batch_tokens < 1:
        problems.append(
            f"batching.max_batch_tokens={b.max_batch_tokens}: must be >= 1, or null to derive it from free memory"
        )
    elif g.max_new_tokens > 0 and b.max_batch_tokens < g.max_new_tokens * max(g.num_return_sequences, 1):
        problems.append(
            f"batching.max_batch_tokens={b.max_batch_tokens}: smaller than one row's generation "
            f"(max_new_tokens={g.max_new_tokens} x num_return_sequences={g.num_return_sequences}); raise it"
        )
    return problems


def _cluster_problems(c: ClusterConfig) -> list[str]:
    problems = []
    if c.num_workers is not None and c.num_workers < 1:
        problems.append(f"cluster.num_workers={c.num_workers}: must be >= 1, or null for one per GPU/CPU slot")
    if c.cpus_per_worker is not None and c.cpus_per_worker < 1:
        problems.append(f"cluster.cpus_per_worker={c.cpus_per_worker}: must be >= 1, or null to fit the nodes")
    if c.device not in DEVICES:
        problems.append(f"cluster.device={c.device!r}: accepted values are {', '.join(DEVICES)}")
    if c.gpus_per_worker < 1:
        problems.append(f"cluster.gpus_per_worker={c.gpus_per_worker}: must be >= 1 (GPUs of one node per worker)")
    if c.gpus_per_worker > 1 and c.device == "cpu":
        problems.append(
            f"cluster.gpus_per_worker={c.gpus_per_worker} with cluster.device=cpu: a CPU worker holds no GPU; "
            "use cluster.device=cuda (or auto)"
        )
    for key in ("hang_timeout_s", "resources_timeout_s"):
        if not getattr(c, key) > 0:
            problems.append(f"cluster.{key}={getattr(c, key)}: must be > 0 (seconds)")
    return problems


def default_samples(g: GenerationSettings) -> int:
    """Samples of a row that asks for none of its own: num_return_sequences, or 1 when greedy (with rows of
    their own settings, num_return_sequences is then only the most a sampled row may ask for)."""
    return g.num_return_sequences if g.do_sample else 1


def has_structured_output(job: JobConfig) -> bool:
    """Whether completions may be constrained (and the output has the `structured_output` column)."""
    g = job.generation
    return any(getattr(g, k) is not None for k in ("json_schema", "regex", "choice")) or bool(job.dataset.schema_column)


def has_row_settings(job: JobConfig) -> bool:
    """Whether rows may carry generation settings of their own (and the output the settings columns)."""
    return bool(job.dataset.settings_columns) or job.dataset.format == "openai_batch"


def planned_batch_rows(b: BatchingConfig) -> int:
    """Rows per planned batch: `batching.max_batch_size`, or 128 where it is unset."""
    return b.max_batch_size or PLANNED_BATCH_ROWS


def as_dict(job: JobConfig) -> dict[str, Any]:
    """The resolved config as plain data (what manifests and Parquet metadata record)."""
    return dataclasses.asdict(job)


def result_affecting(job: JobConfig) -> dict[str, Any]:
    """The parts of the config that change what a run writes (not where, not on which cluster).

    `dataset.path` is left out: where the prompts are read from (a relative or an absolute path, a URI
    with rotated credentials) is not what they are, and the shard fingerprints hash the rows' content.
    """
    d = as_dict(job)
    kept = {k: d[k] for k in ("dataset", "model", "generation", "batching")}
    kept["dataset"] = {k: v for k, v in kept["dataset"].items() if k != "path"}
    # The model's revision as written (null, a branch, a commit) is not what it resolves to: the resolved
    # revision is recorded in every file and checked on its own (runner.store.resume).
    kept["model"] = {k: v for k, v in kept["model"].items() if k not in ("revision", "adapter", "adapters")}
    # Sharing a prompt prefix changes how prompts are read, not what is written (up to float rounding, as
    # the shape of any batch does).
    kept["batching"] = {k: v for k, v in kept["batching"].items() if k != "share_prefix"}
    # A schema's properties are written in their order: hashed as written (the blob below sorts keys).
    if kept["generation"].get("json_schema") is not None:
        kept["generation"]["json_schema"] = json.dumps(kept["generation"]["json_schema"])
    # Keys added after runs were written hash only when set, so those runs still resume.
    for section, key, default in ADDED_KEYS:
        if kept[section].get(key, default) == default:
            kept[section].pop(key, None)
    return kept


def config_hash(
    job: JobConfig,
    adapter: str | None = None,
    model_defaults: dict[str, Any] | None = None,
    adapters: dict[str, str] | None = None,
) -> str:
    """Stable hash of the result-affecting config: a rerun with the same hash may resume.

    `adapter`: what `model.adapter` holds (the hash of its weights), not where it lies or its folder's name;
    `adapters`: likewise for each of `model.adapters`, by the name rows give it.
    `model_defaults`: the model's own generation settings that the engine applies and, before this was
    hashed, ignored (runner.input.applied_model_defaults): a run written then decoded without them.
    """
    if job.model.adapter and adapter is None:
        raise ValueError("config_hash of a job with model.adapter needs the adapter's hash (runner.input.read_adapter)")
    kept = result_affecting(job)
    if job.model.adapters and adapters is None:
        raise ValueError("config_hash of a job with model.adapters needs each adapter's hash")
    if adapter is not None:
        kept["model"]["adapter_id"] = adapter
    if adapters:
        kept["model"]["adapter_ids"] = dict(sorted(adapters.items()))
    if model_defaults:
        kept["model"]["applied_defaults"] = model_defaults
    blob = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
