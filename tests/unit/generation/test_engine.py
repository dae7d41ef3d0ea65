"""The engine without Ray: continuous batching, per-row random streams, stop strings, finish reasons."""

from __future__ import annotations

import pytest

from runner.generation.engine import Engine, Limits, Row, left_pad
from runner.generation.sampling import Decoding


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from runner.config import ModelConfig
    from runner.generation import model as model_lib
    from runner.input import load_tokenizer

    config = ModelConfig(name_or_path=tiny_llama_dir, quantization="none")
    tokenizer = load_tokenizer(tiny_llama_dir, config)
    return model_lib.load_model(tiny_llama_dir, config, "cpu"), tokenizer


def engine(tiny, max_sequences=64, eos=(), **decoding) -> Engine:
    model, tokenizer = tiny
    settings = {"max_new_tokens": 8, "eos_ids": frozenset(eos), "pad_id": tokenizer.pad_token_id, **decoding}
    return Engine(model, tokenizer, Decoding(**settings), Limits(max_sequences=max_sequences, step_cost_tokens=0))


def rows_of(tokenizer, lengths: list[int]) -> list[Row]:
    words = "the history of the city and its river told in many small parts " * 20
    return [Row(i, f"row-{i}", tokenizer.encode(words)[:n]) for i, n in enumerate(lengths)]


LENGTHS = [3, 40, 7, 25, 12, 60, 5, 33]


def generated_alone(model, input_ids: list[int], max_new_tokens: int, pad_id: int, **settings) -> list[int]:
    """The reference: `model.generate` on one prompt alone, greedy (no EOS unless `settings` give one)."""
    import torch

    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([input_ids]),
            attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            **{"eos_token_id": None, **settings},
        )
    return out[0, len(input_ids) :].tolist()


def test_left_pad_puts_padding_and_zero_mask_on_the_left():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_rows_joining_and_leaving_the_running_set_decode_as_each_row_alone(tiny):
    """fp32: exact. Rows end at different steps (a frequent token ends them) and wait for slots."""
    model, tokenizer = tiny
    alone_engine = engine(tiny, max_new_tokens=12)
    probe = alone_engine.generate_all(rows_of(tokenizer, LENGTHS))
    generated = [t for f in probe for t in f.result.tokens]
    frequent = max(set(generated), key=generated.count)
    rows = rows_of(tokenizer, LENGTHS)
    alone = [engine(tiny, eos=[frequent], max_new_tokens=12).generate_all([r])[0] for r in rows]
    small = engine(tiny, max_sequences=3, eos=[frequent], max_new_tokens=12)
    forward, decoded = model.forward, []

    def counted(input_ids=None, **kwargs):
        if input_ids.shape[1] == 1:
            decoded.append(input_ids.shape[0])
        return forward(input_ids=input_ids, **kwargs)

    model.forward = counted
    try:
        together = small.generate_all(rows)
    finally:
        model.forward = forward
    # every row a decode step computed is counted: a sequence's tokens after its first, or an empty row
    assert sum(decoded) == sum(f.steps - 1 for f in together) + small.empty_row_steps
    assert [f.result.tokens for f in together] == [f.result.tokens for f in alone]
    assert [f.result.completion for f in together] == [f.result.completion for f in alone]
    assert len({f.result.completion_tokens for f in together}) > 1  # rows really ended at different steps
    assert small.joins > 0  # rows joined a running set mid-decode
    assert all(f.steps == f.result.completion_tokens for f in together)  # no step spent on an ended row


