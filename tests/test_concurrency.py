"""Unit tests of etl_wsgi.concurrency: the executor and the memory budget."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import gevent
import pytest
from gevent.event import Event as GreenEvent

from etl_wsgi.concurrency import (
    Executor,
    FairSemaphore,
    InlineGate,
    MemoryBudget,
    MemoryBudgetExceeded,
    _timed_capture,
    gevent_active,
)
from etl_wsgi.config import ConfigError, Settings

TARGET = {"AIS_TARGET_URL": "http://127.0.0.1:9/v1/etl/_object/x/s3cr3tABCD"}


def test_executor_runs_inline_without_gevent() -> None:
    assert not gevent_active()  # the test process is not monkey-patched
    for mode in ("auto", "thread", "inline"):
        ex = Executor(mode, 2)
        assert not ex.offloads
        assert ex.run(lambda a, b: (a, b, threading.get_ident()), 1, 2) == (
            1,
            2,
            threading.get_ident(),
        )


def test_executor_propagates_exceptions() -> None:
    def boom() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        Executor("thread", 2).run(boom)


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), ValueError("bad")])
def test_pool_call_returns_exits_as_values(exc: BaseException) -> None:
    """Raised in a pool thread, a ``SystemExit`` would end the thread and leave the waiting
    greenlet without a result: it comes back as a value, like any failure."""

    def fail() -> None:
        raise exc

    ok, value, cpu = _timed_capture(fail, ())
    assert (ok, value) == (False, exc)
    assert cpu >= 0


def test_budget_admits_within_limit_and_releases() -> None:
    budget = MemoryBudget(100, wait_seconds=0.05)
    assert budget.acquire(60) == 60
    assert budget.acquire(40) == 40
    assert budget.held == 100
    budget.release(40)
    budget.release(60)
    assert budget.held == 0


def test_budget_refuses_after_waiting_with_503_and_retry_after() -> None:
    budget = MemoryBudget(100, wait_seconds=0.2)
    budget.acquire(80)
    start = time.monotonic()
    with pytest.raises(MemoryBudgetExceeded) as info:
        budget.acquire(30)
    assert 0.15 <= time.monotonic() - start < 2
    assert info.value.status == 503
    assert info.value.headers == {"Retry-After": "1"}
    assert "80 of 100 bytes held, 30 more needed" in info.value.message
    assert budget.held == 80


def test_budget_oversized_request_runs_alone() -> None:
    budget = MemoryBudget(100, wait_seconds=0.05)
    assert budget.acquire(500) == 500  # nothing else held: admitted, never starved
    with pytest.raises(MemoryBudgetExceeded):
        budget.acquire(1)
    budget.release(500)
    assert budget.acquire(1) == 1


def test_budget_waiter_is_admitted_when_room_frees() -> None:
    budget = MemoryBudget(100, wait_seconds=5)
    budget.acquire(90)
    admitted = threading.Event()

    def waiter() -> None:
        budget.acquire(50)
        admitted.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    assert not admitted.wait(0.1)
    budget.release(90)
    assert admitted.wait(5)
    thread.join(5)
    assert budget.held == 50


def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` (bounded): a thread has reached the point we wait for."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def test_budget_admits_in_arrival_order_a_newcomer_does_not_overtake() -> None:
    budget = MemoryBudget(100, wait_seconds=5)
    budget.acquire(90)
    admitted: list[str] = []

    def waiter(name: str, size: int) -> None:
        budget.acquire(size)
        admitted.append(name)

    big = threading.Thread(target=waiter, args=("big", 50))
    big.start()
    _wait_until(lambda: len(budget.bytes._waiters) == 1)
    small = threading.Thread(target=waiter, args=("small", 5))  # would fit: 90 + 5 <= 100
    small.start()
    _wait_until(lambda: len(budget.bytes._waiters) == 2)  # ...but queues behind "big"
    assert admitted == []
    budget.release(40)  # room for "big" (50 + 50), then none for "small"
    big.join(5)
    assert admitted == ["big"]
    assert len(budget.bytes._waiters) == 1
    budget.release(50)
    small.join(5)
    assert admitted == ["big", "small"]
    assert budget.held == 55


def test_budget_a_waiter_timing_out_at_the_head_lets_the_next_in() -> None:
    budget = MemoryBudget(100, wait_seconds=5)
    budget.acquire(90)
    budget.wait_seconds = 0.05
    with pytest.raises(MemoryBudgetExceeded):
        budget.acquire(50)  # times out at the head of the queue
    assert budget.acquire(10) == 10  # nobody ahead any more: fits at once
    assert budget.held == 100


def test_zero_size_is_free() -> None:
    budget = MemoryBudget(1, wait_seconds=0.01)
    budget.acquire(1)
    assert budget.acquire(0) == 0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1048576", 1 << 20),
        ("512KiB", 512 << 10),
        ("64MiB", 64 << 20),
        ("2GiB", 2 << 30),
        ("2g", 2 << 30),
        ("1 TiB", 1 << 40),
    ],
)
def test_memory_budget_sizes(raw: str, expected: int) -> None:
    assert Settings.from_env({**TARGET, "ETL_MEMORY_BUDGET": raw}).memory_budget == expected


@pytest.mark.parametrize("raw", ["0", "-1", "lots", "1.5GiB", "2PB", "GiB"])
def test_bad_memory_budget_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match="ETL_MEMORY_BUDGET"):
        Settings.from_env({**TARGET, "ETL_MEMORY_BUDGET": raw})


def test_executor_setting() -> None:
    default = Settings.from_env(TARGET)
    assert default.transform_executor == "auto"
    assert (default.inline_max_bytes, default.inline_max_seconds) == (256 << 10, 0.001)
    assert Settings.from_env({**TARGET, "ETL_TRANSFORM_EXECUTOR": "Inline"}).transform_executor == (
        "inline"
    )
    with pytest.raises(ConfigError, match="ETL_TRANSFORM_EXECUTOR"):
        Settings.from_env({**TARGET, "ETL_TRANSFORM_EXECUTOR": "process"})
    for name, raw in (("ETL_INLINE_MAX_BYTES", "0"), ("ETL_INLINE_MAX_SECONDS", "-1")):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({**TARGET, name: raw})


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_inline_gate_needs_a_streak_of_cheap_small_calls() -> None:
    gate = InlineGate(max_bytes=1000, max_seconds=0.001, streak=3, clock=FakeClock())
    for _ in range(2):
        assert not gate.inline(10)
        gate.observe(0.0005)
    assert not gate.inline(10)
    gate.observe(0.001)  # at the limit is still cheap
    assert gate.inline(10)
    assert gate.inline(1000)
    assert not gate.inline(1001)  # larger inputs never run inline
    assert not gate.inline(None)  # nor inputs of unknown size
    assert (gate.judged(1000), gate.judged(1001), gate.judged(None)) == (True, False, False)


def test_inline_gate_one_slow_pooled_call_sends_the_site_back_for_the_cooldown() -> None:
    clock = FakeClock()
    gate = InlineGate(max_bytes=1000, max_seconds=0.001, streak=2, cooldown=30, clock=clock)
    gate.observe(0)
    gate.observe(0)
    assert gate.inline(10)
    gate.observe(0.0011)
    assert not gate.inline(10)
    gate.observe(0)
    gate.observe(0)  # a new streak, but still cooling down
    assert not gate.inline(10)
    clock.now += 30
    assert gate.inline(10)
    clock.now += 1000
    gate.observe(0.5)
    clock.now += 29.9
    gate.observe(0)
    gate.observe(0)
    assert not gate.inline(10)
    clock.now += 0.1
    assert gate.inline(10)


def test_inline_gate_forgives_one_slow_inline_call_per_cooldown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An outlier (the kernel's softirq work charged to the thread) does not end inline; a
    second slow inline call within the cooldown does, and says so in the log."""
    clock = FakeClock()
    gate = InlineGate(1000, max_seconds=0.001, streak=2, cooldown=30, clock=clock, site="md5")
    gate.observe(0)
    gate.observe(0)
    gate.observe_inline(0.0048, 0.0048)
    assert gate.inline(10)
    clock.now += 30  # a cooldown later: the next outlier is forgiven too
    gate.observe_inline(0.002, 0.002)
    assert gate.inline(10)
    clock.now += 29.9
    with caplog.at_level(logging.INFO, logger="etl_wsgi.concurrency"):
        gate.observe_inline(0.002, 0.002)
    assert not gate.inline(10)
    assert "md5: a second inline call within 30 s took longer than 1.000 ms (2.000 ms)" in (
        caplog.text
    )
    gate.observe(0)
    gate.observe(0)
    clock.now += 30
    assert gate.inline(10)  # earned again after the cooldown
    gate.observe_inline(0.002, 0.002)  # a fresh start: forgiven once more
    assert gate.inline(10)


