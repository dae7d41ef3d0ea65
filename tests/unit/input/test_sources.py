"""Finding and streaming the input: files, folders, globs, URIs; chunks in a fixed order."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.config import DatasetConfig
from runner.errors import ConfigError
from runner.input import sources
from runner.input.rows import parse_chunk
from tests.conftest import write_jsonl


def ids_read(path, chunk_rows=2, **kw) -> list[str]:
    cfg = DatasetConfig(path=str(path), **kw)
    chunks = list(sources.read_chunks(sources.resolve(cfg), cfg, chunk_rows))
    assert all(c.rows <= chunk_rows for c in chunks)
    assert [c.first_row for c in chunks] == [sum(c.rows for c in chunks[:k]) for k in range(len(chunks))]
    return [r["id"] for c in chunks for r in parse_chunk(c).to_pylist()]


def test_a_folder_is_read_file_by_file_in_name_order_skipping_hidden_and_underscore_names(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"id": "b1"}, {"id": "b2"}, {"id": "b3"}])
    write_jsonl(folder / "a.jsonl", [{"id": "a1"}])
    (folder / "_SUCCESS").write_text("")
    (folder / ".a.jsonl.crc").write_text("")
    assert ids_read(folder) == ["a1", "b1", "b2", "b3"]
    assert ids_read(folder, limit=3) == ["a1", "b1", "b2"]


def test_a_glob_picks_files_and_parquet_and_csv_stream_in_chunks(tmp_path):
    for k in range(3):
        pq.write_table(pa.table({"id": [f"p{k}-{i}" for i in range(3)]}), tmp_path / f"part-{k}.parquet")
    (tmp_path / "other.parquet").write_bytes(b"not matched")
    assert ids_read(tmp_path / "part-*.parquet") == [f"p{k}-{i}" for k in range(3) for i in range(3)]
    (tmp_path / "p.csv").write_text("id,prompt\n" + "".join(f"c{i},hello\n" for i in range(5)))
    assert ids_read(tmp_path / "p.csv") == [f"c{i}" for i in range(5)]


def test_jsonl_keeps_line_numbers_across_blank_lines_and_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BLOCK_BYTES", 7)  # lines split across reads
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "x"}\n\n{"id": "y"}\n{"id": "z"}')  # a blank line, no final newline
    cfg = DatasetConfig(path=str(path))
    chunks = list(sources.read_chunks(sources.resolve(cfg), cfg, 2))
    assert [c.line_numbers.tolist() for c in chunks] == [[1, 3], [4]]
    assert [r["id"] for c in chunks for r in parse_chunk(c).to_pylist()] == ["x", "y", "z"]


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda d: d / "missing.jsonl", "no such file"),
        (lambda d: d / "nothing-*.jsonl", "no file matches"),
        (lambda d: (d / "mixed").mkdir() or write_jsonl(d / "mixed" / "a.jsonl", []).parent, "mixes"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "holds no"),
    ],
)
def test_paths_that_name_no_usable_input_are_refused_with_the_reason(tmp_path, make, fragment):
    path = make(tmp_path)
    if fragment == "mixes":
        (path / "b.csv").write_text("id\n1\n")
    with pytest.raises(ConfigError, match=fragment):
        sources.resolve(DatasetConfig(path=str(path)))


def test_a_file_uri_is_read_like_a_local_path(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "u1"}, {"id": "u2"}])
    assert ids_read(f"file://{tmp_path}/a.jsonl") == ["u1", "u2"]
    assert ids_read(f"file://{tmp_path}/*.jsonl") == ["u1", "u2"]
    assert ids_read(f"file://{tmp_path}") == ["u1", "u2"]


def test_a_json_array_file_is_one_table(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"id": "j1"}, {"id": "j2"}, {"id": "j3"}]))
    assert ids_read(tmp_path / "a.json") == ["j1", "j2", "j3"]
    (tmp_path / "bad.json").write_text('{"id": 1}')
    with pytest.raises(ConfigError, match="list of objects"):
        ids_read(tmp_path / "bad.json")


def test_limit_inside_a_chunk_and_crlf_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"id": "a"}\r\n{"id": "b"}\r\n\r\n{"id": "c"}\r\n')
    assert ids_read(path, chunk_rows=10, limit=2) == ["a", "b"]
    assert ids_read(path, chunk_rows=10) == ["a", "b", "c"]


def test_a_block_that_starts_with_a_blank_line_keeps_line_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BLOCK_BYTES", 12)
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "x"}\n\n{"id": "y"}\n')  # the second read starts with the blank line
    cfg = DatasetConfig(path=str(path))
    [chunk] = list(sources.read_chunks(sources.resolve(cfg), cfg, 10))
    assert chunk.line_numbers.tolist() == [1, 3]


def test_uri_globs_match_like_local_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "top.jsonl", [{"id": "t"}])
    write_jsonl(tmp_path / "sub" / "deep.jsonl", [{"id": "d"}])
    assert ids_read(f"file://{tmp_path}/*.jsonl") == ["t"]  # `*` does not cross folders
    assert ids_read(f"file://{tmp_path}/**/*.jsonl") == ids_read(f"{tmp_path}/**/*.jsonl") == ["d", "t"]


def test_csv_cells_are_read_as_the_text_they_hold(tmp_path):
    """Ids with leading zeros stay the user's keys, decimals keep their digits, empty cells stay "", and a
    later block holding text where the first held numbers reads on (no type is guessed from the first block)."""
    lines = ["id,score,note,prompt", "00123,1.10,,hello", "00456,2.50,NA,hi", "00789,3.00,x,hey"]
    lines += [f"{k:05d},{k}.0,,p{k}" for k in range(1000, 70000)]  # over 1 MiB: more than one read block
    lines += ["ABC-1,n/a,late text,last"]
    path = tmp_path / "p.csv"
    path.write_text("\n".join(lines) + "\n")
    cfg = DatasetConfig(path=str(path), id_column="id")
    chunks = list(sources.read_chunks(sources.resolve(cfg), cfg, 1000))
    assert all(c.table.schema.field(n).type == pa.string() for c in chunks for n in c.table.column_names)
    rows = [r for c in chunks for r in c.table.to_pylist()]
    assert [r["id"] for r in rows[:3]] == ["00123", "00456", "00789"]
    assert [r["score"] for r in rows[:3]] == ["1.10", "2.50", "3.00"]
    assert [r["note"] for r in rows[:3]] == ["", "NA", "x"]
    assert rows[-1] == {"id": "ABC-1", "score": "n/a", "note": "late text", "prompt": "last"}
    assert len(rows) == 69004 and [r["id"] for c in chunks for r in parse_chunk(c).to_pylist()][:1] == ["00123"]


def test_a_save_to_disk_folder_is_read_from_its_arrow_files_and_a_dataset_dict_by_split(tmp_path):
    import datasets

    rows = {"id": [f"s{i}" for i in range(7)], "prompt": [f"p{i}" for i in range(7)]}
    whole = datasets.Dataset.from_dict(rows)
    whole.save_to_disk(str(tmp_path / "one"), num_shards=2)  # two Arrow files, read in order
    assert ids_read(tmp_path / "one", chunk_rows=3) == rows["id"]
    datasets.DatasetDict({"train": whole, "test": whole.select([5, 6])}).save_to_disk(str(tmp_path / "dict"))
    assert ids_read(tmp_path / "dict", split="test") == ["s5", "s6"]
    assert ids_read(tmp_path / "dict", limit=4) == rows["id"][:4]
    with pytest.raises(ConfigError, match="has the splits train, test; pick one"):
        ids_read(tmp_path / "dict", split="validation")


def test_a_hub_datasets_repository_is_streamed_by_datasets_without_a_cached_copy(tmp_path, monkeypatch):
    """A clone of a Hub dataset's repository (README card, data/ files) goes through `datasets` as the Hub's
    would, streaming: chunk by chunk, and nothing is written to the datasets cache."""
    repo = tmp_path / "org--prompts"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        "    path: data/train-*.parquet\n---\n# prompts\n"
    )
    for k in range(2):
        ids = [f"h{k}-{i}" for i in range(5)]
        pq.write_table(pa.table({"id": ids, "prompt": ids}), repo / "data" / f"train-0000{k}-of-00002.parquet")
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", cache)
    source = sources.resolve(DatasetConfig(path=str(repo)))
    assert source.hub_name == str(repo) and not source.files
    assert ids_read(repo, chunk_rows=3) == [f"h{k}-{i}" for k in range(2) for i in range(5)]
    assert not [p for p in cache.rglob("*.arrow")]  # streamed: no Arrow copy of the dataset was made