def test_finish_reasons_count_eos_and_cut_stop_strings(tiny):
    model, tokenizer = tiny
    rows = rows_of(tokenizer, [10])
    full = engine(tiny, max_new_tokens=6).generate_all(rows)[0].result
    assert (full.finish_reason, full.completion_tokens, len(full.tokens)) == ("length", 6, 6)
    eos = full.tokens[2]
    at_eos = engine(tiny, eos=[eos], max_new_tokens=6).generate_all(rows)[0].result
    first = full.tokens.index(eos)
    assert (at_eos.finish_reason, at_eos.completion_tokens) == ("stop", first + 1)  # EOS counted as generated
    assert at_eos.completion == tokenizer.decode(full.tokens[:first], skip_special_tokens=True)
    text = tokenizer.decode(full.tokens, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        cut = engine(tiny, max_new_tokens=6, stop_strings=(stop,)).generate_all(rows)[0].result
        assert cut.finish_reason == "stop" and cut.completion == text[: text.index(stop)]


class PreferTokenAt:
    """Wraps a model's forward: from its `calls`-th call on, token `token` gets the highest logit of every row."""

    def __init__(self, model, token: int, calls: int):
        self.forward, self.token, self.calls, self.seen = model.forward, token, calls, 0
        self.model = model
        model.forward = self

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        self.seen += 1
        if self.seen >= self.calls:
            out.logits[..., self.token] = out.logits.max() + 10.0
        return out

    def restore(self):
        self.model.forward = self.forward


def test_a_stop_string_that_is_a_special_token_ends_the_row(tiny):
    """`<|im_end|>` is an added token: with special tokens skipped its text never shows, so it is matched as a token."""
    model, tokenizer = tiny
    stop = "<|im_end|>"
    token = tokenizer.added_tokens_encoder[stop]
    rows = rows_of(tokenizer, [10])
    plain = engine(tiny, max_new_tokens=8).generate_all(rows)[0].result
    forced = PreferTokenAt(model, token, calls=4)  # the prefill, then decode steps: the 4th token is <|im_end|>
    try:
        ended = engine(tiny, max_new_tokens=8, stop_strings=(stop,)).generate_all(rows)[0].result
    finally:
        forced.restore()
    assert ended.tokens[:3] == plain.tokens[:3] and ended.tokens[3] == token
    assert (ended.finish_reason, ended.completion_tokens) == ("stop", 4)  # counted like EOS
    assert ended.completion == tokenizer.decode(plain.tokens[:3], skip_special_tokens=True)


@pytest.mark.parametrize("penalty", [None, 1.3], ids=["plain", "repetition_penalty"])
def test_sampled_rows_do_not_depend_on_batching_or_order(tiny, penalty):
    """Each sequence draws from its own stream of (seed, row id, sample index): batching cannot change it
    (nor the tokens each has seen, with a repetition penalty, as rows join and leave)."""
    model, tokenizer = tiny
    settings = {"do_sample": True, "samples": 2, "seed": 11, "temperature": 0.9, "top_k": 40, "top_p": 0.95}
    settings["repetition_penalty"] = penalty
    rows = rows_of(tokenizer, LENGTHS)
    wide = engine(tiny, max_sequences=64, **settings).generate_all(rows)
    narrow = engine(tiny, max_sequences=3, **settings).generate_all(rows)
    backwards = engine(tiny, max_sequences=5, **settings).generate_all(rows[::-1])
    assert [f.result.tokens for f in wide] == [f.result.tokens for f in narrow]
    assert sorted((f.key, f.sample_index, f.result.tokens) for f in backwards) == [
        (f.key, f.sample_index, f.result.tokens) for f in wide
    ]
    assert any(a.result.tokens != b.result.tokens for a, b in zip(wide[::2], wide[1::2]))  # samples differ
    other_seed = engine(tiny, **{**settings, "seed": 12}).generate_all(rows)
    assert [f.result.tokens for f in other_seed] != [f.result.tokens for f in wide]


def test_greedy_rows_equal_transformers_generate(tiny):
    """The engine's own decode loop against the reference: `model.generate` on each prompt alone."""

    model, tokenizer = tiny
    rows = rows_of(tokenizer, [4, 30, 17])
    ours = engine(tiny, max_new_tokens=16).generate_all(rows)
    for row, f in zip(rows, ours):
        assert f.result.tokens == generated_alone(model, row.input_ids, 16, tokenizer.pad_token_id)


def test_repetition_penalty_is_transformers_own_row_by_row():
    """Sequences of different lengths in one batch (their presence over the vocabulary): each row
    penalized exactly as alone."""
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from runner.generation.sampling import penalize, presence

    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seen = [[1, 2, 3, 2], [7], [4, 4, 9, 10, 11, 49]]
    ids, mask = left_pad(seen, pad_id=0)  # 0 pads, and is no row's token: it must stay unpenalized
    ours = penalize(scores, presence(ids, mask, 50), 1.7)
    for row, tokens in enumerate(seen):
        reference = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([tokens]), scores[row : row + 1].clone())
        assert torch.equal(ours[row], reference[0])
    assert not torch.equal(ours, scores)


