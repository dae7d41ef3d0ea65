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
