"""Config composition and validation: every YAML composes, every bad value is named."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from runner.config import config_hash, register_configs, to_job_config, validate
from runner.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"
register_configs()


def compose_job(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["output.dir=/tmp/x", *overrides])
    return to_job_config(cfg)


@pytest.mark.parametrize("group,option", [(p.parent.name, p.stem) for p in sorted(CONF.glob("*/*.yaml"))])
def test_every_yaml_in_conf_composes_and_validates(group, option):
    extra = ["dataset.path=prompts.jsonl"] if group == "dataset" and option != "demo" else []
    job = compose_job(f"{group}={option}", *extra)
    assert validate(job) is job


def test_default_config_is_the_embedded_demo():
    job = compose_job()
    assert job.model.name_or_path == "embedded:SmolLM2-135M-Instruct"
    assert job.model.quantization == "nf4"
    assert job.dataset.path == "conf/data/demo_prompts.jsonl"
    assert job.generation.max_new_tokens > 0 and job.generation.do_sample is False


def test_gpu_model_configs_name_hub_models_in_4bit():
    for name in ("llama-3.1-8b-instruct", "mistral-7b-instruct", "qwen2.5-7b-instruct"):
        job = compose_job(f"model={name}")
        assert "/" in job.model.name_or_path and job.model.quantization == "nf4"


def test_misspelled_key_fails_loudly():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_job("generation.max_new_token=5")


def test_one_error_names_every_bad_field_value_and_accepted_values():
    job = compose_job(
        "generation.temperature=-1",
        "generation.top_p=1.5",
        "generation.max_new_tokens=0",
        "model.quantization=q3",
        "batching.max_batch_size=0",
        "generation.num_return_sequences=2",
    )
    with pytest.raises(ConfigError) as err:
        validate(job)
    text = str(err.value)
    for expected in (
        "generation.temperature=-1",
        "generation.top_p=1.5",
        "generation.max_new_tokens=0",
        "model.quantization='q3'",
        "nf4, fp4, int8, none",
        "batching.max_batch_size=0",
        "num_return_sequences=2",
        "do_sample=true",
    ):
        assert expected in text
    assert len(err.value.problems) == 6


def test_missing_required_key_is_reported_with_its_fix():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["output.dir=/tmp/x", "dataset=jsonl"])
    with pytest.raises(ConfigError, match=r"dataset.path: required.*dataset.path=\.\.\."):
        to_job_config(cfg)


def test_config_hash_ignores_where_and_on_which_cluster():
    a = compose_job()
    b = compose_job("output.dir=/elsewhere", "cluster.num_workers=4")
    c = compose_job("generation.max_new_tokens=7")
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(c)
    # where the prompts are read from is not what they are (the shard fingerprints hash the rows themselves)
    moved = compose_job("dataset.path='s3://rotated-key:new-secret@bucket/prompts/'", "model.revision=main")
    assert config_hash(moved) == config_hash(a) != config_hash(compose_job("dataset.prompt_column=question"))


def test_logprobs_are_checked_and_hashed_only_when_set():
    """A key added later (generation.logprobs) leaves the hash of configs without it as it was: those runs resume."""
    from runner.config import result_affecting

    plain = compose_job()
    assert "logprobs" not in result_affecting(plain)["generation"]
    assert config_hash(compose_job("generation.logprobs=0")) != config_hash(plain)
    assert config_hash(compose_job("generation.logprobs=2")) != config_hash(compose_job("generation.logprobs=0"))
    with pytest.raises(ConfigError, match=r"generation.logprobs=21: must be between 0 .* and 20"):
        validate(compose_job("generation.logprobs=21"))


def test_model_defaults_the_engine_applies_count_in_the_hash_only_where_a_model_sets_them(tmp_path):
    """Runs written before the engine applied a model's no_repeat_ngram_size (and the like) decoded without it:
    a model that sets one hashes apart, so such a run is not resumed with rows decoded another way."""
    import json

    from runner.input import applied_model_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "no_repeat_ngram_size": 3}))
    assert applied_model_defaults(str(tmp_path), "local:x") == {"no_repeat_ngram_size": 3}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "min_length": 0}))
    assert applied_model_defaults(str(tmp_path), "local:x") == {}
    job = compose_job()
    assert config_hash(job, model_defaults={}) == config_hash(job)
    assert config_hash(job, model_defaults={"no_repeat_ngram_size": 3}) != config_hash(job)
    with pytest.raises(ValueError, match="needs the adapter's hash"):
        config_hash(compose_job(f"model.adapter={tmp_path}"))


def test_keys_added_for_rows_settings_adapters_and_scoring_hash_only_when_used():
    """Runs written before these keys existed keep their hash; each key, once used, is part of it."""
    from runner.config import result_affecting

    plain = compose_job()
    kept = result_affecting(plain)
    assert not {"settings_columns", "format", "adapter_column"} & set(kept["dataset"])
    assert "prompt_logprobs" not in kept["generation"]
    mapped = compose_job("+dataset.settings_columns.temperature=temp")
    other = compose_job("+dataset.settings_columns.temperature=temp", "+dataset.settings_columns.seed=s")
    assert len({config_hash(plain), config_hash(mapped), config_hash(other)}) == 3
    assert config_hash(compose_job("dataset.format=openai_batch")) != config_hash(plain)


def test_a_json_schema_hashes_by_what_it_holds_not_where_it_lies(tmp_path):
    """Inline or from a file (read once, on the driver, into the job's config): one schema, one hash."""
    path = tmp_path / "schema.json"
    path.write_text('{"type": "object",\n "properties": {"a": {"type": "integer"}}}')
    from_file = validate(compose_job(f"generation.json_schema={path}"))
    assert from_file.generation.json_schema == {"type": "object", "properties": {"a": {"type": "integer"}}}
    inline = validate(compose_job("generation.json_schema={type: object, properties: {a: {type: integer}}}"))
    assert config_hash(from_file) == config_hash(inline) != config_hash(compose_job())
    other = validate(compose_job("generation.json_schema={type: object, properties: {a: {type: string}}}"))
    assert config_hash(other) != config_hash(inline)
    assert len({config_hash(validate(compose_job(k))) for k in ("generation.regex=a+", "generation.choice=[a]")}) == 2
    reordered = validate(compose_job("generation.json_schema={properties: {a: {type: integer}}, type: object}"))
    assert config_hash(reordered) != config_hash(inline)  # properties and keys are written in their order
    quoted = validate(compose_job('generation.regex="[0-9]{4}-[0-9]{2}-[0-9]{2}"'))  # the README's form
    assert quoted.generation.regex == "[0-9]{4}-[0-9]{2}-[0-9]{2}"


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["generation.max_new_tokens=0"], "add generation.prompt_logprobs=true"),
        (["generation.prompt_logprobs=true"], "set generation.max_new_tokens=0"),
        (
            ["generation.max_new_tokens=0", "generation.prompt_logprobs=true", "generation.logprobs=2"],
            "a scoring job has no samples or generated tokens",
        ),
        (
            ["generation.max_new_tokens=0", "generation.prompt_logprobs=true", "dataset.format=openai_batch"],
            "rows have no settings to give",
        ),
        (["+dataset.settings_columns.beams=temp"], "not a setting rows can hold"),
        (["+model.adapters.a=/x"], "model.adapters and dataset.adapter_column go together"),
        (["dataset.format=openai_batch", "dataset.adapter_column=lora", "+model.adapters.a=/x"], "no columns"),
        (["generation.regex=a+", "generation.choice=[a,b]"], "give one constraint, not several"),
        (["generation.regex='[0-9'"], "llguidance cannot compile it"),
        (["generation.json_schema=/no/such/schema.json"], "no such file"),
        (["generation.choice=[]"], "non-empty list of non-empty strings"),
        (
            ["generation.max_new_tokens=0", "generation.prompt_logprobs=true", "dataset.schema_column=s"],
            "a scoring job generates nothing to constrain",
        ),
        (["dataset.format=openai_batch", "dataset.schema_column=s"], "response_format"),
    ],
    ids=[
        "nothing-to-do",
        "generating",
        "logprobs",
        "row-settings",
        "unknown-setting",
        "adapters-alone",
        "batch",
        "two-constraints",
        "bad-regex",
        "no-schema-file",
        "no-choices",
        "scoring-constrained",
        "batch-schema-column",
    ],
)
def test_settings_that_do_not_go_together_are_refused(overrides, says):
    with pytest.raises(ConfigError, match=says):
        validate(compose_job(*overrides))
