"""The running set's KV cache: transformers' DynamicCache, grown in place and reshaped between steps.

transformers' `DynamicLayer.update` concatenates every step: each decode step copies the whole
cache (batch x width x layers), which on a CPU costs more than the step's attention itself
once a running set holds 64 rows of 700 positions. `GrowingLayer` writes each step's keys and
values into spare room at the end of a buffer and hands attention a view of the used part;
the buffer grows by `GROW` positions at a time, so between changes of the running set a copy
happens once per `GROW` steps (a join or a cut copies the cache once, into a buffer with room).

The engine changes the batch between steps: rows leave (`select`, which also cuts the
columns only padding uses any more), prefilled rows join (`join`, left-padded to one width). These
assign new tensors to a layer's `keys`/`values`; the layer adopts them at its next update.
Sliding-window layers (Mistral, Gemma-2/3's local layers, Phi-3) are growing layers too: they
keep every position and the model's own sliding-window mask hides what lies outside a row's
window. A row's tokens sit contiguous at the right end of the cache, so distances between cache
columns are distances between positions, whatever padding a join or a cut left; the window
therefore covers the same tokens as in a cache of that row alone. This costs full-attention memory
on those layers (the token budget counts them so). A cache where every layer slides drops the
columns no row can see any more (the engine's `_stale`). Other kinds of layers (chunked attention,
linear attention, Mamba states) are left as transformers builds them; `joinable` tells the engine so.
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicCache, DynamicLayer

GROW = 64  # positions of spare room a layer's buffer gets when it must grow


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends in place into a buffer with spare room at its end."""

    def __init__(self) -> None:
        super().__init__()
        self._buffers: tuple[Any, Any] | None = None
        self._views: tuple[Any, Any] | None = None

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        import torch

        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._views is None or self.keys is not self._views[0] or self.values is not self._views[1]:
            self._adopt()  # someone assigned keys/values (a join, a selection, a cut): they are the buffers now
        buf_k, buf_v = self._buffers if self._buffers is not None else (None, None)
        used, new = (self.keys.shape[-2] if buf_k is not None else 0), key_states.shape[-2]
        rows = key_states.shape[0]
        if buf_k is None or buf_k.shape[-2] < used + new or buf_k.shape[0] != rows:
            room = used + new + (GROW if new == 1 else 0)  # a prefill's cache is joined (copied) before it grows
            shape = (rows, key_states.shape[1], room, key_states.shape[-1])
            grown_k = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
            grown_v = torch.empty(
                (rows, value_states.shape[1], room, value_states.shape[-1]),
                dtype=value_states.dtype,
                device=value_states.device,
            )
            if used:
                grown_k[:, :, :used] = self.keys
                grown_v[:, :, :used] = self.values
            buf_k, buf_v = grown_k, grown_v
        buf_k[:, :, used : used + new] = key_states
        buf_v[:, :, used : used + new] = value_states
        self._buffers = (buf_k, buf_v)
        self.keys, self.values = buf_k[:, :, : used + new], buf_v[:, :, : used + new]
        self._views = (self.keys, self.values)
        return self.keys, self.values

    def take(self, buf_k: Any, buf_v: Any, used: int) -> None:
        """Use these buffers, of which the first `used` positions hold the cache."""
        self.dtype, self.device, self.is_initialized = buf_k.dtype, buf_k.device, True
        self._buffers = (buf_k, buf_v)
        self.keys, self.values = buf_k[:, :, :used], buf_v[:, :, :used]
        self._views = (self.keys, self.values)

    def compact(self, index: Any, moved_from: int, cut: int, scratch: tuple[Any, Any]) -> None:
        """Keep the rows `index` (ascending) without their first `cut` positions, in place in the buffers.

        Rows from `moved_from` on are gathered into `scratch` (keys, values: [moved rows, heads, used - cut,
        dim]), then written down; rows before it stay where they are (all of them move when `cut`). The
        buffers keep their size: what is cut becomes room at the end. Nothing is allocated here.
        """
        import torch

        self.own()
        buf_k, buf_v = self._buffers
        used, rows = self.keys.shape[2], index.shape[0]
        if moved_from < rows:
            for buf, into in ((buf_k, scratch[0]), (buf_v, scratch[1])):
                torch.index_select(buf[:, :, cut:used], 0, index[moved_from:], out=into)
                buf[moved_from:rows, :, : used - cut].copy_(into)
        self._buffers = (buf_k[:rows], buf_v[:rows])
        self.keys, self.values = buf_k[:rows, :, : used - cut], buf_v[:rows, :, : used - cut]
        self._views = (self.keys, self.values)

    def release(self) -> None:
        """Let go of this layer's tensors (its rows were joined into another cache)."""
        self.keys = self.values = None
        self._buffers = self._views = None

    def own(self) -> None:
        """Hold the current keys/values as its buffers if someone assigned them (a join, a repeat)."""
        if self._views is None or self.keys is not self._views[0] or self.values is not self._views[1]:
            self._adopt()

    def _adopt(self) -> None:
        if self.keys is None or self.keys.numel() == 0:
            self._buffers = None
        else:
            self._buffers = (self.keys, self.values)
        self._views = (self.keys, self.values)


