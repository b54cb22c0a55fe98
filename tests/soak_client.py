"""Load generator and AIS-target sink for tests/test_soak.py (one gevent process, no pytest).

    python tests/soak_client.py --etl-port P --sink-fd F --fqn-dir D --connections 256 \\
        --warmup 5000 --requests 100000

* The **sink** plays the AIS target on the listening socket ``F`` (inherited, already bound on
  127.0.0.1): it serves hpull GETs of ``<secret>/ais%2F@%23%2Fsrc%2F<name>`` and takes direct
  puts, checking the SHA-256 of every delivered body against the transform of the object.
* The **client** keeps ``--connections`` raw keep-alive sockets to the ETL and sends a fixed
  rotation of request kinds (hpush, FQN, hpull, direct put; buffered and streaming) and object
  sizes, checking status and bytes of every answer.

Protocol with the test, one JSON line per phase on stdout: after ``--warmup`` requests it prints
``{"phase": "warm", ...}`` and waits for a line on stdin (the test samples the worker); after
``--requests`` more it prints ``{"phase": "done", ...}`` and waits again, connections still
open, so both samples see the same idle state; then it closes everything and exits.
Every loop is bounded: per-socket timeouts, and the test's own deadline on the process.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402 - after monkey-patching
import hashlib  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import quote, quote_plus  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

SECRET_PATH = "/v1/etl/_object/etl-upper/s3cr3tABCD"
SIZES = [100, 4 * 1024, 64 * 1024, 300 * 1024]
TIMEOUT = 60.0


def data(size: int) -> bytes:
    """The object of ``size`` bytes: lower-case, distinct per size."""
    block = hashlib.sha256(str(size).encode()).hexdigest().encode()
    block = bytes(b if b >= ord("a") else b + 0x31 for b in block)
    return (block * (size // len(block) + 1))[:size]


OBJECTS = {size: data(size) for size in SIZES}
UPPER = {size: obj.upper() for size, obj in OBJECTS.items()}


# ---- the sink (AIS target) ---------------------------------------------------------------------


@dataclass
class Sink:
    stored: int = 0
    bad: list[str] = field(default_factory=list)

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        path = environ["PATH_INFO"]
        size = int(path.rpartition("-")[2])
        if environ["REQUEST_METHOD"] == "GET":
            start_response("200 OK", [("Content-Length", str(size))])
            return [OBJECTS[size]]
        body = environ["wsgi.input"].read()
        if body == UPPER[size]:
            self.stored += 1
        else:
            self.bad.append(f"{path}: {len(body)} bytes")
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]


# ---- the client --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    name: str
    method: str
    prefix: str  # /b (Upper) or /s (UpperStream)
    source: str  # body | fqn | hpull
    put_to_sink: bool = False


KINDS = [
    Kind("hpush", "PUT", "/b", "body"),
    Kind("hpush-stream", "PUT", "/s", "body"),
    Kind("fqn", "PUT", "/b", "fqn"),
    Kind("fqn-stream", "GET", "/s", "fqn"),
    Kind("hpull", "GET", "/b", "hpull"),
    Kind("hpull-stream", "GET", "/s", "hpull"),
    Kind("direct-put", "PUT", "/b", "body", put_to_sink=True),
    Kind("direct-put-stream-fqn", "PUT", "/s", "fqn", put_to_sink=True),
]


class Conn:
    """One keep-alive HTTP/1.1 connection to the ETL, with a minimal response parser."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.file = None

    def _open(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        if self.sock is not None:
            self.file.close()
            self.sock.close()
            self.sock = None

    def call(self, head: bytes, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.sock is None:
            self._open()
        self.sock.sendall(head + body)
        status_line = self.file.readline(65536)
        if not status_line:
            raise ConnectionError("connection closed before the status line")
        status = int(status_line.split()[1])
        headers = {}
        for _ in range(100):
            line = self.file.readline(65536)
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            body = self._chunked()
        else:
            body = self.file.read(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    def _chunked(self) -> bytes:
        parts = []
        for _ in range(1 << 20):
            size = int(self.file.readline(1024).split(b";")[0], 16)
            if size == 0:
                self.file.readline(1024)
                return b"".join(parts)
            parts.append(self.file.read(size))
            self.file.readline(1024)
        raise ValueError("too many chunks")


def requests_for(sink_port: int, fqn_dir: Path) -> Iterator[tuple[Kind, int, bytes, bytes]]:
    """The endless rotation: ``(kind, size, head, body)``."""
    n = 0
    while True:
        for size in SIZES:
            for kind in KINDS:
                n += 1
                name = f"o{n % 97}-{size}"
                headers = ""
                body = b""
                if kind.source == "fqn":
                    fqn = quote_plus(quote(str(fqn_dir / f"obj-{size}"), safe="$&+:=@"), safe="")
                    target = f"{kind.prefix}/src/{name}?etl_fqn={fqn}"
                elif kind.source == "hpull":
                    target = f"{kind.prefix}/ais%2F@%23%2Fsrc%2F{name}"
                else:
                    target = f"{kind.prefix}/src/{name}"
                    body = OBJECTS[size]
                if kind.put_to_sink:
                    hop = f"http://127.0.0.1:{sink_port}/ais%2F@%23%2Fdst%2F{name}?owt=3"
                    headers += f"Ais-Node-Url: {hop}\r\n"
                if kind.method == "PUT":
                    headers += f"Content-Length: {len(body)}\r\n"
                head = f"{kind.method} {target} HTTP/1.1\r\nHost: etl\r\n{headers}\r\n".encode()
                yield kind, size, head, body


@dataclass
class Stats:
    done: int = 0
    errors: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)


def check(kind: Kind, size: int, status: int, headers: dict[str, str], body: bytes) -> str | None:
    if kind.put_to_sink:
        if status != 204 or headers.get("ais-direct-put-length") != str(size):
            return f"{kind.name} {size}: {status} {headers} {body[:200]!r}"
        return None
    if status != 200 or body != UPPER[size]:
        return f"{kind.name} {size}: {status} {len(body)} bytes {body[:200]!r}"
    return None


def run(port: int, conns: list[Conn], work: Iterator, count: int, stats: Stats) -> None:
    remaining = [count]

    def worker(conn: Conn) -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            kind, size, head, body = next(work)
            try:
                status, headers, reply = conn.call(head, body)
                error = check(kind, size, status, headers, reply)
            except Exception as exc:  # report it, on a fresh connection
                conn.close()
                error = f"{kind.name} {size}: {type(exc).__name__}: {exc}"
            stats.done += 1
            stats.by_kind[kind.name] = stats.by_kind.get(kind.name, 0) + 1
            if error is not None:
                stats.errors.append(error)

    gevent.joinall([gevent.spawn(worker, conn) for conn in conns], raise_error=True)


def report(phase: str, stats: Stats, sink: Sink, elapsed: float) -> None:
    line = {
        "phase": phase,
        "requests": stats.done,
        "errors": len(stats.errors),
        "first_errors": stats.errors[:5],
        "sink_stored": sink.stored,
        "sink_bad": sink.bad[:5],
        "elapsed": round(elapsed, 2),
        "rps": round(stats.done / elapsed) if elapsed else 0,
        "by_kind": stats.by_kind,
    }
    print(json.dumps(line), flush=True)
    sys.stdin.readline()  # the test samples the worker, then lets us go on


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--etl-port", type=int, required=True)
    parser.add_argument("--sink-fd", type=int, required=True)
    parser.add_argument("--fqn-dir", type=Path, required=True)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=100_000)
    args = parser.parse_args()

    for size, obj in OBJECTS.items():
        (args.fqn_dir / f"obj-{size}").write_bytes(obj)
    listener = socket.socket(fileno=args.sink_fd)
    sink = Sink()
    server = WSGIServer(listener, sink, log=None, error_log=None)
    server.start()
    work = requests_for(listener.getsockname()[1], args.fqn_dir)
    conns = [Conn(args.etl_port) for _ in range(args.connections)]
    for phase, count in (("warm", args.warmup), ("done", args.requests)):
        stats = Stats()
        started = time.monotonic()
        run(args.etl_port, conns, work, count, stats)
        report(phase, stats, sink, time.monotonic() - started)
    for conn in conns:
        conn.close()
    server.stop(timeout=5)


if __name__ == "__main__":
    main()