def out_of_memory(what: str = "test"):
    import torch

    return torch.OutOfMemoryError(f"CUDA out of memory (injected: {what})")


def squeeze(monkeypatch, model, engine_, where: str) -> None:
    """Make `where` run out of memory (torch's real OutOfMemoryError) whenever it handles more than one row."""
    from runner.generation import kvcache

    if where == "forward":  # before any layer runs
        forward = model.forward

        def tight(input_ids=None, **kwargs):
            if input_ids.shape[0] > 1:
                raise out_of_memory(where)
            return forward(input_ids=input_ids, **kwargs)

        monkeypatch.setattr(model, "forward", tight)
    elif where == "half-way":  # the second of the model's two layers: the first has written its keys
        layer = model.model.layers[1]
        layer_forward = layer.forward

        def tight_layer(hidden_states, *args, **kwargs):
            if hidden_states.shape[0] > 1:
                raise out_of_memory(where)
            return layer_forward(hidden_states, *args, **kwargs)

        monkeypatch.setattr(layer, "forward", tight_layer)
    elif where == "choosing":
        choose = engine_._chooser.choose

        def tight_choice(logits, seqs, seen=None, masks=None):
            if len(seqs) > 1:
                raise out_of_memory(where)
            return choose(logits, seqs, seen, masks)

        monkeypatch.setattr(engine_._chooser, "choose", tight_choice)
    elif where == "growing":  # a layer past the first must grow its buffer (room for 2 positions at a time)
        monkeypatch.setattr(kvcache, "GROW", 2)
        update = kvcache.GrowingLayer.update

        def tight_update(self, key_states, value_states, *args, **kwargs):
            self.own()
            buffers, used = self._buffers, (self.keys.shape[-2] if self._buffers is not None else 0)
            grows = buffers is None or buffers[0].shape[-2] < used + key_states.shape[-2]
            if grows and key_states.shape[0] > 1 and self is not model_layers[0]:
                raise out_of_memory(where)
            return update(self, key_states, value_states, *args, **kwargs)

        model_layers: list = []
        new_cache = kvcache.new_cache

        def watched_cache(m):
            cache = new_cache(m)
            model_layers[:] = [cache.layers[0]]
            return cache

        monkeypatch.setattr(kvcache.GrowingLayer, "update", tight_update)
        monkeypatch.setattr(kvcache, "new_cache", watched_cache)
    elif where == "joining":
        join = kvcache.join

        def tight_join(caches, width):
            if len(caches) > 1:
                raise out_of_memory(where)
            return join(caches, width)

        monkeypatch.setattr(kvcache, "join", tight_join)
    elif where == "joining-half-way":  # the second of two layers: the first is joined, the running set is lost
        padded, calls = kvcache._padded_buffers, []

        def tight_buffers(layers, width, room):
            calls.append(1)
            if len(calls) % 2 == 0 and sum(x.keys.shape[0] for x in layers) > 2:
                raise out_of_memory(where)
            return padded(layers, width, room)

        monkeypatch.setattr(kvcache, "_padded_buffers", tight_buffers)
    elif where == "selecting":
        select = kvcache.select

        def tight_select(cache, keep, device, cut=0):
            if len(keep) > 1:
                raise out_of_memory(where)
            return select(cache, keep, device, cut)

        monkeypatch.setattr(kvcache, "select", tight_select)


