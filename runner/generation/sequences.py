"""What the engine keeps per row and per sequence, and what it yields; plain data, no torch at import.

A row (`Row`) is one prompt of a shard; each of its samples is a sequence (`Running`) once it
runs. Rows wait (`Waiting`) with the samples they still owe; a prefill (`Prefilled`) hands its
sequences, their cache, mask and presence tensor to the running set; every ended sequence comes
out as `Finished` with its `SequenceResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runner.generation.processors import NgramTable
from runner.generation.sampling import Choice, Decoding


@dataclass
class Row:
    key: int  # the caller's index of the row
    row_id: str  # the row's id: with the seed and the sample index, its random stream
    input_ids: list[int]
    samples: tuple[int, ...] | None = None  # the sample indices to generate (None: all of them)
    decoding: Decoding | None = None  # its own settings (dataset.settings_columns); None: the engine's


@dataclass
class SequenceResult:
    completion: str | None
    completion_tokens: int | None
    finish_reason: str  # stop, length, or error
    error: str | None = None
    tokens: list[int] | None = None  # the generated token ids up to where the sequence ended
    logprobs: list[float] | None = None  # with Decoding.logprobs: one per generated token
    top_logprobs: list[list[tuple[int, str, float]]] | None = None  # with logprobs > 0: (id, text, log p) per step
    prompt_logprobs: list[float] | None = None  # a scoring job's: log p of each prompt token after the first


@dataclass
class Finished:
    """One ended sequence and how it was run."""

    key: int
    sample_index: int
    result: SequenceResult
    batch_size: int  # sequences decoding together once it joined the running set (itself included)
    padded_length: int  # the width its prompt was read at (its prefill group's longest prompt)
    steps: int  # tokens the engine computed for it (its completion, plus any run lost to an eviction)
    latency_s: float  # from its first admission to its end


@dataclass
class Waiting:
    row: Row
    samples: list[int]  # sample indices still to generate
    steps: dict[int, int] = field(default_factory=dict)  # steps already spent on evicted runs
    admitted_at: float | None = None


@dataclass
class Running:
    row: Row
    sample: int
    decoding: Decoding  # its row's settings, or the engine's
    stream: bytes  # the key of its random stream
    length: int  # real tokens in the KV cache (prompt, then generated ones fed back)
    padded_length: int
    admitted_at: float
    steps: int = 0
    batch_size: int = 0
    tokens: list[int] = field(default_factory=list)
    ngrams: NgramTable | None = None  # its n-grams so far, with no_repeat_ngram_size
    logprobs: list[float] = field(default_factory=list)  # with Decoding.logprobs
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    matcher: Any = None  # its llguidance matcher, where its row's completions are constrained

    @property
    def prompt(self) -> list[int]:
        return self.row.input_ids

    def took(self, choice: Choice, i: int) -> None:
        """Take its token (and log-probabilities) of a step's choice; `i`: its place in the choice."""
        token = choice.tokens[i]
        self.tokens.append(token)
        self.steps += 1
        if self.ngrams is not None:
            self.ngrams.add(token)
        if self.matcher is not None:
            self.matcher.consume_token(token)  # a token it does not allow leaves it in error: the row fails
        if choice.logprobs is not None:
            self.logprobs.append(choice.logprobs[i])
        if choice.top is not None:
            self.top.append(choice.top[i])


@dataclass
class Prefilled:
    """Sequences read together: their cache, attention mask and (with a repetition penalty) tokens seen."""

    cache: Any
    mask: Any
    seqs: list[Running]
    seen: Any = None


def took_tokens(seen: Any, choice: Choice, rows: Any = None) -> Any:
    """`seen` with each sequence's newly taken token (one indexed write); `rows`: their rows, if not all."""
    if seen is not None:
        import torch

        rows = torch.arange(seen.shape[0], device=seen.device) if rows is None else rows
        seen[rows, choice.picked] = True
    return seen


def left_pad(input_ids: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """Left-padded id and attention-mask tensors for a batch of unpadded sequences."""
    import torch

    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for i, seq in enumerate(input_ids):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask
