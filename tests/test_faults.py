"""Fault injection on real gunicorn: every object is delivered byte-exact, or the caller is told.

The invariant (PROTOCOL.md §4.3, §4.4, §6.3, §7): after any fault of the next hop, the target or
the client, either the destination holds a *complete* PUT whose bytes are exactly the transform
of the object (checked by SHA-256) and the caller got the acknowledgement (``204`` +
``Ais-Direct-Put-Length``, or a ws text frame with the byte count), or the caller got an error
status (ws: close 1011).  Never a ``204`` or a success text frame for a partial delivery.

The matrix: every next-hop fault (refused, connect stall, reset before / during / after the
request body, read stall, 5xx with a body, truncated response) x every way an object reaches
the direct put (hpush body, FQN, hpull GET; buffered and streaming; a pipeline stage hop; ws).
The modes of one fault run concurrently, each on its own object and destination path (the fake
target's per-path scripts), so a fault costs one backoff, not one per mode.  Two variants:

* ``exhausted``: the hop fails on every attempt, servers with ``AIS_DIRECT_PUT_RETRIES=0``;
* ``once``: the hop fails once then stores, servers with ``AIS_DIRECT_PUT_RETRIES=1``: a
  replayable input is re-sent and delivered; a one-shot body (streaming PUT body, streamed ws
  message) bails with ``503`` + retry reason and is delivered when the caller replays it, as
  the AIS target does (§2.8).

Then faults of the target as the hpull source, and of the client: a body shorter than its
``Content-Length``, a chunked body cut mid-chunk, a client that reads slowly, a client that
leaves mid-response.  Timeouts are small in the servers' environment: connect 1 s, read 3-5 s.
(Streaming readers closed when the client leaves, and ws clients leaving mid-message, are in
tests/test_e2e_streaming.py and tests/test_e2e_ws.py.)
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from tests.conftest import GunicornServer
from tests.e2e_support import (
    MIB,
    TIMEOUT,
    booted_many,
    connect,
    request,
    send_raw,
    split_reply,
)
from tests.fake_target import (
    SECRET_PATH,
    CloseAfterBody,
    FakeTarget,
    Recorded,
    Reply,
    ResetBeforeBody,
    ResetMidBody,
    Stall,
    Truncated,
    blackhole,
)
from tests.test_e2e_ws import OP_BINARY, OP_CLOSE, OP_TEXT, send_task, ws_connect
from tests.unit_support import DST_QUERY, closed_port, fqn_query

T = TypeVar("T")
SIZE = 300 * 1024  # several socket writes, so "mid-body" is mid-body
#: Small outbound timeouts so stalls end fast; the read timeout of servers that must succeed
#: after a fault is larger, so a slow fake hop on a loaded machine is not taken for a stall.
TIMEOUTS = {"ETL_CONNECT_TIMEOUT": "1", "ETL_READ_TIMEOUT": "3"}
CLOSE_INTERNAL_ERROR = 1011


def payload(name: str, size: int = SIZE) -> bytes:
    """Distinct lower-case bytes per name (upper-casing changes every byte)."""
    seed = hashlib.sha256(name.encode()).hexdigest().encode()  # 0-9a-f
    block = bytes(b if b >= ord("a") else b + 0x31 for b in seed)  # a-p only
    return (block * (size // len(block) + 1))[:size]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- servers -----------------------------------------------------------------------------------


def booted_all(target: FakeTarget, **env: str) -> ContextManager[dict[bool, GunicornServer]]:
    """``Upper`` and ``UpperStream`` keyed by "streaming", with the small timeouts."""
    apps = {False: "transformers:Upper", True: "transformers:UpperStream"}
    return booted_many(apps, target, **{**TIMEOUTS, **env})


@pytest.fixture(scope="module")
def no_retry(module_target: FakeTarget) -> Iterator[dict[bool, GunicornServer]]:
    with booted_all(module_target, AIS_DIRECT_PUT_RETRIES="0") as servers:
        yield servers


@pytest.fixture(scope="module")
def one_retry(module_target: FakeTarget) -> Iterator[dict[bool, GunicornServer]]:
    with booted_all(module_target, AIS_DIRECT_PUT_RETRIES="1", ETL_READ_TIMEOUT="5") as servers:
        yield servers


# ---- the ways an object reaches the direct put -------------------------------------------------


@dataclass(frozen=True)
class Mode:
    name: str
    stream: bool  # UpperStream, else Upper
    source: str  # body | fqn | hpull | ws
    stage: bool = False  # the next hop is an ETL stage (no path), else the destination target

    @property
    def one_shot(self) -> bool:
        """Input that comes off a socket once: no local retry (§4.4)."""
        return self.stream and self.source in ("body", "ws")

    @property
    def data(self) -> bytes:
        return payload(self.name)

    @property
    def expected(self) -> bytes:
        return self.data.upper()

    def hop(self, base: str) -> str:
        if self.stage:
            return base
        return f"{base}/ais%2F@%23%2Fdst%2F{self.name}.bin?{DST_QUERY}"

    @property
    def dest_path(self) -> str:
        """Where the put lands on the fake target (§4.2)."""
        if self.stage:
            return f"/src/{self.name}.bin"
        return f"{SECRET_PATH}/ais%2F@%23%2Fdst%2F{self.name}.bin"


MODES = [
    Mode("hpush", False, "body"),
    Mode("fqn", False, "fqn"),
    Mode("hpull", False, "hpull"),
    Mode("hpush-stream", True, "body"),
    Mode("fqn-stream", True, "fqn"),
    Mode("hpull-stream", True, "hpull"),
    Mode("pipeline", False, "body", stage=True),
    Mode("pipeline-stream", True, "fqn", stage=True),
    Mode("ws", False, "ws"),
    Mode("ws-stream", True, "ws"),
]


@dataclass
class Outcome:
    """What the caller saw. ws is mapped onto HTTP terms: a text frame is ``204`` + its count,
    a binary frame ``200``, a close its code (1011) with the reason as body."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def delivered(self) -> int | None:
        if self.status != 204:
            return None
        return int(self.headers.get("Ais-Direct-Put-Length", "0"))


