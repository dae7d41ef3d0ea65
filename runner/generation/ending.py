"""When a sequence ends, and what it yields: EOS, a stop string, max_new_tokens; its text and logprobs.

A stop string that is one of the tokenizer's added tokens (`<|im_end|>`, `<end_of_turn>`) ends a
sequence like EOS does: its text never appears once special tokens are skipped. Other stop strings
are looked for in the decoded tail of a sequence, and only where its new token can complete one
(`runner.generation.text.stop_enders`); the completion is cut where the first one starts.

No torch: token ids in, `SequenceResult` out.
"""

from __future__ import annotations

from typing import Any

from runner.generation.sampling import Decoding
from runner.generation.sequences import Running, SequenceResult
from runner.generation.text import stop_enders, stop_tokens, token_texts

STOP_TAIL_TOKENS = 4  # tokens decoded per character of the longest stop string, when checking for it


class Ending:
    def __init__(self, tokenizer: Any, decoding: Decoding):
        self.tokenizer = tokenizer
        self.decoding = decoding
        self.stop_ids, self.stop_texts = stop_tokens(tokenizer, decoding.stop_strings)
        self.tail = STOP_TAIL_TOKENS * max((len(s) for s in self.stop_texts), default=0) + 2
        self.enders = stop_enders(tokenizer, self.stop_texts)

    def ended(self, s: Running) -> SequenceResult | None:
        """The sequence's result if its last token ended it, else None."""
        d = self.decoding
        last = s.tokens[-1]
        if last in d.eos_ids or last in self.stop_ids:
            return self.result(s, s.tokens[:-1], "stop")
        if self.stop_texts and (self.enders is None or last in self.enders):
            tail = self.tokenizer.decode(s.tokens[-self.tail :], skip_special_tokens=True)
            if any(stop in tail for stop in self.stop_texts):
                return self.result(s, s.tokens, "stop")
        if len(s.tokens) >= d.max_new_tokens:
            return self.result(s, s.tokens, "length")
        return None

    def result(self, s: Running, text_tokens: list[int], reason: str) -> SequenceResult:
        """Its completion: the text of `text_tokens` (cut at a stop string), every generated token counted."""
        text = self.tokenizer.decode(text_tokens, skip_special_tokens=True)
        hits = [text.find(stop) for stop in self.stop_texts if stop in text]
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
