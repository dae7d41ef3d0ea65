"""One run per output directory: the lease is exclusive, names its holder, and a dead holder's is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from runner.errors import ConfigError
from runner.store import lease, output


def test_a_second_run_is_refused_naming_the_first_until_it_releases(tmp_path):
    out = output.open_output_dir(str(tmp_path))
    first = lease.acquire(out, "run-A", timeout_s=60)
    holder = json.loads((tmp_path / "_lease.json").read_text())
    assert holder["run_id"] == "run-A" and holder["pid"] > 0
    with pytest.raises(ConfigError, match=r"in use by another run \(run run-A on .*process \d+"):
        lease.acquire(out, "run-B", timeout_s=60)
    first.release()
    assert not (tmp_path / "_lease.json").exists()
    second = lease.acquire(out, "run-B", timeout_s=60)
    with pytest.raises(ConfigError, match="run run-B"):
        lease.acquire(out, "run-A", timeout_s=60)
    second.release()


def test_a_dead_runs_lease_is_taken_over(tmp_path, caplog):
    out = output.open_output_dir(str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"lease_id": "x", "run_id": "killed", "host": "elsewhere", "pid": 1, "renewed_at": time.time() - 600}
    here = {"host": socket.gethostname(), "pid_namespace": os.readlink("/proc/self/ns/pid")}
    gone = {**stale, **here, "pid": int(dead.stdout), "renewed_at": time.time()}
    other_container = {**gone, "pid_namespace": "pid:[1]"}  # its pid means nothing here: not known dead
    for theirs, why in ((stale, "not renewed for 6"), (gone, f"process {int(dead.stdout)} of this host is gone")):
        (tmp_path / "_lease.json").write_text(json.dumps(theirs))
        with caplog.at_level("WARNING"):
            held = lease.acquire(out, "run-new", timeout_s=60)
        assert why in caplog.text and json.loads((tmp_path / "_lease.json").read_text())["run_id"] == "run-new"
        held.release()
    (tmp_path / "_lease.json").write_text(json.dumps(other_container))
    with pytest.raises(ConfigError, match="in use by another run"):
        lease.acquire(out, "run-new", timeout_s=60)
    (tmp_path / "_lease.json").write_text("")  # a crash between creating the lease and writing it
    os.utime(tmp_path / "_lease.json", (time.time() - 120, time.time() - 120))
    held = lease.acquire(out, "run-new", timeout_s=60)
    assert json.loads((tmp_path / "_lease.json").read_text())["run_id"] == "run-new"
    held.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_heartbeat_renews_the_lease_and_notices_a_takeover(tmp_path):
    out = output.open_output_dir(str(tmp_path))
    held = lease.acquire(out, "run-A", timeout_s=0.4)  # renewed every 0.1 s
    first = json.loads((tmp_path / "_lease.json").read_text())["renewed_at"]
    time.sleep(0.35)
    assert json.loads((tmp_path / "_lease.json").read_text())["renewed_at"] > first
    held.check()
    taken = tmp_path / "taken.json"  # written whole, then renamed over the lease (as a real takeover does)
    taken.write_text(json.dumps({"lease_id": "other", "run_id": "run-B", "renewed_at": 0}))
    taken.replace(tmp_path / "_lease.json")
    time.sleep(0.35)
    with pytest.raises(RuntimeError, match="another run took over.*run run-B"):
        held.check()
    held.release()
    assert json.loads((tmp_path / "_lease.json").read_text())["run_id"] == "run-B"  # not ours: left alone


def _race(path: str, barrier, done, results) -> None:
    out = output.open_output_dir(path)
    barrier.wait()
    try:
        lease.acquire(out, f"run-{os.getpid()}", timeout_s=60)
        results.put("won")
    except ConfigError:
        results.put("refused")
    results.close()
    results.join_thread()  # the answer is sent before the process ends
    done.wait()  # a winner stays alive until both have tried: a lease of a process that is gone is fair game
    os._exit(0)  # holding it, as a run would (its heartbeat dies with it)


def test_two_processes_taking_over_one_dead_lease_never_both_win(tmp_path):
    """Both read the dead run's lease, both rename it aside and create their own: exactly one holds it."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    stale = {"lease_id": "dead", "run_id": "killed", "host": "elsewhere", "pid": 1, "renewed_at": time.time() - 600}
    outcomes = []
    for _ in range(40):
        for p in tmp_path.iterdir():
            p.unlink()
        (tmp_path / "_lease.json").write_text(json.dumps(stale))
        barrier, done, results = ctx.Barrier(2), ctx.Barrier(2), ctx.Queue()
        racers = [ctx.Process(target=_race, args=(str(tmp_path), barrier, done, results)) for _ in range(2)]
        for r in racers:
            r.start()
        for r in racers:
            r.join(timeout=30)
        got = sorted(results.get(timeout=5) for _ in racers)
        holder = json.loads((tmp_path / "_lease.json").read_text())
        assert got.count("won") <= 1, got
        assert holder["lease_id"] != "dead"  # the dead run's lease is gone whatever happened
        outcomes.append(got)
    assert sum(g == ["refused", "won"] for g in outcomes) >= 35, outcomes  # nearly always one wins (never two)