def send(mode: Mode, server: GunicornServer, target: FakeTarget, hop: str, tmp: Path) -> Outcome:
    """One object through ``mode`` to ``hop``, as the AIS target would send it."""
    if mode.source == "ws":
        return send_ws(mode, server, hop)
    method, uri, body = "PUT", f"/src/{mode.name}.bin", mode.data
    if mode.source == "fqn":
        obj = tmp / f"{mode.name}.bin"
        obj.write_bytes(mode.data)
        uri, body = f"{uri}?etl_fqn={fqn_query(obj)}", b""
    elif mode.source == "hpull":
        uri = f"/ais%2F@%23%2Fsrc%2F{mode.name}.bin"
        target.objects[SECRET_PATH + uri] = mode.data
        method, body = "GET", None
    node_url = f"{hop},{Mode('dst', False, 'body').hop(target.url)}" if mode.stage else hop
    status, headers, reply = request(server, method, uri, body, {"Ais-Node-Url": node_url})
    return Outcome(status, reply, dict(headers.items()))


def send_ws(mode: Mode, server: GunicornServer, hop: str) -> Outcome:
    with ws_connect(server) as ws:
        send_task(ws, {"pipeline": hop, "path": f"{mode.name}.bin"}, mode.data)
        frame = ws.recv_frame()
    if frame.opcode == OP_TEXT:
        return Outcome(204, headers={"Ais-Direct-Put-Length": frame.data.decode()})
    if frame.opcode == OP_CLOSE:
        return Outcome(int.from_bytes(frame.data[:2], "big"), frame.data[2:])
    assert frame.opcode == OP_BINARY, frame.opcode
    return Outcome(200, frame.data)


# ---- next-hop faults ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """``behaviour``: the fake hop's scripted answer; ``base``: where the hop points instead."""

    behaviour: object | None = None
    base: Callable[[], Iterator[str]] | None = None
    transient: bool = True  # retried when replayable (§4.4)


@contextmanager
def refused() -> Iterator[str]:
    yield f"http://127.0.0.1:{closed_port()}"


FAULTS = {
    "refused": Fault(base=refused, transient=False),
    "connect-stall": Fault(base=blackhole),
    "reset-before-body": Fault(ResetBeforeBody()),
    "reset-mid-body": Fault(ResetMidBody(after=64 * 1024)),
    "reset-after-body": Fault(CloseAfterBody()),
    "read-stall": Fault(Stall(seconds=20)),
    "5xx-with-body": Fault(Reply(500, b"disk on fire"), transient=False),
    "truncated-reply": Fault(Truncated(200, b"partial", declared=1000)),
}
TRANSIENT = [name for name, fault in FAULTS.items() if fault.transient and fault.base is None]


