"""Render the exact text the tokenizer sees (plain prompt or chat template), tokenize it, cut it to fit.

No torch: a tokenizer is all it needs.
"""

from __future__ import annotations

from typing import Any

from runner.errors import ConfigError, first_line, listing
from runner.input.rows import Prompts


def render(prompts: Prompts, tokenizer: Any, chat_template: str) -> tuple[list[str], bool]:
    """Build the exact text given to the tokenizer for every row.

    Returns:
        The texts, and whether the tokenizer should add its special tokens
        (False once a chat template has placed them).

    Raises:
        ConfigError: chat messages with chat_template=none, or a model without a chat template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompts.messages is not None:
        if chat_template == "none":
            raise ConfigError(
                [
                    "model.chat_template=none with dataset.messages_column: messages need a chat "
                    "template; use model.chat_template=auto or give a Jinja template"
                ]
            )
        if not has_template:
            raise ConfigError(
                [
                    "dataset.messages_column is set but the model's tokenizer has no chat template; "
                    "set model.chat_template to a Jinja template"
                ]
            )
        conversations = prompts.messages
    elif chat_template == "none" or not has_template:
        return list(prompts.prompts), True
    else:
        wrap = verbatim_user_turn(tokenizer)
        if wrap is not None:
            prefix, suffix = wrap
            return [prefix + p + suffix for p in prompts.prompts], False
        conversations = [[{"role": "user", "content": p}] for p in prompts.prompts]
    texts, refused = [], []
    for i, conversation in enumerate(conversations):
        try:
            texts.append(_apply_template(tokenizer, conversation))
        except Exception as e:  # a template's own raise_exception (jinja2), or a bad message: the row is named
            texts.append("")
            refused.append(f"{prompts.ids[i]!r} ({type(e).__name__}: {first_line(e)})")
    if refused:
        raise ConfigError(
            [
                f"the chat template refused {len(refused)} row(s), by id: {listing(refused, 3)}. Fix those rows "
                "(e.g. a template without a system role, or one that needs user and assistant turns to "
                "alternate), or give a template that accepts them with model.chat_template=..."
            ]
        )
    return texts, False


# Texts that a template which alters or inspects a message (trims it, escapes it, branches on it)
# would not return verbatim between the same two pieces.
PROBES = ("probe text", "  \n{{ probe }} {% raw %} <|im_end|>\n\t\"quoted\" 'x' \\ ß 中  ", "/probe? \n\n")


def verbatim_user_turn(tokenizer: Any) -> tuple[str, str] | None:
    """(prefix, suffix) when the chat template renders a lone user turn as prefix + text + suffix.

    Checked on probe texts of awkward content; rendering a million prompts as string
    concatenation instead of one template run each saves about a fifth of preparing them.
    None when the template does anything else with the text (then every prompt is rendered).
    """
    try:
        rendered = [_apply_template(tokenizer, [{"role": "user", "content": p}]) for p in PROBES]
    except Exception:  # a template that refuses a lone user turn: each row is rendered (and named) on its own
        return None
    at = rendered[0].find(PROBES[0])
    if at < 0:
        return None
    prefix, suffix = rendered[0][:at], rendered[0][at + len(PROBES[0]) :]
    if all(text == prefix + probe + suffix for text, probe in zip(rendered, PROBES)):
        return prefix, suffix
    return None


def user_text(prompts: Prompts, row: int) -> str:
    """The user's own text of a row: its prompt, or its last user message (what a cut may shorten)."""
    if prompts.prompts is not None:
        return prompts.prompts[row]
    users = [m["content"] for m in prompts.messages[row] if m["role"] == "user"]
    return users[-1] if users else prompts.messages[row][-1]["content"]


def cut_user_text(tokenizer: Any, text: str, user: str, add_special: bool, limit: int) -> tuple[list[int], str] | None:
    """Token ids of `text` cut to `limit` by dropping the start of the user's text inside it, and the text
    they stand for (the kept end of the user's text as its kept tokens decode, inside the rest unchanged).

    What the chat template puts around the user's text (system prompt, role headers, the
    assistant turn) is kept whole, as are the tokenizer's own special tokens. None when the
    user's text cannot be found in `text`, or what surrounds it alone does not fit.
    """
    at = text.rfind(user) if user else -1
    if at < 0 and user.strip():  # templates that trim the message
        user = user.strip()
        at = text.rfind(user)
    if at < 0:
        return None
    head = tokenize(tokenizer, [text[:at]], add_special)[0]
    tail = tokenize(tokenizer, [text[at + len(user) :]], False)[0] if at + len(user) < len(text) else []
    room = limit - len(head) - len(tail)
    if room < 1:
        return None
    middle = tokenize(tokenizer, [user], False)[0]
    kept = tokenizer.decode(middle[-room:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return head + middle[-room:] + tail, text[:at] + kept + text[at + len(user) :]


def render_and_tokenize(prompts: Prompts, tokenizer: Any, chat_template: str) -> tuple[list[str], list[list[int]]]:
    """The text given to the tokenizer and its token ids, for every row (what `render` + `tokenize` give).

    When the chat template wraps a plain prompt verbatim between a fixed prefix and suffix
    that meet the prompt at special tokens, only the prompt's own segment is tokenized per
    row: a tokenizer splits its input at special tokens first and encodes the pieces
    between them independently, so the pieces' ids can be reused. Checked on probe texts;
    any difference and every text is tokenized whole.
    """
    texts, add_special = render(prompts, tokenizer, chat_template)
    pieces = _template_pieces(tokenizer) if prompts.prompts is not None and not add_special else None
    if pieces is None:
        return texts, tokenize(tokenizer, texts, add_special)
    head, lead, tail = pieces
    middle = tokenize(tokenizer, [lead + p for p in prompts.prompts], False)
    return texts, [head + m + tail for m in middle]


def _template_pieces(tokenizer: Any) -> tuple[list[int], str, list[int]] | None:
    """(ids of the prefix up to its last special token, the rest of the prefix, ids of the suffix), or None."""
    wrap = verbatim_user_turn(tokenizer)
    added = {t.content: t for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    if wrap is None or not added:
        return None
    prefix, suffix = wrap
    ends = [(prefix.rfind(a) + len(a), a) for a in added if a in prefix]
    starts = [a for a in added if suffix.startswith(a)]
    if not ends or not starts:
        return None
    cut, before = max(ends)
    after = max(starts, key=len)
    if added[before].rstrip or added[after].lstrip:  # they would eat whitespace across the cut
        return None
    head, tail = tokenize(tokenizer, [prefix[:cut], suffix], False)
    lead = prefix[cut:]
    for probe in PROBES:
        whole = tokenize(tokenizer, [prefix + probe + suffix], False)[0]
        if whole != head + tokenize(tokenizer, [lead + probe], False)[0] + tail:
            return None
    return head, lead, tail


def _apply_template(tokenizer: Any, conversation: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def tokenize(tokenizer: Any, texts: list[str], add_special_tokens: bool, batch: int = 1024) -> list[list[int]]:
    """Token ids of every text, unpadded, in input order."""
    backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's Rust side: what __call__ runs, less copying
    ids: list[list[int]] = []
    for start in range(0, len(texts), batch):
        part = texts[start : start + batch]
        if backend is not None:
            # encode_batch_fast (tokenizers >= 0.20) skips character offsets: a quarter less time
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            ids.extend(e.ids for e in encode(part, add_special_tokens=add_special_tokens))
        else:
            enc = tokenizer(part, add_special_tokens=add_special_tokens, padding=False, truncation=False)
            ids.extend(enc["input_ids"])
    return ids
