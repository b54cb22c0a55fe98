"""End-to-end: CPU-bound transforms off the event loop; the memory budget under overload."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests


def health_latency(url: str) -> float:
    start = time.monotonic()
    resp = requests.get(url + "/health", timeout=30)
    assert (resp.status_code, resp.content) == (200, b"Running")
    return time.monotonic() - start


def busy_health(server, n: int = 6) -> float:
    """Worst /health latency while ``n`` CPU-bound 0.4 s transforms run on the one worker."""
    with ThreadPoolExecutor(n + 1) as pool:
        futures = [
            pool.submit(requests.put, f"{server.url}/o?etl_args=0.4", data=b"hi", timeout=60)
            for _ in range(n)
        ]
        worst = max(health_latency(server.url) for _ in range(5))
        for future in futures:
            resp = future.result()
            assert (resp.status_code, resp.content) == (200, b"HI")
    return worst


@pytest.mark.parametrize("mode", ["thread", "auto"])
def test_thread_and_auto_executors_keep_health_responsive(serve, mode: str) -> None:
    server = serve("transformers:CpuBound", ETL_TRANSFORM_EXECUTOR=mode)
    assert busy_health(server) < 0.5


def where(server, body: bytes = b"x", slow: str = "0") -> bytes:
    resp = requests.put(f"{server.url}/o?etl_args={slow}", data=body, timeout=30)
    assert resp.status_code == 200
    return resp.content


@pytest.mark.parametrize("slow", ["0.01", "block:0.2"])
def test_auto_executor_runs_cheap_small_calls_inline(serve, slow: str) -> None:
    """Threads until 16 cheap calls in a row; then small inputs inline, large ones still not;
    a second call within 30 s that spins the CPU longer than ``ETL_INLINE_MAX_SECONDS``, or
    holds the loop's thread without CPU (an OS-level sleep), sends the transform back to the
    threads (the first is forgiven: one outlier may be the kernel's work, not the call's)."""
    server = serve("transformers:WhereAmI", ETL_INLINE_MAX_BYTES="1KiB")  # auto: the default
    assert [where(server) for _ in range(16)] == [b"pool"] * 16
    assert where(server) == b"inline"
    assert where(server, b"x" * 1024) == b"inline"
    assert where(server, b"x" * 1025) == b"pool"
    assert where(server, slow=slow) == b"inline"  # found slow while inline: forgiven...
    assert [where(server) for _ in range(3)] == [b"inline"] * 3
    assert where(server, slow=slow) == b"inline"  # ...but not twice within 30 s...
    assert [where(server) for _ in range(20)] == [b"pool"] * 20  # ...so threads, for 30 s


def test_thread_executor_never_runs_inline(serve) -> None:
    server = serve("transformers:WhereAmI", ETL_TRANSFORM_EXECUTOR="thread")
    assert {where(server) for _ in range(20)} == {b"pool"}


def test_inline_executor_stalls_health_control(serve) -> None:
    """The control: the same load inline blocks the event loop (so the test above can fail)."""
    server = serve("transformers:CpuBound", ETL_TRANSFORM_EXECUTOR="inline")
    assert busy_health(server) > 0.8


def wait_for(path: Path, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} not created within {seconds}s"
        time.sleep(0.01)


def test_memory_budget_refuses_excess_with_503(serve, tmp_path: Path) -> None:
    server = serve("transformers:MarkedSleep", ETL_MEMORY_BUDGET="1MiB", ETL_MEMORY_WAIT="0.3")
    body = b"x" * (400 << 10)  # reserves 800 KiB: one fits, two do not
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            requests.put, f"{server.url}/a?etl_args={tmp_path},1.5", data=body, timeout=30
        )
        wait_for(tmp_path / "started")
        other = tmp_path / "other"
        other.mkdir()
        start = time.monotonic()
        refused = requests.put(f"{server.url}/b?etl_args={other},0", data=body, timeout=30)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert "memory budget" in refused.json()["error"]
        assert time.monotonic() - start < 1.4  # refused after the wait, not after the first
        assert not (other / "started").exists()  # never admitted
        assert first.result().status_code == 200
    again = requests.put(f"{server.url}/b?etl_args={other},0", data=body, timeout=30)
    assert (again.status_code, again.content) == (200, body.upper())
    assert os.path.exists(other / "started")
