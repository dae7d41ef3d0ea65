"""One run at a time per output directory: a lease file, created atomically, kept alive by a heartbeat.

`_lease.json` names its holder (run id, host, process) and when it was last renewed.
A run creates it before it touches anything in the directory (temporaries, overwrite)
and deletes it after its manifest. A second run finds it and is refused, naming the
holder, unless the holder is dead: a process of this host that no longer exists, or a
lease not renewed for `output.lease_timeout_s`; then the lease is taken over.

Creation is atomic where the filesystem allows it: an exclusive create on local disks
(and network filesystems that honour O_EXCL). Object stores reached through pyarrow
offer no conditional put, so there the lease is written, read back and checked after
a pause, and the heartbeat stops a run whose lease was taken (a narrow window remains
when two runs start within the same second).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from runner.errors import ConfigError, JobFailedError
from runner.store.output import OutputDir

log = logging.getLogger(__name__)

LEASE = "_lease.json"
SETTLE_S = 1.0  # object stores: how long to wait before reading back a lease just written
STALE_FILE_S = 5.0  # a lease moved aside and not renewed for this long is removed


@dataclass
class Lease:
    out: OutputDir
    holder: dict[str, Any]
    timeout_s: float
    lost: str | None = None  # why the lease is no longer ours (another run took it over)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def check(self) -> None:
        """Raise when another run has taken the directory over (this run must stop writing)."""
        if self.lost:
            raise JobFailedError(self.lost)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        theirs = _read(self.out)
        if theirs is not None and theirs.get("lease_id") == self.holder["lease_id"]:
            try:
                self.out.fs.delete_file(self.out.join(LEASE))
            except (OSError, pa.ArrowException) as e:
                log.warning("could not remove %s: %s", LEASE, e)

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            theirs = _read(self.out)
            if theirs is None:  # unreadable this moment (being replaced): look again at the next beat
                continue
            if theirs.get("lease_id") != self.holder["lease_id"]:
                self.lost = (
                    f"another run took over {self.out.display} ({describe(theirs)}); this run stops. "
                    "Only one run may write to an output directory at a time"
                )
                log.error(self.lost)
                return
            self.holder["renewed_at"] = time.time()
            try:
                _write(self.out, self.holder)
            except (OSError, pa.ArrowException) as e:  # transient: the next beat tries again
                log.warning("could not renew the lease on %s: %s", self.out.display, e)


def acquire(out: OutputDir, run_id: str, timeout_s: float) -> Lease:
    """Hold `out` for this run, or raise ConfigError naming the live run that holds it."""
    me = {
        "lease_id": uuid.uuid4().hex,
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_namespace": _pid_namespace(),
        "started_at": time.time(),
        "renewed_at": time.time(),
        "timeout_s": timeout_s,
    }
    for _ in range(3):
        if _create(out, me):
            break
        theirs = _read(out)
        if theirs is None:  # released, being written, or left empty by a crash while it was created
            if _age_s(out) > timeout_s:
                log.warning("taking over %s: its %s is unreadable and %.0fs old", out.display, LEASE, _age_s(out))
                if _take_over(out, me, None):
                    break
                continue
            time.sleep(0.2)
            continue
        why_dead = _dead(theirs, timeout_s)
        if why_dead is None:
            raise ConfigError(
                [
                    f"output.dir={out.display!r} is in use by another run ({describe(theirs)}). Wait for it to "
                    f"end, stop it, or write elsewhere with output.dir=...; a lease not renewed for "
                    f"{timeout_s:.0f}s (output.lease_timeout_s) is taken over"
                ],
                title="output.dir is in use",
            )
        log.warning("taking over %s from a dead run (%s: %s)", out.display, describe(theirs), why_dead)
        if _take_over(out, me, theirs.get("lease_id")):
            break
    else:
        raise ConfigError([f"output.dir={out.display!r}: could not create {LEASE} there; check the directory"])
    if not isinstance(out.fs, pafs.LocalFileSystem):
        time.sleep(SETTLE_S)
    theirs = _read(out)
    for _ in range(10):  # a rival's takeover may have moved our lease aside for a moment and is putting it back
        if theirs is not None:
            break
        time.sleep(0.05)
        theirs = _read(out)
    if theirs is None or theirs.get("lease_id") != me["lease_id"]:
        raise ConfigError(
            [f"output.dir={out.display!r}: another run took it at the same moment ({describe(theirs or {})})"],
            title="output.dir is in use",
        )
    lease = Lease(out, me, timeout_s)
    lease._thread = threading.Thread(target=lease._beat, name="lease-heartbeat", daemon=True)
    lease._thread.start()
    return lease


def describe(holder: dict[str, Any]) -> str:
    age = time.time() - float(holder.get("renewed_at", 0))
    return (
        f"run {holder.get('run_id', '?')} on {holder.get('host', '?')}, process {holder.get('pid', '?')}, "
        f"lease renewed {age:.0f}s ago"
    )


def _dead(holder: dict[str, Any], timeout_s: float) -> str | None:
    """Why the holder is known to be dead, or None while it may be alive.

    A lease is stale after the longer of the holder's timeout and ours; a process id is only
    checked on the same host and in the same process namespace (not from another container).
    """
    age = time.time() - float(holder.get("renewed_at", 0))
    if age > max(timeout_s, float(holder.get("timeout_s", 0))):
        return f"not renewed for {age:.0f}s"
    if holder.get("host") == socket.gethostname() and holder.get("pid_namespace") == _pid_namespace():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return f"process {holder['pid']} of this host is gone"
        except (PermissionError, KeyError, ValueError):
            pass
    return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _age_s(out: OutputDir) -> float:
    """Seconds since the lease file was last written (0 when it is gone or the store does not say)."""
    info = out.fs.get_file_info(out.join(LEASE))
    if info.type == pafs.FileType.NotFound or info.mtime is None:
        return 0.0
    return time.time() - info.mtime.timestamp()


def _take_over(out: OutputDir, holder: dict[str, Any], stale_id: str | None) -> bool:
    """Replace the dead run's lease `stale_id` (None: an unreadable one); on local disks only one of several
    runs doing this at once wins.

    The stale file is renamed aside, then read: a rival that won meanwhile has put its own lease there,
    and what was moved is then that live lease, which goes back (unless yet another lease is there).
    """
    if not isinstance(out.fs, pafs.LocalFileSystem):
        _write(out, holder)
        return True
    path = out.join(LEASE)
    moved = f"{path}.stale-{uuid.uuid4().hex[:8]}"
    try:  # one rename of the stale file succeeds; the winner then creates its own exclusively
        os.replace(path, moved)
    except FileNotFoundError:
        moved = None
    if moved is not None:
        try:
            with open(moved, "rb") as f:
                found = json.loads(f.read().decode()).get("lease_id")
        except (OSError, ValueError, AttributeError):
            found = None
        if found != stale_id:  # a live lease, taken over a moment ago by a rival: give it back
            try:
                os.link(moved, path)
            except (FileExistsError, FileNotFoundError):
                pass
            try:
                os.remove(moved)
            except FileNotFoundError:
                pass
            return False
        try:
            os.remove(moved)  # the dead run's lease, moved aside by this run
        except FileNotFoundError:
            pass
    for stale in (p for p in os.listdir(out.path) if p.startswith(f"{LEASE}.stale-")):
        try:  # leases moved aside long ago; a live one a rival is putting back was renewed just now
            full = os.path.join(out.path, stale)
            if time.time() - os.stat(full).st_mtime > STALE_FILE_S:
                os.remove(full)
        except OSError:
            pass
    return _create(out, holder)


def _create(out: OutputDir, holder: dict[str, Any]) -> bool:
    """Create the lease file only if there is none; False when one exists."""
    path = out.join(LEASE)
    data = json.dumps(holder).encode()
    if isinstance(out.fs, pafs.LocalFileSystem):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            os.remove(path)  # never leave an empty lease behind (a full disk): it would lock the directory
            raise
        return True
    if out.fs.get_file_info(path).type != pafs.FileType.NotFound:
        return False
    _write(out, holder)
    return True


def _write(out: OutputDir, holder: dict[str, Any]) -> None:
    """Replace the lease file's content in one step (a rename on local disks, one upload on object stores)."""
    path = out.join(LEASE)
    data = json.dumps(holder).encode()
    if isinstance(out.fs, pafs.LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with out.fs.open_output_stream(path) as f:
        f.write(data)


def _read(out: OutputDir) -> dict[str, Any] | None:
    try:
        with out.fs.open_input_stream(out.join(LEASE)) as f:
            return json.loads(f.read().decode())
    except (OSError, pa.ArrowException, ValueError):
        return None
