"""A row's own generation settings (`runner.input.settings`) as the `Decoding` the engine runs it with.

A row's temperature decides how it decodes: above 0 it is sampled, 0 is greedy, none follows the
job. A sampled row of a greedy job takes the settings sampling would take in that job (the model's
own top-k and top-p, or transformers' defaults); a greedy row ignores top-k and top-p, as a greedy
job does. Rows with equal settings share one `Decoding`; a row whose settings come out as the
job's is given the job's own, so it decodes as the job's rows do. No torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from runner.constraints import Constraint
from runner.generation.sampling import Decoding

FIELDS = {"max_new_tokens": "max_new_tokens", "seed": "seed", "num_return_sequences": "samples"}
SAMPLING = ("temperature", "top_p", "top_k")


class RowDecodings:
    """Makes (and keeps) the `Decoding` of each distinct set of row settings.

    Args:
        job: the job's decoding.
        sampled: the job's decoding were it sampled (the job's own when it is).
    """

    def __init__(self, job: Decoding, sampled: Decoding):
        self.job = job
        self.sampled = sampled
        self.greedy = (
            dataclasses.replace(job, do_sample=False, temperature=None, top_k=None, top_p=None, min_p=None)
            if job.do_sample
            else job
        )
        self._made: dict[tuple, Decoding] = {}

    def of(self, values: dict[str, Any] | None) -> Decoding | None:
        """The decoding of a row with these settings (None: the row has none of its own)."""
        if not values:
            return None
        key = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(values.items()) if v is not None)
        if not key:
            return None
        found = self._made.get(key)
        if found is None:
            found = self._make(dict(key))
            self._made[key] = found = self.job if found == self.job else found
        return found

    def _make(self, values: dict[str, Any]) -> Decoding:
        temperature = values.get("temperature")
        sampled = self.job.do_sample if temperature is None else temperature > 0
        changes: dict[str, Any] = {"samples": self.job.samples}  # the job's own count, not the most a row may ask
        changes.update({FIELDS[k]: v for k, v in values.items() if k in FIELDS})
        if sampled:
            changes.update({k: v for k, v in values.items() if k in SAMPLING})
        if "stop_strings" in values:
            changes["stop_strings"] = tuple(values["stop_strings"])
        if "json_schema" in values:  # its own schema, over the job's constraint (if any)
            changes["constraint"] = Constraint("json_schema", values["json_schema"])
        return dataclasses.replace(self.sampled if sampled else self.greedy, **changes)
