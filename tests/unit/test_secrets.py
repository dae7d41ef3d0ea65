"""Credentials in URIs and secret-named keys are masked wherever they are shown or stored."""

from __future__ import annotations

from runner.secrets import mask_files, mask_text, redact


def test_credentials_inside_uris_are_masked_in_any_text():
    text = (
        "- output.dir='s3://AKIA123:hunter2@bucket/run?endpoint_override=127.0.0.1:9000&secret_key=s3cr3t'\n"
        "- dataset.path=gs://bucket/x?access_key=AK&region=eu&token=tok42\n"
        "https://host/o?X-Amz-Security-Token=amz9&sig=azure7&sv=2022\n"
        "python jobs/generate.py generation.max_new_tokens=8 batching.max_batch_tokens=100\n"
    )
    masked = mask_text(text)
    for secret in ("AKIA123", "hunter2", "s3cr3t", "tok42", "access_key=AK&", "amz9", "azure7"):
        assert secret not in masked
    assert "s3://***@bucket/run?endpoint_override=127.0.0.1:9000&secret_key=***" in masked
    assert "region=eu" in masked and "sv=2022" in masked
    assert "generation.max_new_tokens=8 batching.max_batch_tokens=100" in masked


def test_redact_masks_secret_keys_and_uris_through_nested_config():
    config = {"model": {"hf_token": "hf_x", "max_new_tokens": 4}, "dirs": ["s3://k:s@b/p?secret_key=z"]}
    assert redact(config) == {
        "model": {"hf_token": "***", "max_new_tokens": 4},
        "dirs": ["s3://***@b/p?secret_key=***"],
    }


def test_saved_files_are_rewritten_masked(tmp_path):
    saved = tmp_path / "overrides.yaml"
    saved.write_text("- output.dir=s3://key:secret@bucket/run\n- generation.seed=3\n")
    untouched = tmp_path / "config.yaml"
    untouched.write_text("seed: 3\n")
    mask_files([saved, untouched, tmp_path / "missing.yaml"])
    assert saved.read_text() == "- output.dir=s3://***@bucket/run\n- generation.seed=3\n"
    assert untouched.read_text() == "seed: 3\n"
