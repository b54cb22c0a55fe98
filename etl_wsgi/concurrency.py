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


class FairSlots:
    """At most ``n`` holders; waiters served strictly in arrival order.

    A released slot goes straight to the oldest waiter: a newcomer cannot take it first.
    gevent's own semaphores let newcomers barge in (a free slot is grabbed before the woken
    waiter runs), so under load some greenlets waited 100 ms and more for the thread pool
    while others never waited at all.  Used from one thread (the worker's event loop).
    """

    def __init__(self, n: int, event: Callable[[], Any] = threading.Event) -> None:
        self.free = n
        self._event = event  # threading.Event: gevent's in a patched worker
        self._waiters: deque[Any] = deque()

    def acquire(self) -> None:
        if self.free and not self._waiters:
            self.free -= 1
            return
        handed = self._event()
        self._waiters.append(handed)
        try:
            handed.wait()
        except BaseException:  # killed while waiting: give up the place, or the slot
            if handed.is_set():
                self.release()
            else:
                self._waiters.remove(handed)
            raise

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # the slot changes hands, never becomes free
        else:
            self.free += 1


class Executor:
    """Runs blocking calls in a pool of OS threads (``thread``) or inline.

    Offloading uses a gevent ``ThreadPool`` of our own (the hub's also serves DNS lookups),
    entered through :class:`FairSlots`, so hand-offs start in arrival order.
    """

    def __init__(self, mode: str, threads: int) -> None:
        self.mode = mode
        self.threads = threads
        self._pool: Any = None
        self._slots = FairSlots(threads)
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
    """A weighted semaphore over bytes of buffered input held by one worker.

    A request larger than the whole budget is admitted alone (when nothing else is held), so
    it can never wait forever; everything else waits in strict arrival order: freed room goes
    to the oldest waiter first, and a newcomer queues behind waiters even if it would fit (a
    free-for-all let 16 MiB requests wait 6x the median at 256 connections).
    """

    def __init__(self, limit: int, wait_seconds: float) -> None:
        self.limit = limit
        self.wait_seconds = wait_seconds
        self.held = 0
        self._lock = threading.Lock()
        self._waiters: deque[_BudgetWaiter] = deque()

    def acquire(self, size: int) -> int:
        """Reserve ``size`` bytes (waiting up to ``wait_seconds``); returns what to release."""
        size = max(0, size)
        if size == 0:
            return 0
        with self._lock:
            if not self._waiters and self._fits(size):
                self.held += size
                return size
            waiter = _BudgetWaiter(size)
            self._waiters.append(waiter)
        try:
            if waiter.admitted.wait(self.wait_seconds):
                return size
        except BaseException:  # killed while waiting
            self._leave(waiter)
            raise
        with self._lock:
            if waiter.admitted.is_set():  # admitted right at the deadline
                return size
            self._waiters.remove(waiter)
            self._admit()  # it may have been the head holding back smaller ones
            held = self.held
        raise MemoryBudgetExceeded(
            f"worker memory budget exhausted: {held} of {self.limit} bytes held, "
            f"{size} more needed; retry later"
        )

    def release(self, size: int) -> None:
        if size <= 0:
            return
        with self._lock:
            self.held -= size
            self._admit()

    def _leave(self, waiter: _BudgetWaiter) -> None:
        with self._lock:
            if waiter.admitted.is_set():
                self.held -= waiter.size
            else:
                self._waiters.remove(waiter)
            self._admit()

    def _admit(self) -> None:
        """Hand freed room to waiters, oldest first (lock held)."""
        while self._waiters and self._fits(self._waiters[0].size):
            waiter = self._waiters.popleft()
            self.held += waiter.size
            waiter.admitted.set()

    def _fits(self, size: int) -> bool:
        return self.held == 0 or self.held + size <= self.limit


class _BudgetWaiter:
    __slots__ = ("admitted", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.admitted = threading.Event()
