"""jobs/verify.py's checks: each kind of damage to a run directory is found and named."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pyarrow.parquet as pq

from runner.store import output, verify_run
from tests.conftest import REPO
from tests.unit.store.test_output import one_row_table


def make_run(path, rows_per_file=(1, 1)):
    out = output.open_output_dir(str(path))
    files = []
    for i, _ in enumerate(rows_per_file):
        table = one_row_table("hash", "plan")
        table = table.set_column(0, "id", output.pa.array([f"row-{i}"], output.pa.string()))
        name = f"part-{i:05d}-of-00002-plan.parquet"
        output.write_shard(out, name, table)
        files.append({"path": name, "rows": 1})
    manifest = {
        "config_hash": "hash",
        "files": files,
        "totals": {"rows": len(files)},
        "config": {"generation": {"num_return_sequences": 1}},
    }
    output.write_manifest(out, manifest)
    return out


def test_a_sound_run_passes_and_the_command_exits_0(tmp_path):
    make_run(tmp_path)
    assert verify_run(str(tmp_path)).ok
    result = subprocess.run(
        [sys.executable, "jobs/verify.py", f"output.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0 and "OK: 2 rows in 2 files" in result.stdout


def test_missing_extra_duplicated_and_unreadable_files_are_each_named(tmp_path):
    make_run(tmp_path)
    first, second = sorted(tmp_path.glob("part-*.parquet"))
    shutil.copy(first, tmp_path / "part-copy.parquet")  # an unlisted file repeating rows
    second.unlink()
    verdict = verify_run(str(tmp_path))
    text = "\n".join(verdict.problems)
    assert "part-copy.parquet: a data file the manifest does not list" in text
    assert f"{second.name}: listed in the manifest but missing" in text
    assert "1 rows in the files, the manifest totals say 2" in text
    first.write_bytes(b"not parquet")
    assert any("unreadable" in p for p in verify_run(str(tmp_path)).problems)
    result = subprocess.run(
        [sys.executable, "jobs/verify.py", f"output.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 1 and "FAILED" in result.stderr


def test_duplicate_rows_and_an_unfinished_run_fail(tmp_path):
    out = make_run(tmp_path)
    manifest = output.read_manifest(out)
    dup = one_row_table("hash", "plan")  # id "x" twice across two listed files
    for name in ("part-00000-of-00002-plan.parquet", "part-00001-of-00002-plan.parquet"):
        output.write_shard(out, name, dup)
    output.write_manifest(out, manifest)
    assert any("appear more than once" in p for p in verify_run(str(tmp_path)).problems)
    (tmp_path / "_manifest.json").unlink()
    assert "the run has not finished" in verify_run(str(tmp_path)).problems[0]


def test_hash_collisions_make_suspects_that_the_exact_count_clears(tmp_path, monkeypatch):
    """verify keeps 64-bit hashes, not Python tuples; a collision (here every hash is 0) is counted again
    exactly from the files, so a sound run still passes and a real repeat is still named."""
    from runner.store import verify as verify_lib

    make_run(tmp_path, rows_per_file=(1, 1, 1))
    monkeypatch.setattr(verify_lib, "hash", lambda value: 0, raising=False)
    assert verify_run(str(tmp_path)).ok
    out = output.open_output_dir(str(tmp_path))
    manifest = output.read_manifest(out)
    first = pq.read_table(tmp_path / manifest["files"][0]["path"])
    output.write_shard(out, "part-00001-of-00002-plan.parquet", first)  # row-0 twice, row-1 gone
    problems = verify_run(str(tmp_path)).problems
    assert any("1 (id, sample_index) pairs appear more than once, e.g. [('row-0', 0)]" in p for p in problems)
    assert not any("do not have exactly" in p for p in problems)  # row-0 has its one sample (twice)
