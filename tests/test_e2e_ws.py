"""End-to-end WebSocket tests: PROTOCOL.md §6, §10 vectors #18-#20, real ``gunicorn -k gevent``.

The client is ``websocket-client``; every assertion is on the wire: opcodes (binary reply, text
"delivered" reply, close frame), payloads, close codes and reasons, and what the fake AIS target
received from a direct put.  The §10 hosts ``10.0.0.x`` are replaced by the fake target on
127.0.0.1.

Design under test (``etl_wsgi/ws.py``): exactly one reply per task, FIFO per connection; a failure
of any kind closes the connection with 1011 (never a success text frame); a streaming transform
reads the data message as it arrives and answers with one fragmented binary message.

Large messages are sent by a sender thread while the test reads the reply: a streaming server
answers while the input still arrives, so a client that only sends would deadlock on full TCP
buffers.  Every wait is bounded by a deadline or a count.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import websocket
from websocket import ABNF

from tests.conftest import GunicornServer
from tests.e2e_support import MIB, TIMEOUT, booted, request, vm_hwm_kib, wait_for_file
from tests.fake_target import SECRET_PATH, FakeTarget, Reply
from tests.unit_support import (
    DST_PATH,
    DST_QUERY,
    FQN_J,
    closed_port,
    dst,
    path_escape,
    write_object,
)

CLOSE_INTERNAL_ERROR = 1011
CLOSE_MESSAGE_TOO_BIG = 1009

OP_TEXT = ABNF.OPCODE_TEXT
OP_BINARY = ABNF.OPCODE_BINARY
OP_CONT = ABNF.OPCODE_CONT
OP_CLOSE = ABNF.OPCODE_CLOSE
OP_PONG = ABNF.OPCODE_PONG


# ---- helpers -----------------------------------------------------------------------------------


def ws_url(server: GunicornServer) -> str:
    return f"ws://127.0.0.1:{server.port}/ws"


@contextmanager
def ws_connect(server: GunicornServer, timeout: float = TIMEOUT) -> Iterator[websocket.WebSocket]:
    """A connection to ``/ws``; closed (close handshake if still open, then the socket) on exit."""
    ws = websocket.create_connection(ws_url(server), timeout=timeout)
    try:
        yield ws
    finally:
        ws.close(timeout=2)  # a no-op when the server closed first: then only shutdown() closes
        ws.shutdown()


def task(control: dict[str, str], data: bytes | None = None) -> list[bytes]:
    """One task's messages (§6.2): JSON control, then the data message unless ``fqn`` is given."""
    return [json.dumps(control).encode()] + ([] if data is None else [data])


def send_task(ws: websocket.WebSocket, control: dict[str, str], data: bytes | None) -> None:
    """Send one task, every message binary."""
    for message in task(control, data):
        ws.send_binary(message)


def recv(ws: websocket.WebSocket) -> tuple[int, bytes]:
    """The next whole message as ``(opcode, payload)``; a close frame is returned, not raised."""
    opcode, data = ws.recv_data()
    return opcode, data.encode() if isinstance(data, str) else bytes(data)


def frames_until_close(
    ws: websocket.WebSocket, max_frames: int = 1000
) -> tuple[list[ABNF], int, str]:
    """Frames up to a close frame: ``(data frames before it, close code, close reason)``.

    Frame level on purpose: the client does not answer the close here (the server may already
    have reset the connection), and a cut fragmented reply shows as fragments without FIN.
    """
    frames: list[ABNF] = []
    for _ in range(max_frames):
        frame = ws.recv_frame()
        if frame.opcode == OP_CLOSE:
            assert len(frame.data) >= 2, frame.data
            return frames, int.from_bytes(frame.data[:2], "big"), frame.data[2:].decode()
        frames.append(frame)
    raise AssertionError(f"no close frame within {max_frames} frames")


def expect_close(ws: websocket.WebSocket) -> tuple[int, str]:
    """The next frame is a close frame (no success reply first): its ``(code, reason)``."""
    frames, code, reason = frames_until_close(ws)
    assert frames == [], [(f.opcode, f.data[:100]) for f in frames]
    return code, reason


def health_ok(server: GunicornServer) -> float:
    """``GET /health`` answers ``200 Running``; returns how long it took."""
    start = time.monotonic()
    resp = requests.get(server.url + "/health", timeout=5)
    elapsed = time.monotonic() - start
    assert (resp.status_code, resp.content) == (200, b"Running")
    return elapsed


