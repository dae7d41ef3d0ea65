"""Scoring: each prompt's token log-probabilities, read in left-padded groups, equal a plain forward per row."""

from __future__ import annotations

import pytest

from runner.generation import scoring
from runner.generation.engine import Row
from tests.unit.generation.test_engine import rows_of, tiny  # noqa: F401 (tiny: the fixture)

LENGTHS = [1, 2, 9, 30, 17, 64, 5]


def alone(model, input_ids: list[int]) -> list[float]:
    """The reference: one forward pass over the prompt alone, log-softmax, each next token's value."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp.gather(1, torch.tensor(input_ids[1:]).unsqueeze(1)).squeeze(1).tolist()


@pytest.mark.parametrize("budget", [None, 3], ids=["one-pass", "groups-of-few-rows"])
def test_prompt_logprobs_equal_a_plain_forward_pass_per_row(tiny, monkeypatch, budget):  # noqa: F811
    model, tokenizer = tiny
    vocab = model.get_output_embeddings().weight.shape[0]
    if budget is not None:  # at most `budget` rows of the widest prompt per pass, 5 positions' logits a slice
        monkeypatch.setattr(scoring, "SCORE_HIDDEN", budget * max(LENGTHS) * model.config.hidden_size)
        monkeypatch.setattr(scoring, "SCORE_LOGITS", 5 * vocab)
    rows = rows_of(tokenizer, LENGTHS)
    got = {f.key: f for f in scoring.score(model, rows, tokenizer.pad_token_id)}
    assert sorted(got) == list(range(len(rows)))
    for row in rows:
        f = got[row.key]
        assert f.result.finish_reason == "length" and f.result.completion == "" and f.result.completion_tokens == 0
        want = alone(model, row.input_ids)
        assert len(f.result.prompt_logprobs) == len(row.input_ids) - 1
        assert f.result.prompt_logprobs == pytest.approx(want, abs=1e-4)
    if budget is not None:
        assert all(f.batch_size * f.padded_length <= budget * max(LENGTHS) for f in got.values())
        assert len({f.padded_length for f in got.values()}) > 1  # several passes


def test_a_pass_that_runs_out_of_memory_is_split_and_a_row_too_big_alone_is_an_error_row(tiny, monkeypatch):  # noqa: F811
    import torch

    model, tokenizer = tiny
    real = scoring.prompt_logprobs

    def squeezed(model_, input_ids, pad_id):
        if len(input_ids) > 2 or max(len(x) for x in input_ids) > 60:  # what "does not fit" means here
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model_, input_ids, pad_id)

    monkeypatch.setattr(scoring, "prompt_logprobs", squeezed)
    rows = rows_of(tokenizer, LENGTHS)
    got = {f.key: f.result for f in scoring.score(model, rows, tokenizer.pad_token_id)}
    for row in rows:
        if len(row.input_ids) > 60:
            assert got[row.key].finish_reason == "error" and "out of memory even alone" in got[row.key].error
        else:
            assert got[row.key].prompt_logprobs == pytest.approx(alone(model, row.input_ids), abs=1e-4)
    with pytest.raises(scoring.RowFailedError, match="out of memory even alone"):
        list(scoring.score(model, [Row(0, "big", rows[5].input_ids)], tokenizer.pad_token_id, "fail"))