class SlidingLayer(GrowingLayer):
    """A growing layer of a sliding-window attention layer: it keeps every position, the mask applies the window."""

    is_sliding = True  # the model builds this layer's mask as a sliding-window one

    def __init__(self, sliding_window: int) -> None:
        super().__init__()
        self.sliding_window = sliding_window


def new_cache(model: Any) -> Any:
    """A DynamicCache for `model`, with growing layers where all its layers are full or sliding-window attention."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    cache = DynamicCache(config=model.config)
    kinds, kwargs = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    if len(kinds) == len(cache.layers) and all(kind in _GROWING for kind in kinds):
        cache.layers = [_GROWING[kind](**kw) for kind, kw in zip(kinds, kwargs)]
    return cache


_GROWING = {"full_attention": GrowingLayer, "sliding_attention": SlidingLayer}


def joinable(cache: Any) -> bool:
    """Whether caches of this kind can be joined and cut (every layer a full or sliding-window attention one)."""
    return all(isinstance(layer, GrowingLayer) for layer in cache.layers)


def layer_kinds(cache: Any) -> str:
    """The kinds of layer a cache holds, for a log line: `GrowingLayer x 30, SlidingLayer x 2`."""
    names = [type(layer).__name__ for layer in cache.layers]
    return ", ".join(f"{n} x {names.count(n)}" for n in dict.fromkeys(names))


def window(cache: Any) -> int | None:
    """The widest sliding window when every layer is a growing one that slides (the columns a row can still
    see), else None."""
    windows = [layer.sliding_window if isinstance(layer, SlidingLayer) else None for layer in cache.layers]
    return max(windows) if windows and None not in windows else None


def repeat(cache: Any, counts: Any) -> None:
    """Row i repeated counts[i] times (a row's samples share its prompt's cache)."""
    import torch

    if not joinable(cache):  # transformers' own reordering knows every kind of layer state
        cache.reorder_cache(torch.arange(len(counts), device=counts.device).repeat_interleave(counts))
        return
    on = _per_device(counts)
    for layer in cache.layers:
        here = on(layer.keys.device)
        layer.keys = layer.keys.repeat_interleave(here, dim=0)
        layer.values = layer.values.repeat_interleave(here, dim=0)


def join(caches: list[Any], width: int) -> Any:
    """One cache of all the rows of `caches`, each left-padded to `width` positions; the first is reused.

    Layer by layer: each layer's joined buffer is built, then that layer's old buffers are let go, so
    a join needs the caches it joins plus one layer's joined buffer (and GROW positions of room per
    layer), not a second copy of everything. Running out of memory on the first layer leaves the
    caches as they were; later, half-joined: `broken(cache)` says so and the caller drops them.
    """
    import torch

    joined = caches[0]
    for k, target in enumerate(joined.layers):
        layers = [c.layers[k] for c in caches]
        try:
            keys, values = _padded_buffers(layers, width, GROW)
        except torch.OutOfMemoryError:
            joined.half_joined = k > 0
            raise
        for x in layers[1:]:
            x.release()
        target.take(keys, values, width)
    return joined


def broadcast(source: Any, into: Any, rows: int, room: int) -> Any:
    """`into` (an empty cache of the same model) holding `rows` copies of the one row of `source`,
    each with room for `room` more positions."""
    for layer, target in zip(source.layers, into.layers):
        keys, values = layer.keys, layer.values
        used = keys.shape[2]
        buf_k = keys.new_empty((rows, keys.shape[1], used + room, keys.shape[3]))
        buf_v = values.new_empty((rows, values.shape[1], used + room, values.shape[3]))
        buf_k[:, :, :used] = keys
        buf_v[:, :, :used] = values
        target.take(buf_k, buf_v, used)
    return into


def slides(cache: Any) -> bool:
    """Whether any layer of the cache has a sliding window."""
    return any(getattr(layer, "is_sliding", False) for layer in cache.layers)


def broken(cache: Any) -> bool:
    """Whether a join ran out of memory after joining some of this cache's layers (its rows are lost)."""
    return bool(getattr(cache, "half_joined", False))


