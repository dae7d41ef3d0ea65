"""The running set's cache: a join needs one layer of slack, a selection happens in place."""

from __future__ import annotations

import pytest

from runner.generation import kvcache

LAYERS = 8


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def prefilled(model, rows: int, width: int):
    import torch

    cache = kvcache.new_cache(model)
    with torch.inference_mode():
        ids = torch.randint(3, 500, (rows, width), generator=torch.Generator().manual_seed(rows))
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def live_bytes(*caches, extra=()) -> int:
    """Bytes of the distinct storages the caches' layers (and `extra` tensors) hold."""
    storages = {}
    for cache in caches:
        for layer in cache.layers:
            for t in (layer.keys, layer.values, *(layer._buffers or ())):
                if t is not None:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for t in extra:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def test_a_join_needs_the_joined_cache_plus_one_layer_of_the_old_ones(model, monkeypatch):
    import torch

    running, new = prefilled(model, 64, 300), prefilled(model, 16, 200)
    before = live_bytes(running, new)
    kept = [layer.keys.clone() for layer in running.layers[:1]], [layer.keys.clone() for layer in new.layers[:1]]
    padded, peaks = kvcache._padded_buffers, []

    def watched(layers, width, room):
        keys, values = padded(layers, width, room)
        peaks.append(live_bytes(running, new, extra=(keys, values)))
        return keys, values

    monkeypatch.setattr(kvcache, "_padded_buffers", watched)
    joined = kvcache.join([running, new], 300)
    after = live_bytes(joined)  # the joined cache: the rows, the new rows' left padding and GROW room
    # At most the joined cache plus one layer of the caches it joined (building every layer before letting
    # any go would need before + after)
    assert max(peaks) <= after + before / LAYERS
    # the rows are where a join puts them: the running set's first, the new ones right-aligned after
    assert torch.equal(joined.layers[0].keys[:64], kept[0][0])
    assert torch.equal(joined.layers[0].keys[64:, :, 100:], kept[1][0])
    assert not joined.layers[0].keys[64:, :, :100].any()  # zero padding on the left


@pytest.mark.parametrize("cut", [0, 40])
def test_a_selection_moves_rows_in_place_and_changes_nothing_when_its_scratch_does_not_fit(model, cut):
    import torch

    cache = kvcache.join([prefilled(model, 12, 100), prefilled(model, 4, 100)], 100)  # growing buffers with room
    keep = [0, 1, 3, 6, 7, 11, 15]
    expected = [layer.keys[keep][:, :, cut:].clone() for layer in cache.layers]
    storage = cache.layers[0]._buffers[0].untyped_storage().data_ptr()

    full = [layer.keys.clone() for layer in cache.layers]
    empty = torch.Tensor.new_empty

    def no_room(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected: scratch)")

    torch.Tensor.new_empty = no_room
    try:
        with pytest.raises(torch.OutOfMemoryError):
            kvcache.select(cache, keep, "cpu", cut)
    finally:
        torch.Tensor.new_empty = empty
    assert all(torch.equal(layer.keys, k) for layer, k in zip(cache.layers, full))  # as it was

    kvcache.select(cache, keep, "cpu", cut)
    assert all(torch.equal(layer.keys, k) for layer, k in zip(cache.layers, expected))
    assert cache.layers[0]._buffers[0].untyped_storage().data_ptr() == storage  # in place: the same buffer
