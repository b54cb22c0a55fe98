"""Transformers for the end-to-end tests (gunicorn workers import them as ``transformers:X``)."""

from __future__ import annotations

import argparse
import sys

from etl_wsgi import ETLServer, FlaskServer


def _read(data):
    if isinstance(data, str):  # ETL_DIRECT_FQN: we get the path
        with open(data, "rb") as f:
            return f.read()
    return data


class Upper(ETLServer):
    """Buffered upper-case; raises ValueError('bad') on the input b'boom'."""

    def transform(self, data, path, etl_args):
        data = _read(data)
        if data == b"boom":
            raise ValueError("bad")
        return data.upper()


class Echo(ETLServer):
    def transform(self, data, path, etl_args):
        return _read(data)


class Inspect(ETLServer):
    """Replies with what transform() received: type of data, path, etl_args."""

    def transform(self, data, path, etl_args):
        kind = "str:" + data if isinstance(data, str) else "bytes:" + data.decode("latin-1")
        return f"{kind}|{path}|{etl_args}".encode()


class UpperStream(ETLServer):
    """Streaming upper-case in 64 KiB chunks."""

    def transform_stream(self, reader, path, etl_args):
        while True:
            chunk = reader.read(65536)
            if not chunk:
                break
            yield chunk.upper()


class StreamFailFirst(ETLServer):
    """Streaming transform that raises before producing any chunk."""

    def transform_stream(self, reader, path, etl_args):
        raise ValueError("bad stream")
        yield b""  # pragma: no cover


def _exit_as_asked(etl_args):
    """What ``Exits*`` do for ``etl_args``: ``sys.exit(N)`` for a number N, ``KeyboardInterrupt``
    for ``interrupt``, argparse's exit on an unknown option for ``--bogus``; nothing otherwise."""
    if etl_args == "interrupt":
        raise KeyboardInterrupt
    if etl_args.startswith("--"):
        argparse.ArgumentParser(prog="exits").parse_args(etl_args.split())  # SystemExit(2)
    if etl_args:
        sys.exit(int(etl_args))


class Exits(ETLServer):
    """Buffered upper-case, unless ``etl_args`` asks to exit (:func:`_exit_as_asked`)."""

    def transform(self, data, path, etl_args):
        _exit_as_asked(etl_args)
        return _read(data).upper()


class ExitsStream(ETLServer):
    """Streaming upper-case (a generator), exiting before its first chunk if asked."""

    def transform_stream(self, reader, path, etl_args):
        _exit_as_asked(etl_args)
        yield reader.read().upper()


class ExitsStreamCall(ETLServer):
    """Streaming upper-case from a plain function: exits when called, before any iterator."""

    def transform_stream(self, reader, path, etl_args):
        _exit_as_asked(etl_args)
        return iter([reader.read().upper()])


class StreamReads3(ETLServer):
    """Reads only 3 bytes of the input and stops (keep-alive must survive)."""

    def transform_stream(self, reader, path, etl_args):
        yield reader.read(3).upper()


class UpperFlask(FlaskServer):
    def transform(self, data, path, etl_args):
        return _read(data).upper()


def make_flask_app():
    """A FlaskServer subclass instance's .app, as ported ais-etl code exposes it."""
    return UpperFlask().app


# ---- streaming probes (tests/test_e2e_streaming.py) ------------------------------------------


class StreamFailMid(ETLServer):
    """Streaming: yields four 64 KiB chunks of ``A``, then raises (the body must be cut)."""

    def transform_stream(self, reader, path, etl_args):
        for _ in range(4):
            yield b"A" * 65536
        raise ValueError("bad mid-stream")


def _write_marker(directory, name, text):
    """Create ``directory/name`` atomically (write a temp file, rename), so pollers see it whole."""
    import os

    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(directory, name))


class CloseProbe(ETLServer):
    """Streaming probe for "the reader is closed on every path" (PROTOCOL.md §5).

    ``etl_args`` is a directory the test owns.  The transform reads the whole input, creates
    ``started``, then waits (bounded, 30 s) for a file ``release`` holding ``N`` or ``N!``: it
    yields the upper-cased input, then N chunks of 64 KiB of ``F``; with ``!`` it raises
    ``ValueError`` instead of finishing (``0!``: before the first chunk).  Every
    ``close_reader`` call appends ``closed=<reader.closed>`` to ``closed.log``, then creates
    ``closed``.
    """

    def transform_stream(self, reader, path, etl_args):
        import os
        import time

        self._dirs = getattr(self, "_dirs", {})
        self._dirs[id(reader)] = etl_args
        data = reader.read()
        _write_marker(etl_args, "started", path)
        release = os.path.join(etl_args, "release")
        deadline = time.monotonic() + 30
        while not os.path.exists(release):
            if time.monotonic() > deadline:
                raise TimeoutError("CloseProbe was never released")
            time.sleep(0.01)  # gevent-patched in the worker: cooperative
        with open(release) as f:
            plan = f.read().strip()
        fail = plan.endswith("!")
        filler = int(plan.rstrip("!") or 0)
        if fail and filler == 0:
            raise ValueError("probe failed before the first chunk")
        yield data.upper()
        for _ in range(filler):
            yield b"F" * 65536
        if fail:
            raise ValueError("probe failed mid-stream")

    def close_reader(self, reader):
        import os

        ETLServer.close_reader(reader)
        directory = getattr(self, "_dirs", {}).pop(id(reader), None)
        if directory is None:
            return
        with open(os.path.join(directory, "closed.log"), "a") as f:
            f.write(f"closed={reader.closed}\n")
        _write_marker(directory, "closed", "1")


