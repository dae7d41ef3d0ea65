"""OpenAI Batch API input files (`dataset.format=openai_batch`): each line one request, read as one row.

A line is `{"custom_id", "method": "POST", "url", "body"}` with `url` `/v1/chat/completions` (the body's
`messages` are rendered with the model's chat template) or `/v1/completions` (the body's `prompt` goes
to the tokenizer as it is); both may mix in one file. `custom_id` is the row's id. The body's settings
become the row's own settings (`runner.input.settings`):

    max_completion_tokens, max_tokens -> max_new_tokens     temperature -> temperature (0: greedy)
    top_p -> top_p        n -> num_return_sequences        stop -> stop_strings        seed -> seed
    response_format {"type": "json_schema" | "json_object"} -> the row's own JSON schema (structured output)

A request without `n` asks for one sample, as the Batch API's do (`generation.num_return_sequences` is
the most any request may ask for); one without another setting takes the job's.

Accepted without effect: `model` (the job's model answers every line), `user`, `metadata`, `store`,
`stream: false`, `frequency_penalty`/`presence_penalty` of 0, `response_format` `{"type": "text"}`, and
`logprobs`/`top_logprobs` where they ask for what `generation.logprobs` gives every row. Any other key,
or a value the runner cannot honour, is refused with its file, line and key. No torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from runner.config import GenerationSettings
from runner.errors import SHOW, ConfigError

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
TOP = ("custom_id", "method", "url", "body")
SETTINGS = {  # body key -> the row setting it is
    "max_completion_tokens": "max_new_tokens",
    "max_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "n": "num_return_sequences",
    "stop": "stop_strings",
    "seed": "seed",
}
WITHOUT_EFFECT = ("model", "user", "metadata", "store")
RESPONSE_SCHEMAS = ("json_schema", "json_object")  # response_format types that constrain the row's completion


@dataclass
class BatchRows:
    """A chunk's requests: per row its id, whether it is a chat request, its prompt or messages, settings."""

    ids: list[str]
    chat: list[bool]
    prompts: list[str | None]
    messages: list[list[dict[str, str]] | None]
    settings: list[dict[str, Any]]
    urls: list[str]
    lines: list[int]  # each row's line number in its file

    def source(self, setting: str) -> str:
        """Where a setting's values come from, for messages."""
        keys = [k for k, v in SETTINGS.items() if v == setting]
        return "the Batch lines' body." + " / body.".join(keys)


def parse(chunk: Any, gen: GenerationSettings) -> BatchRows:
    """The requests of a JSONL `sources.RawChunk`.

    Raises:
        ConfigError: lines that are not Batch requests the runner can run, each with its file, line and key.
    """
    if chunk.lines is None:
        raise ConfigError(
            [f"dataset.format=openai_batch reads JSONL files (one request a line); {chunk.file} is not one"]
        )
    rows = BatchRows([], [], [], [], [], [], [])
    bad: list[str] = []
    for number, line in zip(chunk.line_numbers.tolist(), chunk.lines.split(b"\n")):
        where = f"{chunk.file}:{number}"
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            bad.append(f"{where}: not a JSON line ({e})")
            continue
        problems = _request(request, gen, rows, number)
        bad += [f"{where}: {p}" for p in problems]
    if bad:
        shown = bad[:SHOW] + ([f"... and {len(bad) - SHOW} more"] if len(bad) > SHOW else [])
        raise ConfigError(shown, title=f"OpenAI Batch requests the runner cannot run, in {chunk.file}")
    return rows


