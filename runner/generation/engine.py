"""The generation engine: continuous batching over a Hugging Face causal LM, 4-bit included.

`Engine.generate` takes a shard's rows in plan order (sorted by length) and yields each
sequence as soon as it ends. It keeps a running set of sequences that decode together,
one token per step. A sequence leaves the set the step it ends (EOS, a stop string,
`max_new_tokens`), so no decode step is spent on a finished row; when enough slots are
free, the next waiting rows are read (prefill, in groups of similar length, each group
left-padded only to its own longest prompt) and their KV caches join the running set's,
left-padded to one width. Columns of the cache that only padding uses any more are cut.

Sampling (`runner.generation.sampling`) draws each token from a random stream of its own sequence:
a uniform number derived from (seed, row id, sample index, step) alone, so the same config
and data give the same samples whatever the batching, worker count, memory, retry or resume.

Out of memory: a prefill that does not fit puts its rows back and the engine admits
fewer; a decode step that does not fit sends the newest half of the running set back to
wait (their samples come out the same when they run again). Either way the learned token
limit (`Limits.learned`) holds for the rest of the worker's life. A sequence that does
not fit even alone ends with finish_reason `error` (or raises, with on_row_error=fail).

Plain torch and transformers: no Ray, no I/O. `runner.generation.worker` turns a shard into
rows through it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from runner import faults, plan
from runner.errors import RowFailedError, first_line
from runner.generation import kvcache
from runner.generation.processors import NgramTable, check_vocabulary
from runner.generation.sampling import Choice, Chooser, Decoding, presence, stream_key
from runner.generation.text import stop_enders, stop_tokens, token_texts

log = logging.getLogger(__name__)

REFILL_SHARE = 0.25  # read waiting rows once this share of the running set's slots is free
CUT_MIN = 64  # padding-only cache columns worth a copy of the cache to cut (fewer cost little attention)
STOP_TAIL_TOKENS = 4  # tokens decoded per character of the longest stop string, when checking for it


@dataclass
class Limits:
    """How much the running set may hold; `learned` is set after an out-of-memory error and kept."""

    max_sequences: int
    max_tokens: int | None = None  # KV-cache tokens (sequences x (widest prompt + max_new_tokens)), if bounded
    step_cost_tokens: int = 64  # padding a prefill group may add before it is cheaper to read two groups
    learned: int | None = None

    def tokens(self) -> int | None:
        known = [x for x in (self.max_tokens, self.learned) if x is not None]
        return min(known) if known else None


@dataclass
class Row:
    key: int  # the caller's index of the row
    row_id: str  # the row's id: with the seed and the sample index, its random stream
    input_ids: list[int]
    samples: tuple[int, ...] | None = None  # the sample indices to generate (None: all of them)


@dataclass
class SequenceResult:
    completion: str | None
    completion_tokens: int | None
    finish_reason: str  # stop, length, or error
    error: str | None = None
    tokens: list[int] | None = None  # the generated token ids up to where the sequence ended
    logprobs: list[float] | None = None  # with Decoding.logprobs: one per generated token
    top_logprobs: list[list[tuple[int, str, float]]] | None = None  # with logprobs > 0: (id, text, log p) per step


@dataclass
class Finished:
    """One ended sequence and how it was run."""

    key: int
    sample_index: int
    result: SequenceResult
    batch_size: int  # sequences decoding together once it joined the running set (itself included)
    padded_length: int  # the width its prompt was read at (its prefill group's longest prompt)
    steps: int  # tokens the engine computed for it (its completion, plus any run lost to an eviction)
    latency_s: float  # from its first admission to its end


@dataclass
class _Waiting:
    row: Row
    samples: list[int]  # sample indices still to generate
    steps: dict[int, int] = field(default_factory=dict)  # steps already spent on evicted runs
    admitted_at: float | None = None


@dataclass
class _Sequence:
    row: Row
    sample: int
    stream: bytes  # the key of its random stream
    length: int  # real tokens in the KV cache (prompt, then generated ones fed back)
    padded_length: int
    admitted_at: float
    steps: int = 0
    batch_size: int = 0
    tokens: list[int] = field(default_factory=list)
    ngrams: NgramTable | None = None  # its n-grams so far, with no_repeat_ngram_size
    logprobs: list[float] = field(default_factory=list)  # with Decoding.logprobs
    top: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def prompt(self) -> list[int]:
        return self.row.input_ids

    def took(self, choice: Choice, i: int) -> None:
        """Take its token (and log-probabilities) of a step's choice; `i`: its place in the choice."""
        token = choice.tokens[i]
        self.tokens.append(token)
        self.steps += 1
        if self.ngrams is not None:
            self.ngrams.add(token)
        if choice.logprobs is not None:
            self.logprobs.append(choice.logprobs[i])
        if choice.top is not None:
            self.top.append(choice.top[i])


