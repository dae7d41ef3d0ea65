"""What a worker's device decides: dtype, the device map over several GPUs, the budget over them, the running set."""

from __future__ import annotations

import pytest

from runner.generation.budget import HEADROOM, MIN_BUDGET, ModelShape, spread_token_budget, token_budget
from runner.generation.model import auto_dtype_name, decoder_layers, layer_device_map, layers_per_device
from runner.generation.worker import running_rows

LLAMA_70B = ModelShape(layers=80, kv_heads=8, head_dim=128, hidden=8192, intermediate=28672, dtype_bytes=2)


def test_auto_dtype_follows_the_device():
    assert auto_dtype_name("cpu", None) == "float32"
    assert auto_dtype_name("cuda:0", (8, 0)) == "bfloat16"  # A100
    assert auto_dtype_name("cuda:0", (9, 0)) == "bfloat16"  # H100
    assert auto_dtype_name("cuda:0", (7, 5)) == "float16"  # T4: no bfloat16
    assert auto_dtype_name("cuda:0", (7, 0)) == "float16"  # V100


def test_the_bitsandbytes_compute_dtype_follows_the_model_dtype():
    import torch

    from runner.generation.model import quantization_config

    assert quantization_config("nf4", torch.float16).bnb_4bit_compute_dtype == torch.float16
    assert quantization_config("nf4", torch.bfloat16).bnb_4bit_compute_dtype == torch.bfloat16


def _empty_llama(layers: int, tied: bool):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=tied,
    )
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("gpus", [2, 3, 4])
def test_the_device_map_spreads_the_layers_evenly_in_order(gpus):
    model = _empty_llama(layers=10, tied=False)
    placement = layer_device_map(model, gpus)
    assert decoder_layers(model) == ("model.layers", 10)
    held = layers_per_device(placement, "model.layers")
    assert sorted(held) == list(range(gpus)) and max(held.values()) - min(held.values()) <= 1
    order = [placement[f"model.layers.{i}"] for i in range(10)]
    assert order == sorted(order)  # hidden states move forward from GPU to GPU, never back and forth
    assert placement["model.embed_tokens"] == 0
    assert placement["model.norm"] == placement["lm_head"] == gpus - 1
    # every parameter of the model is placed
    for name, _ in model.named_parameters():
        assert any(name == k or name.startswith(k + ".") for k in placement), name


def test_a_head_tied_to_the_embeddings_stays_with_them():
    placement = layer_device_map(_empty_llama(layers=4, tied=True), 2)
    assert placement["lm_head"] == placement["model.embed_tokens"] == 0
    assert placement["model.norm"] == 1


def test_the_budget_over_several_gpus_is_set_by_the_tightest_one():
    kv_layer = 2 * LLAMA_70B.kv_heads * LLAMA_70B.head_dim * LLAMA_70B.dtype_bytes
    act = (4 * LLAMA_70B.hidden + 2 * LLAMA_70B.intermediate) * LLAMA_70B.dtype_bytes
    free = [30 * 2**30, 20 * 2**30]  # the first card holds less of the model
    layers = [40, 40]
    expected = min(int(f * HEADROOM) // (kv_layer * n + act) for f, n in zip(free, layers))
    assert spread_token_budget(free, layers, LLAMA_70B) == expected
    # two cards holding half the layers each fit more tokens than one card with the same free memory
    assert spread_token_budget([20 * 2**30] * 2, [40, 40], LLAMA_70B) > token_budget(20 * 2**30, LLAMA_70B)
    assert spread_token_budget([0, 0], [40, 40], LLAMA_70B) == MIN_BUDGET
    with pytest.raises(ValueError):
        spread_token_budget([1, 2, 3], [40, 40], LLAMA_70B)


def test_the_running_set_is_sized_from_the_budget_on_a_gpu_only_where_unset():
    assert running_rows(64, "cuda:0", 10**6) == 64  # set: as set
    assert running_rows(None, "cpu", 10**6) == 128
    assert running_rows(None, "cuda:0", 230_000) == 898  # an 8B model with 60 GiB free: 230k tokens / 256
    assert running_rows(None, "cuda:0", 10**7) == 1024  # the cap
    assert running_rows(None, "cuda:0", 1000) == 128  # a small card: never below the CPU default
