"""What the engine asks of the tokenizer: stop strings that are tokens, the tokens that can end a stop
string, and each token's text as it reads in a completion. Plain transformers tokenizers; no torch."""

from __future__ import annotations

from typing import Any


def stop_tokens(tokenizer: Any, stop_strings: tuple[str, ...]) -> tuple[frozenset[int], tuple[str, ...]]:
    """(ids of the stop strings that are special tokens of the tokenizer, the other stop strings).

    Only special tokens: their text is gone once special tokens are skipped. Other added tokens
    decode as text, and stay text stops (the model may also spell them out over several tokens).
    """
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = {str(token): i for i, token in decoder.items() if getattr(token, "special", False)}
    ids = frozenset(special[s] for s in stop_strings if s in special)
    return ids, tuple(s for s in stop_strings if s not in special)


def stop_enders(tokenizer: Any, stop_texts: tuple[str, ...]) -> frozenset[int] | None:
    """The tokens that can complete one of `stop_texts`, or None where any token may.

    A stop string ends with the token whose text holds its last character; only rows whose new token is
    one of these are decoded to look for a stop string. Tokens that decode alone to nothing or to a
    partial character (U+FFFD) count too. A stop string ending in whitespace makes every token one:
    tokenizers drop a token's leading space when it is decoded alone.
    """
    if not stop_texts or any(s[-1].isspace() for s in stop_texts):
        return None
    key = (id(tokenizer), len(tokenizer), stop_texts)  # every sweep point builds an engine: decode the vocabulary once
    if key not in _STOP_ENDERS:
        last = {s[-1] for s in stop_texts}
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
        found = frozenset(i for i, t in enumerate(texts) if not t or "\ufffd" in t or any(c in t for c in last))
        _STOP_ENDERS[key] = found
    return _STOP_ENDERS[key]


_STOP_ENDERS: dict[tuple[int, int, tuple[str, ...]], frozenset[int]] = {}


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's text as it reads inside a completion: decoded after an anchor token, the anchor's text
    cut off. Decoded alone, SentencePiece tokenizers (Llama-2, Mistral, Gemma) drop a token's leading space."""
    raw = {"clean_up_tokenization_spaces": False}  # the token's own characters, no " ," -> "," clean-up
    alone = tokenizer.batch_decode([[i] for i in ids], **raw)
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
    if not anchor:
        return alone
    prefix = tokenizer.decode(anchor, **raw)
    texts = tokenizer.batch_decode([anchor + [i] for i in ids], **raw)
    return [t[len(prefix) :] if t.startswith(prefix) else a for t, a in zip(texts, alone)]
