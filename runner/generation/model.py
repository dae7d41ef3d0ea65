"""Load the (quantized) model on a device, and read what the memory budget needs off it."""

from __future__ import annotations

import os
from typing import Any

from runner.config import ModelConfig
from runner.input import quiet_transformers


class DeviceUnavailableError(RuntimeError):
    """A worker placed to use a GPU finds none torch can use."""


def pick_device(kind: str = "auto") -> str:
    """The worker's first device: `cuda` (Ray gave it GPUs: they must work), `cpu`, or `auto` (CUDA if any).

    Raises:
        DeviceUnavailableError: `kind` is cuda and torch sees no CUDA device.
    """
    import torch

    if kind == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda:0"
    if kind == "cuda":
        raise DeviceUnavailableError(
            f"this worker was placed on GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}) "
            f"but torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda}); install a "
            "CUDA build of torch and check the node's driver (nvidia-smi)"
        )
    return "cpu"


def import_model_code() -> None:
    """Import what loading a tokenizer and a model imports on first use (seconds): a warm worker pays it early."""
    import importlib

    import runner.generation.engine  # noqa: F401

    for name in ("transformers.modeling_utils", "transformers.tokenization_utils_tokenizers",
                 "transformers.utils.type_validators"):  # fmt: skip
        try:
            importlib.import_module(name)
        except ImportError:  # another transformers version lays its modules out otherwise: they load on use
            pass


def auto_dtype_name(device: str, capability: tuple[int, int] | None) -> str:
    """`model.dtype=auto`: bfloat16 on GPUs of compute capability 8.0 or newer, float16 on older ones
    (T4, V100 have no bfloat16), float32 on the CPU."""
    if not device.startswith("cuda"):
        return "float32"
    return "bfloat16" if capability is not None and tuple(capability) >= (8, 0) else "float16"


def torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        capability = torch.cuda.get_device_capability(device) if device.startswith("cuda") else None
        name = auto_dtype_name(device, capability)
    return getattr(torch, name)


def quantization_config(quantization: str, compute_dtype: Any) -> Any:
    """BitsAndBytesConfig for nf4/fp4/int8; None for `none`."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def load_model(path: str, model_cfg: ModelConfig, device: str, gpus: int = 1) -> Any:
    """Load the causal LM on `device` (spread over `gpus` GPUs from cuda:0), quantized as configured, in eval mode."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    dtype = torch_dtype(model_cfg.dtype, device)
    placement: Any = device
    if gpus > 1 and device.startswith("cuda"):
        placement = spread_device_map(path, model_cfg, gpus)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        quantization_config=quantization_config(model_cfg.quantization, dtype),
        device_map=placement,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if model_cfg.adapter:
        model = apply_adapter(model, model_cfg.adapter)
    model.eval()
    return model


def apply_adapter(model: Any, folder: str) -> Any:
    """The model with a PEFT LoRA adapter in its layers (4-bit ones included), not merged into the weights.

    peft puts LoRA layers in place of the adapted modules of `model` itself; the returned model is that
    model, unwrapped, so the engine, the KV cache and the memory budget see the model's own class.
    """
    from peft import PeftModel

    return PeftModel.from_pretrained(model, folder, is_trainable=False).get_base_model()


class Adapters:
    """Several named LoRA adapters in one model's layers (peft's multi-adapter model); one is active at a time.

    The engine keeps running the model itself (its layers hold every adapter's LoRA matrices); `use(name)`
    makes `name`'s the ones applied, or none for the base model alone (None).
    """

    def __init__(self, model: Any, folders: dict[str, str]):
        from peft import PeftModel

        names = list(folders)
        self.peft = PeftModel.from_pretrained(model, folders[names[0]], adapter_name=names[0], is_trainable=False)
        for name in names[1:]:
            self.peft.load_adapter(folders[name], adapter_name=name, is_trainable=False)
        self.names = names

    def use(self, name: str | None) -> Any:
        """A context in which the model applies adapter `name` (None: no adapter)."""
        import contextlib

        if name is None:
            return self.peft.disable_adapter()
        self.peft.set_adapter(name)
        return contextlib.nullcontext()