@pytest.mark.parametrize(
    "penalty,where",
    [
        (None, "forward"),
        (1.3, "forward"),
        (None, "half-way"),
        (1.3, "choosing"),
        (None, "growing"),
        (None, "joining"),
        (1.3, "joining-half-way"),
        (None, "selecting"),
    ],
    ids=["forward", "forward-penalty", "half-way", "choosing", "growing", "joining", "joining-half-way", "selecting"],
)
def test_out_of_memory_anywhere_in_a_step_reruns_to_the_same_samples(tiny, monkeypatch, penalty, where):
    """Whatever runs out of memory (the forward before or half-way through the layers, choosing tokens over
    [sequences, vocabulary] scores, growing, joining or cutting the cache), rows go back to wait or stay
    put, and every sequence comes out as without the fault: its reruns draw the same tokens."""
    model, tokenizer = tiny
    settings = {"do_sample": True, "samples": 2, "seed": 5, "max_new_tokens": 6, "repetition_penalty": penalty}
    lengths = [9, 21, 14, 30, 5]
    probe = engine(tiny, **settings).generate_all(rows_of(tokenizer, lengths))
    generated = [t for f in probe for t in f.result.tokens[1:]]
    eos = [max(set(generated), key=lambda t: (generated.count(t), t))]  # ends some sequences early
    free = engine(tiny, max_sequences=4, eos=eos, **settings).generate_all(rows_of(tokenizer, lengths))
    assert len({f.result.completion_tokens for f in free}) > 1
    squeezed = engine(tiny, max_sequences=4, eos=eos, **settings)
    squeeze(monkeypatch, model, squeezed, where)
    out = squeezed.generate_all(rows_of(tokenizer, lengths))
    assert [(f.key, f.sample_index, f.result.tokens) for f in out] == [
        (f.key, f.sample_index, f.result.tokens) for f in free
    ]
    assert squeezed.oom_events > 0 and all(f.result.finish_reason != "error" for f in out)
    assert sum(f.steps for f in out) >= sum(f.result.completion_tokens for f in out)  # lost work is counted


def test_a_generated_pad_token_does_not_end_the_completion(tiny):
    """Where pad is a real token (UNK, or a model's own pad), generating it is not an end."""
    model, tokenizer = tiny
    rows = rows_of(tokenizer, [12])
    tokens = engine(tiny, max_new_tokens=6).generate_all(rows)[0].result.tokens
    padded = engine(tiny, max_new_tokens=6, pad_id=tokens[1]).generate_all(rows)[0].result
    assert padded.tokens == tokens and (padded.finish_reason, padded.completion_tokens) == ("length", 6)


def test_an_error_in_one_rows_decoding_fails_that_row_only(tiny, monkeypatch):
    from runner import faults
    from runner.errors import RowFailedError

    model, tokenizer = tiny
    rows = rows_of(tokenizer, LENGTHS)
    clean = engine(tiny, samples=2).generate_all(rows)
    monkeypatch.setenv(faults.ENV, '{"row_error": ["row-3"]}')
    faults._faults.cache_clear()
    try:
        got = engine(tiny, samples=2).generate_all(rows)
        assert [(f.key, f.sample_index) for f in got] == [(f.key, f.sample_index) for f in clean]
        failed = [f for f in got if f.result.finish_reason == "error"]
        assert {(f.key, f.sample_index) for f in failed} == {(3, 0), (3, 1)}
        assert all("row 'row-3' failed: InjectedFault" in f.result.error for f in failed)
        assert [f.result.tokens for f in got if f.key != 3] == [f.result.tokens for f in clean if f.key != 3]
        strict = engine(tiny, samples=2)
        strict.on_row_error = "fail"
        with pytest.raises(RowFailedError, match="row-3"):
            strict.generate_all(rows)
    finally:
        monkeypatch.delenv(faults.ENV)
        faults._faults.cache_clear()


