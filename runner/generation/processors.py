"""The model's own rules on what may come next: transformers' logits processors, for rows of any length.

A model's `generation_config.json` (or the job) may set `no_repeat_ngram_size`, `bad_words_ids`,
`min_new_tokens` or `min_length`; `generate` applies them as logits processors over a padded
batch. Here they work on the running set, whose sequences all have their own lengths, and give
each row exactly what transformers gives it alone (tests compare them):

- `no_repeat_ngram_size=n`: a token that would repeat an n-gram of the sequence (prompt and
  completion) is banned. Each sequence keeps its n-grams in a table indexed by their first n-1
  tokens, built once from its prompt and grown by one entry a step (never rescanned).
- `bad_words_ids`: single tokens are banned at every step (one mask over the vocabulary); the last
  token of a longer sequence is banned where the sequence ends with the rest of it. EOS alone is
  never a bad word (as in transformers).
- `min_new_tokens` / `min_length`: EOS is banned until the sequence has that many new tokens
  (`min_length`: prompt and completion together, the prompt without padding); where both are set,
  `min_new_tokens` wins, as in `generate`.

The bans are applied before the repetition penalty and the warpers: a banned token stays
impossible whatever they do (`-inf` scaled stays `-inf`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rules:
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    min_new_tokens: int = 0
    min_length: int = 0

    @classmethod
    def from_generation_config(cls, config: Any, eos_ids: frozenset[int]) -> Rules:
        bad = tuple(tuple(int(t) for t in word) for word in (config.bad_words_ids or ()) if word)
        return cls(
            no_repeat_ngram_size=int(config.no_repeat_ngram_size or 0),
            bad_words_ids=tuple(w for w in bad if not (len(w) == 1 and w[0] in eos_ids)),
            min_new_tokens=int(getattr(config, "min_new_tokens", None) or 0),
            min_length=int(config.min_length or 0),
        )

    def any(self) -> bool:
        return bool(self.no_repeat_ngram_size or self.bad_words_ids or self.min_new_tokens or self.min_length)


class NgramTable:
    """A sequence's n-grams by their first n-1 tokens: the tokens `no_repeat_ngram_size` bans next."""

    def __init__(self, n: int, tokens: Sequence[int] = ()):
        self.n = n
        self.next: dict[tuple[int, ...], set[int]] = {}
        self.tail: tuple[int, ...] = ()
        for token in tokens:
            self.add(token)

    def add(self, token: int) -> None:
        if len(self.tail) == self.n - 1:
            self.next.setdefault(self.tail, set()).add(token)
        self.tail = (self.tail + (token,))[-(self.n - 1) :] if self.n > 1 else ()

    def banned(self) -> set[int]:
        return self.next.get(self.tail, set()) if len(self.tail) == self.n - 1 else set()

    def copy(self) -> NgramTable:
        out = NgramTable(self.n)
        out.next = {k: set(v) for k, v in self.next.items()}
        out.tail = self.tail
        return out


class Banner:
    """Applies `Rules` to a step's scores: one mask for the fixed bans, a scatter for each row's own."""

    def __init__(self, rules: Rules, eos_ids: frozenset[int]):
        self.rules = rules
        self.eos = sorted(eos_ids)
        self.always = [w[0] for w in rules.bad_words_ids if len(w) == 1]
        self.prefixed = [w for w in rules.bad_words_ids if len(w) > 1]
        self._always_mask: Any = None

    def _min_length(self, prompt_length: int) -> int:
        """Prompt and completion tokens before EOS may come: min_new_tokens, where set, replaces min_length
        (as `generate` does: it sets min_length to the prompt's length + min_new_tokens)."""
        r = self.rules
        return prompt_length + r.min_new_tokens if r.min_new_tokens else r.min_length

    def ban(
        self, scores: Any, prompts: Sequence[Sequence[int]], tokens: Sequence[Sequence[int]], tables: Sequence[Any]
    ) -> Any:
        """`scores` [rows, vocab] with each row's banned tokens at -inf.

        Args: per row, its prompt ids, its generated ids and its `NgramTable` (None without n-gram bans).
        """
        import torch

        r = self.rules
        if self.always:
            if self._always_mask is None or self._always_mask.device != scores.device:
                mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
                mask[[t for t in self.always if t < scores.shape[-1]]] = True
                self._always_mask = mask
            scores = scores.masked_fill(self._always_mask, float("-inf"))
        rows: list[int] = []
        cols: list[int] = []
        for i, (prompt, generated) in enumerate(zip(prompts, tokens)):
            banned: set[int] = set(tables[i].banned()) if r.no_repeat_ngram_size else set()
            for word in self.prefixed:
                if _ends_with(prompt, generated, word[:-1]):
                    banned.add(word[-1])
            if len(prompt) + len(generated) < self._min_length(len(prompt)):
                banned.update(self.eos)
            rows.extend([i] * len(banned))
            cols.extend(banned)
        if rows:
            index = (torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device))
            scores = scores.index_put(index, torch.tensor(float("-inf"), device=scores.device))
        return scores


def check_vocabulary(rules: Rules, vocab: int | None) -> None:
    """Refuse bad_words_ids beyond the vocabulary (as transformers does), before a step indexes with them."""
    outside = [w for w in rules.bad_words_ids if vocab and any(not 0 <= t < vocab for t in w)]
    if outside:
        raise ValueError(
            f"bad_words_ids {[list(w) for w in outside[:3]]}: token ids outside the model's vocabulary of {vocab}; "
            "fix bad_words_ids in the model's generation_config.json"
        )


def _ends_with(prompt: Sequence[int], generated: Sequence[int], part: tuple[int, ...]) -> bool:
    """Whether prompt + generated ends with `part` (without building prompt + generated)."""
    k = len(part)
    if len(generated) >= k:
        return tuple(generated[len(generated) - k :]) == part
    need = k - len(generated)
    return len(prompt) >= need and tuple(prompt[len(prompt) - need :]) + tuple(generated) == part
