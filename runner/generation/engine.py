"""The generation engine: continuous batching over a Hugging Face causal LM, 4-bit included.

`Engine.generate` takes a shard's rows in plan order (sorted by length) and yields each
sequence as soon as it ends. It keeps a running set of sequences that decode together,
one token per step. A sequence leaves the set the step it ends (EOS, a stop string,
`max_new_tokens`), so no token is chosen for a finished row; its cache row stays where it is,
an empty slot, until the next join's copy drops it (or, with no join coming, until a quarter
of the rows are empty), so a step where rows end costs what any other step costs. When enough
slots are free, the next waiting rows are read (prefill, in groups of similar length, each group
left-padded only to its own longest prompt) and their KV caches join the running set's,
left-padded to one width. Columns of the cache that only padding uses any more are cut.

Sampling (`runner.generation.sampling`) draws each token from a random stream of its own sequence:
a uniform number derived from (seed, row id, sample index, step) alone, so the same config
and data give the same samples whatever the batching, worker count, memory, retry or resume.

Out of memory, wherever in a step (the forward, choosing tokens, growing, joining or cutting the
cache): a prefill that does not fit puts its rows back and the engine reads fewer prompt tokens
at once; a decode step that does not fit sends the newest half of the running set back to wait
(their samples come out the same when they run again) and the running set holds fewer cache
tokens. The two limits are learned apart and grow back after clean steps (`runner.generation.limits`).
A sequence that does not fit even alone ends with finish_reason `error` (or raises, with
on_row_error=fail).

Plain torch and transformers: no Ray, no I/O. `runner.generation.worker` turns a shard into
rows through it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from runner import faults, plan
from runner.errors import RowFailedError, first_line
from runner.generation import kvcache, prefix, structured
from runner.generation.ending import Ending
from runner.generation.limits import Limits
from runner.generation.processors import NgramTable, check_vocabulary
from runner.generation.sampling import Chooser, Decoding, presence, stream_key
from runner.generation.sequences import (
    Finished,
    Prefilled,
    Row,
    Running,
    SequenceResult,
    Waiting,
    left_pad,
    took_tokens,
)

log = logging.getLogger(__name__)

REFILL_SHARE = 0.25  # read waiting rows once this share of the running set's slots is free
EMPTY_SHARE = 0.25  # ended rows' cache rows are dropped once they are this share of the cache (or at a join)
COMPACT_BACKOFF = 16  # decode steps before a compaction that did not fit is tried again
CUT_MIN = 64  # padding-only cache columns worth a copy of the cache to cut (fewer cost little attention)


class Engine:
    """Generates rows with continuous batching; one per worker, reused across shards."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        decoding: Decoding,
        limits: Limits,
        on_row_error: str = "write",
        share_prefix: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.decoding = decoding
        self.limits = limits
        self.on_row_error = on_row_error
        self.device = model.device
        self.oom_events = 0  # out-of-memory errors met (prefill and decode), over the engine's life
        self.joins = 0  # prefills whose sequences joined a running set that was decoding, over its life
        self.prompt_positions = 0  # prompt positions its prefills computed (padding and shared prefixes included)
        self.empty_row_steps = 0  # decode steps computed for the empty rows of ended sequences, over its life
        check_vocabulary(decoding.rules, getattr(getattr(model, "config", None), "vocab_size", None))
        self._chooser = Chooser(decoding)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        self._grammars = structured.Grammars(tokenizer, decoding.eos_ids, vocab)
        probe = kvcache.new_cache(model)
        self._joinable = kvcache.joinable(probe)
        self._window = kvcache.window(probe)  # every layer slides: columns older than it are cut
        self._share = share_prefix and self._joinable and not kvcache.slides(probe)
        self._prefix: prefix.SharedPrefix | None = None  # the last shared prefix read, kept for the next rows
        if not self._joinable:
            log.warning(
                "this model's KV cache (%s) cannot be joined or cut: rows are read only into an empty running "
                "set, in one prefill group, and out of memory sends every row back to wait",
                kvcache.layer_kinds(probe),
            )
        self._failing_rows = faults.failing_rows()
        self._ending = Ending(tokenizer, decoding)
        self._reset()

    def _reset(self) -> None:
        self.seqs: list[Running] = []  # the running sequences, in cache row order
        self.slots: list[Running | None] = []  # each cache row's sequence; None: it ended, its row is empty
        self._live: Any = None  # the rows of `seqs` in the cache, as a tensor; None while no row is empty
        self.cache: Any = None
        self.mask: Any = None  # [sequences, cache width] attention mask of the running set
        self.seen: Any = None  # [sequences, vocabulary] tokens each holds, with a repetition penalty
        self._compact_wait = 0  # steps before a compaction is tried again, after one that did not fit
        self._lost = False  # a cache that cannot join ran out of memory while reordered: unusable

    def generate(self, rows: list[Row]) -> Iterator[Finished]:
        """Yield every sequence of `rows` (samples of a row: sample_index 0..n-1) as it ends.

        Raises:
            RowFailedError: a row ran out of memory alone, or its decoding raised, and on_row_error is `fail`.
        """
        import torch

        waiting = deque(Waiting(r, list(self._samples(r))) for r in rows)
        self._reset()
        with torch.inference_mode():
            while waiting or self.seqs:
                if waiting and self._may_admit():
                    yield from self._admit(waiting)
                if self.seqs:
                    yield from self._step(waiting)

    def _samples(self, row: Row) -> tuple[int, ...]:
        if row.samples is not None:
            return row.samples
        return tuple(range((row.decoding or self.decoding).samples))

    def forget_prefix(self) -> None:
        """Drop the kept shared prefix: its cache was computed by weights that are about to change (an adapter)."""
        self._prefix = None

    def counts(self) -> tuple[int, int, int]:
        """Its counters so far: out-of-memory errors, prompt positions computed, empty rows' decode steps."""
        return self.oom_events, self.prompt_positions, self.empty_row_steps

    def check_structured(self) -> None:
        """Make the structured-output matchers' tokenizer view now (raises ValueError if the tokenizer has none)."""
        self._grammars.ready()

    def mask_seconds(self) -> tuple[float, float]:
        """Structured output's masks so far: seconds spent computing them (beside the forward), and seconds
        decode steps waited for them after their forward."""
        return self._grammars.computing_s, self._grammars.waiting_s

    def generate_all(self, rows: list[Row]) -> list[Finished]:
        """Every sequence of `rows`, in row order, samples in order."""
        return sorted(self.generate(rows), key=lambda f: (f.key, f.sample_index))

    # -- admission -----------------------------------------------------------------------------

    def _may_admit(self) -> bool:
        """Read waiting rows into an empty running set, or (caches that join) once REFILL_SHARE of its slots
        and, where the cache's tokens are bounded, REFILL_SHARE of those tokens are free: whichever binds,
        rows are read in batches, not one per ended sequence (each join copies the whole cache)."""
        if not self.seqs:
            return True
        free = self.limits.max_sequences - len(self.seqs)
        if not self._joinable or free < max(1, int(self.limits.max_sequences * REFILL_SHARE)):
            return False
        limit = self.limits.tokens()
        held = self._cost(len(self.seqs), max(len(s.row.input_ids) for s in self.seqs))
        return limit is None or limit - held >= limit * REFILL_SHARE

    def _cost(self, seqs: int, widest: int) -> int:
        return seqs * (widest + self.decoding.max_new_tokens)

    def _take(self, waiting: deque[Waiting]) -> list[Waiting]:
        """The next waiting rows that fit beside the running set (at least one row when it is empty)."""
        taken: list[Waiting] = []
        seqs, read = len(self.seqs), 0
        widest = max((len(s.row.input_ids) for s in self.seqs), default=0)
        limit, reads = self.limits.tokens(), self.limits.prefill.value
        while waiting:
            nxt = waiting[0]
            more, wider = seqs + len(nxt.samples), max(widest, len(nxt.row.input_ids))
            fits = more <= self.limits.max_sequences and (limit is None or self._cost(more, wider) <= limit)
            if taken and reads is not None and read + len(nxt.row.input_ids) > reads:
                break  # one admission reads no more prompt tokens than a prefill that ran out of memory taught
            if not fits and (taken or self.seqs):
                break
            taken.append(waiting.popleft())
            seqs, widest, read = more, wider, read + len(nxt.row.input_ids)
            if not fits:
                break
        return taken

    def _admit(self, waiting: deque[Waiting]) -> Iterator[Finished]:
        taken = self._take(waiting)
        if not taken:
            return
        now = time.perf_counter()
        for w in taken:
            w.admitted_at = w.admitted_at or now
        error, stage = None, "cache"
        try:
            if len(self.slots) > len(self.seqs):
                self._select(self._live_rows())  # the empty rows leave before anything is read beside them
            stage = "prefill"
            shared = self._shared_prefix(taken)
            start = len(shared) if shared is not None else 0
            own = [len(w.row.input_ids) - start for w in taken]
            groups = [list(range(len(own)))]  # caches that cannot join: one group
            if self._joinable:
                groups = plan.prefill_groups(own, self.limits.step_cost_tokens)
            parts = [self._prefill([taken[i] for i in g], shared) for g in groups]
            stage = "cache"
            self._join(parts)
        except _oom_errors() as e:
            error = first_line(e, 200)  # not the exception: its traceback holds the failed step's tensors
        if error is None:
            yield from self._retire()
            return
        _free_memory()
        self.oom_events += 1
        parts = None
        cost = self._cost(len(self.seqs) + sum(len(w.samples) for w in taken), self._widest(taken))
        if self.seqs and kvcache.broken(self.cache):  # the join ran out half-way: the running set's cache is lost
            self.limits.cache.failed_at(cost)
            waiting.extendleft(reversed(taken))
            lost = self.seqs
            self._reset()
            self._send_back(waiting, lost)  # they rerun to the same tokens, before the rows that were joining
            return
        if stage == "prefill" and len(taken) > 1:  # reading these prompts at once did not fit: read fewer at once
            self.limits.prefill.failed_at(sum(len(w.row.input_ids) for w in taken))
        else:  # the cache holds too much: dropping empty rows, joining, or one row beside the running set
            self.limits.cache.failed_at(cost)
        alone = taken[0]
        if len(taken) > 1 or self.seqs:
            waiting.extendleft(reversed(taken))  # fewer fit now: the next admission takes fewer
        elif len(alone.samples) > 1:  # one row's samples apart: half of them at a time
            half = len(alone.samples) // 2
            waiting.appendleft(Waiting(alone.row, alone.samples[half:], alone.steps, alone.admitted_at))
            waiting.appendleft(Waiting(alone.row, alone.samples[:half], alone.steps, alone.admitted_at))
        else:
            yield from self._fail(alone, error)

    def _widest(self, taken: list[Waiting]) -> int:
        return max([len(w.row.input_ids) for w in taken] + [len(s.row.input_ids) for s in self.seqs])

    def _shared_prefix(self, taken: list[Waiting]) -> prefix.SharedPrefix | None:
        """The prefix every taken row starts with, read once (or the kept one), if one is worth sharing."""
        if not self._share:
            return None
        kept = self._prefix.tokens if self._prefix is not None else None
        length, reuse = prefix.choose([w.row.input_ids for w in taken], kept)
        if reuse or not length:
            return self._prefix if reuse else None
        self._prefix = None  # the old one goes before the new one is read
        self._prefix = prefix.SharedPrefix(self.model, taken[0].row.input_ids[:length])
        self.prompt_positions += length
        return self._prefix

    def _prefill(self, group: list[Waiting], shared: prefix.SharedPrefix | None = None) -> Prefilled:
        """Read a group's prompts (after the `shared` prefix, if any, read once); its cache, mask and
        sequences, each with its first token chosen."""
        import torch

        start = len(shared) if shared is not None else 0
        ids, mask = left_pad([w.row.input_ids[start:] for w in group], self.decoding.pad_id)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1) + start
        if shared is not None:  # [prefix][padding][own part]: the padding between is masked
            cache = shared.copies(self.model, len(group), ids.shape[1])
            mask = torch.cat([mask.new_ones((len(group), start)), mask], dim=1)
            every = torch.cat([torch.tensor([shared.tokens]).expand(len(group), start), ids], dim=1)
        else:
            cache, every = kvcache.new_cache(self.model), ids
        self.prompt_positions += ids.numel()
        width = int(mask.shape[1])
        seqs = self._sequences(group, width)
        masks = self._grammars.start(seqs)  # computed while the prompts are read
        try:
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            if masks is not None:
                masks.wait()
        counts = [len(w.samples) for w in group]
        repeat = torch.tensor(counts, device=self.device)
        logits = out.logits[:, -1].repeat_interleave(repeat, dim=0)
        if any(c != 1 for c in counts):
            kvcache.repeat(cache, repeat)
        mask = mask.to(self.device)
        seen = None
        if self._chooser.penalized:  # the prompt's tokens; each generated one is added as it is taken
            seen = presence(every.to(self.device), mask, out.logits.shape[-1]).repeat_interleave(repeat, dim=0)
        mask = mask.repeat_interleave(repeat, dim=0)
        choice = self._chooser.choose(logits, seqs, seen, masks)
        for i, s in enumerate(seqs):
            s.took(choice, i)
        return Prefilled(cache, mask, seqs, took_tokens(seen, choice))

    def _sequences(self, group: list[Waiting], width: int) -> list[Running]:
        """The running sequences of a prefill group's rows: each sample one, with its matcher where constrained."""
        n = self.decoding.rules.no_repeat_ngram_size
        seqs = []
        for w in group:
            table = NgramTable(n, w.row.input_ids) if n else None
            decoding = w.row.decoding or self.decoding
            for k in w.samples:
                seqs.append(
                    Running(
                        row=w.row,
                        sample=k,
                        decoding=decoding,
                        stream=stream_key(decoding.seed, w.row.row_id, k),
                        length=len(w.row.input_ids),
                        padded_length=width,
                        admitted_at=w.admitted_at,
                        steps=w.steps.get(k, 0),
                        ngrams=table.copy() if table is not None and len(w.samples) > 1 else table,
                        matcher=self._grammars.matcher(decoding.constraint) if decoding.constraint else None,
                    )
                )
        return seqs

    def _join(self, parts: list[Prefilled]) -> None:
        """Append prefilled groups to the running set: every cache left-padded to the widest."""
        import torch
        from torch.nn.functional import pad

        self.joins += bool(self.seqs)
        pieces = ([Prefilled(self.cache, self.mask, self.seqs, self.seen)] if self.seqs else []) + parts
        width = max(p.mask.shape[1] for p in pieces)
        if len(pieces) == 1:
            self.cache, self.mask, self.seen = parts[0].cache, parts[0].mask, parts[0].seen
        else:  # mask and seen first; the cache is joined layer by layer (see kvcache.join on running out)
            mask = torch.cat([pad(p.mask, (width - p.mask.shape[1], 0)) for p in pieces])
            seen = torch.cat([p.seen for p in pieces]) if self._chooser.penalized else None
            self.cache = kvcache.join([p.cache for p in pieces], width)
            self.mask, self.seen = mask, seen
        for p in parts:
            self.seqs.extend(p.seqs)
        self.slots = list(self.seqs)
        for s in (s for p in parts for s in p.seqs):
            s.batch_size = len(self.seqs)

    # -- decoding ------------------------------------------------------------------------------

    def _step(self, waiting: deque[Waiting]) -> Iterator[Finished]:
        """One decode step of the whole running set, then the ended sequences leave it."""
        import torch

        if self._lost:  # its rows rerun to the same tokens
            lost = self.seqs
            self._reset()
            self._send_back(waiting, lost)
            return
        self._compact_wait = max(0, self._compact_wait - 1)
        pad = self.decoding.pad_id  # an empty row decodes padding beside the others; nothing is chosen for it
        tokens = torch.tensor([[s.tokens[-1] if s else pad] for s in self.slots], device=self.device)
        positions = torch.tensor([[s.length if s else 0] for s in self.slots], device=self.device)
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.slots), 1))], dim=1)
        error = None
        masks = self._grammars.start(self.seqs)  # the constrained sequences' masks, computed beside the forward
        try:  # the forward and the choice ([sequences, vocabulary] scores): running out in either is the same
            out = self.model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            )
            logits, seen = out.logits[:, -1], self.seen
            if self._live is not None:
                logits = logits.index_select(0, self._live)
                seen = seen.index_select(0, self._live) if seen is not None else None
            choice = self._chooser.choose(logits, self.seqs, seen, masks)
        except _oom_errors() as e:
            error = first_line(e, 200)  # not the exception: its traceback holds the failed step's tensors
        if error is not None:
            if masks is not None:
                masks.wait()  # before any of its matchers is used again
            out = logits = seen = None  # the failed step's [rows, vocabulary] tensors go before evicting
            _free_memory()
            self.oom_events += 1
            self._undo_step()
            yield from self._evict(waiting, error)
            return
        del out
        self.limits.clean_step()
        self.empty_row_steps += len(self.slots) - len(self.seqs)
        self.mask = mask
        self.seen = took_tokens(self.seen, choice, self._live)
        for i, s in enumerate(self.seqs):
            s.length += 1
            s.took(choice, i)
        yield from self._retire()
        if self.seqs and self._stale() >= CUT_MIN:  # a sliding window left columns behind: cut them
            self._compact()

    def _undo_step(self) -> None:
        """Layers that took the failed step's column before memory ran out give it back."""
        if self._joinable:
            kvcache.truncate(self.cache, self.mask.shape[1])

    def _retire(self) -> Iterator[Finished]:
        """Ended sequences leave the running set; their cache rows stay, empty, until the next join drops them
        or they are EMPTY_SHARE of the cache (caches that cannot join drop them at once)."""
        import torch

        ended = []
        for i, s in enumerate(self.slots):
            if s is None:
                continue
            try:
                result = self._ended(s)
            except Exception as e:  # confined to this row (decoding its text, a stop string): the row fails
                result = self._row_error(s, f"{type(e).__name__}: {first_line(e, 200)}")
            if result is not None:
                ended.append((s, result))
                self.slots[i] = None
        if not ended:
            return
        self.seqs = [s for s in self.slots if s is not None]
        now = time.perf_counter()
        for s, result in ended:
            yield Finished(s.row.key, s.sample, result, s.batch_size, s.padded_length, s.steps, now - s.admitted_at)
        if not self.seqs:
            self._reset()
            return
        empty = len(self.slots) - len(self.seqs)
        if not self._joinable or empty >= max(1, int(len(self.slots) * EMPTY_SHARE)):
            self._compact()
        else:
            self._live = torch.tensor(self._live_rows(), device=self.device)

    def _live_rows(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None]

    def _select(self, keep: list[int]) -> None:
        """Keep the cache's rows `keep` (ascending, each a live sequence's); cut the cache columns that only
        padding uses (or a sliding window has left), once there are CUT_MIN.

        Raises torch.OutOfMemoryError, with the running set as it was, if the selection does not fit.
        """
        import torch

        rows = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, rows)
        seen = self.seen.index_select(0, rows) if self.seen is not None else None
        cut = int(mask.any(dim=0).int().argmax()) if self._joinable else 0  # the first column a kept row uses
        cut = max(cut, self._stale())
        cut = cut if cut >= CUT_MIN else 0
        kvcache.select(self.cache, keep, self.device, cut)  # changes nothing if it runs out of memory
        self.mask, self.seen = mask[:, cut:], seen
        self.slots = [self.slots[i] for i in keep]
        self.seqs = [s for s in self.slots if s is not None]
        self._live = None

    def _compact(self) -> None:
        """Drop the empty rows (and cut columns) now, or, if that does not fit, in COMPACT_BACKOFF steps.

        A cache that cannot join is reordered by transformers layer by layer: running out of memory there
        leaves it unusable, and the next step sends every row back to wait (`_lost`).
        """
        import torch

        live = self._live_rows()
        if self._compact_wait:
            self._live = torch.tensor(live, device=self.device) if len(live) < len(self.slots) else self._live
            return
        try:
            self._select(live)
        except _oom_errors():
            _free_memory()
            self.oom_events += 1
            self._lost = not self._joinable
            self._compact_wait = COMPACT_BACKOFF
            self._live = torch.tensor(live, device=self.device) if len(live) < len(self.slots) else None

    def _stale(self) -> int:
        """Leading cache columns outside every row's sliding window (none unless every layer slides).

        The next step's query sits at column `width`; a window of W sees columns width - W + 1 .. width.
        """
        return max(0, self.mask.shape[1] - self._window + 1) if self._window else 0

    def _row_error(self, s: Running, error: str) -> SequenceResult:
        message = f"row {s.row.row_id!r} failed: {error}"
        if self.on_row_error == "fail":
            raise RowFailedError(message)
        return SequenceResult(None, None, "error", message)

    def _ended(self, s: Running) -> SequenceResult | None:
        """The sequence's result if its last token ended it, else None (`runner.generation.ending`)."""
        if s.row.row_id in self._failing_rows:
            raise faults.InjectedFault("injected fault in this row's decoding")
        return self._ending.ended(s)

    # -- out of memory -------------------------------------------------------------------------

    def _evict(self, waiting: deque[Waiting], error: str) -> Iterator[Finished]:
        """A decode step did not fit: the newest half of the running set waits again (or one row fails).

        A cache that cannot be cut (chunked or linear attention: see `kvcache`), or a selection that does
        not fit either, sends every row back to wait.
        """
        # what failed held the empty rows too
        self.limits.cache.failed_at(self._cost(len(self.slots), max(len(s.row.input_ids) for s in self.seqs)))
        if len(self.seqs) == 1 and len(self.slots) == 1:
            s = self.seqs[0]
            self._reset()
            yield from self._fail(Waiting(s.row, [s.sample], {s.sample: s.steps}), error)
            return
        seqs = self.seqs
        keep = len(seqs) - len(seqs) // 2 if self._joinable else 0  # one row beside empty ones: it stays, alone
        if keep:
            try:
                self._select(self._live_rows()[:keep])  # the empty rows leave too
            except _oom_errors():
                _free_memory()
                self.oom_events += 1
                keep = 0
        self._send_back(waiting, seqs[keep:])
        if keep == 0:
            self._reset()

    @staticmethod
    def _send_back(waiting: deque[Waiting], seqs: list[Running]) -> None:
        """`seqs` wait again, at the front, in their order; the steps they spent are kept for the count."""
        back: dict[int, Waiting] = {}
        for s in seqs:
            w = back.setdefault(id(s.row), Waiting(s.row, [], admitted_at=s.admitted_at))
            w.samples.append(s.sample)
            w.steps[s.sample] = s.steps
        waiting.extendleft(reversed(list(back.values())))

    def _fail(self, w: Waiting, error: str) -> Iterator[Finished]:
        message = f"out of memory even alone ({len(w.row.input_ids)} prompt tokens): {error}"
        if self.on_row_error == "fail":
            raise RowFailedError(message)
        spent = time.perf_counter() - (w.admitted_at or time.perf_counter())
        for k in w.samples:
            result = SequenceResult(None, None, "error", message)
            yield Finished(w.row.key, k, result, 1, len(w.row.input_ids), w.steps.get(k, 0), spent)


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