def spread_device_map(path: str, model_cfg: ModelConfig, gpus: int) -> dict[str, int]:
    """The device map that spreads the model's decoder layers evenly over `gpus` GPUs (see `layer_device_map`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    return layer_device_map(empty, gpus)


def layer_device_map(model: Any, gpus: int) -> dict[str, int]:
    """Decoder layers split evenly over GPUs 0..gpus-1 (so is their KV cache), in order; what comes before
    the layers (embeddings) on GPU 0, what comes after (final norm, lm_head) on the last, except a head tied
    to the input embeddings, which stays with them. Works on an empty (meta) model."""
    layers_name, count = decoder_layers(model)
    share = [count // gpus + (1 if i < count % gpus else 0) for i in range(gpus)]
    placement: dict[str, int] = {}
    layer = 0
    for gpu, n in enumerate(share):
        for _ in range(n):
            placement[f"{layers_name}.{layer}"] = gpu
            layer += 1
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, after in _around_layers(model, layers_name):
        head = name == "lm_head" or name.endswith(".lm_head")
        placement[name] = gpus - 1 if after and not (head and tied) else 0
    return placement


def decoder_layers(model: Any) -> tuple[str, int]:
    """The name of the ModuleList that holds the decoder layers, and how many it holds."""
    import torch

    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    best: tuple[str, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and type(module[0]).__name__ in block_classes:
            if best is None or len(module) > best[1]:
                best = (name, len(module))
    if best is None:
        raise ValueError(f"{type(model).__name__}: no list of decoder layers found to spread over GPUs")
    return best


def _around_layers(model: Any, layers_name: str) -> list[tuple[str, bool]]:
    """The other modules a device map must name: the siblings of each module on the path to the decoder
    layers, each with whether it comes after that path in the model's order (the forward's order)."""
    out: list[tuple[str, bool]] = []
    module, prefix = model, ""
    for part in layers_name.split("."):
        after = False
        for child_name, child in module.named_children():
            if child_name == part:
                after = True
            elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                out.append((prefix + child_name, after))
        module, prefix = getattr(module, part), prefix + part + "."
    return out


def layers_per_device(device_map: dict[str, Any], layers_name: str) -> dict[Any, int]:
    """How many decoder layers (and so how much of the KV cache) each device of a map holds."""
    counts: dict[Any, int] = {}
    for name, dev in device_map.items():
        if name.startswith(layers_name + ".") and name[len(layers_name) + 1 :].isdigit():
            counts[dev] = counts.get(dev, 0) + 1
    return counts


def model_shape(model: Any) -> Any:
    """The numbers the token budget needs, read off a loaded model's config and compute dtype."""
    from runner.generation.budget import ModelShape

    config = getattr(model.config, "text_config", None) or model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = getattr(model, "dtype", None)
    dtype_bytes = getattr(dtype, "itemsize", 4)
    return ModelShape(
        layers=config.num_hidden_layers,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden=config.hidden_size,
        intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        dtype_bytes=dtype_bytes,
    )


def memory_budget(model: Any, device: str, gpus: int, threads: int | None) -> tuple[int, str]:
    """The worker's token budget and how it was reached, in words: over every GPU it holds."""
    from runner.generation import budget

    shape = model_shape(model)
    if gpus == 1:
        free = free_memory_bytes(device, threads)
        return budget.token_budget(free, shape), budget.describe(free, shape)
    import torch

    layers_name, _ = decoder_layers(model)
    held = layers_per_device(getattr(model, "hf_device_map", {}), layers_name)
    free = [int(torch.cuda.mem_get_info(torch.device(f"cuda:{i}"))[0]) for i in range(gpus)]
    layers = [held.get(i, 0) for i in range(gpus)]
    tokens = budget.spread_token_budget(free, layers, shape)
    shown = ", ".join(f"cuda:{i} {f / 2**30:.1f} GiB free for {n} layers" for i, (f, n) in enumerate(zip(free, layers)))
    return tokens, f"{tokens} tokens per batch over {gpus} GPUs ({shown}; the tightest GPU sets it)"


def free_memory_bytes(device: str, threads: int | None) -> int:
    """Memory this worker may fill with batches: CUDA's free memory, or on the CPU its share of available RAM."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    cores = os.cpu_count() or 1
    share = min(1.0, (threads or cores) / cores)
    return int(psutil.virtual_memory().available * share)
