"""A run directory as an OpenAI Batch API output file: one JSON line per input row.

Each line is what the Batch API writes for a request: its `custom_id` (the row's id), and a
`response` with `status_code` 200 and a `body` shaped as a `chat.completion` (rows rendered with a
chat template) or a `text_completion` (plain prompts), every sample of the row in `choices`
(`index` = its sample_index) with its `finish_reason`, and `usage` with the row's token counts:
`prompt_tokens` once, `completion_tokens` summed over its samples. A row whose generation failed
(any sample with finish_reason=error) gets `response: null` and an `error` with the message, as the
Batch API reports a failed request. Pure: Arrow tables in, dicts out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

BATCH_SHAPES = ("auto", "chat", "completion")
COMPLETIONS_URL = "/v1/completions"
COLUMNS = ["id", "sample_index", "completion", "prompt_tokens", "completion_tokens", "finish_reason", "error", "model"]


def batch_shape(config: dict[str, Any]) -> str:
    """`request` where the run read an OpenAI Batch file (each line answered as its own url asks: the carried
    `url` column), else `chat` where it rendered its prompts with a chat template (or read chat messages),
    else `completion`."""
    dataset, model = config.get("dataset", {}), config.get("model", {})
    if dataset.get("format") == "openai_batch":
        return "request"
    if dataset.get("messages_column") or model.get("chat_template", "auto") != "none":
        return "chat"
    return "completion"


def batch_lines(table: pa.Table, shape: str, run_id: str, created: int) -> Iterator[dict[str, Any]]:
    """The output lines of the rows in `table` (a data file: each row's samples together, in order)."""
    by_url = shape == "request" and "url" in table.column_names
    rows = table.select(COLUMNS + (["url"] if by_url else [])).to_pylist()
    start = 0
    while start < len(rows):
        end = start + 1
        while end < len(rows) and rows[end]["id"] == rows[start]["id"]:
            end += 1
        own = ("completion" if rows[start]["url"] == COMPLETIONS_URL else "chat") if by_url else shape
        yield _line(rows[start:end], own, run_id, created)
        start = end


def _line(samples: list[dict[str, Any]], shape: str, run_id: str, created: int) -> dict[str, Any]:
    first = samples[0]
    custom_id = first["id"]
    digest = hashlib.sha256(f"{run_id}\0{custom_id}".encode()).hexdigest()[:24]
    line: dict[str, Any] = {"id": f"batch_req_{digest}", "custom_id": custom_id, "response": None, "error": None}
    failed = [s for s in samples if s["finish_reason"] == "error"]
    if failed:
        which = ", ".join(str(s["sample_index"]) for s in failed)
        line["error"] = {"code": "generation_failed", "message": f"sample(s) {which}: {failed[0]['error']}"}
        return line
    usage = {
        "prompt_tokens": first["prompt_tokens"],
        "completion_tokens": sum(s["completion_tokens"] for s in samples),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if shape == "chat":
        choices = [
            {
                "index": s["sample_index"],
                "message": {"role": "assistant", "content": s["completion"], "refusal": None},
                "logprobs": None,
                "finish_reason": s["finish_reason"],
            }
            for s in samples
        ]
        body = {"id": f"chatcmpl-{digest}", "object": "chat.completion"}
    else:
        choices = [
            {"index": s["sample_index"], "text": s["completion"], "logprobs": None, "finish_reason": s["finish_reason"]}
            for s in samples
        ]
        body = {"id": f"cmpl-{digest}", "object": "text_completion"}
    body.update({"created": created, "model": first["model"], "choices": choices, "usage": usage})
    line["response"] = {"status_code": 200, "request_id": digest, "body": body}
    return line
