"""How the engine chooses each next token: greedy, or drawn from the sequence's own random stream.

A sampled sequence's randomness comes from (seed, row id, sample index) alone: at each step it
takes one uniform number derived from that key and the step, and picks the token where that
number falls in the cumulative distribution of its (penalized, warped) next-token
probabilities. Nothing depends on which rows share its batch, on the worker, a retry or a
resume. Temperature, top-k and top-p are transformers' own warpers (they work row by row);
the repetition penalty is transformers' own, applied to each row's prompt and generated tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

# Transformers' own defaults when sampling and the config leaves a value unset (what generate used).
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
# Generation settings this engine does not apply; a model's or job's config that sets them is refused.
UNSUPPORTED = (
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "no_repeat_ngram_size",
    "min_new_tokens",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "sequence_bias",
    "encoder_repetition_penalty",
    "num_beams",
)


@dataclass(frozen=True)
class Decoding:
    """How each next token is chosen and when a sequence ends."""

    max_new_tokens: int
    eos_ids: frozenset[int]
    pad_id: int
    samples: int = 1  # sequences per row (num_return_sequences)
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int = 0
    stop_strings: tuple[str, ...] = ()

    @classmethod
    def from_generation_config(cls, config: Any, seed: int, stop_strings: list[str] | None) -> Decoding:
        def sampled(name: str) -> Any:
            value = getattr(config, name)
            return SAMPLING_DEFAULTS[name] if value is None else value

        eos = config.eos_token_id
        eos_ids = frozenset(eos if isinstance(eos, list) else [eos]) - {None}
        return cls(
            max_new_tokens=config.max_new_tokens,
            eos_ids=eos_ids,
            pad_id=config.pad_token_id,
            samples=config.num_return_sequences or 1,
            do_sample=bool(config.do_sample),
            temperature=sampled("temperature") if config.do_sample else None,
            top_k=sampled("top_k") if config.do_sample else None,
            top_p=sampled("top_p") if config.do_sample else None,
            repetition_penalty=config.repetition_penalty,
            seed=seed,
            stop_strings=tuple(stop_strings or ()),
        )


class Chooser:
    """Picks the next token of every sequence in a batch from its logits."""

    def __init__(self, decoding: Decoding):
        self.decoding = decoding
        self.warpers = _warpers(decoding)

    def choose(self, logits: Any, seen: list[list[int]], streams: list[bytes], steps: list[int]) -> list[int]:
        """Args: per sequence, its prompt and generated tokens, its stream key, and its step (tokens so far)."""
        import torch

        d = self.decoding
        scores = logits.float()
        if d.repetition_penalty not in (None, 1.0):
            scores = penalize(scores, seen, d.repetition_penalty)
        if not d.do_sample:
            return scores.argmax(dim=-1).tolist()
        for warper in self.warpers:
            scores = warper(None, scores)
        cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
        u = torch.tensor([uniform(k, n) for k, n in zip(streams, steps)], dtype=cdf.dtype, device=cdf.device)
        # right=True: the first token whose cumulative probability exceeds u, never one of probability 0
        picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        return picked.clamp_(max=cdf.shape[1] - 1).tolist()


def stream_key(seed: int, row_id: str, sample: int) -> bytes:
    """The key of one sequence's random stream."""
    return hashlib.blake2b(f"{seed}\0{row_id}\0{sample}".encode(), digest_size=16).digest()


def uniform(stream: bytes, step: int) -> float:
    """The step's uniform number in [0, 1) of a sequence's random stream (24 bits: exact in float32)."""
    digest = hashlib.blake2b(step.to_bytes(4, "little"), key=stream, digest_size=3).digest()
    return int.from_bytes(digest, "little") / (1 << 24)


def penalize(scores: Any, seen: list[list[int]], penalty: float) -> Any:
    """Transformers' repetition penalty over each sequence's own tokens (rows of different lengths)."""
    import torch

    width = max(len(x) for x in seen)
    index = torch.tensor([x + [x[0]] * (width - len(x)) for x in seen], device=scores.device)  # pad with a seen token
    picked = scores.gather(1, index)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, index, picked)


def _warpers(d: Decoding) -> list[Any]:
    """Transformers' own temperature, top-k and top-p warpers, in generate's order."""
    if not d.do_sample:
        return []
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out: list[Any] = []
    if d.temperature not in (None, 1.0):
        out.append(TemperatureLogitsWarper(d.temperature))
    if d.top_k not in (None, 0):
        out.append(TopKLogitsWarper(d.top_k))
    if d.top_p not in (None, 1.0):
        out.append(TopPLogitsWarper(d.top_p))
    return out


def unsupported_settings(config: Any) -> list[str]:
    """Settings of a GenerationConfig that the engine would not apply (set to other than transformers' default)."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    found = []
    for name in UNSUPPORTED:
        value = getattr(config, name, None)
        if value is not None and value != getattr(default, name, None) and not (name == "num_beams" and value == 1):
            found.append(f"{name}={value!r}")
    return found
