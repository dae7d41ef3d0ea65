"""On a CUDA GPU (`jobs/bench_gpu.py` runs these there; skipped elsewhere): the engine's greedy output in
bfloat16, a real CUDA out-of-memory backed off, the worker on cuda:0 with the budget CUDA allows.

The tokenizer comes from RUNNER_GPU_TOKENIZER (the GPU check's bundle), or from the embedded model here.
"""

from __future__ import annotations

import os
import random

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
MARGIN = 0.5  # bfloat16 logits of one prompt in batches of other shapes differ in the last bits (see test_left_padding)


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    if os.environ.get("RUNNER_GPU_TOKENIZER"):
        return os.environ["RUNNER_GPU_TOKENIZER"]
    from runner.input import prepare_embedded_model

    return str(prepare_embedded_model("SmolLM2-135M-Instruct"))


def build(tokenizer_dir: str, folder, layers: int = 4, hidden: int = 256, kv_heads: int = 2) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(4, hidden // 64),
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def engine_for(model, tok, max_new_tokens: int, max_sequences: int, max_tokens: int | None = None):
    from runner.generation import Decoding, Engine, Limits

    decoding = Decoding(max_new_tokens=max_new_tokens, eos_ids=frozenset({tok.eos_token_id}), pad_id=tok.pad_token_id)
    return Engine(model, tok, decoding, Limits(max_sequences=max_sequences, max_tokens=max_tokens))


def rows(count: int, vocab: int, longest: int):
    from runner.generation import Row

    rng = random.Random(count)
    return [Row(k, f"r{k}", [rng.randrange(3, vocab) for _ in range(rng.randint(4, longest))]) for k in range(count)]


def test_engine_greedy_in_bfloat16_equals_each_prompt_alone_up_to_near_ties(tokenizer_dir, tmp_path):
    from runner.config import ModelConfig
    from runner.generation import load_model
    from runner.input import load_tokenizer

    path = build(tokenizer_dir, tmp_path / "model")
    tok = load_tokenizer(path)
    model = load_model(path, ModelConfig(name_or_path=path, quantization="none", dtype="bfloat16"), "cuda:0")
    prompts = rows(24, len(tok), 300)
    together = {f.key: f.result.tokens for f in engine_for(model, tok, 16, max_sequences=5).generate_all(prompts)}
    equal, not_near = 0, []
    for row in prompts:
        ids = torch.tensor([row.input_ids], device="cuda:0")
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=16,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=tok.pad_token_id,
            )
        alone = out.sequences[0, ids.shape[1] :].tolist()
        mine = together[row.key]
        if alone[: len(mine)] == mine or mine[: len(alone)] == alone:  # equal, up to whether the EOS is counted
            equal += 1
            continue
        k = next(i for i, (a, b) in enumerate(zip(alone, mine)) if a != b)
        scores = out.scores[k][0].float()
        if abs(float(scores[alone[k]] - scores[mine[k]])) > MARGIN:
            not_near.append((row.key, k))
    assert not not_near, f"completions that differ other than at a near-tie: {not_near}"
    assert equal >= len(prompts) // 2, f"only {equal} of {len(prompts)} equal"


def test_a_real_cuda_out_of_memory_is_backed_off_without_losing_a_row(tokenizer_dir, tmp_path):
    from runner.config import ModelConfig
    from runner.generation import load_model
    from runner.input import load_tokenizer

    path = build(tokenizer_dir, tmp_path / "model", layers=8, hidden=1024, kv_heads=8)
    tok = load_tokenizer(path)
    model = load_model(path, ModelConfig(name_or_path=path, quantization="none", dtype="bfloat16"), "cuda:0")
    prompts = rows(512, len(tok), 600)
    _, total = torch.cuda.mem_get_info()
    cap = (torch.cuda.memory_allocated() + 3 * 2**30) / total  # 3 GiB for batches; the limits assume the card
    torch.cuda.set_per_process_memory_fraction(cap)
    try:
        engine = engine_for(model, tok, 8, max_sequences=512, max_tokens=10**8)
        done = engine.generate_all(prompts)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert engine.oom_events > 0, "the capped card never ran out of memory: the test did not test anything"
    assert sorted(f.key for f in done) == list(range(512))
    assert all(f.result.finish_reason in ("stop", "length") for f in done), {f.result.error for f in done}


def test_the_worker_loads_on_cuda0_with_the_budget_cuda_allows(tokenizer_dir, tmp_path):
    from runner.generation.budget import token_budget
    from runner.generation.model import model_shape
    from tests.unit.generation.test_worker import make_generator

    path = build(tokenizer_dir, tmp_path / "model")
    gen = make_generator(path, tmp_path / "out")
    assert gen.device == "cuda:0" and next(gen.model.parameters()).device == torch.device("cuda:0")
    assert gen.model.dtype == (torch.bfloat16 if torch.cuda.get_device_capability(0) >= (8, 0) else torch.float16)
    free, _ = torch.cuda.mem_get_info()
    expected = token_budget(free, model_shape(gen.model))
    assert abs(gen.memory_budget - expected) <= 0.02 * expected, (gen.memory_budget, expected)
    assert "GiB free" in gen.memory_budget_note
