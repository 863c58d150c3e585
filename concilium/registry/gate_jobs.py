"""Background jobs of the registry: work that registration starts but must not wait for.

Training a PHATGOOSE gate takes seconds to tens of seconds; ``Registry.register`` queues it here
and returns. One daemon thread per registry runs the queue in order (one training at a time, so
registrations never multiply the CPU load) and exits when the queue is empty. ``wait`` lets a CLI
command or a test block until the queue drains. At interpreter exit the queue is dropped and the
running job is asked to stop (``stopping``; a training checks it every step), so the process never
dies with a thread inside torch. Jobs lost that way are found again by
``Registry.train_pending_gates``.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)


class JobQueue:
    """A FIFO of named jobs run by ``work(name)`` on one daemon thread, started on demand."""

    def __init__(self, work: Callable[[str], None], name: str = "concilium-registry-jobs") -> None:
        self._work, self._name = work, name
        self._queue: deque[str] = deque()
        self._cv = threading.Condition()
        self._running: str | None = None
        self._thread: threading.Thread | None = None
        self.stopping = threading.Event()  # set at exit: the running job should return early

    def submit(self, job: str) -> None:
        """Queue ``job`` (a name already queued is not queued twice; a running one is queued
        again: it may be running for a row that was replaced since, and a rerun for a row that
        needs nothing returns at once)."""
        with self._cv:
            if job in self._queue or self.stopping.is_set():
                return
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
                atexit.register(self.close)

    def pending(self) -> list[str]:
        """Jobs queued or running, in order."""
        with self._cv:
            return [*([self._running] if self._running else []), *self._queue]

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued job has run; False if ``timeout`` seconds passed first."""
        with self._cv:
            return self._cv.wait_for(lambda: self._thread is None, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Drop queued jobs, ask the running one to stop, wait for the thread (at most timeout)."""
        with self._cv:
            self.stopping.set()
            self._queue.clear()
        self.wait(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._queue:
                    self._thread, self._running = None, None
                    self._cv.notify_all()
                    atexit.unregister(self.close)
                    return
                self._running = self._queue.popleft()
                job = self._running
            try:
                self._work(job)
            except Exception:  # a job's failure must not stop the queue
                log.exception("background registry job %s failed", job)
