"""Fixtures for the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tests.integration.jobs import ROWS


@pytest.fixture(scope="module")
def prompts(t0_rows, tmp_path_factory) -> Path:
    """24 short real prompts from the shared T0 mix, with their `id` column."""
    short = [r for r in t0_rows if len(r["prompt"]) < 500][:ROWS]
    return write_jsonl(tmp_path_factory.mktemp("data") / "t0_short.jsonl", short)