def test_a_row_can_ask_for_some_of_its_samples_only(tiny):
    model, tokenizer = tiny
    rows = rows_of(tokenizer, LENGTHS[:3])
    every = engine(tiny, samples=3, do_sample=True, temperature=1.0).generate_all(rows)
    rows[1].samples = (2,)
    some = engine(tiny, samples=3, do_sample=True, temperature=1.0).generate_all(rows)
    assert [(f.key, f.sample_index) for f in some] == [(0, 0), (0, 1), (0, 2), (1, 2), (2, 0), (2, 1), (2, 2)]
    wanted = [f.result.tokens for f in every if (f.key, f.sample_index) != (1, 0) and (f.key, f.sample_index) != (1, 1)]
    assert [f.result.tokens for f in some] == wanted


@pytest.mark.parametrize(
    "rules",
    [
        {"no_repeat_ngram_size": 2},
        {"no_repeat_ngram_size": 3, "repetition_penalty": 1.3},
        {"repetition_penalty": 1.6},
        {"bad_words_ids": "frequent"},
        {"min_new_tokens": 10},
        {"min_length": 40},
        {"min_new_tokens": 6, "min_length": 70},
    ],
    ids=["ngram2", "ngram3+penalty", "penalty", "bad_words", "min_new_tokens", "min_length", "min_new_tokens_wins"],
)
def test_the_models_bans_equal_transformers_own_processors(tiny, rules):
    """Greedy fp32 rows of different lengths decoding together: each as `model.generate` gives it alone."""

    from runner.generation.processors import Rules

    model, tokenizer = tiny
    first = rows_of(tokenizer, [4, 30, 17, 9])
    start = engine(tiny, max_new_tokens=3).generate_all(first)
    # Each prompt, its own first tokens, the prompt again: plain greedy decoding repeats those n-grams.
    rows = [Row(r.key, r.row_id, r.input_ids + f.result.tokens + r.input_ids) for r, f in zip(first, start)]
    plain = engine(tiny, max_new_tokens=14).generate_all(rows)
    generated = [t for f in plain for t in f.result.tokens]
    frequent = sorted(set(generated), key=generated.count)[-3:]  # tokens the rows really produce
    eos = [frequent[-1]] if "min" in next(iter(rules)) else []
    settings = dict(rules)
    if settings.get("bad_words_ids") == "frequent":  # one token alone, and two-token words ending in frequent ones
        settings["bad_words_ids"] = [
            [frequent[0]],
            [plain[0].result.tokens[0], frequent[1]],
            [frequent[2], frequent[2]],
        ]
    penalty = settings.pop("repetition_penalty", None)
    ban = Rules(**{k: tuple(map(tuple, v)) if k == "bad_words_ids" else v for k, v in settings.items()})
    ours = engine(tiny, max_sequences=3, eos=eos, max_new_tokens=14, rules=ban, repetition_penalty=penalty)
    together = ours.generate_all(rows)
    for row, f in zip(rows, together):
        reference = generated_alone(
            model,
            row.input_ids,
            14,
            tokenizer.pad_token_id,
            eos_token_id=eos or None,
            repetition_penalty=penalty,
            **settings,
        )
        if eos and reference[-1] == eos[0]:
            reference = reference[:-1]
        assert f.result.tokens[: len(reference)] == reference[: len(f.result.tokens)]
        assert [t for t in f.result.tokens if t not in eos] == reference
    assert [f.result.tokens for f in together] != [f.result.tokens for f in plain]  # the rules changed rows


def test_min_p_keeps_only_tokens_near_the_most_likely(tiny):
    """Sampled with min_p (transformers' warper): every drawn token had at least min_p x the top probability."""
    import torch

    model, tokenizer = tiny
    rows = rows_of(tokenizer, [5, 12])
    loose = engine(tiny, do_sample=True, temperature=1.0, max_new_tokens=10).generate_all(rows)
    strict = engine(tiny, do_sample=True, temperature=1.0, min_p=0.9, max_new_tokens=10).generate_all(rows)
    for row, f in zip(rows, strict):
        ids = torch.tensor([row.input_ids + f.result.tokens])
        with torch.inference_mode():
            probs = model(input_ids=ids).logits[0, len(row.input_ids) - 1 : -1].softmax(-1)
        chosen = probs.gather(1, torch.tensor(f.result.tokens).unsqueeze(1)).squeeze(1)
        assert bool((chosen >= 0.9 * probs.max(-1).values).all())
    assert [f.result.tokens for f in strict] != [f.result.tokens for f in loose]


