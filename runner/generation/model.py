"""Load the (quantized) model on a device, and read what the memory budget needs off it."""

from __future__ import annotations

import os
from typing import Any

from runner.config import ModelConfig
from runner.input import quiet_transformers


def pick_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def torch_dtype(name: str, device: str) -> Any:
    """`auto` is bfloat16 on a GPU and float32 on the CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
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


def load_model(path: str, model_cfg: ModelConfig, device: str) -> Any:
    """Load the causal LM on `device`, quantized as configured, in eval mode."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    dtype = torch_dtype(model_cfg.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        quantization_config=quantization_config(model_cfg.quantization, dtype),
        device_map=device,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    model.eval()
    return model


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