def _request(request: Any, gen: GenerationSettings, rows: BatchRows, number: int) -> list[str]:
    """Add one request to `rows`; or the problems that keep it out."""
    if not isinstance(request, dict):
        return ["each line must be a JSON object (a Batch request)"]
    problems = [f"key {k!r}: not a Batch request key (they are {', '.join(TOP)})" for k in request if k not in TOP]
    custom_id, url, body = request.get("custom_id"), request.get("url"), request.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        problems.append("custom_id: must be a non-empty string (it is the row's id)")
    if request.get("method", "POST") != "POST":
        problems.append(f"method={request.get('method')!r}: Batch requests are POST")
    if url not in (CHAT, COMPLETIONS):  # its body is another endpoint's: nothing more to say of it
        return problems + [f"url={url!r}: the runner answers {CHAT} and {COMPLETIONS}"]
    if not isinstance(body, dict):
        return problems + ["body: must be a JSON object (the request's parameters)"]
    chat = url == CHAT
    text, messages = None, None
    if chat:
        messages, found = _messages(body.get("messages"))
        problems += found
    else:
        text, found = _prompt(body.get("prompt"))
        problems += found
    settings: dict[str, Any] = {}
    for key, value in body.items():
        if key in ("messages", "prompt") and key == ("messages" if chat else "prompt"):
            continue
        if key in SETTINGS:
            name = SETTINGS[key]
            if value is not None and name in settings and settings[name] != value:
                problems.append(f"body.{key}={value!r}: another key of the body sets {name} to {settings[name]!r}")
            settings[name] = value if value is not None else settings.get(name)
            continue
        if key == "response_format" and isinstance(value, dict) and value.get("type") in RESPONSE_SCHEMAS:
            schema, problem = _response_schema(value)
            if problem:
                problems.append(problem)
            else:
                settings["json_schema"] = schema
            continue
        problem = _without_effect(key, value, body, gen, chat)
        if problem:
            problems.append(problem)
    if problems:
        return problems
    if settings.get("num_return_sequences") is None:
        settings["num_return_sequences"] = 1  # the Batch API's default, whatever the job's most is
    rows.ids.append(custom_id)
    rows.chat.append(chat)
    rows.prompts.append(text)
    rows.messages.append(messages)
    rows.settings.append(settings)
    rows.urls.append(url)
    rows.lines.append(number)
    return []


def _response_schema(value: dict[str, Any]) -> tuple[str | None, str | None]:
    """A `response_format`'s JSON schema as text (checked with the row's other settings), or what is wrong.

    `json_object` is any JSON object; `json_schema` is `{"name", "schema", "strict"}`, enforced whether
    `strict` is set or not (a constrained completion always matches its schema)."""
    if value["type"] == "json_object":
        return json.dumps({"type": "object"}), None
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        return None, (
            'body.response_format: a "json_schema" response format needs {"json_schema": {"name": ..., '
            '"schema": {...}}}'
        )
    return json.dumps(spec["schema"]), None


def _without_effect(key: str, value: Any, body: dict[str, Any], gen: GenerationSettings, chat: bool) -> str | None:
    """None where a body key may stay (it changes nothing the runner writes), else why it may not.

    Log-probabilities: a chat body asks with `logprobs: true` and `top_logprobs: K`, a completions body
    with `logprobs: K` (an integer, 0: the chosen token's only)."""
    if key in WITHOUT_EFFECT or (key == "stream" and value in (False, None)):
        return None
    if key in ("frequency_penalty", "presence_penalty") and value in (0, None):
        return None
    if key == "response_format" and value in (None, {"type": "text"}):
        return None
    if not chat and key == "logprobs":
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value == gen.logprobs:
            return None
        return (
            f"body.logprobs={value!r}: every row of a job gets the same logprobs; run this file with "
            f"generation.logprobs={value} (this job's is {gen.logprobs})"
        )
    if key in ("logprobs", "top_logprobs"):
        if not body.get("logprobs"):  # nothing asked
            if key == "logprobs" or value in (None, 0):
                return None
            return f"body.top_logprobs={value!r} without body.logprobs=true asks for nothing; remove it"
        asked = body.get("top_logprobs") or 0
        if asked == gen.logprobs:
            return None
        return (
            f"body.{key}={value!r}: every row of a job gets the same logprobs; run this file with "
            f"generation.logprobs={asked} (this job's is {gen.logprobs})"
        )
    return f"body.{key}={value!r}: the runner cannot honour this setting; remove it from the request"


def _messages(value: Any) -> tuple[list[dict[str, str]] | None, list[str]]:
    """Chat messages with text content (a content given as text parts is joined, one part a line)."""
    if not isinstance(value, list) or not value:
        return None, ["body.messages: must be a non-empty list of {role, content} messages"]
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return None, [f"body.messages[{i}]: must be an object with a role and a content"]
        content = m.get("content")
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                return None, [f"body.messages[{i}].content: only text parts can be read (no images, audio or files)"]
            content = "\n".join(texts)
        if not isinstance(content, str):
            return None, [f"body.messages[{i}].content: must be text, or a list of text parts"]
        out.append({"role": m["role"], "content": content})
    if not any(m["content"].strip() for m in out):
        return None, ["body.messages: every message is empty"]
    return out, []


def _prompt(value: Any) -> tuple[str | None, list[str]]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        return None, ["body.prompt: must be one text (a list of several prompts, or of token ids, is not read)"]
    if not value.strip():
        return None, ["body.prompt: is empty"]
    return value, []
