"""A transform that exits (``sys.exit``, argparse, ``KeyboardInterrupt``) gets a 500, and the
worker lives on.

PROTOCOL.md §1.1: the server process must never exit (a restart aborts the ETL); §7: a transform
that raised is a ``500``.  Let through, ``SystemExit`` ends the gevent worker with every request on
it, and gunicorn's master halts the whole server on a worker's exit code 3 or 4.  Each test sends
the failing request, then a good one, to the same single worker, which must still be the same
process.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import GunicornServer
from tests.e2e_support import booted
from tests.fake_target import FakeTarget
from tests.test_e2e_http import Wire, call, node_url
from tests.unit_support import dst

#: etl_args -> the error text of the 500 (tests/transformers.py, ``_exit_as_asked``)
EXITS = {
    "3": "SystemExit: 3",  # gunicorn's WORKER_BOOT_ERROR: the master would halt
    "4": "SystemExit: 4",  # APP_LOAD_ERROR: likewise
    "0": "SystemExit: 0",
    "--bogus": "SystemExit: 2",  # argparse on an unknown option
    "interrupt": "KeyboardInterrupt",
}


@pytest.fixture(scope="module", params=["auto", "thread", "inline"])
def exits(request: pytest.FixtureRequest, module_target: FakeTarget) -> Iterator[GunicornServer]:
    with booted(
        "transformers:Exits", module_target, ETL_TRANSFORM_EXECUTOR=request.param
    ) as server:
        yield server


@pytest.fixture(scope="module", params=["ExitsStream", "ExitsStreamCall"])
def exits_stream(
    request: pytest.FixtureRequest, module_target: FakeTarget
) -> Iterator[GunicornServer]:
    with booted(f"transformers:{request.param}", module_target) as server:
        yield server


def exit_then_work(server: GunicornServer, send: dict[str, str] | None = None) -> list[Wire]:
    """Each exit of :data:`EXITS`, then a good request; the worker is the same throughout."""
    (worker,) = server.worker_pids()
    answers = []
    for etl_args, text in EXITS.items():
        wire = call(server, "PUT", f"/src/a.txt?etl_args={etl_args}", b"hello", send)
        assert (wire.status, wire.error()) == (500, text), etl_args
        answers.append(wire)
        good = call(server, "PUT", "/src/a.txt", b"hello")
        assert (good.status, good.body) == (200, b"HELLO"), etl_args
    assert server.proc.poll() is None
    assert server.worker_pids() == [worker]
    return answers


def test_buffered_transform_exit_is_500(exits: GunicornServer) -> None:
    exit_then_work(exits)


def test_streaming_transform_exit_is_500(exits_stream: GunicornServer) -> None:
    exit_then_work(exits_stream)


def test_transform_exit_before_a_direct_put_sends_nothing(
    exits: GunicornServer, module_target: FakeTarget
) -> None:
    module_target.reset()
    exit_then_work(exits, node_url(dst(module_target)))
    assert module_target.puts == []


def test_streaming_exit_during_a_direct_put_is_not_retried(
    exits_stream: GunicornServer, module_target: FakeTarget
) -> None:
    """The stream is consumed inside the outbound PUT: the exit must be the transform's 500,
    not a network failure to retry.  A PUT may have started before the first chunk was asked
    for: it must be cut (never a complete body), and never sent again."""
    module_target.reset()
    exit_then_work(exits_stream, node_url(dst(module_target)))
    puts = module_target.puts
    assert len(puts) <= len(EXITS)
    assert [p.raw_path for p in puts if p.complete] == []
