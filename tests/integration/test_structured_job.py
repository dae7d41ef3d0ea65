"""A real job on the embedded model with structured output: a schema file for the job, rows with their own."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pyarrow.dataset as ds

from runner.store import verify_run
from tests.conftest import REPO, write_jsonl

PLACE_FILE = REPO / "conf" / "schemas" / "place.json"  # the README's example schema
PLACE = json.loads(PLACE_FILE.read_text())  # nested objects, an enum, an array, bounded numbers
VERDICT = {
    "type": "object",
    "properties": {"answer": {"type": "boolean"}, "confidence": {"enum": ["low", "medium", "high"]}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
TOPICS = ["Paris", "the Nile", "Mount Everest", "Ada Lovelace", "Tokyo", "Kilimanjaro"]


def test_every_stopped_completion_validates_against_its_rows_schema(tmp_path, embedded_model_dir):
    rows = []
    for i, topic in enumerate(TOPICS):
        own = i in (2, 5)
        prompt = f"Is {topic} in Europe? Answer as JSON." if own else f"Describe {topic} as JSON."
        rows.append({"id": f"r{i}", "prompt": prompt, "schema": json.dumps(VERDICT) if own else None})
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out"
    args = [
        sys.executable,
        "jobs/generate.py",
        f"dataset.path={prompts}",
        "dataset.id_column=id",
        "dataset.schema_column=schema",
        "generation.json_schema=conf/schemas/place.json",
        "generation.max_new_tokens=128",
        "model.quantization=none",
        f"output.dir={out}",
    ]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert verify_run(str(out)).ok
    table = ds.dataset(out, format="parquet").to_table().to_pylist()
    assert sorted(r["id"] for r in table) == [f"r{i}" for i in range(len(TOPICS))]
    stopped = 0
    for r in table:
        own = r["id"] in ("r2", "r5")
        schema = VERDICT if own else PLACE
        assert json.loads(r["structured_output"]) == {"json_schema": schema}
        assert r["finish_reason"] in ("stop", "length"), r["error"]
        if r["finish_reason"] == "stop":
            stopped += 1
            jsonschema.validate(json.loads(r["completion"]), schema)
        else:  # cut by max_new_tokens: a prefix of a valid document, and said so
            assert r["completion_tokens"] == 128
    assert stopped >= 4, [r["completion"] for r in table]
    config = json.loads((out / "_manifest.json").read_text())["config"]
    assert config["generation"]["json_schema"] == PLACE  # read on the driver: the run records what it held