@dataclass
class _Prefilled:
    """Sequences read together: their cache, attention mask and (with a repetition penalty) tokens seen."""

    cache: Any
    mask: Any
    seqs: list[_Sequence]
    seen: Any = None


def _took(seen: Any, choice: Choice) -> Any:
    """`seen` with each sequence's newly taken token (one indexed write)."""
    if seen is not None:
        import torch

        seen[torch.arange(seen.shape[0], device=seen.device), choice.picked] = True
    return seen


class Engine:
    """Generates rows with continuous batching; one per worker, reused across shards."""

    def __init__(self, model: Any, tokenizer: Any, decoding: Decoding, limits: Limits, on_row_error: str = "write"):
        self.model = model
        self.tokenizer = tokenizer
        self.decoding = decoding
        self.limits = limits
        self.on_row_error = on_row_error
        self.device = model.device
        self.oom_events = 0  # out-of-memory errors met (prefill and decode), over the engine's life
        self.joins = 0  # prefills whose sequences joined a running set that was decoding, over its life
        check_vocabulary(decoding.rules, getattr(getattr(model, "config", None), "vocab_size", None))
        self._chooser = Chooser(decoding)
        probe = kvcache.new_cache(model)
        self._joinable = kvcache.joinable(probe)
        self._window = kvcache.window(probe)  # every layer slides: columns older than it are cut
        if not self._joinable:
            log.warning(
                "this model's KV cache (%s) cannot be joined or cut: rows are read only into an empty running "
                "set, in one prefill group, and out of memory sends every row back to wait",
                kvcache.layer_kinds(probe),
            )
        self._failing_rows = faults.failing_rows()
        # A stop string that is one of the tokenizer's added tokens (`<|im_end|>`, `<end_of_turn>`) ends a
        # sequence like EOS does: its text never appears once special tokens are skipped.
        self._stop_ids, self._stop_texts = stop_tokens(tokenizer, decoding.stop_strings)
        self._stop_tail = STOP_TAIL_TOKENS * max((len(s) for s in self._stop_texts), default=0) + 2
        self._stop_enders = stop_enders(tokenizer, self._stop_texts)
        self._reset()

    def _reset(self) -> None:
        self.seqs: list[_Sequence] = []
        self.cache: Any = None
        self.mask: Any = None  # [sequences, cache width] attention mask of the running set
        self.seen: Any = None  # [sequences, vocabulary] tokens each holds, with a repetition penalty

    def generate(self, rows: list[Row]) -> Iterator[Finished]:
        """Yield every sequence of `rows` (samples of a row: sample_index 0..n-1) as it ends.

        Raises:
            RowFailedError: a row ran out of memory alone, or its decoding raised, and on_row_error is `fail`.
        """
        import torch

        every = tuple(range(self.decoding.samples))
        waiting = deque(_Waiting(r, list(every if r.samples is None else r.samples)) for r in rows)
        self._reset()
        with torch.inference_mode():
            while waiting or self.seqs:
                if waiting and self._may_admit():
                    yield from self._admit(waiting)
                if self.seqs:
                    yield from self._step(waiting)

    def generate_all(self, rows: list[Row]) -> list[Finished]:
        """Every sequence of `rows`, in row order, samples in order."""
        return sorted(self.generate(rows), key=lambda f: (f.key, f.sample_index))

    # -- admission -----------------------------------------------------------------------------

    def _may_admit(self) -> bool:
        """Read waiting rows into an empty running set, or (caches that join) once enough slots are free."""
        free = self.limits.max_sequences - len(self.seqs)
        return not self.seqs or (self._joinable and free >= max(1, int(self.limits.max_sequences * REFILL_SHARE)))

    def _cost(self, seqs: int, widest: int) -> int:
        return seqs * (widest + self.decoding.max_new_tokens)

    def _take(self, waiting: deque[_Waiting]) -> list[_Waiting]:
        """The next waiting rows that fit beside the running set (at least one row when it is empty)."""
        taken: list[_Waiting] = []
        seqs = len(self.seqs)
        widest = max((len(s.row.input_ids) for s in self.seqs), default=0)
        limit = self.limits.tokens()
        while waiting:
            nxt = waiting[0]
            more, wider = seqs + len(nxt.samples), max(widest, len(nxt.row.input_ids))
            fits = more <= self.limits.max_sequences and (limit is None or self._cost(more, wider) <= limit)
            if not fits and (taken or self.seqs):
                break
            taken.append(waiting.popleft())
            seqs, widest = more, wider
            if not fits:
                break
        return taken

    def _admit(self, waiting: deque[_Waiting]) -> Iterator[Finished]:
        taken = self._take(waiting)
        if not taken:
            return
        now = time.perf_counter()
        for w in taken:
            w.admitted_at = w.admitted_at or now
        groups = plan.prefill_groups([len(w.row.input_ids) for w in taken], self.limits.step_cost_tokens)
        if not self._joinable:
            groups = [list(range(len(taken)))]
        error = None
        try:
            self._join([self._prefill([taken[i] for i in g]) for g in groups])  # join builds before it assigns
        except _oom_errors() as e:
            error = first_line(e, 200)  # not the exception: its traceback holds the failed step's tensors
        if error is None:
            yield from self._retire()
            return
        _free_memory()
        self.oom_events += 1
        cost = self._cost(len(self.seqs) + sum(len(w.samples) for w in taken), self._widest(taken))
        self.limits.learned = max(1, min(self.limits.learned or cost, cost // 2))
        alone = taken[0]
        if len(taken) > 1 or self.seqs:
            waiting.extendleft(reversed(taken))  # fewer fit now: the next admission takes fewer
        elif len(alone.samples) > 1:  # one row's samples apart: half of them at a time
            half = len(alone.samples) // 2
            waiting.appendleft(_Waiting(alone.row, alone.samples[half:], alone.steps, alone.admitted_at))
            waiting.appendleft(_Waiting(alone.row, alone.samples[:half], alone.steps, alone.admitted_at))
        else:
            yield from self._fail(alone, error)

    def _widest(self, taken: list[_Waiting]) -> int:
        return max([len(w.row.input_ids) for w in taken] + [len(s.row.input_ids) for s in self.seqs])

    def _prefill(self, group: list[_Waiting]) -> _Prefilled:
        """Read a group's prompts; its cache, mask and sequences, each with its first token chosen."""
        import torch

        ids, mask = left_pad([w.row.input_ids for w in group], self.decoding.pad_id)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        cache = kvcache.new_cache(self.model)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        width = int(ids.shape[1])
        counts = [len(w.samples) for w in group]
        repeat = torch.tensor(counts, device=self.device)
        logits = out.logits[:, -1].repeat_interleave(repeat, dim=0)
        if any(c != 1 for c in counts):
            kvcache.repeat(cache, repeat)
        mask = mask.to(self.device)
        seen = None
        if self._chooser.penalized:  # the prompt's tokens; each generated one is added as it is taken
            seen = presence(ids.to(self.device), mask, out.logits.shape[-1]).repeat_interleave(repeat, dim=0)
        mask = mask.repeat_interleave(repeat, dim=0)
        n = self.decoding.rules.no_repeat_ngram_size
        seqs = []
        for w in group:
            table = NgramTable(n, w.row.input_ids) if n else None
            for k in w.samples:
                seqs.append(
                    _Sequence(
                        row=w.row,
                        sample=k,
                        stream=stream_key(self.decoding.seed, w.row.row_id, k),
                        length=len(w.row.input_ids),
                        padded_length=width,
                        admitted_at=w.admitted_at,
                        steps=w.steps.get(k, 0),
                        ngrams=table.copy() if table is not None and len(w.samples) > 1 else table,
                    )
                )
        choice = self._chooser.choose(logits, seqs, seen)
        for i, s in enumerate(seqs):
            s.took(choice, i)
        return _Prefilled(cache, mask, seqs, _took(seen, choice))

    def _join(self, parts: list[_Prefilled]) -> None:
        """Append prefilled groups to the running set: every cache left-padded to the widest."""
        import torch
        from torch.nn.functional import pad

        self.joins += bool(self.seqs)
        pieces = ([_Prefilled(self.cache, self.mask, self.seqs, self.seen)] if self.seqs else []) + parts
        width = max(p.mask.shape[1] for p in pieces)
        if len(pieces) == 1:
            self.cache, self.mask, self.seen = parts[0].cache, parts[0].mask, parts[0].seen
        else:  # everything built before anything is assigned: running out of memory leaves the set as it was
            mask = torch.cat([pad(p.mask, (width - p.mask.shape[1], 0)) for p in pieces])
            seen = torch.cat([p.seen for p in pieces]) if self._chooser.penalized else None
            self.cache = kvcache.join([p.cache for p in pieces], width)
            self.mask, self.seen = mask, seen
        for p in parts:
            self.seqs.extend(p.seqs)
        for s in (s for p in parts for s in p.seqs):
            s.batch_size = len(self.seqs)

    # -- decoding ------------------------------------------------------------------------------

    def _step(self, waiting: deque[_Waiting]) -> Iterator[Finished]:
        """One decode step of the whole running set, then the ended sequences leave it."""
        import torch

        tokens = torch.tensor([[s.tokens[-1]] for s in self.seqs], device=self.device)
        positions = torch.tensor([[s.length] for s in self.seqs], device=self.device)
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.seqs), 1))], dim=1)
        error = None
        try:  # the forward and the choice ([sequences, vocabulary] scores): running out in either is the same
            out = self.model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            )
            choice = self._chooser.choose(out.logits[:, -1], self.seqs, self.seen)
        except _oom_errors() as e:
            error = first_line(e, 200)  # not the exception: its traceback holds the failed step's tensors
        if error is not None:
            out = None
            _free_memory()
            self.oom_events += 1
            self._undo_step()
            yield from self._evict(waiting, error)
            return
        del out
        self.mask = mask
        self.seen = _took(self.seen, choice)
        for i, s in enumerate(self.seqs):
            s.length += 1
            s.took(choice, i)
        yield from self._retire()
        if self.seqs and self._stale() >= CUT_MIN:  # a sliding window left columns behind: cut them
            self._select(list(range(len(self.seqs))))

    def _undo_step(self) -> None:
        """Layers that took the failed step's column before memory ran out give it back."""
        if self._joinable:
            kvcache.truncate(self.cache, self.mask.shape[1])

    def _retire(self) -> Iterator[Finished]:
        """Ended sequences leave the running set (and their cache rows); padding-only columns are cut."""

        ended, kept = [], []
        for i, s in enumerate(self.seqs):
            try:
                result = self._ended(s)
            except Exception as e:  # confined to this row (decoding its text, a stop string): the row fails
                result = self._row_error(s, f"{type(e).__name__}: {first_line(e, 200)}")
            if result is None:
                kept.append(i)
            else:
                ended.append((s, result))
        if not ended:
            return
        now = time.perf_counter()
        for s, result in ended:
            yield Finished(s.row.key, s.sample, result, s.batch_size, s.padded_length, s.steps, now - s.admitted_at)
        if not kept:
            self._reset()
            return
        self.seqs = [self.seqs[i] for i in kept]
        self._select(kept)

    def _select(self, keep: list[int]) -> None:
        """Keep the running set's rows `keep`; cut cache columns that only padding uses, once there are CUT_MIN."""
        import torch

        rows = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, rows)
        if self.seen is not None:
            self.seen = self.seen.index_select(0, rows)
        used = mask.any(dim=0)
        cut = int(used.int().argmax()) if self._joinable and bool(used.any()) else 0
        cut = max(cut, self._stale())
        cut = cut if cut >= CUT_MIN else 0
        self.mask = mask[:, cut:]
        kvcache.select(self.cache, keep, self.device, cut)

    def _stale(self) -> int:
        """Leading cache columns outside every row's sliding window (none unless every layer slides).

        The next step's query sits at column `width`; a window of W sees columns width - W + 1 .. width.
        """
        return max(0, self.mask.shape[1] - self._window + 1) if self._window else 0

    def _row_error(self, s: _Sequence, error: str) -> SequenceResult:
        message = f"row {s.row.row_id!r} failed: {error}"
        if self.on_row_error == "fail":
            raise RowFailedError(message)
        return SequenceResult(None, None, "error", message)

    def _ended(self, s: _Sequence) -> SequenceResult | None:
        """The sequence's result if its last token ended it, else None."""
        if s.row.row_id in self._failing_rows:
            raise faults.InjectedFault("injected fault in this row's decoding")
        d = self.decoding
        last = s.tokens[-1]
        if last in d.eos_ids or last in self._stop_ids:
            return self._result(s, s.tokens[:-1], "stop")
        if self._stop_texts and (self._stop_enders is None or last in self._stop_enders):
            tail = self.tokenizer.decode(s.tokens[-self._stop_tail :], skip_special_tokens=True)
            if any(stop in tail for stop in self._stop_texts):
                return self._result(s, s.tokens, "stop")
        if len(s.tokens) >= d.max_new_tokens:
            return self._result(s, s.tokens, "length")
        return None

    def _result(self, s: _Sequence, text_tokens: list[int], reason: str) -> SequenceResult:
        """Its completion: the text of `text_tokens` (cut at a stop string), every generated token counted."""
        text = self.tokenizer.decode(text_tokens, skip_special_tokens=True)
        hits = [text.find(stop) for stop in self._stop_texts if stop in text]
        if hits:
            text, reason = text[: min(hits)], "stop"
        result = SequenceResult(text, len(s.tokens), reason, tokens=list(s.tokens))
        if self.decoding.logprobs is not None:
            result.logprobs = list(s.logprobs)
        if self.decoding.logprobs:
            result.top_logprobs = self._named(s.top)
        return result

    def _named(self, top: list[list[tuple[int, float]]]) -> list[list[tuple[int, str, float]]]:
        """Each step's most likely tokens with their text, special tokens kept (see `token_texts`)."""
        ids = sorted({i for step in top for i, _ in step})
        text = dict(zip(ids, token_texts(self.tokenizer, ids)))
        return [[(i, text[i], lp) for i, lp in step] for step in top]

    # -- out of memory -------------------------------------------------------------------------

    def _evict(self, waiting: deque[_Waiting], error: str) -> Iterator[Finished]:
        """A decode step did not fit: the newest half of the running set waits again (or one row fails).

        A cache that cannot be cut (chunked or linear attention: see `kvcache`) sends every row back to wait.
        """
        cost = self._cost(len(self.seqs), max(len(s.row.input_ids) for s in self.seqs))
        self.limits.learned = max(1, min(self.limits.learned or cost, cost // 2))
        if len(self.seqs) == 1:
            s = self.seqs[0]
            self._reset()
            yield from self._fail(_Waiting(s.row, [s.sample], {s.sample: s.steps}), error)
            return
        keep = len(self.seqs) - len(self.seqs) // 2 if self._joinable else 0
        back: dict[int, _Waiting] = {}
        for s in self.seqs[keep:]:
            w = back.setdefault(id(s.row), _Waiting(s.row, [], admitted_at=s.admitted_at))
            w.samples.append(s.sample)
            w.steps[s.sample] = s.steps
        waiting.extendleft(reversed(list(back.values())))
        if keep == 0:
            self._reset()
            return
        self.seqs = self.seqs[:keep]
        self._select(list(range(keep)))

    def _fail(self, w: _Waiting, error: str) -> Iterator[Finished]:
        message = f"out of memory even alone ({len(w.row.input_ids)} prompt tokens): {error}"
        if self.on_row_error == "fail":
            raise RowFailedError(message)
        spent = time.perf_counter() - (w.admitted_at or time.perf_counter())
        for k in w.samples:
            result = SequenceResult(None, None, "error", message)
            yield Finished(w.row.key, k, result, 1, len(w.row.input_ids), w.steps.get(k, 0), spent)


def left_pad(input_ids: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """Left-padded id and attention-mask tensors for a batch of unpadded sequences."""
    import torch

    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for i, seq in enumerate(input_ids):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def _oom_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "this does not fit": torch's OutOfMemoryError (CUDA, MPS, XPU)."""
    import torch

    return (torch.OutOfMemoryError,)


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
