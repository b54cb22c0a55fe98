"""Prometheus metrics, recorded by the framework-free flow, served at ``GET /metrics``.

Adapter-agnostic: :mod:`etl_wsgi.handler` (every HTTP request and every WebSocket task goes
through ``handle``), :func:`etl_wsgi.direct_put.deliver` and the streaming body's ``close()``
record; an adapter only serves :meth:`Recorder.exposition`.  With ``ETL_METRICS`` off the
recorder is :data:`NULL`: nothing is recorded and the adapter answers ``/metrics`` with 404.

Several gunicorn workers: prometheus_client's multiprocess mode.  Each worker writes its values
to mmap'ed files in ``PROMETHEUS_MULTIPROC_DIR`` (the gunicorn master creates a private one when
unset, :mod:`etl_wsgi.gunicorn_hooks`); a scrape, answered by any worker, sums every file.
Counters of a dead worker stay in the sum (nothing is lost on a restart); its in-flight gauge
files are removed by the master's ``child_exit`` hook (``livesum`` counts live processes only).

prometheus_client is imported lazily, on the first record in a worker: it reads
``PROMETHEUS_MULTIPROC_DIR`` at import, and it imports ``ssl``, which must not be loaded in the
gunicorn master before gevent patches the workers.

Cost per request: a few counter increments and one histogram observation; labels are bounded
(``route`` is the route template - ``/<path>``, ``/ws``, ``/health`` - never the object name).

Under gevent (the gunicorn worker) counter increments, the in-flight gauge and the transform
time histogram's writes (its sum and one bucket, as ``Histogram.observe`` does) are batched per
worker: in multiprocess mode every ``inc()`` takes a lock and writes the mmap'ed file, and the
five writes per request cost about a tenth of a worker at 1 KiB hpush.  A quiet worker writes
at once: when its last request in flight finishes (before the reply is sent), and when it
takes its first.  A busy one writes at most :data:`FLUSH_SECONDS` later (a timer), and a
scrape writes the answering worker's own first; so a scrape sees every finished request of a
worker that has gone quiet, and lags a busy worker by at most :data:`FLUSH_SECONDS`.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from etl_wsgi.concurrency import gevent_active

if TYPE_CHECKING:
    from etl_wsgi.config import Settings

#: Route labels (templates, so the label set stays small).
ROUTE_OBJECT = "/<path>"
ROUTE_WS = "/ws"
ROUTE_HEALTH = "/health"

#: ``status`` label of a streamed reply cut after its status line (the client saw 200 + a cut).
STATUS_ABORTED = "aborted"

#: Longest a busy gevent worker keeps counter increments to itself before writing them.
FLUSH_SECONDS = 0.1

#: Transform latency buckets (seconds): sub-millisecond transforms up to a minute-long object.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Track:
    """One request in flight: :meth:`finish` (once) counts it and leaves the in-flight gauge."""

    __slots__ = ("_done", "_recorder", "bytes_in", "method", "route")

    def __init__(self, recorder: Recorder | None, method: str, route: str) -> None:
        self._recorder = recorder
        self.method = method
        self.route = route
        #: Input bytes of the object, set by the flow once known.
        self.bytes_in = 0
        self._done = recorder is None

    def finish(self, status: int | str, bytes_out: int = 0) -> None:
        if self._done:
            return
        self._done = True
        assert self._recorder is not None
        self._recorder.finished(self, _label(status), bytes_out)


_NULL_TRACK = Track(None, "", "")


def _histogram_parts(child: Any) -> tuple[Any, list[Any], list[float]] | None:
    """A histogram child's sum value, bucket values and upper bounds (the last is +Inf), as
    ``Histogram.observe`` uses them; ``None`` if this prometheus_client keeps them otherwise."""
    total = getattr(child, "_sum", None)
    buckets = getattr(child, "_buckets", None)
    bounds = getattr(child, "_upper_bounds", None)
    if total is None or not isinstance(buckets, list) or not isinstance(bounds, list):
        return None
    if len(buckets) != len(bounds) or not bounds or bounds[-1] != float("inf"):
        return None
    return total, buckets, bounds


def _label(status: int | str) -> str:
    """``"200"``: ``str(HTTPStatus.OK)`` is ``"HTTPStatus.OK"`` on Python 3.10."""
    return status if isinstance(status, str) else str(int(status))


class Recorder:
    """The process's metrics; one instance per process (:func:`recorder`)."""

    enabled = True

    def __init__(
        self,
        multiproc_dir: str,
        batched: bool | None = None,
        schedule: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        """``batched``: default under gevent (see the module doc); ``schedule(seconds, fn)``
        runs ``fn`` later, default ``gevent.spawn_later``; both are overridable for tests."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

        self.multiproc_dir = multiproc_dir
        if values.ValueClass is not values.MutexValue:  # multiprocess mode
            # Every increment checks for a fork with os.getpid(), a system call: a tenth of a
            # worker's CPU at 1 KiB hpush (py-spy). The documented process_identifier hook
            # takes the pid cached at fork instead.
            values.ValueClass = values.MultiProcessValue(process_identifier=_current_pid)
        # A private registry: nothing leaks into prometheus_client's global one (a host app may
        # have its own), and a multiprocess scrape builds a fresh one from the files instead.
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "etl_requests",
            "Requests (HTTP) and WebSocket tasks answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=reg,
        )
        self.bytes_in = Counter(
            "etl_received_bytes",
            "Object input bytes: request body, upstream GET, FQN file or WebSocket data message.",
            ["route"],
            registry=reg,
        )
        self.bytes_out = Counter(
            "etl_sent_bytes",
            "Reply body bytes handed to the server (streamed replies counted as they are sent).",
            ["route"],
            registry=reg,
        )
        self.transform_seconds = Histogram(
            "etl_transform_duration_seconds",
            "Time in the user's transform: the transform() call, or a transform_stream() "
            "generator from its first to its last chunk.",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.direct_puts = Counter(
            "etl_direct_put",
            "Direct puts to the next hop, by outcome (delivered, returned, rejected, refused, "
            "exhausted, bailed, failed).",
            ["outcome"],
            registry=reg,
        )
        self.direct_put_bytes = Counter(
            "etl_direct_put_sent_bytes",
            "Bytes of successful direct puts (what the next hop accepted).",
            registry=reg,
        )
        self.direct_put_retries = Counter(
            "etl_direct_put_retries",
            "Local retries of direct puts after a transient network error.",
            registry=reg,
        )
        self.in_flight = Gauge(
            "etl_requests_in_flight",
            "Requests and WebSocket tasks being processed (summed over live workers).",
            registry=reg,
            multiprocess_mode="livesum",
        )
        #: Labelled children by (metric, label values): ``labels()`` costs more than ``inc()``.
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        #: Transform-time histogram by mode: its child and, batched, :func:`_histogram_parts`.
        self._histograms: dict[str, tuple[Any, tuple[Any, list[Any], list[float]] | None]] = {}
        self._batched = gevent_active() if batched is None else batched
        self._schedule = schedule or _spawn_later
        #: Batched mode: increments not written yet, by child; requests in flight here, and
        #: the last value written to the gauge; whether a timed flush is pending.
        self._pending: dict[Any, float] = {}
        self._busy = 0
        self._busy_written = 0
        self._timer = False

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric, values)
        child = self._children.get(key)
        if child is None:  # label sets are small and bounded (see module doc)
            child = self._children[key] = metric.labels(*values)
        return child

    def _inc(self, child: Any, amount: float = 1) -> None:
        """``child.inc(amount)``, or batched: then the caller ends with :meth:`_settle`."""
        if not self._batched:
            child.inc(amount)
            return
        pending = self._pending
        pending[child] = pending.get(child, 0) + amount

    def _settle(self) -> None:
        """Batched mode: write now if the worker is quiet, else make sure a timer will."""
        if not self._batched:
            return
        if not self._busy:
            self.flush()
        elif not self._timer:
            self._timer = True
            self._schedule(FLUSH_SECONDS, self._timed_flush)

    def _timed_flush(self) -> None:
        self._timer = False
        self.flush()

    def flush(self) -> None:
        """Write batched increments and the in-flight count to the metric files."""
        pending, self._pending = self._pending, {}
        for child, amount in pending.items():
            child.inc(amount)
        if self._busy != self._busy_written:
            self._busy_written = self._busy
            self.in_flight.set(self._busy)

    def start(self, method: str, route: str) -> Track:
        if not self._batched:
            self.in_flight.inc()
        else:
            self._busy += 1
            if self._busy == 1:
                self.flush()  # a quiet worker shows its first request in flight at once
            else:
                self._settle()
        return Track(self, method, route)

    def finished(self, track: Track, status: str, bytes_out: int) -> None:
        if not self._batched:
            self.in_flight.dec()
        else:
            self._busy -= 1
        self._inc(self._child(self.requests, track.method, track.route, status))
        if track.bytes_in:
            self._inc(self._child(self.bytes_in, track.route), track.bytes_in)
        if bytes_out:
            self._inc(self._child(self.bytes_out, track.route), bytes_out)
        self._settle()

    def request(self, method: str, route: str, status: int) -> None:
        """A request answered at once, with no body worth counting (``/health``)."""
        self._inc(self._child(self.requests, method, route, _label(status)))
        self._settle()

    def transform_time(self, mode: str, seconds: float) -> None:
        found = self._histograms.get(mode)
        if found is None:  # once per mode: the child's parts do not change
            child = self._child(self.transform_seconds, mode)
            found = self._histograms[mode] = (
                child,
                _histogram_parts(child) if self._batched else None,
            )
        child, parts = found
        if parts is None:
            child.observe(seconds)
            return
        # Batched like the counters: what Histogram.observe writes (the sum, one bucket).
        total, buckets, bounds = parts
        self._inc(total, seconds)
        self._inc(buckets[bisect_left(bounds, seconds)])
        self._settle()

    def direct_put(self, outcome: str, sent: int = 0) -> None:
        self._inc(self._child(self.direct_puts, outcome))
        if sent:
            self._inc(self.direct_put_bytes, sent)
        self._settle()

    def direct_put_retry(self) -> None:
        self._inc(self.direct_put_retries)
        self._settle()

    def exposition(self) -> tuple[bytes, str] | None:
        """``(body, content type)`` of a scrape: every worker's values in multiprocess mode."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        self.flush()
        registry = self.registry
        if self.multiproc_dir:
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiproc_dir)
        return generate_latest(registry), CONTENT_TYPE_LATEST


