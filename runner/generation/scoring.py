"""Scoring jobs (`generation.max_new_tokens=0`, `generation.prompt_logprobs=true`): each prompt's own tokens'
log-probabilities under the model, nothing generated.

A prompt of n tokens gets n - 1 values: log p(token_i | tokens before it) for i = 1..n-1, from the
model's raw logits (log-softmax in float32), the same distribution `generation.logprobs` reports.
Rows are read in the shard's plan order (sorted by length within each planned batch), left-padded,
a few at a time: a forward pass holds at most `SCORE_HIDDEN` decoder states (rows x width x hidden
size), at least one row, and its output layer runs a slice of positions at a time, at most
`SCORE_LOGITS` float32 logits each. A pass that runs out of memory is split in half and tried again; a row that does not
fit alone is an error row (or fails the job, with `output.on_row_error=fail`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from runner.errors import RowFailedError, first_line
from runner.generation.sequences import Finished, Row, SequenceResult, left_pad

SCORE_LOGITS = 1 << 26  # float32 logits one slice of positions may hold: 256 MiB
SCORE_HIDDEN = 1 << 26  # decoder states (rows x width x hidden size) one forward pass may hold


def score(model: Any, rows: list[Row], pad_id: int, on_row_error: str = "write") -> Iterator[Finished]:
    """Every row's prompt log-probabilities, as `Finished` results (completion "", finish_reason `length`)."""
    hidden = getattr(model.config, "hidden_size", None) or 4096  # a pass holds its decoder's states
    groups, group, widest = [], [], 0
    for row in rows:
        wider = max(widest, len(row.input_ids))
        if group and (len(group) + 1) * wider * hidden > SCORE_HIDDEN:
            groups.append(group)
            group, wider = [], len(row.input_ids)
        group.append(row)
        widest = wider
    if group:
        groups.append(group)
    for group in groups:
        yield from _score_group(model, group, pad_id, on_row_error)


def _score_group(model: Any, group: list[Row], pad_id: int, on_row_error: str) -> Iterator[Finished]:
    import torch

    from runner.generation.engine import _free_memory, _oom_errors

    started = time.perf_counter()
    error = None
    try:
        with torch.inference_mode():
            values, width = prompt_logprobs(model, [r.input_ids for r in group], pad_id)
    except _oom_errors() as e:
        error = first_line(e, 200)
    if error is not None:
        _free_memory()
        if len(group) > 1:
            half = len(group) // 2
            yield from _score_group(model, group[:half], pad_id, on_row_error)
            yield from _score_group(model, group[half:], pad_id, on_row_error)
            return
        message = f"row {group[0].row_id!r} failed: out of memory even alone ({error})"
        if on_row_error == "fail":
            raise RowFailedError(message)
        yield Finished(group[0].key, 0, SequenceResult(None, None, "error", message), 1, 0, 0, 0.0)
        return
    latency = time.perf_counter() - started
    for row, own in zip(group, values):
        result = SequenceResult("", 0, "length", tokens=[], prompt_logprobs=own)
        yield Finished(row.key, 0, result, len(group), width, 0, latency)


def prompt_logprobs(model: Any, input_ids: list[list[int]], pad_id: int) -> tuple[list[list[float]], int]:
    """log p(token_i | tokens before it), i >= 1, of each prompt, read together left-padded; and the width read.

    The decoder runs once; its output layer then runs a slice of positions at a time, each slice's
    logits (at most `SCORE_LOGITS`, in float32) gone before the next, so a long prompt never holds
    [width, vocabulary] logits whole.
    """
    import torch

    ids, mask = left_pad(input_ids, pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    device = model.device
    hidden = model.get_decoder()(
        input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), use_cache=False
    ).last_hidden_state[:, :-1]  # position j predicts token j + 1
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-2's, applied as its forward does
    targets = ids[:, 1:].to(device)
    rows, width = hidden.shape[0], hidden.shape[1]
    step = max(1, SCORE_LOGITS // max(1, rows * head.weight.shape[0]))
    taken = []
    for start in range(0, width, step):
        logits = head(hidden[:, start : start + step]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        want = logits.gather(2, targets[:, start : start + step].unsqueeze(-1)).squeeze(-1)
        taken.append((want - torch.logsumexp(logits, dim=-1)).cpu())
        del logits
    values = torch.cat(taken, dim=1) if taken else torch.zeros((rows, 0))
    full = ids.shape[1]
    return [values[i, full - len(x) :].tolist() if len(x) > 1 else [] for i, x in enumerate(input_ids)], full
