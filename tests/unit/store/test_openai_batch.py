"""Rows as OpenAI Batch API output lines, read back with the openai package's own types."""

from __future__ import annotations

import pyarrow as pa
from openai.types import Completion
from openai.types.chat import ChatCompletion

from runner.store import batch_lines, batch_shape

ROWS = {
    "id": ["q1", "q1", "q2", "q3", "q3"],
    "sample_index": [0, 1, 0, 0, 1],
    "completion": ["Paris.", "Paris", "Blue", None, "4"],
    "prompt_tokens": [12, 12, 9, 7, 7],
    "completion_tokens": [3, 2, 2, None, 1],
    "finish_reason": ["stop", "length", "stop", "error", "stop"],
    "error": [None, None, None, "row 'q3' failed: out of memory even alone", None],
    "model": ["embedded:SmolLM2-135M-Instruct"] * 5,
}


def test_each_row_is_one_line_with_its_samples_as_choices_and_its_token_counts():
    lines = list(batch_lines(pa.table(ROWS), "chat", "run-1", 1_700_000_000))
    assert [line["custom_id"] for line in lines] == ["q1", "q2", "q3"]
    body = ChatCompletion.model_validate(lines[0]["response"]["body"])
    assert [c.message.content for c in body.choices] == ["Paris.", "Paris"]
    assert [c.finish_reason for c in body.choices] == ["stop", "length"] and [c.index for c in body.choices] == [0, 1]
    assert (body.usage.prompt_tokens, body.usage.completion_tokens, body.usage.total_tokens) == (12, 5, 17)
    assert lines[0]["response"]["status_code"] == 200 and lines[0]["error"] is None
    # a row with a failed sample is a failed request: no response, the error's message
    assert (
        lines[2]["response"] is None and "sample(s) 0: row 'q3' failed: out of memory" in lines[2]["error"]["message"]
    )
    assert len({line["id"] for line in lines}) == 3


def test_plain_prompts_are_text_completions():
    (line, *_) = batch_lines(pa.table(ROWS), "completion", "run-1", 1_700_000_000)
    body = Completion.model_validate(line["response"]["body"])
    assert body.object == "text_completion" and [c.text for c in body.choices] == ["Paris.", "Paris"]
    assert batch_shape({"model": {"chat_template": "none"}, "dataset": {}}) == "completion"
    assert batch_shape({"model": {"chat_template": "auto"}, "dataset": {}}) == "chat"