def puts_to(target: FakeTarget, mode: Mode) -> list[Recorded]:
    return [r for r in target.requests if r.method == "PUT" and r.path == mode.dest_path]


def assert_never_partial(target: FakeTarget, mode: Mode) -> None:
    """Every complete body the hop received is the whole transformed object."""
    for put in puts_to(target, mode):
        if put.complete:
            assert digest(put.body) == digest(mode.expected), (mode.name, len(put.body))


def assert_delivered(outcome: Outcome, target: FakeTarget, mode: Mode) -> None:
    assert outcome.delivered == len(mode.expected), (mode.name, outcome.status, outcome.body)
    complete = [p for p in puts_to(target, mode) if p.complete]
    assert complete, f"{mode.name}: acknowledged, but no complete put reached the hop"
    assert digest(complete[-1].body) == digest(mode.expected), mode.name
    assert_never_partial(target, mode)


def assert_failed(outcome: Outcome, mode: Mode, fault: str) -> None:
    """The error of §4.3/§4.4/§7 (ws: close 1011, never a text frame)."""
    assert outcome.delivered is None, (mode.name, outcome)
    if mode.source == "ws":
        assert outcome.status == CLOSE_INTERNAL_ERROR, (mode.name, outcome)
        return
    retry_reason = outcome.headers.get("Ais-Etl-Retry-Reason")
    if fault == "5xx-with-body":  # passed through verbatim, never retried
        assert (outcome.status, outcome.body) == (500, b"disk on fire"), (mode.name, outcome)
    elif fault == "refused" or not mode.one_shot:
        assert outcome.status == 502, (mode.name, outcome)
        assert retry_reason is None
    else:  # one-shot body: the target must replay the whole PUT
        assert outcome.status == 503, (mode.name, outcome)
        assert retry_reason == "direct-put-transient"


def run_all(fn: Callable[[T], None], items: list[T]) -> None:
    """``fn`` for every item at once (each on its own paths); the first failure is re-raised."""
    with ThreadPoolExecutor(len(items)) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result(timeout=4 * TIMEOUT)


@contextmanager
def hop_base(fault: Fault, target: FakeTarget) -> Iterator[str]:
    if fault.base is None:
        yield target.url
    else:
        with fault.base() as base:
            yield base


@pytest.mark.parametrize("name", list(FAULTS))
def test_next_hop_fault_every_attempt_is_an_error(
    no_retry: dict[bool, GunicornServer], target: FakeTarget, tmp_path: Path, name: str
) -> None:
    fault = FAULTS[name]
    with hop_base(fault, target) as base:

        def one(mode: Mode) -> None:
            if fault.behaviour is not None:
                target.scripts[mode.dest_path] = [fault.behaviour] * 4
            outcome = send(mode, no_retry[mode.stream], target, mode.hop(base), tmp_path)
            assert_failed(outcome, mode, name)
            assert_never_partial(target, mode)
            if fault.behaviour is not None:  # exactly one attempt (retries=0)
                assert len(puts_to(target, mode)) == 1, mode.name

        run_all(one, MODES)


@pytest.mark.parametrize("name", TRANSIENT)
def test_next_hop_fault_once_is_retried_or_replayed(
    one_retry: dict[bool, GunicornServer], target: FakeTarget, tmp_path: Path, name: str
) -> None:
    fault = FAULTS[name]

    def one(mode: Mode) -> None:
        target.scripts[mode.dest_path] = [fault.behaviour]
        server = one_retry[mode.stream]
        outcome = send(mode, server, target, mode.hop(target.url), tmp_path)
        if mode.one_shot:  # no local re-send of a socket body: the caller replays it
            assert_failed(outcome, mode, name)
            assert len(puts_to(target, mode)) == 1, mode.name
            outcome = send(mode, server, target, mode.hop(target.url), tmp_path)
        assert_delivered(outcome, target, mode)
        assert len(puts_to(target, mode)) == 2, mode.name

    run_all(one, MODES)


# ---- the target as the source of an hpull GET (no pipeline) ------------------------------------