def test_a_models_own_settings_reach_the_engine():
    """What generation_config.json sets (and the job leaves alone) is applied, not dropped."""
    from transformers import GenerationConfig

    from runner.generation.sampling import unsupported_settings

    config = GenerationConfig(
        max_new_tokens=8,
        eos_token_id=[2, 7],
        pad_token_id=0,
        do_sample=True,
        min_p=0.05,
        no_repeat_ngram_size=3,
        bad_words_ids=[[7], [5], [4, 9]],
        min_new_tokens=2,
        stop_strings=["###"],
        typical_p=0.5,
    )
    d = Decoding.from_generation_config(config, seed=3)
    assert d.min_p == 0.05 and d.stop_strings == ("###",)
    assert d.rules.no_repeat_ngram_size == 3 and d.rules.min_new_tokens == 2
    assert d.rules.bad_words_ids == ((5,), (4, 9))  # EOS alone is never a bad word (transformers' rule)
    assert unsupported_settings(config) == ["typical_p=0.5"]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_logprobs_are_the_models_own_as_transformers_computes_them(tiny, sampled):
    """Rows decoding together: each token's log-probability equals `compute_transition_scores` over the
    model's raw logits for that row alone (greedy), or a plain forward pass over the row's tokens (sampled at
    temperature 0.5: the model's distribution, not the warped one); the top 3 per step with their text."""
    import torch

    model, tokenizer = tiny
    rows = rows_of(tokenizer, [4, 30, 17])
    settings = {"do_sample": True, "temperature": 0.5, "top_k": 20} if sampled else {}
    ours = engine(tiny, max_sequences=2, max_new_tokens=10, logprobs=3, **settings).generate_all(rows)
    for row, f in zip(rows, ours):
        ids = torch.tensor([row.input_ids + f.result.tokens])
        with torch.inference_mode():
            if sampled:
                logits = model(input_ids=ids).logits[0, len(row.input_ids) - 1 : -1]
                expected = logits.log_softmax(-1).gather(1, torch.tensor(f.result.tokens).unsqueeze(1)).squeeze(1)
            else:
                out = model.generate(
                    input_ids=ids[:, : len(row.input_ids)],
                    max_new_tokens=10,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=tokenizer.pad_token_id,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
                assert out.sequences[0].tolist() == ids[0].tolist()
                expected = model.compute_transition_scores(out.sequences, out.logits, normalize_logits=True)[0]
                logits = torch.cat(out.logits)
        assert torch.allclose(torch.tensor(f.result.logprobs), expected.float(), atol=1e-4)
        top_values, top_ids = logits.float().log_softmax(-1).topk(3)
        assert [[i for i, _, _ in step] for step in f.result.top_logprobs] == top_ids.tolist()
        assert torch.allclose(
            torch.tensor([[lp for _, _, lp in s] for s in f.result.top_logprobs]), top_values, atol=1e-4
        )
        raw = {"clean_up_tokenization_spaces": False}  # byte-level BPE: a token reads as it decodes alone
        assert all(text == tokenizer.decode([i], **raw) for step in f.result.top_logprobs for i, text, _ in step)


def test_logprobs_zero_gives_the_chosen_tokens_only(tiny):
    model, tokenizer = tiny
    (f,) = engine(tiny, max_new_tokens=5, logprobs=0).generate_all(rows_of(tokenizer, [6]))
    assert len(f.result.logprobs) == 5 and f.result.top_logprobs is None
    (off,) = engine(tiny, max_new_tokens=5).generate_all(rows_of(tokenizer, [6]))
    assert off.result.logprobs is None and off.result.tokens == f.result.tokens


def test_only_rows_whose_new_token_can_end_a_stop_string_are_decoded(tiny):
    from runner.generation.text import stop_enders

    _, tokenizer = tiny
    enders = stop_enders(tokenizer, ("###", "END"))
    texts = {i: tokenizer.decode([i], skip_special_tokens=True) for i in range(len(tokenizer))}
    assert all(i in enders for i, t in texts.items() if "#" in t or "D" in t)
    assert tokenizer.encode(" the")[0] not in enders and 0 < len(enders) < len(tokenizer) // 4
    assert stop_enders(tokenizer, ("Answer: ",)) is None and stop_enders(tokenizer, ()) is None


def test_bad_words_outside_the_vocabulary_are_refused(tiny):
    from runner.generation.processors import Rules

    model, _ = tiny
    with pytest.raises(ValueError, match=r"bad_words_ids \[\[5, 999999\]\]: token ids outside the model's vocabulary"):
        engine(tiny, rules=Rules(bad_words_ids=((5, 999999),)))


def test_after_an_out_of_memory_spike_the_running_set_grows_back(tiny, monkeypatch):
    """A decode step of 4 wide rows runs out of memory once. The cache limit halves (2 narrower rows fit
    under it), then grows back after clean steps until 4 narrower rows run together again; never to the
    size that failed."""
    import torch

    from runner.generation import limits as limits_lib

    monkeypatch.setattr(limits_lib, "GROW_BACK_STEPS", 2)
    model, tokenizer = tiny
    squeezed = engine(tiny, max_sequences=4, max_new_tokens=12)
    forward, sizes, spikes = model.forward, [], [1]

    def spike(input_ids=None, **kwargs):
        if input_ids.shape[1] == 1:
            sizes.append(input_ids.shape[0])
        if input_ids.shape == (4, 1) and spikes:  # the first decode step of 4 rows: once
            spikes.pop()
            raise torch.OutOfMemoryError("CUDA out of memory (injected spike)")
        return forward(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "forward", spike)
    out = squeezed.generate_all(rows_of(tokenizer, [30] * 4 + [20] * 12))
    assert squeezed.oom_events == 1 and all(f.result.finish_reason == "length" for f in out)
    assert squeezed.limits.cache.failed == 4 * (30 + 12)
    after = sizes[1:]
    assert after[0] < 4 and 4 in after, f"decode batch sizes after the spike: {sizes}"
    assert squeezed.limits.cache.value < squeezed.limits.cache.failed


def test_when_the_token_budget_binds_rows_are_read_in_batches_not_one_per_ended_row(tiny):
    """Slots are plenty (64) but the cache's tokens bound the running set (about 10 rows): the engine waits
    until a quarter of the tokens is free and reads several rows at once, and the rows are as without it."""
    model, tokenizer = tiny
    lengths = [5 + (i * 7) % 30 for i in range(40)]
    probe = engine(tiny, max_new_tokens=12).generate_all(rows_of(tokenizer, lengths))
    generated = [t for f in probe for t in f.result.tokens[1:]]
    eos = [max(set(generated), key=lambda t: (generated.count(t), t))]
    free = engine(tiny, eos=eos, max_new_tokens=12).generate_all(rows_of(tokenizer, lengths))
    bound = engine(tiny, eos=eos, max_new_tokens=12)
    bound.limits.max_tokens = 10 * (max(lengths) + 12)
    take, admitted = bound._take, []

    def watched(waiting):
        taken = take(waiting)
        admitted.append(len(taken))
        return taken

    bound._take = watched
    out = bound.generate_all(rows_of(tokenizer, lengths))
    assert [f.result.tokens for f in out] == [f.result.tokens for f in free]
    assert max(f.batch_size for f in out) <= 10 and bound.joins > 0
    assert len({f.result.completion_tokens for f in free}) > 3  # rows end at many different steps
    joined = admitted[1:-1]  # after the first admission (and before the last), each fills a quarter of the budget
    assert min(joined) >= 2 and len(admitted) <= len(lengths) // 2, f"rows read per admission: {admitted}"
