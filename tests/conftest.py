"""Shared fixtures: the embedded model, a tiny random Llama, the shared prompt mix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
T0_MIX = Path(os.environ.get("RUNNER_T0_DATA", REPO.parent / "shared" / "data" / "t0_mix_2k.jsonl"))


@pytest.fixture(scope="session")
def embedded_model_dir() -> str:
    """The embedded SmolLM2-135M-Instruct, converted once into the local cache."""
    from runner.input import prepare_embedded_model

    return str(prepare_embedded_model("SmolLM2-135M-Instruct"))


TINY_LLAMA = Path.home() / ".cache" / "runner" / "test-models" / "tiny-llama-2l-v1"


def tiny_llama() -> str:
    """A 2-layer random Llama with the SmolLM2 tokenizer: fast, deterministic, not sensible.

    Built once into the local cache (written beside, then renamed into place), so the jobs that
    integration tests run as subprocesses can load it too: their faults, streams, clusters and stores
    do not need sensible text, and this model's forward costs nothing next to the embedded one's.
    """
    if (TINY_LLAMA / "config.json").exists():
        return str(TINY_LLAMA)
    import tempfile

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from runner.input import prepare_embedded_model

    tokenizer = AutoTokenizer.from_pretrained(prepare_embedded_model("SmolLM2-135M-Instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    TINY_LLAMA.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=TINY_LLAMA.parent, prefix=".tiny-"))
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    try:
        scratch.rename(TINY_LLAMA)
    except OSError:  # built meanwhile by another process
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return str(TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_llama_dir(embedded_model_dir) -> str:
    return tiny_llama()


@pytest.fixture(scope="session")
def t0_rows() -> list[dict]:
    if not T0_MIX.exists():
        pytest.skip(f"shared prompt mix not found at {T0_MIX} (set RUNNER_T0_DATA)")
    with open(T0_MIX) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