HPULL = "/ais%2F@%23%2Fsrc%2Fobj.bin"

UPSTREAM_FAULTS = {
    "reset": ResetBeforeBody(),
    "read-stall": Stall(seconds=20),
    "5xx-with-body": Reply(500, b"disk on fire"),
    "truncated-at-start": Truncated(200, b"", declared=1000),
    "truncated-mid": Truncated(200, payload("mid", 200 * 1024), declared=SIZE),
}


def read_reply(server: GunicornServer, method: str, uri: str) -> tuple[int, bytes, bool]:
    """``(status, body, complete)``: ``complete`` is false when the body was cut short."""
    conn = connect(server)
    try:
        conn.request(method, uri)
        with conn.getresponse() as resp:
            try:
                return resp.status, resp.read(), True
            except http.client.IncompleteRead as exc:
                return resp.status, exc.partial, False
    finally:
        conn.close()


@pytest.mark.parametrize("name", list(UPSTREAM_FAULTS))
def test_upstream_get_fault_is_an_error(
    no_retry: dict[bool, GunicornServer], target: FakeTarget, name: str
) -> None:
    """§2.6, §7: network failure -> 502; non-2xx -> that status; never a whole-looking 200.

    Buffered and streaming servers at once, each on its own object.
    """

    def one(stream: bool) -> None:
        uri = f"{HPULL}.{stream}"
        target.scripts[SECRET_PATH + uri] = [UPSTREAM_FAULTS[name]]
        status, body, complete = read_reply(no_retry[stream], "GET", uri)
        if name == "5xx-with-body":
            assert (status, json.loads(body)) == (500, {"error": "Target request failed"})
        elif name == "truncated-mid" and stream:  # headers were out: the reply is cut
            assert (status, complete) == (200, False)
            assert body == payload("mid", 200 * 1024).upper()[: len(body)]
        else:
            assert status == 502, (stream, status, body)
            assert json.loads(body)["error"].startswith("Network error: ")

    run_all(one, [False, True])


def test_upstream_connect_stall_is_502_after_the_connect_timeout(serve) -> None:
    """The target accepts no connection (its queue is full): 502 once ETL_CONNECT_TIMEOUT ends."""
    with blackhole() as base:
        server = serve("transformers:UpperStream", AIS_TARGET_URL=base + SECRET_PATH, **TIMEOUTS)
        started = time.monotonic()
        status, body, _ = read_reply(server, "GET", HPULL)
    assert status == 502, body
    assert "ConnectTimeout" in json.loads(body)["error"]
    assert 0.9 <= time.monotonic() - started < TIMEOUT


