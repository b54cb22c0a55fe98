"""Prometheus metrics (etl_wsgi/metrics.py): recorded by the framework-free flow, summed over
gunicorn workers by prometheus_client's multiprocess mode, off with ``ETL_METRICS=0``.

Unit tests drive :func:`etl_wsgi.handler.handle` and :func:`etl_wsgi.direct_put.deliver` in this
process (one registry, read as deltas); end-to-end tests scrape a real 2-worker gunicorn.
"""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from etl_wsgi import ETLServer, handler, metrics
from etl_wsgi.direct_put import Attempt, deliver
from etl_wsgi.errors import StreamCut, TransformError
from tests.conftest import GunicornServer
from tests.e2e_support import TIMEOUT, request, wait_for_file
from tests.fake_target import FakeTarget
from tests.test_e2e_ws import OP_BINARY, expect_close, recv, send_task, ws_connect
from tests.test_handler import RecordingStream, call, put

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
OBJ = {"method": "PUT", "route": "/<path>"}


# ---- helpers -------------------------------------------------------------------------------------


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def local(etl: ETLServer) -> Samples:
    """This process's samples (single-process mode: the recorder's own registry)."""
    scraped = handler.metrics_reply(etl)
    assert scraped is not None
    assert isinstance(scraped.body, bytes)
    return parse(scraped.body.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


# ---- unit: the flow records -------------------------------------------------------------------


class Upper(ETLServer):
    def transform(self, data, path, etl_args):
        if data == b"boom":
            raise ValueError("bad")
        return data.upper()


def test_buffered_request_counts_status_bytes_latency(make) -> None:
    etl = make(Upper)
    before = local(etl)
    assert call(etl, put(), io.BytesIO(b"hello")).body == b"HELLO"
    with pytest.raises(TransformError):
        call(etl, put(), io.BytesIO(b"boom"))
    after = local(etl)
    assert delta(before, after, "etl_requests_total", **OBJ, status="200") == 1
    assert delta(before, after, "etl_requests_total", **OBJ, status="500") == 1
    assert delta(before, after, "etl_received_bytes_total", route="/<path>") == 5 + 4
    assert delta(before, after, "etl_sent_bytes_total", route="/<path>") == 5
    assert delta(before, after, "etl_transform_duration_seconds_count", mode="buffered") == 2
    assert value(after, "etl_requests_in_flight") == 0


def test_streamed_reply_is_counted_on_close_with_the_bytes_sent(make, obj) -> None:
    etl = make(RecordingStream)
    obj.write_bytes(b"x" * 10)
    before = local(etl)
    reply = call(etl, put(), io.BytesIO(b"hello world"))
    assert (
        value(local(etl), "etl_requests_in_flight") == value(before, "etl_requests_in_flight") + 1
    )
    chunks = iter(reply.body)
    first = next(chunks)  # the client reads one chunk, then goes away
    reply.body.close()  # type: ignore[union-attr]
    after = local(etl)
    assert delta(before, after, "etl_requests_total", **OBJ, status="200") == 1
    assert delta(before, after, "etl_sent_bytes_total", route="/<path>") == len(first)
    assert delta(before, after, "etl_received_bytes_total", route="/<path>") == len(first)
    assert delta(before, after, "etl_transform_duration_seconds_count", mode="streaming") == 1
    assert value(after, "etl_requests_in_flight") == value(before, "etl_requests_in_flight")


def test_stream_cut_after_the_status_line_is_counted_as_aborted(make) -> None:
    etl = make(RecordingStream)
    etl.fail = True  # type: ignore[attr-defined]
    before = local(etl)
    reply = call(etl, put(), io.BytesIO(b"hello"))
    chunks = iter(reply.body)
    next(chunks)
    with pytest.raises(StreamCut):
        next(chunks)
    reply.body.close()  # type: ignore[union-attr]
    after = local(etl)
    assert delta(before, after, "etl_requests_total", **OBJ, status="aborted") == 1
    assert delta(before, after, "etl_requests_total", **OBJ, status="200") == 0


def test_direct_put_outcomes_and_retries_are_counted(make) -> None:
    etl = make(Upper)
    rec = metrics.recorder(etl.settings)
    calls: list[int] = []

    def send(url: str, body: bytes, headers: dict[str, str]) -> requests.Response:
        calls.append(1)
        if len(calls) == 1:
            raise requests.ConnectionError("reset by peer")
        resp = requests.Response()
        resp.status_code = 204
        resp.headers["Ais-Direct-Put-Length"] = "5"
        resp.raw = io.BytesIO(b"")
        return resp

    def put_once(retries: int) -> object:
        calls.clear()
        return deliver(
            send,
            "http://h/x",
            "http://h",
            "",
            lambda: Attempt(b"HELLO"),
            retries=retries,
            replayable=True,
            sleep=lambda s: None,
            recorder=rec,
        )

    before = local(etl)
    put_once(retries=1)
    with pytest.raises(Exception, match="transient"):
        put_once(retries=0)
    after = local(etl)
    assert delta(before, after, "etl_direct_put_total", outcome="delivered") == 1
    assert delta(before, after, "etl_direct_put_total", outcome="exhausted") == 1
    assert delta(before, after, "etl_direct_put_retries_total") == 1
    assert delta(before, after, "etl_direct_put_sent_bytes_total") == 5


def test_metrics_off_records_nothing_and_serves_404(make) -> None:
    etl = make(Upper, ETL_METRICS="0")
    assert metrics.recorder(etl.settings) is metrics.NULL
    assert handler.metrics_reply(etl) is None
    from etl_wsgi.app import create_app

    client = create_app(etl).test_client()
    resp = client.get("/metrics")
    assert resp.status_code == 404
    assert resp.json == {"error": "metrics are disabled (ETL_METRICS)"}


def test_batched_recorder_writes_when_quiet_or_on_its_timer() -> None:
    """Under gevent increments are batched: written when the worker goes quiet, when it takes
    its first request, by a timer while busy, and before a scrape (metrics.py module doc)."""
    from prometheus_client import generate_latest

    timers: list[tuple[float, Callable[[], None]]] = []
    rec = metrics.Recorder("", batched=True, schedule=lambda s, fn: timers.append((s, fn)))

    def written() -> Samples:  # what a scrape of the files would see, without flushing
        return parse(generate_latest(rec.registry).decode())

    first = rec.start("PUT", "/<path>")
    assert value(written(), "etl_requests_in_flight") == 1  # a quiet worker's first: at once
    second = rec.start("PUT", "/<path>")
    first.bytes_in = 5
    first.finish(200, 7)
    assert value(written(), "etl_requests_total", **OBJ, status="200") == 0  # busy: batched
    assert value(written(), "etl_requests_in_flight") == 1
    rec.direct_put_retry()
    assert [s for s, _ in timers] == [metrics.FLUSH_SECONDS]  # one timer for the batch
    timers.pop()[1]()
    samples = written()
    assert value(samples, "etl_requests_total", **OBJ, status="200") == 1
    assert value(samples, "etl_received_bytes_total", route="/<path>") == 5
    assert value(samples, "etl_sent_bytes_total", route="/<path>") == 7
    assert value(samples, "etl_direct_put_retries_total") == 1
    assert value(samples, "etl_requests_in_flight") == 1

    rec.request("GET", "/health", 200)
    assert len(timers) == 1  # a new batch, a new timer
    second.finish(500)  # the last in flight: the worker is quiet, everything is written now
    samples = written()
    assert value(samples, "etl_requests_total", **OBJ, status="500") == 1
    assert value(samples, "etl_requests_total", method="GET", route="/health", status="200") == 1
    assert value(samples, "etl_requests_in_flight") == 0
    timers.pop()[1]()  # a timer firing with nothing pending changes nothing
    assert written() == samples

    rec.start("PUT", "/<path>")
    rec.start("PUT", "/<path>").finish(200)
    assert value(written(), "etl_requests_total", **OBJ, status="200") == 1
    scraped = rec.exposition()  # a scrape writes this worker's batch first
    assert scraped is not None
    assert value(parse(scraped[0].decode()), "etl_requests_total", **OBJ, status="200") == 2


def test_batched_histogram_writes_what_observe_would() -> None:
    """Transform times are batched too: after a flush the buckets and the sum are exactly what
    prometheus_client's own ``observe`` gives for the same times."""
    from prometheus_client import generate_latest

    times = [0.0, 0.0004, 0.001, 0.0011, 0.3, 59.9, 61.0, 3600.0]
    direct = metrics.Recorder("", batched=False)
    batched = metrics.Recorder("", batched=True, schedule=lambda s, fn: None)
    busy = batched.start("PUT", "/<path>")  # in flight: nothing is written before the flush
    for seconds in times:
        direct.transform_time("buffered", seconds)
        batched.transform_time("buffered", seconds)
    pending = parse(generate_latest(batched.registry).decode())
    assert value(pending, "etl_transform_duration_seconds_count", mode="buffered") == 0
    busy.finish(200)  # quiet again: written
    observed = parse(generate_latest(direct.registry).decode())
    written = parse(generate_latest(batched.registry).decode())
    histogram = {k: v for k, v in observed.items() if "transform_duration" in k[0]}
    assert histogram  # buckets, count, sum (and _created)
    for key, expected in histogram.items():
        if not key[0].endswith("_created"):
            assert written[key] == pytest.approx(expected), key


# ---- end-to-end: two gunicorn workers ----------------------------------------------------------


def scrape(server: GunicornServer) -> Samples:
    status, headers, body = request(server, "GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    return parse(body.decode())


def put_many(server: GunicornServer, pool: ThreadPoolExecutor, start: int, n: int) -> list[bytes]:
    """``n`` PUTs, each on its own connection, many at once: both workers get some."""

    def one(i: int) -> bytes:
        status, _, body = request(server, "PUT", f"/b/o{i}", f"obj-{i}".encode())
        assert status == 200, body
        return body

    return list(pool.map(one, range(start, start + n)))


def wait_for_workers(server: GunicornServer, count: int, gone: int = 0) -> set[int]:
    """The master's ``count`` worker pids, once it has them all (and none is ``gone``)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        pids = server.worker_pids()
        if len(pids) == count and gone not in pids:
            return set(pids)
        time.sleep(0.05)
    raise AssertionError(f"no {count} workers (without {gone}) within {TIMEOUT}s")


def test_counters_sum_over_workers_and_survive_a_killed_worker(
    serve: Callable[..., GunicornServer], tmp_path: Path
) -> None:
    server = serve("transformers:Gate", workers=2, ETL_TRANSFORM_EXECUTOR="inline")
    pids = wait_for_workers(server, 2)  # /health answered: one is up, the other may be forking
    replies: list[bytes] = []
    with ThreadPoolExecutor(16) as pool:
        for _ in range(40):  # bounded: stop once both workers have answered
            replies += put_many(server, pool, len(replies), 32)
            if {int(r.split(b":")[0]) for r in replies} == pids:
                break
    seen = {int(r.split(b":")[0]) for r in replies}
    assert seen == pids, "requests never reached both workers"
    total, sent = len(replies), sum(len(r) for r in replies)
    received = sum(len(f"obj-{i}") for i in range(total))

    for _ in range(3):  # whichever worker answers the scrape, it reports every worker's counts
        samples = scrape(server)
        assert value(samples, "etl_requests_total", **OBJ, status="200") == total
        assert value(samples, "etl_received_bytes_total", route="/<path>") == received
        assert value(samples, "etl_sent_bytes_total", route="/<path>") == sent
        assert value(samples, "etl_transform_duration_seconds_count", mode="buffered") == total
        assert value(samples, "etl_requests_in_flight") == 0

    # A request in flight on one worker, which is then killed: its counts stay, and its
    # in-flight gauge goes with it (the master's child_exit hook: mark_process_dead).
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(request, server, "PUT", f"/b/held?etl_args={tmp_path}", b"x")
        victim = int(wait_for_file(tmp_path / "started-b_held"))
        assert victim in pids
        assert value(scrape(server), "etl_requests_in_flight") == 1
        os.kill(victim, signal.SIGKILL)
        with pytest.raises((ConnectionError, OSError)):
            held.result(TIMEOUT)
    (newcomer,) = wait_for_workers(server, 2, gone=victim) - pids
    samples = scrape(server)
    assert value(samples, "etl_requests_in_flight") == 0
    assert value(samples, "etl_requests_total", **OBJ, status="200") == total
    assert value(samples, "etl_sent_bytes_total", route="/<path>") == sent

    # Until the new worker answers too (it is then fully booted: a signal sent to a worker
    # still booting is lost by gunicorn, and the teardown's SIGQUIT would wait it out).
    more: list[bytes] = []
    with ThreadPoolExecutor(8) as pool:
        for _ in range(40):
            more += put_many(server, pool, total + len(more), 16)
            if newcomer in {int(r.split(b":")[0]) for r in more}:
                break
    assert newcomer in {int(r.split(b":")[0]) for r in more}
    samples = scrape(server)
    assert value(samples, "etl_requests_total", **OBJ, status="200") == total + len(more)
    assert value(samples, "etl_sent_bytes_total", route="/<path>") == sent + sum(map(len, more))
    assert value(samples, "etl_requests_total", method="GET", route="/health", status="200") >= 1
    assert '"PUT /b/o' not in server.log()  # no access log by default


def test_metrics_off_end_to_end(serve: Callable[..., GunicornServer], tmp_path: Path) -> None:
    """``ETL_METRICS=0``: 404, and no worker writes a metrics file (even into a given dir)."""
    stale = tmp_path / "counter_1.db"
    stale.write_bytes(b"")
    server = serve("transformers:Gate", ETL_METRICS="0", PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    assert request(server, "PUT", "/b/o", b"abc")[0] == 200
    status, _, body = request(server, "GET", "/metrics")
    assert status == 404
    assert b"ETL_METRICS" in body
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_1.db"]  # untouched
    assert "metrics off" in server.log()


def test_given_multiproc_dir_is_wiped_and_used(
    serve: Callable[..., GunicornServer], tmp_path: Path, fake_target: FakeTarget
) -> None:
    stale = tmp_path / "counter_999999.db"
    stale.write_bytes(b"garbage from a previous run")
    server = serve("transformers:Gate", PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    assert request(server, "PUT", "/b/o", b"abc")[0] == 200
    assert value(scrape(server), "etl_requests_total", **OBJ, status="200") == 1
    assert not stale.exists()
    assert any(p.name.startswith("counter_") for p in tmp_path.iterdir())


def test_websocket_tasks_are_counted_under_ws(serve: Callable[..., GunicornServer]) -> None:
    """The same flow records WebSocket tasks (route ``/ws``), including a failed one."""
    server = serve("transformers:Upper")
    with ws_connect(server) as ws:
        send_task(ws, {"path": "b/a"}, b"abc")
        assert recv(ws) == (OP_BINARY, b"ABC")
        send_task(ws, {"path": "b/boom"}, b"boom")
        assert expect_close(ws) == (1011, "bad")
    samples = scrape(server)
    ws_route = {"method": "PUT", "route": "/ws"}
    assert value(samples, "etl_requests_total", **ws_route, status="200") == 1
    assert value(samples, "etl_requests_total", **ws_route, status="500") == 1
    assert value(samples, "etl_received_bytes_total", route="/ws") == 3 + 4
    assert value(samples, "etl_sent_bytes_total", route="/ws") == 3
    assert value(samples, "etl_requests_in_flight") == 0
