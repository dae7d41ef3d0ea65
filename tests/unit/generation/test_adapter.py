"""QLoRA adapters: a PEFT LoRA adapter on the base (4-bit included), checked against the base before a job."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from runner.config import DatasetConfig, GenerationSettings, JobConfig, ModelConfig, OutputConfig
from runner.errors import ConfigError
from runner.generation.engine import Row
from runner.generation.worker import ShardGenerator
from runner.input import check_fits, read_adapter
from runner.tasks import ShardDone, WorkerSetup
from tests.unit.generation.test_engine import generated_alone
from tests.unit.generation.test_worker import shard_task

PROMPTS = ["The history of the river", "Write one word about the sea and the", "A"]


def make_adapter(model_dir: str, folder, seed: int = 0) -> str:
    """A LoRA adapter with random (non-zero) weights on q_proj and v_proj, saved as peft saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapter_dir(embedded_model_dir, tmp_path_factory) -> str:
    return make_adapter(embedded_model_dir, tmp_path_factory.mktemp("adapter") / "my-lora")


def generator(model_dir, adapter, out_dir, quantization="none") -> ShardGenerator:
    job = JobConfig(
        dataset=DatasetConfig(path="unused"),
        model=ModelConfig(name_or_path=model_dir, quantization=quantization, chat_template="none", adapter=adapter),
        generation=GenerationSettings(max_new_tokens=8),
        output=OutputConfig(dir=str(out_dir)),
    )
    label = read_adapter(adapter).label if adapter else None
    setup = WorkerSetup(
        job, model_dir, "run-1", "hash-1", pa.schema([]), {b"runner.config_hash": b"hash-1"}, adapter=label
    )
    return ShardGenerator(setup, index=0, threads=2)


def test_greedy_rows_with_an_adapter_equal_the_merged_model_alone(embedded_model_dir, adapter_dir, tmp_path):
    """fp32: the engine's rows (decoding together) are what the adapter merged into the weights gives each alone."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    gen = generator(embedded_model_dir, adapter_dir, tmp_path)
    rows = [Row(i, f"r{i}", gen.tokenizer.encode(p)) for i, p in enumerate(PROMPTS)]
    ours = gen.engine.generate_all(rows)
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()
    plain = generator(embedded_model_dir, None, tmp_path).engine.generate_all(rows)
    for row, f in zip(rows, ours):
        eos = gen.generation_config.eos_token_id
        assert f.result.tokens == generated_alone(
            merged, row.input_ids, 8, gen.tokenizer.pad_token_id, eos_token_id=eos
        )
    assert [f.result.tokens for f in ours] != [f.result.tokens for f in plain]  # the adapter changed the rows


def test_an_adapter_on_the_4bit_base_writes_its_rows_with_the_adapter_column(embedded_model_dir, adapter_dir, tmp_path):
    import pyarrow.parquet as pq

    (tmp_path / "out").mkdir()
    gen = generator(embedded_model_dir, adapter_dir, tmp_path / "out", quantization="nf4")
    lora = [m for m in gen.model.modules() if hasattr(m, "lora_A")]
    assert lora and all(type(m.base_layer).__name__ == "Linear4bit" for m in lora)  # LoRA layers over 4-bit ones
    tok = gen.tokenizer
    task = shard_task(
        0, "part-0.parquet", [(0, 0, 2)], ["a", "b"], PROMPTS[:2], [tok.encode(p) for p in PROMPTS[:2]], pa.table({})
    )
    done = list(gen.run_shard(task))[-1]
    assert isinstance(done, ShardDone)
    table = pq.read_table(tmp_path / "out" / "part-0.parquet")
    assert table.column("adapter").to_pylist() == [read_adapter(adapter_dir).label] * 2
    assert set(table.column("finish_reason").to_pylist()) <= {"stop", "length"}


def test_an_adapter_is_named_by_its_weights_and_one_for_another_base_is_refused(
    embedded_model_dir, tiny_llama_dir, adapter_dir, tmp_path
):
    found = read_adapter(adapter_dir)
    assert found.name == "my-lora" and len(found.digest) == 16 and found.label == f"my-lora@{found.digest}"
    check_fits(found, embedded_model_dir)  # its own base
    other = read_adapter(make_adapter(embedded_model_dir, tmp_path / "my-lora", seed=1))
    assert other.digest != found.digest and other.name == found.name  # same name, other weights: another adapter
    with pytest.raises(
        ConfigError, match=r"does not fit model .*it was trained on .*q_proj \(takes 576 inputs, the model's 64\)"
    ):
        check_fits(found, tiny_llama_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no adapter_config.json there; point it at a PEFT adapter folder"):
        read_adapter(str(tmp_path / "empty"))
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ConfigError, match="no adapter weights"):
        read_adapter(str(tmp_path / "empty"))