def test_pool_maxsize_follows_worker_connections() -> None:
    s = Settings.from_env({**TARGET, "ETL_WORKER_CONNECTIONS": "256"})
    assert s.outbound_pool_size == 256
    s = Settings.from_env({**TARGET, "ETL_WORKER_CONNECTIONS": "256", "ETL_POOL_MAXSIZE": "32"})
    assert s.outbound_pool_size == 32


# --- FairSemaphore: hand-offs to the thread pool in arrival order -------------------------------


def test_fair_slots_hand_a_released_slot_to_the_oldest_waiter() -> None:
    """A newcomer acquiring right after a release queues: it does not barge in.

    (gevent's Semaphore gives this order as ["newcomer", "b", "c"].)
    """
    slots = FairSemaphore(1, event=GreenEvent)
    order: list[str] = []

    def waiter(name: str) -> None:
        slots.acquire()
        order.append(name)
        slots.release()

    slots.acquire()
    waiters = [gevent.spawn(waiter, name) for name in "bc"]
    gevent.sleep(0)  # b and c wait, in that order
    slots.release()
    slots.acquire()  # no yield since the release: a newcomer
    order.append("newcomer")
    slots.release()
    gevent.joinall(waiters, timeout=5)
    assert order == ["b", "c", "newcomer"]
    assert slots.held == 0


def test_fair_slots_a_killed_waiter_leaves_the_queue() -> None:
    slots = FairSemaphore(1, event=GreenEvent)
    slots.acquire()
    waiter = gevent.spawn(slots.acquire)
    gevent.sleep(0)
    waiter.kill(block=True, timeout=5)
    slots.release()
    assert slots.held == 0  # nobody was waiting any more: the slot is free again


def test_inline_gate_counts_cpu_not_preemption_but_catches_a_blocked_thread() -> None:
    gate = InlineGate(max_bytes=1000, max_seconds=0.001, streak=1, clock=FakeClock())
    gate.observe(0)
    gate.observe_inline(0.0002, 0.03)  # preempted by the OS for 30 ms: still a cheap call
    assert gate.inline(10)
    gate.observe_inline(0.0002, 0.051)  # held the thread past blocked_seconds (0.05)
    assert gate.inline(10)  # the first slow inline call in a cooldown is forgiven
    gate.observe_inline(0.0002, 0.051)
    assert not gate.inline(10)
    assert InlineGate(1000, max_seconds=0.2).blocked_seconds == 0.2  # never below max_seconds