# ---- faults of the client ----------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "direct-put"])
@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_body_shorter_than_content_length_is_never_delivered(
    no_retry: dict[bool, GunicornServer], target: FakeTarget, stream: bool, pipeline: bool
) -> None:
    """The client stops after half its ``Content-Length``: ``400``, and nothing is acknowledged.

    gunicorn reports the early end as a plain EOF; before the fix the half object was
    transformed and delivered with ``204`` (and the destination stored it).
    """
    mode = Mode("short-body", stream, "body")
    node_url = f"Ais-Node-Url: {mode.hop(target.url)}\r\n" if pipeline else ""
    head = f"PUT /src/a.bin HTTP/1.1\r\nHost: x\r\n{node_url}Content-Length: {SIZE}\r\n\r\n"
    raw = head.encode() + mode.data[:1000]
    status, headers, body = split_reply(send_raw(no_retry[stream], raw))
    if stream and not pipeline and status == 200:  # the first chunk went out: cut, unterminated
        assert headers.get("transfer-encoding") == "chunked"
        assert not body.endswith(b"0\r\n\r\n"), body[-20:]
    else:
        assert status == 400, (status, body)
        assert json.loads(body) == {
            "error": f"Request body ended after 1000 of {SIZE} bytes (Content-Length)"
        }
    assert [p for p in puts_to(target, mode) if p.complete] == []


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_chunked_body_cut_mid_chunk_is_never_delivered(
    no_retry: dict[bool, GunicornServer], target: FakeTarget, stream: bool
) -> None:
    mode = Mode("cut-chunk", stream, "body")
    head = (
        f"PUT /src/a.bin HTTP/1.1\r\nHost: x\r\nAis-Node-Url: {mode.hop(target.url)}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    body = b"%x\r\n" % SIZE + mode.data[:1000]
    status, _, reply = split_reply(send_raw(no_retry[stream], head.encode() + body))
    assert status == 400, reply
    assert json.loads(reply)["error"].startswith("Request body could not be read: NoMoreData")
    assert [p for p in puts_to(target, mode) if p.complete] == []


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_client_reset_mid_body_is_never_delivered(
    no_retry: dict[bool, GunicornServer], target: FakeTarget, stream: bool
) -> None:
    """The client resets the connection after 100 KiB of a 300 KiB direct-put request: nothing
    complete reaches the hop (the server's 400 is logged; nobody is left to read it)."""
    server = no_retry[stream]
    mode = Mode(f"client-reset-{stream}", stream, "body")
    head = (
        f"PUT /src/{mode.name}.bin HTTP/1.1\r\nHost: x\r\n"
        f"Ais-Node-Url: {mode.hop(target.url)}\r\nContent-Length: {SIZE}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(head.encode() + mode.data[: 100 * 1024])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    answered = f"PUT '/src/{mode.name}.bin' -> 400: Request body"
    deadline = time.monotonic() + TIMEOUT
    while answered not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answered in server.log()
    assert [p for p in puts_to(target, mode) if p.complete] == []


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def settled_fds(pid: int, baseline: int, timeout: float = TIMEOUT) -> int:
    """Poll (bounded) until the worker's open descriptors are back to ``baseline``."""
    deadline = time.monotonic() + timeout
    count = fd_count(pid)
    while count > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
        count = fd_count(pid)
    return count


@pytest.fixture
def fqn_object(tmp_path: Path) -> tuple[Path, bytes]:
    """A 16 MiB object file (far more than socket buffers hold) and its transformed bytes."""
    data = payload("big", 16 * MIB)
    obj = tmp_path / "big.bin"
    obj.write_bytes(data)
    return obj, data.upper()


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_slow_reading_client_gets_every_byte_and_blocks_nobody(
    no_retry: dict[bool, GunicornServer], fqn_object: tuple[Path, bytes], stream: bool
) -> None:
    """A client that stops reading a 16 MiB reply: other requests go on; then it gets it all."""
    server = no_retry[stream]
    obj, expected = fqn_object
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(
            f"GET /src/big.bin?etl_fqn={fqn_query(obj)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        first = sock.recv(4096)  # the reply has started; now the client stalls
        assert first.startswith(b"HTTP/1.1 200 ")
        # the worker is blocked writing to this client, yet serves others
        assert request(server, "GET", "/health")[::2] == (200, b"Running")
        assert request(server, "PUT", "/src/small", b"abc")[::2] == (200, b"ABC")
        resp = http.client.HTTPResponse(_Replay(first, sock), method="GET")
        resp.begin()
        body = resp.read()
    assert digest(body) == digest(expected)


class _Replay:
    """A socket whose first bytes were already received: lets ``HTTPResponse`` parse them."""

    def __init__(self, head: bytes, sock: socket.socket) -> None:
        self._head = head
        self._sock = sock

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_Chain(self._head, self._sock))  # type: ignore[arg-type]


class _Chain(io.RawIOBase):
    def __init__(self, head: bytes, sock: socket.socket) -> None:
        super().__init__()
        self._head = head
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        return self._sock.recv_into(buffer)


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_client_gone_mid_response_leaks_nothing(
    no_retry: dict[bool, GunicornServer], fqn_object: tuple[Path, bytes], stream: bool
) -> None:
    """The client resets the connection after 64 KiB of a 16 MiB reply: the worker survives
    (same pid), its descriptors come back to where they were, the next request is served."""
    server = no_retry[stream]
    (pid,) = server.worker_pids()
    assert request(server, "GET", "/health")[0] == 200
    baseline = fd_count(pid)
    obj, expected = fqn_object
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(
            f"GET /src/big.bin?etl_fqn={fqn_query(obj)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        received = 0
        for _ in range(1000):  # bounded
            received += len(sock.recv(1 << 16))
            if received >= 1 << 16:
                break
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert settled_fds(pid, baseline) <= baseline
    status, _, body = request(server, "GET", f"/src/big.bin?etl_fqn={fqn_query(obj)}")
    assert (status, digest(body)) == (200, digest(expected))
    assert server.worker_pids() == [pid]
