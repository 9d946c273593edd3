"""Writing beside the model: encode and write outputs on a thread while the next batch runs.

PNG encoding (Pillow), ``np.save`` and file writes release the GIL, so on a machine with a
spare core the files of one batch are written while the model explains the next. Results come
back in the order the jobs were submitted, so a run's records and manifest do not depend on
thread timing.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class OrderedWriter:
    """Run write jobs on one background thread, at most ``depth`` pending; deliver results in order.

    ``submit(job, on_done)`` queues ``job()``; once it has finished (and every job before it),
    ``on_done(result)`` runs on the submitting thread, inside a later :meth:`submit` or
    :meth:`drain`. An exception raised by a job is re-raised there, so the caller handles it
    exactly as if the job had run inline. With ``depth=0`` jobs run inline (no thread).

    Use as a context manager: leaving it drains what is pending when there was no error, and
    otherwise waits for the running job and drops the rest.
    """

    def __init__(self, depth: int = 16) -> None:
        self.depth = depth
        self._pending: deque[tuple[Future, Callable[[Any], None]]] = deque()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medlens-writer") if depth > 0 else None

    def submit(self, job: Callable[[], Any], on_done: Callable[[Any], None]) -> None:
        if self._pool is None:
            on_done(job())
            return
        self._pending.append((self._pool.submit(job), on_done))
        self._deliver(block_until=self.depth)

    def drain(self) -> None:
        """Wait for every pending job and deliver its result."""
        self._deliver(block_until=0)

    def _deliver(self, block_until: int) -> None:
        while self._pending and (len(self._pending) > block_until or self._pending[0][0].done()):
            future, on_done = self._pending.popleft()
            on_done(future.result())

    def __enter__(self) -> "OrderedWriter":
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        try:
            if kind is None:
                self.drain()
        finally:
            for future, _ in self._pending:
                future.cancel()
            self._pending.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
