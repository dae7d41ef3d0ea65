"""The output contract: schema, atomic files, resume checks, manifest, redaction."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.errors import ConfigError
from runner.store import output, resume

DESIGN_COLUMNS = {
    "id": pa.string(),
    "sample_index": pa.int32(),
    "prompt": pa.string(),
    "completion": pa.string(),
    "prompt_tokens": pa.int32(),
    "completion_tokens": pa.int32(),
    "finish_reason": pa.string(),
    "model": pa.string(),
    "quantization": pa.string(),
    "model_revision": pa.string(),
    "temperature": pa.float64(),
    "top_p": pa.float64(),
    "top_k": pa.int32(),
    "do_sample": pa.bool_(),
    "max_new_tokens": pa.int32(),
    "seed": pa.int64(),
    "generation_config": pa.string(),
    "run_id": pa.string(),
    "config_hash": pa.string(),
    "shard_id": pa.int32(),
    "batch_id": pa.int32(),
    "batch_size": pa.int32(),
    "padded_length": pa.int32(),
    "worker": pa.string(),
    "device": pa.string(),
    "latency_s": pa.float64(),
    "created_at": pa.timestamp("us", tz="UTC"),
}


def test_schema_has_every_design_column_with_its_type_then_carried_columns():
    schema = output.output_schema(pa.schema([("topic", pa.string())]))
    for name, typ in DESIGN_COLUMNS.items():
        assert schema.field(name).type == typ, name
    assert schema.names[-1] == "topic"
    with pytest.raises(ValueError):
        output.output_schema(pa.schema([("prompt", pa.string())]))


def one_row_table(config_hash="h", plan="p") -> pa.Table:
    schema = output.output_schema(pa.schema([]), output.file_metadata({"a": 1}, config_hash, "run", "rev-1"))
    row = {f.name: None for f in schema}
    row.update(
        id="x",
        sample_index=0,
        truncated_tokens=0,
        prompt="p",
        prompt_tokens=1,
        finish_reason="stop",
        model="m",
        quantization="nf4",
        model_revision="rev-1",
        do_sample=False,
        max_new_tokens=1,
        seed=0,
        generation_config="{}",
        run_id="run",
        config_hash=config_hash,
        shard_id=0,
        batch_id=0,
        batch_size=1,
        padded_length=1,
        worker="w",
        device="cpu",
        latency_s=0.1,
        created_at=datetime.now(timezone.utc),
    )
    return pa.Table.from_pylist([row], schema=schema)


def test_shard_write_leaves_only_the_final_file_and_lists_ignore_temporaries(tmp_path):
    out = output.open_output_dir(str(tmp_path / "run"))
    output.ensure_writable(out)
    (tmp_path / "run" / ".part-00001.parquet.tmp-abc").write_bytes(b"partial")
    output.write_shard(out, "part-00000.parquet", one_row_table())
    names = [i.base_name for i in output.list_data_files(out)]
    assert names == ["part-00000.parquet"]
    meta = pq.read_schema(tmp_path / "run" / "part-00000.parquet").metadata
    assert json.loads(meta[b"runner.config"]) == {"a": 1}
    assert pq.read_table(tmp_path / "run" / "part-00000.parquet").num_rows == 1


def test_existing_results_of_another_config_are_refused_unless_overwrite(tmp_path):
    out = output.open_output_dir(str(tmp_path))
    name = output.shard_file_name(0, "ab" * 8)
    output.write_shard(out, name, one_row_table("old", "p"))
    (tmp_path / f".{name}.tmp-dead").write_bytes(b"a dead run's half-written file")
    with pytest.raises(ConfigError, match="config hash mismatch.*output.overwrite=true"):
        resume.scan_existing(out, "new", overwrite=False)
    existing = resume.scan_existing(out, "old", overwrite=False)
    assert existing.files.keys() == {name} and existing.committed(0, name) and not existing.committed(1, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # temporaries of dead runs are gone
    # the same shard number planned over other rows: the input changed since that run
    with pytest.raises(ConfigError, match="shard 0 for other input rows.*output.overwrite=true"):
        existing.committed(0, output.shard_file_name(0, "cd" * 8))
    existing = resume.scan_existing(out, "new", overwrite=True)
    assert existing.files == {} and output.list_data_files(out) == []


def test_files_cut_short_by_a_power_loss_are_reported_and_their_shards_redone(tmp_path, caplog):
    """A crash between rename and the data reaching the disk leaves a zero-length or truncated file."""
    out = output.open_output_dir(str(tmp_path))
    names = [output.shard_file_name(k, f"{k:02d}" * 8) for k in range(3)]
    for name in names:
        output.write_shard(out, name, one_row_table("old", "p"))
    (tmp_path / names[0]).write_bytes(b"")  # the rename reached the disk, the data did not
    whole = (tmp_path / names[1]).read_bytes()
    (tmp_path / names[1]).write_bytes(whole[: len(whole) // 2])  # half of it
    with caplog.at_level("WARNING"):
        existing = resume.scan_existing(out, "old", overwrite=False)
    assert existing.files.keys() == {names[2]}
    assert not existing.committed(0, names[0]) and not existing.committed(1, names[1])  # generated again
    assert sorted(p.name for p in tmp_path.iterdir()) == [names[2]]
    assert f"{names[0]} is damaged (0 bytes)" in caplog.text and f"{names[1]} is damaged (no Parquet footer)" in (
        caplog.text
    )


def test_files_of_an_older_layout_are_not_mixed_with_new_ones(tmp_path):
    out = output.open_output_dir(str(tmp_path))
    output.write_shard(out, "part-00000-of-00001-abcd1234.parquet", one_row_table("old", "p"))
    with pytest.raises(ConfigError, match="did not write.*part-00000-of-00001"):
        resume.scan_existing(out, "old", overwrite=False)
    assert resume.scan_existing(out, "new", overwrite=True).files == {}  # this runner wrote it: overwrite removes it
    assert output.list_data_files(out) == []


def test_overwrite_removes_only_what_this_runner_wrote_and_refuses_before_removing_anything(tmp_path):
    out = output.open_output_dir(str(tmp_path))
    ours = output.shard_file_name(0, "ab" * 8)
    output.write_shard(out, ours, one_row_table("old", "p"))
    pq.write_table(pa.table({"prompt": ["the user's own prompts"]}), tmp_path / "prompts.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / output.shard_file_name(1, "cd" * 8))  # our name, not our file
    with pytest.raises(ConfigError, match=r"did not write \(part-000001-cdcd.*prompts.parquet\).*move them away"):
        resume.scan_existing(out, "new", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [ours, "prompts.parquet", output.shard_file_name(1, "cd" * 8)]
    )
    (tmp_path / "prompts.parquet").unlink()
    (tmp_path / output.shard_file_name(1, "cd" * 8)).unlink()
    assert resume.scan_existing(out, "new", overwrite=True).files == {} and list(tmp_path.iterdir()) == []


def test_unwritable_output_dir_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write there"):
        output.ensure_writable(output.open_output_dir(str(blocker / "sub")))


def test_manifest_is_atomic_and_redacts_secrets(tmp_path):
    out = output.open_output_dir(str(tmp_path))
    output.write_manifest(
        out, {"config": {"hf_token": "hf_abc", "max_new_tokens": 5, "dir": "s3://key:hunter2@bucket/x"}}
    )
    text = (tmp_path / "_manifest.json").read_text()
    assert "hf_abc" not in text and "hunter2" not in text and '"max_new_tokens": 5' in text
    assert output.read_manifest(out)["config"]["dir"] == "s3://***@bucket/x"
    assert [p.name for p in tmp_path.iterdir()] == ["_manifest.json"]
    (tmp_path / "_manifest.json").rename(tmp_path / "manifest.json")  # a directory written by an older version
    assert output.read_manifest(out)["config"]["max_new_tokens"] == 5


def test_error_rows_are_found_from_the_footers_then_the_files_that_hold_them(tmp_path):
    out = output.open_output_dir(str(tmp_path))
    clean = one_row_table()
    failed = [dict(clean.to_pylist()[0]) for _ in range(3)]
    for k, r in enumerate(failed):
        r.update(id=f"q{k // 2}", sample_index=k % 2, finish_reason="error" if k else "stop")
    for name, table in (("part-0.parquet", clean), ("part-1.parquet", pa.Table.from_pylist(failed, clean.schema))):
        totals = json.dumps(output.shard_totals(table)).encode()
        output.write_shard(out, name, table.replace_schema_metadata({output.META_TOTALS: totals}))
    assert resume.error_rows(out, ["part-0.parquet", "part-1.parquet"]) == {"part-1.parquet": {"q0": [1], "q1": [0]}}
    assert [t["errors"] for t in resume.read_shard_totals(out, ["part-0.parquet", "part-1.parquet"])] == [0, 2]


def test_a_write_that_fails_twice_is_tried_again_and_lands_once(tmp_path, monkeypatch, caplog):
    from runner import faults

    monkeypatch.setenv(faults.ENV, '{"write_error": {"part-7": 2}}')
    faults._faults.cache_clear()
    try:
        out = output.open_output_dir(str(tmp_path))
        with caplog.at_level("WARNING"):
            output.write_shard(out, "part-7.parquet", one_row_table(), backoff_s=0.01)
        assert [p.name for p in tmp_path.iterdir()] == ["part-7.parquet"]
        assert caplog.text.count("trying again") == 2
        monkeypatch.setenv(faults.ENV, '{"write_error": {"part-8": 9}}')
        faults._faults.cache_clear()
        with pytest.raises(OSError, match="injected write failure 4 of 9"):
            output.write_shard(out, "part-8.parquet", one_row_table(), backoff_s=0.01)
        assert [p.name for p in tmp_path.iterdir()] == ["part-7.parquet"]  # no temporary left behind
    finally:
        monkeypatch.delenv(faults.ENV)
        faults._faults.cache_clear()


def test_results_of_another_model_revision_are_refused(tmp_path):
    """A rerun whose model resolves to another commit (or a changed folder) must not mix two models' rows."""
    out = output.open_output_dir(str(tmp_path))
    output.write_shard(out, output.shard_file_name(0, "ab" * 8), one_row_table("h", "p"))
    assert resume.scan_existing(out, "h", overwrite=False, model_revision="rev-1").files  # the same: resumes
    with pytest.raises(ConfigError, match=r"model revision rev-1 .*resolves to rev-2 now.*model.revision"):
        resume.scan_existing(out, "h", overwrite=False, model_revision="rev-2")
    assert resume.scan_existing(out, "h", overwrite=True, model_revision="rev-2").files == {}
