"""When a sequence ends, and what it yields: EOS, a stop string, max_new_tokens; its text and logprobs.

A stop string that is one of the tokenizer's added tokens (`<|im_end|>`, `<end_of_turn>`) ends a
sequence like EOS does: its text never appears once special tokens are skipped. Other stop strings
are looked for in the decoded tail of a sequence, and only where its new token can complete one
(`runner.generation.text.stop_enders`); the completion is cut where the first one starts.

No torch: token ids in, `SequenceResult` out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.errors import first_line
from runner.generation.sampling import Decoding
from runner.generation.sequences import Running, SequenceResult
from runner.generation.text import stop_enders, stop_tokens, token_texts

STOP_TAIL_TOKENS = 4  # tokens decoded per character of the longest stop string, when checking for it


@dataclass
class Stops:
    """One set of stop strings, as `ended` checks them: the ids of those that are added tokens, the texts
    of the others, how many tokens a check decodes and the tokens that can complete one."""

    ids: frozenset[int]
    texts: tuple[str, ...]
    tail: int
    enders: Any

    @classmethod
    def of(cls, tokenizer: Any, stop_strings: tuple[str, ...]) -> Stops:
        ids, texts = stop_tokens(tokenizer, stop_strings)
        tail = STOP_TAIL_TOKENS * max((len(s) for s in texts), default=0) + 2
        return cls(frozenset(ids), tuple(texts), tail, stop_enders(tokenizer, texts))


class Ending:
    """When the engine's sequences end, each by its own row's settings (max_new_tokens, stop strings)."""

    def __init__(self, tokenizer: Any, decoding: Decoding):
        self.tokenizer = tokenizer
        self.decoding = decoding
        self._stops: dict[tuple[str, ...], Stops] = {}

    def stops(self, stop_strings: tuple[str, ...]) -> Stops:
        found = self._stops.get(stop_strings)
        if found is None:
            found = self._stops[stop_strings] = Stops.of(self.tokenizer, stop_strings)
        return found

    def ended(self, s: Running) -> SequenceResult | None:
        """The sequence's result if its last token ended it, else None."""
        d = s.decoding
        last = s.tokens[-1]
        if s.matcher is not None:  # constrained: its grammar says when it may end; stop strings do not cut it
            if s.matcher.is_error():
                raise ValueError(f"structured output: {first_line(s.matcher.get_error(), 200)}")
            if last in d.eos_ids:
                return self.result(s, s.tokens[:-1], "stop")
            if s.matcher.is_stopped():  # its grammar is complete and allows nothing more
                return self.result(s, s.tokens, "stop")
            return self.result(s, s.tokens, "length") if len(s.tokens) >= d.max_new_tokens else None
        stops = self.stops(d.stop_strings)
        if last in d.eos_ids or last in stops.ids:
            return self.result(s, s.tokens[:-1], "stop")
        if stops.texts and (stops.enders is None or last in stops.enders):
            tail = self.tokenizer.decode(s.tokens[-stops.tail :], skip_special_tokens=True)
            if any(stop in tail for stop in stops.texts):
                return self.result(s, s.tokens, "stop")
        if len(s.tokens) >= d.max_new_tokens:
            return self.result(s, s.tokens, "length")
        return None

    def result(self, s: Running, text_tokens: list[int], reason: str) -> SequenceResult:
        """Its completion: the text of `text_tokens` (cut at a stop string), every generated token counted."""
        text = self.tokenizer.decode(text_tokens, skip_special_tokens=True)
        texts = self.stops(s.decoding.stop_strings).texts if s.matcher is None else ()
        hits = [text.find(stop) for stop in texts if stop in text]
        if hits:
            text, reason = text[: min(hits)], "stop"
        result = SequenceResult(text, len(s.tokens), reason, tokens=list(s.tokens))
        if self.decoding.logprobs is not None:
            result.logprobs = list(s.logprobs)
        if self.decoding.logprobs:
            result.top_logprobs = self.named(s.top)
        return result

    def named(self, top: list[list[tuple[int, float]]]) -> list[list[tuple[int, str, float]]]:
        """Each step's most likely tokens with their text, special tokens kept (see `token_texts`)."""
        ids = sorted({i for step in top for i, _ in step})
        text = dict(zip(ids, token_texts(self.tokenizer, ids)))
        return [[(i, text[i], lp) for i, lp in step] for step in top]
