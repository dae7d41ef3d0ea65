"""A PEFT (LoRA) adapter's files, checked against the base model before a job starts.

What the driver asks of `model.adapter`: that the folder holds an adapter (`adapter_config.json` and
its weights), what it is (its name and a hash of its weights: the config hash, the manifest and the
`adapter` column carry them) and that it fits the model: every module it adapts exists in the base
model's weights with the shapes its LoRA matrices expect. An adapter trained on another base is
refused here, naming that base, before Ray or a model starts. Where the base's checkpoint names a
module otherwise, or stores its weights quantized, peft checks it as the worker loads the adapter.
Reads JSON and safetensors headers only: no torch, no peft (`runner.generation.model` applies the
adapter on the worker, which first checks that its node sees the same adapter).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

from runner.errors import ConfigError, listing

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class Adapter:
    path: str  # the folder, as the workers load it
    name: str  # the folder's name
    digest: str  # sha256 of its config and weights (first 16 hex digits)
    base_model: str | None  # the base it says it was trained on (adapter_config.json)

    @property
    def label(self) -> str:
        """What the `adapter` column and the manifest say: name@digest."""
        return f"{self.name}@{self.digest}"


def read_adapter(path: str) -> Adapter:
    """The adapter in folder `path`, or a ConfigError naming what is missing."""
    folder = Path(path).expanduser()
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ConfigError(
            [
                f"model.adapter={path!r}: no {ADAPTER_CONFIG} there; point it at a PEFT adapter folder "
                "(what `model.save_pretrained(folder)` writes for a PeftModel)"
            ]
        )
    weights = [folder / w for w in ADAPTER_WEIGHTS if (folder / w).is_file()]
    if not weights:
        raise ConfigError([f"model.adapter={path!r}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}) there"])
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError([f"model.adapter={path!r}: {ADAPTER_CONFIG} is not readable JSON ({e})"]) from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ConfigError(
            [f"model.adapter={path!r}: a {peft_type or 'unknown'} adapter; only LoRA adapters are applied"]
        )
    own = [f for f in ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja") if (folder / f).is_file()]
    if own or config.get("modules_to_save"):
        log.warning(
            "model.adapter=%s holds %s: the runner tokenizes with the base model's tokenizer and chat template; "
            "an adapter trained with added tokens or another template needs them in the base model's folder",
            path,
            ", ".join(own + [f"modules_to_save={config.get('modules_to_save')}"] * bool(config.get("modules_to_save"))),
        )
    digest = hashlib.sha256()
    for f in (folder / ADAPTER_CONFIG, weights[0]):
        digest.update(f.read_bytes())
    return Adapter(
        str(folder.resolve()), folder.resolve().name, digest.hexdigest()[:16], config.get("base_model_name_or_path")
    )


def check_fits(adapter: Adapter, model_folder: str) -> None:
    """Refuse an adapter whose LoRA matrices do not fit the base model's weights (another base model).

    Only for a local model folder with safetensors weights (a Hub model's shapes are checked by peft as
    the worker loads it).
    """
    folder = Path(model_folder)
    lora = Path(adapter.path) / ADAPTER_WEIGHTS[0]
    if not folder.is_dir() or not lora.is_file() or _quantized(folder):
        return  # a pre-quantized base stores packed weights whose shapes are not the layers' (peft checks it)
    base = _model_shapes(folder)
    if base is None:
        return
    swapped = bool(json.loads((Path(adapter.path) / ADAPTER_CONFIG).read_text()).get("fan_in_fan_out"))
    problems = []
    for key, shape in _header_shapes(lora).items():
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None or len(shape) != 2:
            continue
        module = _module_name(key[: -len(suffix)])
        weight = base.get(f"{module}.weight")
        if weight is None or len(weight) != 2:  # named otherwise in the checkpoint (tied, prefixed): peft's to check
            continue
        outputs, inputs = (weight[1], weight[0]) if swapped else (weight[0], weight[1])
        if suffix == ".lora_A.weight" and shape[1] != inputs:
            problems.append(f"{module} (takes {shape[1]} inputs, the model's {inputs})")
        elif suffix == ".lora_B.weight" and shape[0] != outputs:
            problems.append(f"{module} (gives {shape[0]} outputs, the model's {outputs})")
    if problems:
        trained_on = f"trained on {adapter.base_model!r}" if adapter.base_model else "trained on another model"
        raise ConfigError(
            [
                f"model.adapter={adapter.path!r} does not fit model {model_folder!r}: it was {trained_on}, and "
                f"its layers do not match: {listing(sorted(set(problems)), 3)}. Use the adapter's base model, "
                "or an adapter trained on this one"
            ]
        )


def _quantized(folder: Path) -> bool:
    """Whether the folder's weights are stored quantized (bitsandbytes, GPTQ, AWQ: its config says so)."""
    try:
        return "quantization_config" in json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return True  # nothing to compare against


def _module_name(key: str) -> str:
    """`base_model.model.model.layers.0.self_attn.q_proj` -> `model.layers.0.self_attn.q_proj`."""
    return key.removeprefix("base_model.model.")


def _model_shapes(folder: Path) -> dict[str, list[int]] | None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    else:
        files = [p.name for p in folder.glob("*.safetensors")]
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    for name in files:
        shapes.update(_header_shapes(folder / name))
    return shapes


def _header_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's header (the first 8 bytes give its length)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
