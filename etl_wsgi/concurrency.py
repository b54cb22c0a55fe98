"""Where transforms run, and how much buffered input a worker may hold at once.

* :class:`Executor` - ``ETL_TRANSFORM_EXECUTOR``: ``thread`` runs buffered ``transform()`` calls
  (and FQN file reads) in the gevent hub's pool of real OS threads, so a CPU-bound or blocking
  transform cannot stall the event loop: other requests, ``/health`` (the AIS readiness probe)
  and gunicorn's heartbeat keep running. ``inline`` runs them in the request's greenlet (no
  hand-off cost; right for transforms that are cheap or cooperative). Without gevent (Werkzeug's
  threaded development server) every request has its own thread already and ``thread`` runs
  inline. Streaming transforms always run in the request's greenlet: their reader may be the
  request socket, which belongs to the event loop's thread.
* :class:`MemoryBudget` - ``ETL_MEMORY_BUDGET``: buffered requests reserve their input size
  before reading it; excess requests wait (up to ``ETL_MEMORY_WAIT``) and are then refused with
  ``503`` + ``Retry-After`` instead of taking the worker past its memory.

Only the standard library and, when it is running, gevent.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from etl_wsgi.errors import ETLError

T = TypeVar("T")


def gevent_active() -> bool:
    """True in a gevent-patched process (gunicorn's gevent worker)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def _capture(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
    """``(True, result)`` or ``(False, exception)``: a task's failure as a value."""
    try:
        return True, fn(*args)
    except Exception as exc:
        return False, exc


class FairSemaphore:
    """A weighted semaphore (``limit`` units) whose waiters are served strictly in arrival order.

    Freed units go straight to the oldest waiter, and a newcomer queues behind waiters even
    when it would fit.  gevent's own semaphores (and a ``Condition`` with ``notify_all``) let
    newcomers barge in: under load some greenlets waited round after round (thread-pool
    hand-offs 100 ms and more, 16 MiB buffered requests 6x the median) while others never
    waited.  A request larger than ``limit`` is admitted alone (when nothing is held), so it
    can never wait forever.  ``event`` makes a waiter's event: ``threading.Event``, which is
    gevent's in a patched worker.
    """

    def __init__(self, limit: int, event: Callable[[], Any] = threading.Event) -> None:
        self.limit = limit
        self.held = 0
        self._event = event
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()

    def acquire(self, size: int = 1, timeout: float | None = None) -> bool:
        """Take ``size`` units, waiting up to ``timeout`` seconds (``None``: no limit)."""
        with self._lock:
            if not self._waiters and self._fits(size):
                self.held += size
                return True
            waiter = _Waiter(size, self._event())
            self._waiters.append(waiter)
        try:
            if waiter.admitted.wait(timeout):
                return True
        except BaseException:  # killed while waiting: give up the place, or the units
            self._leave(waiter)
            raise
        with self._lock:
            if waiter.admitted.is_set():  # admitted right at the deadline
                return True
            self._waiters.remove(waiter)
            self._admit()  # it may have been the head holding back smaller ones
        return False

    def release(self, size: int = 1) -> None:
        with self._lock:
            self.held -= size
            self._admit()

    def _leave(self, waiter: _Waiter) -> None:
        with self._lock:
            if waiter.admitted.is_set():
                self.held -= waiter.size
            else:
                self._waiters.remove(waiter)
            self._admit()

    def _admit(self) -> None:
        """Hand freed units to waiters, oldest first (lock held)."""
        while self._waiters and self._fits(self._waiters[0].size):
            waiter = self._waiters.popleft()
            self.held += waiter.size
            waiter.admitted.set()

    def _fits(self, size: int) -> bool:
        return self.held == 0 or self.held + size <= self.limit


class _Waiter:
    __slots__ = ("admitted", "size")

    def __init__(self, size: int, admitted: Any) -> None:
        self.size = size
        self.admitted = admitted


class Executor:
    """Runs blocking calls in a pool of OS threads (``thread``) or inline.

    Offloading uses a gevent ``ThreadPool`` of our own (the hub's also serves DNS lookups),
    entered through a :class:`FairSemaphore`, so hand-offs start in arrival order.
    """

    def __init__(self, mode: str, threads: int) -> None:
        self.mode = mode
        self.threads = threads
        self._pool: Any = None
        self._slots = FairSemaphore(threads)
        self._lock = threading.Lock()

    @property
    def offloads(self) -> bool:
        return self.mode == "thread" and gevent_active()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, in a pool thread when offloading; exceptions propagate unchanged.

        The pool thread returns a failure instead of raising it: gevent's thread pool reports
        an exception raised in a task to the hub, which prints it with a traceback to stderr;
        the request's error mapping logs it once already.
        """
        if not self.offloads:
            return fn(*args)
        pool = self._get_pool()
        self._slots.acquire()
        try:
            ok, value = pool.apply(_capture, (fn, args))
        finally:
            self._slots.release()
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def _get_pool(self) -> Any:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    from gevent.threadpool import ThreadPool

                    self._pool = ThreadPool(self.threads)
        return self._pool


class MemoryBudgetExceeded(ETLError):
    """No room in the worker's memory budget in time -> 503 + ``Retry-After``."""

    status = 503

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class MemoryBudget:
    """Bytes of buffered input one worker holds at once: a :class:`FairSemaphore` over bytes.

    A request larger than the whole budget is admitted alone (when nothing else is held), so
    it can never wait forever; everything else waits in strict arrival order for room, up to
    ``wait_seconds``, then gets :class:`MemoryBudgetExceeded`.
    """

    def __init__(self, limit: int, wait_seconds: float) -> None:
        self.limit = limit
        self.wait_seconds = wait_seconds
        self.bytes = FairSemaphore(limit)

    @property
    def held(self) -> int:
        return self.bytes.held

    def acquire(self, size: int) -> int:
        """Reserve ``size`` bytes (waiting up to ``wait_seconds``); returns what to release."""
        size = max(0, size)
        if size == 0:
            return 0
        if not self.bytes.acquire(size, self.wait_seconds):
            raise MemoryBudgetExceeded(
                f"worker memory budget exhausted: {self.held} of {self.limit} bytes held, "
                f"{size} more needed; retry later"
            )
        return size

    def release(self, size: int) -> None:
        if size > 0:
            self.bytes.release(size)
