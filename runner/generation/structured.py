"""Constrained decoding: each constrained sequence's llguidance matcher, and its token masks beside the forward.

A sequence whose row has a constraint (`runner.constraints`) holds a matcher of its grammar, which
takes each token the sequence takes. Before a step's forward pass starts, `Grammars.start` hands
the running set's matchers to a thread that fills their next-token bitmask (llguidance drops the
GIL and spreads the rows over its own threads), so the masks are computed while the model runs;
`Masks.apply` waits for them and sets every token a sequence's grammar does not allow to -inf
before a token is chosen. Greedy and sampled choice then only see allowed tokens; log-probabilities
stay the model's own (`runner.generation.sampling`).

A sequence whose matcher has stopped (its grammar is complete and allows nothing more) ends with
finish_reason `stop` (`runner.generation.ending`); the mask allows EOS wherever the grammar may end.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from runner.constraints import Constraint

KEEP_GRAMMARS = 256  # compiled grammars a worker keeps (rows of their own schemas may bring many)


class Grammars:
    """One worker's llguidance tokenizer, compiled grammars and mask thread (made on first use)."""

    def __init__(self, tokenizer: Any, eos_ids: frozenset[int], vocab_size: int | None):
        self._hf = tokenizer
        self._eos = sorted(eos_ids)
        self._vocab = vocab_size
        self._tokenizer: Any = None
        self._compiled: dict[Constraint, Any] = {}  # a fresh matcher of each grammar, copied per sequence
        self._thread: ThreadPoolExecutor | None = None
        self._executor: Any = None
        self.computing_s = 0.0  # time the mask thread spent filling masks, over the worker's life
        self.waiting_s = 0.0  # time decode steps waited for masks after their forward

    def matcher(self, constraint: Constraint) -> Any:
        """A new matcher of `constraint`'s grammar, at its start: in llguidance's error state where the grammar
        does not compile for this tokenizer (the driver checked it without one), so its row fails alone."""
        fresh = self._compiled.pop(constraint, None)
        if fresh is None:
            import llguidance

            try:
                tokenizer = self.ready()
            except ValueError as e:  # a row's own schema (a Batch line's response_format) on such a model
                return _Failed(str(e))
            fresh = llguidance.LLMatcher(tokenizer, constraint.grammar(), log_level=0)
            if len(self._compiled) >= KEEP_GRAMMARS:  # rows of many schemas: the least recently used goes
                del self._compiled[next(iter(self._compiled))]
        self._compiled[constraint] = fresh  # the most recently used last
        return fresh.deep_copy()

    def ready(self) -> Any:
        """llguidance's view of the tokenizer, made once (about 0.4 s).

        Raises:
            ValueError: the tokenizer is not a fast (Rust) tokenizer, which llguidance needs.
        """
        if self._tokenizer is None:
            import llguidance.hf
            from transformers import PreTrainedTokenizerFast

            if not isinstance(self._hf, PreTrainedTokenizerFast):
                raise ValueError(
                    "structured output needs a fast tokenizer (a tokenizer.json), and this model's is "
                    f"{type(self._hf).__name__}"
                )
            eos = self._eos or None  # none given: the tokenizer's own
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab, eos_token=eos)
        return self._tokenizer

    def start(self, seqs: list[Any]) -> Masks | None:
        """Start computing the next-token masks of `seqs`' constrained sequences (None: none is constrained)."""
        rows = [(s.matcher, i) for i, s in enumerate(seqs) if s.matcher is not None and not s.matcher.is_error()]
        if not rows:
            return None
        import llguidance
        import llguidance.torch

        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
            self._executor = llguidance.LLExecutor()
        bitmask = llguidance.torch.allocate_token_bitmask(len(seqs), self._tokenizer.vocab_size)
        return Masks(self, self._thread.submit(self._fill, rows, bitmask), bitmask, [i for _, i in rows])

    def _fill(self, rows: list[tuple[Any, int]], bitmask: Any) -> None:
        import llguidance.torch

        started = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask_par(self._executor, rows, bitmask)
        self.computing_s += time.perf_counter() - started


class _Failed:
    """A matcher that could not be made: its row fails alone, with the reason (`runner.generation.ending`)."""

    def __init__(self, reason: str):
        self.reason = reason

    def is_error(self) -> bool:
        return True

    def get_error(self) -> str:
        return self.reason

    def consume_token(self, token: int) -> bool:
        return False


class Masks:
    """A step's next-token masks being computed: `apply` waits for them and masks the scores."""

    def __init__(self, grammars: Grammars, job: Future, bitmask: Any, rows: list[int]):
        self._grammars = grammars
        self._job = job
        self._bitmask = bitmask
        self.rows = rows  # the constrained sequences' places in the step's scores

    def wait(self) -> None:
        """Wait for the masks (also after a failed step, before its matchers are used again)."""
        started = time.perf_counter()
        self._job.result()
        self._grammars.waiting_s += time.perf_counter() - started

    def apply(self, scores: Any) -> Any:
        """`scores` [sequences, vocabulary] with each constrained sequence's disallowed tokens at -inf."""
        import torch

        self.wait()
        rows = torch.tensor(self.rows, device=scores.device)
        bitmask = self._bitmask.index_select(0, torch.tensor(self.rows)).to(scores.device)  # 1 bit a token
        allowed = unpack(bitmask, scores.shape[-1])  # on the scores' device
        scores = scores.clone()
        scores[rows] = scores[rows].masked_fill(~allowed, -float("inf"))
        return scores


def unpack(bitmask: Any, width: int) -> Any:
    """[rows, width] bool from llguidance's [rows, ceil(vocab / 32)] int32 bitmask (bit j of word i: token
    32 i + j allowed); tokens past the mask (a model's padded vocabulary) are not allowed."""
    import torch

    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)
    if allowed.shape[1] >= width:
        return allowed[:, :width]
    return torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]), value=False)
