"""Where transforms run, and how much buffered input a worker may hold at once.

* :class:`Executor` - ``ETL_TRANSFORM_EXECUTOR``: ``thread`` runs buffered ``transform()`` calls
  (and FQN file reads) in a gevent pool of real OS threads, so a CPU-bound or blocking
  transform cannot stall the event loop: other requests, ``/health`` (the AIS readiness probe)
  and gunicorn's heartbeat keep running. ``inline`` runs them in the request's greenlet (no
  hand-off cost; right for transforms that are cheap or cooperative). ``auto`` (the default)
  runs them in the threads until a call site has shown it is cheap on small inputs
  (:class:`InlineGate`), then those inline. Without gevent (Werkzeug's threaded development
  server) every request has its own thread already and every mode runs inline. Streaming
  transforms always run in the request's greenlet: their reader may be the request socket,
  which belongs to the event loop's thread.
* :class:`MemoryBudget` - ``ETL_MEMORY_BUDGET``: buffered requests reserve their input size
  before reading it; excess requests wait (up to ``ETL_MEMORY_WAIT``) and are then refused with
  ``503`` + ``Retry-After`` instead of taking the worker past its memory.

Only the standard library and, when it is running, gevent.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from etl_wsgi.errors import USER_CODE_FAILURES, ETLError

log = logging.getLogger(__name__)

T = TypeVar("T")


def gevent_active() -> bool:
    """True in a gevent-patched process (gunicorn's gevent worker)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def _timed_capture(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any, float]:
    """``(True, result, cpu)`` or ``(False, exception, cpu)``: a failure as a value.

    ``cpu``: the thread's CPU seconds, what the call would have cost the event loop inline.
    Wall time would also count waits for the GIL, up to the 5 ms switch interval each.
    A ``SystemExit`` is a value too: raised in a pool thread, it would end that thread and leave
    the waiting greenlet without a result.
    """
    started = time.thread_time()
    try:
        return True, fn(*args), time.thread_time() - started
    except USER_CODE_FAILURES as exc:
        return False, exc, time.thread_time() - started


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


class InlineGate:
    """``auto`` mode's judgement of one call site: may its next call of ``size`` run inline?

    Only calls on inputs of at most ``max_bytes`` are judged.  A site earns inline after
    ``streak`` such calls in a row took at most ``max_seconds`` each, counted in CPU time of the
    thread that ran them.  Once inline, a slower call is forgiven if it is the only one in
    ``cooldown`` seconds; a second one within them sends the site back to the threads for
    ``cooldown`` seconds, then it earns inline again.  So a transform that is cheap on small
    inputs stops paying for the hand-off, and one that turns CPU-bound blocks the event loop
    at most twice per cooldown, for one call each.

    Why forgive one: the thread's CPU clock also counts work the kernel does in its context
    (without ``CONFIG_IRQ_TIME_ACCOUNTING``, softirq processing of other sockets' packets is
    charged to whichever thread it interrupted).  Under loopback load a 0.1 ms md5 of 64 KiB
    was once measured at 4.8 ms of CPU, and that single call sent the site to the threads for
    30 s (wrk, hpush md5 64 KiB, 256 connections: 9.8k req/s in that cell, 10.1-10.7k in the
    others).

    CPU time, not wall time: on a busy machine the OS preempts the worker in the middle of
    cheap calls, and wall time sent them to the threads for 30 s at a time (wrk, 64 KiB echo,
    256 connections: 8.3-9.1k req/s against 10.8-11.4k with preemption not counted).  A call
    run inline that holds the loop's thread without using CPU (blocking C code that does not
    yield) is caught by its wall time instead: over ``blocked_seconds`` counts as slow.
    """

    def __init__(
        self,
        max_bytes: int,
        max_seconds: float,
        streak: int = 16,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        blocked_seconds: float = 0.05,
        site: str = "",
    ) -> None:
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.blocked_seconds = max(blocked_seconds, max_seconds)
        self.streak = streak
        self.cooldown = cooldown
        self.clock = clock
        self.site = site
        self._fast = 0
        self._slow_until = 0.0
        self._forgiven_at: float | None = None

    def judged(self, size: int | None) -> bool:
        return size is not None and size <= self.max_bytes

    def inline(self, size: int | None) -> bool:
        return (
            self.judged(size)
            and self._fast >= self.streak
            and (not self._slow_until or self.clock() >= self._slow_until)
        )

    def observe_inline(self, cpu_seconds: float, wall_seconds: float) -> None:
        """One call ran inline: its CPU time counts, unless it held the thread too long."""
        seconds = cpu_seconds if wall_seconds <= self.blocked_seconds else wall_seconds
        self._observe(seconds, ran_inline=True)

    def observe(self, seconds: float) -> None:
        """One call ran in the thread pool, for ``seconds`` (of the pool thread's CPU)."""
        self._observe(seconds, ran_inline=False)

    def _observe(self, seconds: float, ran_inline: bool) -> None:
        if seconds <= self.max_seconds:
            self._fast += 1
            return
        now = self.clock()
        if ran_inline:
            if self._forgiven_at is None or now - self._forgiven_at >= self.cooldown:
                self._forgiven_at = now  # the first slow inline call in a cooldown: forgiven
                return
            log.info(
                "%s: a second inline call within %.0f s took longer than %.3f ms (%.3f ms): "
                "back to the thread pool for %.0f s",
                self.site or "call",
                self.cooldown,
                self.max_seconds * 1e3,
                seconds * 1e3,
                self.cooldown,
            )
        self._fast = 0
        self._forgiven_at = None
        self._slow_until = now + self.cooldown


class Executor:
    """Runs blocking calls in a pool of OS threads (``thread``), inline, or either (``auto``).

    Offloading uses a gevent ``ThreadPool`` of our own (the hub's also serves DNS lookups),
    entered through a :class:`FairSemaphore`, so hand-offs start in arrival order.  A call run
    inline under gevent first lets every other greenlet with I/O ready run (:func:`_yield`): a
    greenlet whose client already sent its next request would otherwise serve it without ever
    giving way (wrk, 64 connections, 1 KiB inline: p99 was 33-75x p50; with the yield about
    3.6x).  ``auto`` asks an :class:`InlineGate` per call site (``site``: transform, FQN read).
    """

    def __init__(
        self,
        mode: str,
        threads: int,
        inline_max_bytes: int = 256 << 10,
        inline_max_seconds: float = 0.001,
    ) -> None:
        self.mode = mode
        self.threads = threads
        self.inline_max_bytes = inline_max_bytes
        self.inline_max_seconds = inline_max_seconds
        self._gates: dict[str, InlineGate] = {}
        self._pool: Any = None
        self._slots = FairSemaphore(threads)
        self._lock = threading.Lock()

    @property
    def offloads(self) -> bool:
        return self.mode != "inline" and gevent_active()

    def gate(self, site: str) -> InlineGate:
        gate = self._gates.get(site)
        if gate is None:
            gate = self._gates[site] = InlineGate(
                self.inline_max_bytes, self.inline_max_seconds, site=site
            )
        return gate

    def run(self, fn: Callable[..., T], *args: Any, site: str = "", size: int | None = None) -> T:
        """``fn(*args)``, in a pool thread when offloading; exceptions propagate unchanged.

        ``site`` and ``size`` (the input's bytes) feed ``auto`` mode's :class:`InlineGate`.
        The pool thread returns a failure instead of raising it: gevent's thread pool reports
        an exception raised in a task to the hub, which prints it with a traceback to stderr;
        the request's error mapping logs it once already.
        """
        if not gevent_active():
            return fn(*args)
        if self.mode == "inline":
            _yield()
            return fn(*args)
        gate = self.gate(site) if self.mode == "auto" else None
        if gate is not None and gate.inline(size):
            _yield()
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args)
            finally:
                gate.observe_inline(time.thread_time() - cpu, time.perf_counter() - started)
        pool = self._get_pool()
        self._slots.acquire()
        try:
            ok, value, seconds = pool.apply(_timed_capture, (fn, args))
        finally:
            self._slots.release()
        if gate is not None and gate.judged(size):
            gate.observe(seconds)
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


def _yield() -> None:
    """Wait until the event loop is idle: every greenlet with I/O ready runs first.

    ``gevent.sleep(0)`` only queues behind the greenlets already runnable; with it, wrk's
    1 KiB c256 p99 still jumped to 10-18x p50 in some runs, with ``idle()`` 2.5-3.3x.
    Only called under gevent.
    """
    import gevent

    gevent.idle()


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