def _spawn_later(seconds: float, fn: Callable[[], None]) -> object:
    import gevent

    return gevent.spawn_later(seconds, fn)


class NullRecorder(Recorder):
    """``ETL_METRICS`` off: records nothing, serves nothing, never imports prometheus_client."""

    enabled = False

    def __init__(self) -> None:
        self.multiproc_dir = ""

    def start(self, method: str, route: str) -> Track:
        return _NULL_TRACK

    def request(self, method: str, route: str, status: int) -> None:
        pass

    def transform_time(self, mode: str, seconds: float) -> None:
        pass

    def direct_put(self, outcome: str, sent: int = 0) -> None:
        pass

    def direct_put_retry(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def exposition(self) -> tuple[bytes, str] | None:
        return None


NULL = NullRecorder()

_lock = threading.Lock()
_recorder: Recorder | None = None


def recorder(settings: Settings) -> Recorder:
    """The process's recorder, or :data:`NULL` when ``ETL_METRICS`` is off."""
    if not settings.metrics:
        return NULL
    if _recorder is None:
        return _create(settings.prometheus_multiproc_dir)
    return _recorder


def flush() -> None:
    """Write the process's batched metric updates, if it has a recorder (worker exit)."""
    if _recorder is not None:
        _recorder.flush()


def _create(multiproc_dir: str) -> Recorder:
    global _recorder
    with _lock:
        if _recorder is None:
            _recorder = Recorder(multiproc_dir)
        return _recorder


_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


def _current_pid() -> int:
    """``os.getpid()`` without the system call: cached, refreshed in a forked child."""
    return _pid


def clock() -> float:
    """Monotonic seconds for latencies."""
    return time.perf_counter()