class SlowUpper(ETLServer):
    """Buffered upper-case after a 0.2 s cooperative sleep (gevent patches ``time.sleep``)."""

    def transform(self, data, path, etl_args):
        import time

        time.sleep(0.2)
        return _read(data).upper()


class CpuBound(ETLServer):
    """Holds the GIL in pure Python for ``etl_args`` seconds (default 0.3), then upper-cases."""

    def transform(self, data, path, etl_args):
        import time

        end = time.perf_counter() + float(etl_args or 0.3)
        n = 0
        while time.perf_counter() < end:
            n += sum(range(1000))
        return _read(data).upper()


def _os_thread() -> int:
    """The OS thread's id (``threading.get_ident`` is the greenlet's under gevent)."""
    try:
        from gevent.monkey import get_original

        return get_original("threading", "get_ident")()
    except ImportError:  # pragma: no cover - gevent is installed with etl-wsgi
        import threading

        return threading.get_ident()


_LOOP_THREAD = _os_thread()  # imported by the worker, in its event loop's thread


class WhereAmI(ETLServer):
    """Answers ``inline`` (event loop's thread) or ``pool``.

    ``etl_args``: seconds to spin the CPU first, or ``block:<seconds>`` to hold the thread in
    an unpatched (OS-level, not yielding) sleep.
    """

    def transform(self, data, path, etl_args):
        import time

        if etl_args and etl_args.startswith("block:"):
            from gevent.monkey import get_original

            get_original("time", "sleep")(float(etl_args[6:]))
            etl_args = None
        end = time.perf_counter() + float(etl_args or 0)
        while time.perf_counter() < end:
            pass
        return b"inline" if _os_thread() == _LOOP_THREAD else b"pool"


class GcFrozen(ETLServer):
    """Answers how many objects the worker's garbage collector has frozen (``gc.freeze``)."""

    def transform(self, data, path, etl_args):
        import gc

        return str(gc.get_freeze_count()).encode()


class WorkerTuned(ETLServer):
    """Answers which of etl_wsgi's worker patches are in gunicorn (``post_worker_init``)."""

    def transform(self, data, path, etl_args):
        from gunicorn import util
        from gunicorn.http import message, wsgi

        from etl_wsgi import reply_writes, worker_tuning

        if etl_args:  # write it to the wsgi.errors a request of this worker gets
            wsgi.base_environ(worker_tuning._worker_cfg)["wsgi.errors"].write(etl_args + "\n")
        return " ".join(
            name
            for name, installed in (
                ("peer-verdicts", message._ip_in_allow_list is worker_tuning.ip_in_allow_list),
                ("one-send", getattr(wsgi.Response, "one_send", False)),
                ("date", util.http_date is reply_writes.http_date),
                ("environ", wsgi.base_environ is worker_tuning.base_environ),
            )
            if installed
        ).encode()


class MarkedSleep(ETLServer):
    """Writes ``<dir>/started`` then sleeps: ``etl_args`` = ``<dir>,<seconds>``."""

    def transform(self, data, path, etl_args):
        import time

        directory, seconds = etl_args.split(",")
        _write_marker(directory, "started", "1")
        time.sleep(float(seconds))
        return _read(data).upper()


# ---- gated probes (tests/test_metrics.py, tests/test_shutdown.py, tests/test_logging.py) ------


def _wait_for_release(directory, seconds=60):
    """Poll (cooperatively under gevent, bounded) until the test creates ``directory/release``."""
    import os
    import time

    release = os.path.join(directory, "release")
    deadline = time.monotonic() + seconds
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.01)


class Gate(ETLServer):
    """Buffered: replies ``<worker pid>:`` + the upper-cased input.

    With ``etl_args`` = a directory the test owns, it first creates ``started-<path>`` (``/``
    replaced by ``_``) holding the worker's pid, then waits for ``release`` (bounded, 60 s):
    the test decides when the request may finish.
    """

    def transform(self, data, path, etl_args):
        import os

        if etl_args:
            _write_marker(etl_args, "started-" + path.replace("/", "_"), str(os.getpid()))
            _wait_for_release(etl_args)
        return f"{os.getpid()}:".encode() + _read(data).upper()


class GateStream(ETLServer):
    """Streaming: yields the upper-cased input at once, then (once that chunk is out) creates
    ``<etl_args>/started-<path>``, waits for ``<etl_args>/release`` and yields 16 chunks of
    64 KiB of ``F``.
    """

    def transform_stream(self, reader, path, etl_args):
        import os

        yield reader.read().upper()
        _write_marker(etl_args, "started-" + path.replace("/", "_"), str(os.getpid()))
        _wait_for_release(etl_args)
        for _ in range(16):
            yield b"F" * 65536