def assert_connection_works(server: GunicornServer, text: bytes = b"still alive") -> None:
    """A new connection gets a correct reply, and ``/health`` answers."""
    with ws_connect(server) as ws:
        send_task(ws, {"path": "again"}, text)
        assert recv(ws) == (OP_BINARY, text.upper())
    health_ok(server)


class Background:
    """Run ``fn`` in a daemon thread; :meth:`result` joins (bounded) and re-raises its error."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.error: BaseException | None = None

        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = TIMEOUT) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background thread did not finish"
        if self.error is not None:
            raise self.error


#: 1 MiB with every byte value, lower-case ASCII included (so upper-casing changes it).
BLOCK = bytes(range(256)) * 4096


def frame_data(index: int) -> bytes:
    """Fragment ``index`` of a large message: 1 MiB, distinct per index (its number in front)."""
    return index.to_bytes(8, "big") + BLOCK[8:]


@dataclass
class FragmentedSender:
    """Send one data message as 1 MiB fragments (BINARY, CONT..., final CONT with FIN).

    Sends ``count`` fragments, or, with ``count=None``, until :attr:`stop` is set (bounded by
    ``limit`` fragments).  :attr:`expected` hashes the upper-cased input as it goes.
    """

    ws: websocket.WebSocket
    count: int | None
    limit: int = 4096
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    expected: hashlib._Hash = field(default_factory=hashlib.sha256)

    def __call__(self) -> None:
        total = self.limit if self.count is None else self.count
        for index in range(total):
            if self.count is None and self.stop.is_set():
                break
            data = frame_data(index)
            opcode = OP_BINARY if index == 0 else OP_CONT
            last = self.count is not None and index == total - 1
            self.ws.send_frame(ABNF.create_frame(data, opcode, int(last)))
            self.sent += len(data)
            self.expected.update(data.upper())
        if self.count is None:  # open-ended: an empty final fragment ends the message
            self.ws.send_frame(ABNF.create_frame(b"", OP_CONT, 1))


@dataclass
class FragmentReader:
    """Read one binary message frame by frame: opcodes, fragment count, length and digest."""

    ws: websocket.WebSocket
    max_frames: int = 1 << 20
    received: int = 0
    frames: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    progress: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self) -> None:
        for _ in range(self.max_frames):
            frame = self.ws.recv_frame()
            assert frame.opcode == (OP_BINARY if self.frames == 0 else OP_CONT), frame.opcode
            self.digest.update(frame.data)
            with self.progress:
                self.received += len(frame.data)
                self.frames += 1
                self.progress.notify_all()
            if frame.fin:
                return
        raise AssertionError(f"no final fragment in {self.max_frames} frames")

    def wait_for(self, nbytes: int, timeout: float = TIMEOUT) -> None:
        with self.progress:
            ok = self.progress.wait_for(lambda: self.received >= nbytes, timeout)
        assert ok, f"only {self.received} reply bytes within {timeout}s"


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upper(module_target: FakeTarget) -> Iterator[GunicornServer]:
    """Buffered upper-case, shared by the module (a boot costs about a second)."""
    with booted("transformers:Upper", module_target) as server:
        yield server


@pytest.fixture(scope="module")
def upper_stream(module_target: FakeTarget) -> Iterator[GunicornServer]:
    with booted("transformers:UpperStream", module_target) as server:
        yield server


# ---- §10 vectors 18-20 ---------------------------------------------------------------------------


def test_vector18_control_then_data_one_binary_reply(upper: GunicornServer):
    with ws_connect(upper) as ws:
        send_task(ws, {"etl_args": "x", "path": "hello.txt"}, b"hello")
        assert recv(ws) == (OP_BINARY, b"HELLO")


def test_vector18_transform_gets_path_and_etl_args(serve):
    server = serve("transformers:Inspect")
    with ws_connect(server) as ws:
        send_task(ws, {"etl_args": "x", "path": "hello.txt"}, b"hello")
        assert recv(ws) == (OP_BINARY, b"bytes:hello|hello.txt|x")
        send_task(ws, {"path": "src/a b.txt"}, b"hi")  # etl_args omitted when empty (§6.2)
        assert recv(ws) == (OP_BINARY, b"bytes:hi|src/a b.txt|")


def test_vector19_fqn_task_then_data_task_in_order(upper: GunicornServer, tmp_path: Path):
    assert path_escape("/mp1/@ais/src/%ob/hello.txt") == FQN_J
    fqn_file = write_object(tmp_path / "mp1" / "@ais" / "src" / "%ob" / "hello.txt")
    with ws_connect(upper) as ws:
        send_task(ws, {"fqn": path_escape(fqn_file), "path": "hello.txt"}, None)
        send_task(ws, {"path": "b"}, b"abc")
        assert recv(ws) == (OP_BINARY, b"HELLO")
        assert recv(ws) == (OP_BINARY, b"ABC")


def test_vector20_pipeline_direct_put_replies_text_count(upper: GunicornServer, target: FakeTarget):
    with ws_connect(upper) as ws:
        send_task(ws, {"pipeline": dst(target), "path": "a.txt"}, b"hello")
        assert recv(ws) == (OP_TEXT, b"5")
    (put,) = target.puts
    assert put.raw_path == f"{SECRET_PATH}{DST_PATH}?{DST_QUERY}"
    assert put.body == b"HELLO"
    assert put.header("Ais-Node-Url") is None


def test_pipeline_etl_args_and_remaining_hops(upper: GunicornServer, target: FakeTarget):
    """A stage hop gets the object path, ``etl_args`` and the rest of the pipeline (§4.2)."""
    target.script = [Reply(204, headers={"Ais-Direct-Put-Length": "7"})]
    with ws_connect(upper) as ws:
        send_task(
            ws, {"pipeline": f"{target.url},{dst(target)}", "etl_args": "q", "path": "a.txt"}, b"hi"
        )
        assert recv(ws) == (OP_TEXT, b"7")  # the count the next stage delivered
    (put,) = target.puts
    assert put.raw_path == "/a.txt?etl_args=q"
    assert put.header("Ais-Node-Url") == dst(target)
    assert put.body == b"HI"


def test_pipeline_last_stage_body_comes_back_binary(upper: GunicornServer, target: FakeTarget):
    target.script = [Reply(200, b"HELLO!")]
    with ws_connect(upper) as ws:
        send_task(ws, {"pipeline": target.url, "path": "a.txt"}, b"hello")
        assert recv(ws) == (OP_BINARY, b"HELLO!")
        send_task(ws, {"path": "b"}, b"next")  # the connection goes on
        assert recv(ws) == (OP_BINARY, b"NEXT")
    assert [p.body for p in target.puts] == [b"HELLO"]


# ---- ordering and concurrency ------------------------------------------------------------------


def payload(conn: int, n: int) -> bytes:
    """Task ``n`` of connection ``conn``: varied sizes (0 B to about 20 KiB), lower case."""
    size = (n * 7919 + conn * 104729) % 20000 if n % 10 else n % 3
    return (f"c{conn}t{n}-".encode() * (size // 6 + 1))[:size]


def test_many_tasks_in_flight_replies_in_order(upper: GunicornServer, tmp_path: Path):
    """50 tasks (data and fqn mixed) sent before any reply is read: 50 replies, FIFO (§6.3)."""
    tasks: list[tuple[dict[str, str], bytes | None, bytes]] = []
    for i in range(50):
        if i % 7 == 3:
            fqn_file = tmp_path / f"obj{i}"
            fqn_file.write_bytes(payload(99, i) + b"fqn")
            tasks.append(
                ({"fqn": path_escape(fqn_file), "path": f"o{i}"}, None, fqn_file.read_bytes())
            )
        else:
            tasks.append(({"path": f"o{i}"}, payload(0, i), payload(0, i)))
    assert sum(len(expected) for *_, expected in tasks) < 1 * MIB  # fits in TCP buffers
    with ws_connect(upper) as ws:
        for control, data, _ in tasks:
            send_task(ws, control, data)
        for i, (*_, expected) in enumerate(tasks):
            assert recv(ws) == (OP_BINARY, expected.upper()), f"reply {i}"


def test_many_connections_at_once(upper: GunicornServer):
    """8 connections in threads, 100 tasks each, pipelined in windows of 10."""

    def one_connection(conn: int) -> int:
        with ws_connect(upper) as ws:
            for start in range(0, 100, 10):
                window = range(start, start + 10)
                for n in window:
                    send_task(ws, {"path": f"c{conn}/t{n}"}, payload(conn, n))
                for n in window:
                    assert recv(ws) == (OP_BINARY, payload(conn, n).upper()), (conn, n)
        return conn

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(one_connection, conn) for conn in range(8)]
        assert [f.result(timeout=TIMEOUT) for f in futures] == list(range(8))


# ---- failures close with 1011 ------------------------------------------------------------------


def test_transform_exception_closes_1011_after_earlier_replies(upper: GunicornServer):
    with ws_connect(upper) as ws:
        send_task(ws, {"path": "ok"}, b"hello")
        send_task(ws, {"path": "bad"}, b"boom")  # Upper raises ValueError("bad")
        assert recv(ws) == (OP_BINARY, b"HELLO")
        code, reason = expect_close(ws)
    assert (code, reason) == (CLOSE_INTERNAL_ERROR, "bad")
    assert_connection_works(upper)


@pytest.mark.parametrize("app", ["Exits", "ExitsStream"])
def test_transform_exit_closes_1011_and_the_worker_lives(module_target: FakeTarget, app: str):
    """``sys.exit(3)`` in a transform: 1011, not a dead worker (gunicorn's master would halt on
    a worker's exit code 3; PROTOCOL.md §1.1)."""
    with booted(f"transformers:{app}", module_target) as server:
        (worker,) = server.worker_pids()
        with ws_connect(server) as ws:
            send_task(ws, {"path": "ok"}, b"hello")
            send_task(ws, {"path": "bad", "etl_args": "3"}, b"hello")
            assert recv(ws) == (OP_BINARY, b"HELLO")
            assert expect_close(ws) == (CLOSE_INTERNAL_ERROR, "SystemExit: 3")
        assert_connection_works(server)
        assert server.worker_pids() == [worker]


def test_next_hop_error_status_closes_1011(upper: GunicornServer, target: FakeTarget):
    target.script = [Reply(500, b"disk on fire")]
    with ws_connect(upper) as ws:
        send_task(ws, {"pipeline": dst(target), "path": "a.txt"}, b"hello")
        code, reason = expect_close(ws)  # never a success text frame (§6.3 pitfall)
    assert code == CLOSE_INTERNAL_ERROR
    assert "500" in reason
    assert "disk on fire" in reason
    assert "s3cr3tABCD" not in reason
    assert [p.body for p in target.puts] == [b"HELLO"]
    assert_connection_works(upper)


BAD_PIPELINE = "http://a:1,,http://b:2"


def _existing(tmp_path: Path) -> str:
    (tmp_path / "obj").write_bytes(b"hello")
    return path_escape(tmp_path / "obj")


#: Failures detected before or while transforming: ``messages(tmp_path)``, reason substring.
FAILURES: dict[str, tuple[Callable[[Path], list[bytes]], str]] = {
    "next-hop-refused": (
        lambda _: task({"pipeline": f"http://127.0.0.1:{closed_port()}", "path": "a"}, b"hi"),
        "ConnectionError",
    ),
    "bad-pipeline": (
        lambda _: task({"pipeline": BAD_PIPELINE, "path": "a"}, b"hi"),
        "Invalid pipeline header: Pipeline header contains empty entry",
    ),
    "bad-pipeline-fqn": (  # detected by the reader, before the task is queued
        lambda tmp: task({"pipeline": BAD_PIPELINE, "path": "a", "fqn": _existing(tmp)}),
        "Invalid pipeline header: Pipeline header contains empty entry",
    ),
    "missing-fqn-file": (
        lambda tmp: task({"fqn": path_escape(tmp / "gone"), "path": "src/gone.txt"}),
        "src/gone.txt",
    ),
    "control-not-json": (lambda _: [b"not json"], "not JSON"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failure_closes_1011(upper: GunicornServer, tmp_path: Path, case: str):
    messages, expected_reason = FAILURES[case]
    with ws_connect(upper) as ws:
        for message in messages(tmp_path):
            ws.send_binary(message)
        code, reason = expect_close(ws)
    assert code == CLOSE_INTERNAL_ERROR
    assert expected_reason in reason
    assert_connection_works(upper)


def test_oversized_control_message_closes_1009(upper: GunicornServer):
    """A control message over 1 MiB is refused with 1009 (the server stops reading it)."""
    with ws_connect(upper) as ws:
        control = json.dumps({"path": "x" * MIB}).encode()
        # the server may close before the whole message is in; a failed send is expected then
        sending = Background(lambda: _send_ignoring_reset(ws, control))
        code, reason = expect_close(ws)
        sending.result()
    assert code == CLOSE_MESSAGE_TOO_BIG
    assert "larger than" in reason
    assert_connection_works(upper)


def _send_ignoring_reset(ws: websocket.WebSocket, data: bytes) -> None:
    try:
        ws.send_binary(data)
    except (OSError, websocket.WebSocketConnectionClosedException):
        pass


def test_ping_between_fragments_is_answered(upper: GunicornServer):
    """Control frames may interleave with a fragmented data message (RFC 6455 §5.4)."""
    with ws_connect(upper) as ws:
        ws.send_binary(json.dumps({"path": "p"}).encode())
        ws.send_frame(ABNF.create_frame(b"hel", OP_BINARY, 0))
        ws.ping(b"are you there")
        ws.send_frame(ABNF.create_frame(b"lo", OP_CONT, 1))
        assert ws.recv_data(control_frame=True) == (OP_PONG, b"are you there")
        assert recv(ws) == (OP_BINARY, b"HELLO")


# ---- streaming transformers --------------------------------------------------------------------


def test_stream_failing_mid_reply_cuts_the_message_with_1011(serve):
    """Fragments already sent are never finished: no FIN, then close 1011 (StreamFailMid)."""
    server = serve("transformers:StreamFailMid")
    with ws_connect(server) as ws:
        send_task(ws, {"path": "x"}, b"hello")
        frames, code, reason = frames_until_close(ws)
    assert [(f.opcode, f.fin) for f in frames] == [(OP_BINARY, 0)] + [(OP_CONT, 0)] * (
        len(frames) - 1
    )
    assert 1 <= len(frames) <= 4
    assert all(f.data == b"A" * 65536 for f in frames)
    assert (code, reason) == (CLOSE_INTERNAL_ERROR, "bad mid-stream")
    health_ok(server)


def test_stream_failing_before_first_chunk_closes_1011(serve):
    server = serve("transformers:StreamFailFirst")
    with ws_connect(server) as ws:
        send_task(ws, {"path": "x"}, b"hello")
        assert expect_close(ws) == (CLOSE_INTERNAL_ERROR, "bad stream")
    health_ok(server)


def test_stream_reading_part_of_the_input_leaves_connection_usable(serve):
    """The unread rest of a data message is drained; the next task gets its own reply (§5)."""
    server = serve("transformers:StreamReads3")
    with ws_connect(server) as ws:
        send_task(ws, {"path": "a"}, b"hello" * (MIB // 5))
        send_task(ws, {"path": "b"}, b"abcdef")
        assert recv(ws) == (OP_BINARY, b"HEL")
        assert recv(ws) == (OP_BINARY, b"ABC")


def test_client_gone_mid_message_then_new_connection_works(upper_stream: GunicornServer):
    with ws_connect(upper_stream) as ws:
        ws.send_binary(json.dumps({"path": "cut"}).encode())
        ws.send_frame(ABNF.create_frame(b"a" * MIB, OP_BINARY, 0))
        assert ws.recv_frame().opcode == OP_BINARY  # the transform is under way
        ws.abort()  # no close frame, message unfinished
    assert_connection_works(upper_stream)


# ---- large messages, memory, responsiveness ----------------------------------------------------


def test_256mib_streaming_constant_memory_and_fragmented_reply(serve):
    """256 MiB in 1 MiB fragments through ``transform_stream``: worker peak RSS grows < 64 MiB."""
    server = serve("transformers:UpperStream")
    (pid,) = server.worker_pids()
    with ws_connect(server) as ws:
        send_task(ws, {"path": "warm-up"}, b"warm")  # imports and first allocations
        assert recv(ws) == (OP_BINARY, b"WARM")
        before = vm_hwm_kib(pid)

        ws.send_binary(json.dumps({"path": "big"}).encode())
        sender = FragmentedSender(ws, count=256)
        sending = Background(sender)
        reader = FragmentReader(ws)
        reader()
        sending.result()

        send_task(ws, {"path": "after"}, b"after")  # the connection goes on
        assert recv(ws) == (OP_BINARY, b"AFTER")
    after = vm_hwm_kib(pid)
    assert sender.sent == 256 * MIB
    assert reader.received == sender.sent
    assert reader.digest.hexdigest() == sender.expected.hexdigest()
    assert (after - before) * 1024 < 64 * MIB, f"worker VmHWM grew {after - before} KiB"
    assert reader.frames > 256  # streamed as it came (64 KiB chunks), not one 256 MiB frame


def test_64mib_buffered_echo(serve):
    server = serve("transformers:Echo")
    data = b"".join(frame_data(i) for i in range(64))
    with ws_connect(server) as ws:
        ws.send_binary(json.dumps({"path": "big"}).encode())
        for i in range(64):
            chunk = data[i * MIB : (i + 1) * MIB]
            ws.send_frame(ABNF.create_frame(chunk, OP_BINARY if i == 0 else OP_CONT, int(i == 63)))
        opcode, reply = recv(ws)
        assert opcode == OP_BINARY
        assert len(reply) == len(data)
        assert hashlib.sha256(reply).digest() == hashlib.sha256(data).digest()
        send_task(ws, {"path": "small"}, b"small")
        assert recv(ws) == (OP_BINARY, b"small")


def test_health_responsive_while_ws_streams(upper_stream: GunicornServer):
    """``/health`` answers in < 1 s at points where one open-ended message is mid-stream."""
    with ws_connect(upper_stream) as ws:
        ws.send_binary(json.dumps({"path": "endless"}).encode())
        sender = FragmentedSender(ws, count=None, limit=2048)
        sending = Background(sender)
        reader = FragmentReader(ws)
        reading = Background(reader)
        try:
            for step in range(1, 6):
                reader.wait_for(step * 16 * MIB)  # the stream is flowing, the message unfinished
                assert health_ok(upper_stream) < 1.0
        finally:
            sender.stop.set()
        sending.result()
        reading.result()
        assert reader.received == sender.sent > 5 * 16 * MIB
        assert reader.digest.hexdigest() == sender.expected.hexdigest()


# ---- connection lifetime and routing -----------------------------------------------------------


def test_idle_connection_outlives_worker_timeout(serve):
    """Idle longer than ``ETL_WORKER_TIMEOUT``: the worker is not killed, the connection works."""
    server = serve("transformers:Upper", ETL_WORKER_TIMEOUT="2")
    workers = server.worker_pids()
    with ws_connect(server) as ws:
        send_task(ws, {"path": "a"}, b"before")
        assert recv(ws) == (OP_BINARY, b"BEFORE")
        time.sleep(3.5)  # idleness is what is under test: more than the 2 s worker timeout
        send_task(ws, {"path": "b"}, b"after")
        assert recv(ws) == (OP_BINARY, b"AFTER")
    assert server.worker_pids() == workers
    health_ok(server)


def test_plain_get_ws_is_hpull_of_object_ws(upper: GunicornServer, target: FakeTarget):
    target.objects[SECRET_PATH + "/ws"] = b"hello"
    status, _, body = request(upper, "GET", "/ws")
    assert (status, body) == (200, b"HELLO")
    assert [(r.method, r.raw_path) for r in target.requests] == [("GET", SECRET_PATH + "/ws")]


# ---- shutdown and close handshake ----------------------------------------------------------------


def test_sigterm_closes_idle_connection_with_1001_and_worker_exits(serve):
    """SIGTERM: an idle connection gets 1001 "going away" at once, not a cut after 30 s."""
    server = serve("transformers:Upper")
    with ws_connect(server) as ws:
        send_task(ws, {"path": "a"}, b"hello")
        assert recv(ws) == (OP_BINARY, b"HELLO")
        start = time.monotonic()
        server.proc.send_signal(15)
        code, reason = expect_close(ws)
        assert (code, reason) == (1001, "server shutting down")
        assert time.monotonic() - start < 5
    assert server.proc.wait(timeout=10) == 0


def test_sigterm_lets_the_task_in_flight_finish_then_1001(serve, tmp_path):
    """SIGTERM during a transform: its reply still arrives, then the connection closes with 1001.

    The signal is sent once the transform has started (a task still unread in the socket when
    the worker stops is not in flight: the session may close before reading it).
    """
    server = serve("transformers:MarkedSleep")
    with ws_connect(server) as ws:
        send_task(ws, {"path": "a", "etl_args": f"{tmp_path},0.3"}, b"slow")
        wait_for_file(tmp_path / "started")
        server.proc.send_signal(15)
        assert recv(ws) == (OP_BINARY, b"SLOW")
        assert expect_close(ws) == (1001, "server shutting down")
    assert server.proc.wait(timeout=10) == 0


def test_failure_close_survives_pipelined_tasks(serve):
    """Tasks already sent after a failing one do not turn the 1011 close into a reset."""
    server = serve("transformers:Upper")
    with ws_connect(server) as ws:
        send_task(ws, {"path": "a"}, b"boom")
        for i in range(20):
            send_task(ws, {"path": f"b{i}"}, b"x" * 65536)
        opcode, data = recv(ws)
        assert opcode == OP_CLOSE
        assert (int.from_bytes(data[:2], "big"), data[2:]) == (1011, b"bad")
