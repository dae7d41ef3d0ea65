"""An OpenAI Batch API input file through a real job (dataset.format=openai_batch), and back out as one."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

from tests.conftest import REPO, tiny_llama

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def request(custom_id: str, url: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "gpt-4o-mini", **body}}


REQUESTS = [
    request("chat-plain", CHAT, messages=[{"role": "user", "content": "Name three colours."}], max_tokens=6),
    request(
        "chat-sampled",
        CHAT,
        messages=[
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": [{"type": "text", "text": "Pick a fruit."}, {"type": "text", "text": "Now."}]},
        ],
        temperature=0.8,
        n=3,
        seed=42,
        max_completion_tokens=5,
    ),
    request("text-stop", COMPLETIONS, prompt="Once upon a time", max_tokens=8, stop=["\n", "."], temperature=0),
    request("text-n", COMPLETIONS, prompt=["The capital of France is"], n=2, temperature=1.1, top_p=0.9, seed=7),
    request("chat-json", CHAT, messages=[{"role": "user", "content": "Hi"}], response_format={"type": "text"}),
]


def batch_args(lines: list[dict], tmp_path, *extra: str, sweep: bool = False) -> list[str]:
    """The command of a job (or with `sweep`, a multirun) over a Batch input file of `lines` (written here)."""
    path = tmp_path / "batch_input.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return [
        sys.executable,
        "jobs/generate.py",
        *(["-m"] if sweep else []),
        f"dataset.path={path}",
        "dataset.format=openai_batch",
        f"model.name_or_path={tiny_llama()}",
        "model.quantization=none",
        "generation.max_new_tokens=8",
        "generation.num_return_sequences=3",
        *extra,
    ]


def job(tmp_path, lines: list[dict], *extra: str) -> subprocess.CompletedProcess:
    args = batch_args(lines, tmp_path, "batching.shard_size=2", f"output.dir={tmp_path / 'out'}", *extra)
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_a_batch_file_runs_each_request_with_its_own_settings_and_exports_as_batch_output(tmp_path):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    done = job(tmp_path, REQUESTS)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = ds.dataset(tmp_path / "out", format="parquet").to_table().to_pylist()
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
    assert {i: len(v) for i, v in by_id.items()} == {
        "chat-plain": 1,
        "chat-sampled": 3,
        "text-stop": 1,
        "text-n": 2,
        "chat-json": 1,
    }
    first = {i: v[0] for i, v in by_id.items()}
    assert first["chat-plain"]["max_new_tokens"] == 6 and first["chat-plain"]["do_sample"] is False
    assert (first["chat-sampled"]["temperature"], first["chat-sampled"]["seed"]) == (0.8, 42)
    assert first["chat-sampled"]["max_new_tokens"] == 5
    assert "Pick a fruit.\nNow." in first["chat-sampled"]["prompt"]  # text parts joined, chat template applied
    assert first["text-stop"]["prompt"] == "Once upon a time"  # a completion's prompt goes in as it is
    assert first["text-stop"]["stop_strings"] == ["\n", "."]
    assert all("." not in r["completion"] and "\n" not in r["completion"] for r in by_id["text-stop"])
    assert (first["text-n"]["top_p"], first["text-n"]["url"]) == (0.9, COMPLETIONS)

    target = tmp_path / "batch_output.jsonl"
    export = subprocess.run(
        [
            sys.executable,
            "jobs/export.py",
            f"output.dir={tmp_path / 'out'}",
            "export.format=openai_batch",
            f"export.path={target}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr[-2000:]
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(r["custom_id"] for r in REQUESTS)
    for line in lines:
        samples = by_id[line["custom_id"]]
        kind = ChatCompletion if samples[0]["url"] == CHAT else Completion
        body = kind.model_validate(line["response"]["body"])
        assert body.object == ("chat.completion" if kind is ChatCompletion else "text_completion")
        assert len(body.choices) == len(samples)
        assert body.usage.completion_tokens == sum(s["completion_tokens"] for s in samples)
        assert body.usage.prompt_tokens == samples[0]["prompt_tokens"]

    again = job(tmp_path, REQUESTS)  # the same file resumes: nothing to generate
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.slow  # keeps make test under 10 minutes: each refusal is also checked without Ray (test_own_settings)
def test_requests_the_runner_cannot_honour_are_refused_with_their_line_and_key(tmp_path):
    lines = [
        REQUESTS[0],
        request("penalized", CHAT, messages=[{"role": "user", "content": "x"}], frequency_penalty=0.5),
        request("tools", CHAT, messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}]),
        request("image", CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        request("embed", "/v1/embeddings", input="x"),
        request("too-many", COMPLETIONS, prompt="x", n=5, temperature=1.0),
        request("logprobs", CHAT, messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=2),
    ]
    done = job(tmp_path, lines)
    assert done.returncode == 2, done.stderr[-3000:]
    message = done.stdout + done.stderr
    assert "batch_input.jsonl:2: body.frequency_penalty=0.5" in message
    assert "batch_input.jsonl:3: body.tools=" in message
    assert "batch_input.jsonl:4: body.messages[0].content: only text parts" in message
    assert "batch_input.jsonl:5: url='/v1/embeddings'" in message
    assert "generation.logprobs=2" in message
    assert "Traceback" not in message


@pytest.mark.slow  # keeps make test under 10 minutes; test_sweep.py runs sweeps in the default suite
def test_a_sweep_over_a_batch_file_gives_each_point_its_run_and_rows_keep_their_own_seed(tmp_path):
    args = batch_args(
        REQUESTS,
        tmp_path,
        "generation.seed=1,2",
        "cluster.num_workers=1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        sweep=True,
    )
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    points = []
    for point in ("0", "1"):
        out = tmp_path / "sweep" / point
        check = subprocess.run([sys.executable, "jobs/verify.py", f"output.dir={out}"], cwd=REPO, capture_output=True)
        assert check.returncode == 0, check.stdout
        rows = ds.dataset(out, format="parquet").to_table().to_pylist()
        points.append({(r["id"], r["sample_index"]): (r["seed"], r["completion"]) for r in rows})
    assert points[0].keys() == points[1].keys()
    for key, (seed, text) in points[0].items():
        if key[0] in ("chat-sampled", "text-n"):  # their own seed: the same samples at every point
            assert points[1][key] == (seed, text) and seed in (42, 7)
        else:
            assert points[1][key][0] == 2 and seed == 1
