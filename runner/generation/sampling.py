"""How the engine chooses each next token: greedy, or drawn from the sequence's own random stream.

A sampled sequence's randomness comes from (seed, row id, sample index) alone: at each step it
takes one uniform number derived from that key and the step, and picks the token where that
number falls in the cumulative distribution of its (penalized, warped) next-token
probabilities. Nothing depends on which rows share its batch, on the worker, a retry or a
resume. Temperature, top-k, top-p and min-p are transformers' own warpers (batched); the
repetition penalty is transformers' own, applied to each row's prompt and generated tokens;
the model's bans (`no_repeat_ngram_size`, `bad_words_ids`, `min_new_tokens`, `min_length`) are
`runner.generation.processors`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runner.constraints import Constraint
from runner.generation.processors import Banner, Rules

# Transformers' own defaults when sampling and the config leaves a value unset (what generate used).
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
# Generation settings this engine does not apply; a model's or job's config that sets them is refused.
UNSUPPORTED = (
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "top_h",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "sequence_bias",
    "encoder_repetition_penalty",
    "exponential_decay_length_penalty",
    "guidance_scale",
    "penalty_alpha",
    "dola_layers",
    "watermarking_config",
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
    min_p: float | None = None
    logprobs: int | None = None  # None: off; K: each chosen token's log-probability and the K most likely
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    rules: Rules = Rules()  # the model's bans: n-grams, bad words, a minimum length
    constraint: Constraint | None = None  # structured output: what every completion matches

    @classmethod
    def from_generation_config(
        cls, config: Any, seed: int, logprobs: int | None = None, constraint: Constraint | None = None
    ) -> Decoding:
        """The config's settings; its stop_strings are the job's, or else the model's own."""

        def sampled(name: str) -> Any:
            value = getattr(config, name)
            return SAMPLING_DEFAULTS[name] if value is None else value

        eos = config.eos_token_id
        eos_ids = frozenset(eos if isinstance(eos, list) else [eos]) - {None}
        stops = config.stop_strings or ()
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
            min_p=config.min_p if config.do_sample else None,
            logprobs=logprobs,
            seed=seed,
            stop_strings=(stops,) if isinstance(stops, str) else tuple(stops),
            rules=Rules.from_generation_config(config, eos_ids),
            constraint=constraint,
        )


@dataclass
class Choice:
    """A step's tokens, one per sequence, with their log-probabilities when the job asks for them."""

    tokens: list[int]
    logprobs: list[float] | None = None  # log p(token) under the model's own distribution
    top: list[list[tuple[int, float]]] | None = None  # the K most likely (token id, log p), most likely first
    picked: Any = None  # the tokens as a tensor on the logits' device


class Chooser:
    """Picks the next token of every sequence in a batch from its logits."""

    def __init__(self, decoding: Decoding):
        self.decoding = decoding
        self.warpers = _warpers(decoding)
        self.banner = Banner(decoding.rules, decoding.eos_ids) if decoding.rules.any() else None

    @property
    def penalized(self) -> bool:
        return self.decoding.repetition_penalty not in (None, 1.0)

    def choose(self, logits: Any, seqs: Sequence[Any], seen: Any = None, masks: Any = None) -> Choice:
        """The next token of each sequence of `seqs`, each with `prompt` and `tokens` (its ids so far),
        `stream` (its random stream's key), `ngrams` (its `NgramTable`, with no_repeat_ngram_size) and
        `decoding` (its row's own `Decoding`, where it has settings of its own; else the chooser's).

        `seen`: with a repetition penalty, the [sequences, vocabulary] presence of each sequence's prompt
        and generated tokens (`presence`), kept by the caller as tokens are taken.
        `masks`: the constrained sequences' token masks (`runner.generation.structured.Masks`), applied first.
        """
        import torch

        d = self.decoding
        scores = logits.float()
        if masks is not None:
            scores = masks.apply(scores)
        if self.banner is not None:
            scores = self.banner.ban(
                scores, [s.prompt for s in seqs], [s.tokens for s in seqs], [s.ngrams for s in seqs]
            )
        if self.penalized:
            scores = penalize(scores, seen, d.repetition_penalty)
        own = [getattr(s, "decoding", d) for s in seqs]
        if any(o is not d for o in own):
            return self._with_logprobs(logits, self._per_row(scores, seqs, own))
        if not d.do_sample:
            return self._with_logprobs(logits, scores.argmax(dim=-1))
        for warper in self.warpers:
            scores = warper(None, scores)
        cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
        u = torch.tensor([uniform(s.stream, len(s.tokens)) for s in seqs], dtype=cdf.dtype, device=cdf.device)
        # right=True: the first token whose cumulative probability exceeds u, never one of probability 0
        picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        return self._with_logprobs(logits, picked.clamp_(max=cdf.shape[1] - 1))

    def _per_row(self, scores: Any, seqs: Sequence[Any], own: list[Decoding]) -> Any:
        """Each sequence's token under its own settings (greedy or sampled, its temperature, top-k and
        top-p), the whole set at once: a row's pick equals the one its settings give as the job's."""
        import torch

        greedy = scores.argmax(dim=-1)
        sampled = [o.do_sample for o in own]
        if not any(sampled):
            return greedy
        scores = warp_rows(
            scores,
            [o.temperature if o.do_sample and o.temperature is not None else 1.0 for o in own],
            [o.top_k if o.do_sample and o.top_k else 0 for o in own],
            [o.top_p if o.do_sample and o.top_p is not None else 1.0 for o in own],
        )
        min_p = next((o.min_p for o in own if o.do_sample and o.min_p is not None), None)
        if min_p is not None:  # the model's own, the same for every sampled row
            from transformers.generation.logits_process import MinPLogitsWarper

            scores = MinPLogitsWarper(min_p)(None, scores)
        cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
        u = [uniform(s.stream, len(s.tokens)) if on else 0.0 for s, on in zip(seqs, sampled)]
        u = torch.tensor(u, dtype=cdf.dtype, device=cdf.device)
        picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        picked = picked.clamp_(max=cdf.shape[1] - 1)
        return torch.where(torch.tensor(sampled, device=picked.device), picked, greedy)

    def _with_logprobs(self, logits: Any, picked: Any) -> Choice:
        """The picked tokens, and their log-probabilities under the model's raw logits (one transfer each)."""
        import torch

        k = self.decoding.logprobs
        if k is None:
            return Choice(picked.tolist(), picked=picked)
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = logp.gather(1, picked.unsqueeze(1)).squeeze(1)
        if not k:
            return Choice(picked.tolist(), chosen.tolist(), picked=picked)
        values, ids = logp.topk(k, dim=-1)
        top = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        return Choice(picked.tolist(), chosen.tolist(), top, picked)