def _padded_buffers(layers: list[Any], width: int, room: int) -> tuple[Any, Any]:
    """Zeroed buffers [all rows, heads, width + room, dim] with each layer's rows right-aligned at `width`.

    Padding must be finite (zeros): masked positions get no attention weight, but 0 x NaN is NaN.
    """
    first = layers[0]
    rows = sum(x.keys.shape[0] for x in layers)
    buf_k = first.keys.new_zeros((rows, first.keys.shape[1], width + room, first.keys.shape[3]))
    buf_v = first.values.new_zeros((rows, first.values.shape[1], width + room, first.values.shape[3]))
    at = 0
    for x in layers:
        n, w = x.keys.shape[0], x.keys.shape[2]
        buf_k[at : at + n, :, width - w : width] = x.keys
        buf_v[at : at + n, :, width - w : width] = x.values
        at += n
    return buf_k, buf_v


def _per_device(tensor: Any) -> Any:
    """`tensor` on a given device, copied once per device: a model spread over GPUs (cluster.gpus_per_worker)
    holds each layer's cache on that layer's GPU."""
    copies = {tensor.device: tensor}

    def on(device: Any) -> Any:
        if device not in copies:
            copies[device] = tensor.to(device)
        return copies[device]

    return on


def select(cache: Any, keep: list[int], device: Any, cut: int = 0) -> None:
    """Keep only the rows `keep` (ascending), without their first `cut` positions (padding no kept row uses).

    Growing layers are compacted in place: the rows that move (all of them with a cut) are gathered
    into scratch space of one layer's size, allocated before any layer changes, so running out of
    memory here leaves the cache as it was; then two copies per layer, whichever rows left.
    """
    import torch

    index = torch.tensor(keep, device=device)
    if not joinable(cache):
        cache.reorder_cache(index)  # some layers hold no keys (linear attention)
        return
    moved_from = 0 if cut else next((j for j, i in enumerate(keep) if i != j), len(keep))
    on = _per_device(index)
    scratch: dict[tuple, tuple[Any, Any]] = {}
    for layer in cache.layers:  # every scratch buffer (and index copy) first: nothing has changed if one does not fit
        layer.own()
        on(layer.keys.device)
        shape = (len(keep) - moved_from, layer.keys.shape[1], layer.keys.shape[2] - cut)
        key = (shape, layer.keys.shape[3], layer.values.shape[3], layer.keys.dtype, layer.keys.device)
        if key not in scratch and moved_from < len(keep):
            scratch[key] = (layer.keys.new_empty((*shape, key[1])), layer.values.new_empty((*shape, key[2])))
    for layer in cache.layers:
        shape = (len(keep) - moved_from, layer.keys.shape[1], layer.keys.shape[2] - cut)
        key = (shape, layer.keys.shape[3], layer.values.shape[3], layer.keys.dtype, layer.keys.device)
        layer.compact(on(layer.keys.device), moved_from, cut, scratch.get(key, (None, None)))


def truncate(cache: Any, width: int) -> None:
    """Give back positions past `width` (a step that failed half-way through the layers)."""
    for layer in cache.layers:
        if layer.keys is not None and layer.keys.shape[2] > width:
            layer.keys = layer.keys[:, :, :width]
            layer.values = layer.values[:, :, :width]
