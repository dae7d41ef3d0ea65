"""Shard tasks planned in a driver thread while the workers generate: the pool's source of work."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator

from runner.tasks import ShardTask


class TaskFeed:
    """Shard tasks from a `JobStream`, planned in a driver thread while workers generate.

    The queue is bounded, so preparation runs only a little ahead of generation: the object
    store holds a few windows of prepared rows, not the dataset.
    """

    def __init__(self, windows: Iterator[list[ShardTask]], first: list[ShardTask], max_queued: int):
        self._queue: queue.Queue = queue.Queue(max_queued)
        self._ready: deque[ShardTask] = deque(first)
        self._ended = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.finished = False  # every window was planned and queued, without an error
        self._thread = threading.Thread(target=self._fill, args=(windows,), name="runner-planner", daemon=True)
        self._thread.start()

    def _fill(self, windows: Iterator[list[ShardTask]]) -> None:
        try:
            for tasks in windows:
                for task in tasks:
                    while not self._stop.is_set():
                        try:
                            self._queue.put(task, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
            self.finished = True
        except BaseException as e:  # handed to the pool's thread, which raises it
            self._error = e
        finally:
            self._ended.set()

    def next(self) -> ShardTask | None:
        """The next task if one is ready now (None otherwise); raises what the planner raised.

        Once planning has failed no further task is handed out: the job stops with the error.
        """
        if self._error is not None:
            raise self._error
        if self._ready:
            return self._ready.popleft()
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    @property
    def exhausted(self) -> bool:
        """No task is left and none will come (raises what the planner raised instead)."""
        ended = self._ended.is_set()  # read before the error: the planner sets the error, then ends
        if self._error is not None:
            raise self._error
        return ended and not self._ready and self._queue.empty()

    def close(self) -> None:
        self._stop.set()