def stream_key(seed: int, row_id: str, sample: int) -> bytes:
    """The key of one sequence's random stream."""
    return hashlib.blake2b(f"{seed}\0{row_id}\0{sample}".encode(), digest_size=16).digest()


def uniform(stream: bytes, step: int) -> float:
    """The step's uniform number in [0, 1) of a sequence's random stream (24 bits: exact in float32)."""
    digest = hashlib.blake2b(step.to_bytes(4, "little"), key=stream, digest_size=3).digest()
    return int.from_bytes(digest, "little") / (1 << 24)


def warp_rows(scores: Any, temperature: list[float], top_k: list[int], top_p: list[float]) -> Any:
    """Transformers' temperature, top-k and top-p warpers in generate's order, each row with its own value
    (1.0, 0 and 1.0 leave a row as it is): equal, row by row, to those warpers given that row's values."""
    import torch

    if any(t != 1.0 for t in temperature):
        scores = scores / torch.tensor(temperature, dtype=scores.dtype, device=scores.device).unsqueeze(1)
    vocab = scores.shape[-1]
    ks = [min(k, vocab) if k > 0 else vocab for k in top_k]
    if any(k < vocab for k in ks):  # the k-th largest score of each row is its threshold
        kth = torch.topk(scores, max(ks)).values
        kth = kth.gather(1, torch.tensor(ks, device=scores.device).sub_(1).unsqueeze(1))
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if any(p < 1.0 for p in top_p):
        # 1 - p as transformers computes it (in double, compared in the scores' dtype); -1 keeps every token
        cut = torch.tensor([1 - p if p < 1.0 else -1.0 for p in top_p], dtype=scores.dtype, device=scores.device)
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= cut.unsqueeze(1)
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores


def penalize(scores: Any, seen: Any, penalty: float) -> Any:
    """Transformers' repetition penalty over each sequence's own tokens: `seen` [rows, vocab] their presence.

    A token seen once or many times is penalized once, as transformers' gather and scatter over the
    sequence's ids do; nothing here grows with the sequences' lengths.
    """
    import torch

    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen[:, : scores.shape[-1]], penalized, scores)


def presence(input_ids: Any, mask: Any, width: int) -> Any:
    """[rows, width] bool: which token ids each row of a left-padded batch holds (padding not counted)."""
    import torch

    index = input_ids.masked_fill(mask == 0, width)  # padding lands in one extra column, then dropped
    seen = torch.zeros((input_ids.shape[0], width + 1), dtype=torch.bool, device=input_ids.device)
    return seen.scatter_(1, index, True)[:, :width]


def _warpers(d: Decoding) -> list[Any]:
    """Transformers' own temperature, top-k, top-p and min-p warpers, in generate's order."""
    if not d.do_sample:
        return []
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out: list[Any] = []
    if d.temperature not in (None, 1.0):
        out.append(TemperatureLogitsWarper(d.temperature))
    if d.top_k not in (None, 0):
        out.append(TopKLogitsWarper(d.top_k))
    if d.top_p not in (None, 1.0):
        out.append(TopPLogitsWarper(d.top_p))
    if d.min_p is not None:
        out.append(MinPLogitsWarper(d.min_p))
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
