"""etl-wsgi side by side with aistore 2.0.0's FlaskServer and FastAPIServer (issue 4, item 5).

    bash benchmarks/run.sh side-by-side [--quick] [options]     (installs everything first)
    .venv/bin/python benchmarks/side_by_side.py --help          (once installed)

In one run, on 127.0.0.1, each server on its own port, with the same transforms (echo, md5-hex):

- etl-wsgi: ``gunicorn -c gunicorn.conf.py`` (gevent), ``ETL_WORKERS=--workers`` (default: cores);
- ais-flask: aistore's ``FlaskServer`` under ``gunicorn --workers 4`` (sync), from .bench-venv;
- ais-fastapi: aistore's ``FastAPIServer`` under ``uvicorn --workers 4``, from .bench-venv;
- raw: raw_echo.c, a C keep-alive echo server, the loopback ceiling (hpush echo only);
- nginx: the fake AIS target itself hit directly by wrk (hpull GET / direct-put PUT), the
  ceiling of what the target side can serve or absorb.

nginx plays the AIS target (``AIS_TARGET_URL``): it serves the objects hpull GETs and is the
direct-put sink. wrk (2 threads, closed loop) plays the target's side calling the ETL: hpush
(``PUT /b/obj`` + body), hpull (``GET /<escaped uname>``), direct put (``PUT`` + body +
``Ais-Node-Url``, answered 204). For each mode, transform and size the servers are started
fresh, checked with one request (exact status and body), warmed up for 1 s, then measured one
after another at each connection count; after every wrk run the harness waits until the server
and nginx are idle again (wrk leaves requests in flight). Cells with much data in flight
(connections x size) are stretched so every connection gets several replies. Errors (socket
errors, statuses > 399, short replies, workers restarted or dead) are printed loudly and listed
in the report with the server's log. Then the memory tests: a 1 GiB streaming echo through each
server (full-duplex client) and one 256 MiB buffered echo, each on a fresh server.

Results: a markdown summary on stdout and in benchmarks/results/side_by_side-<time>.md, every
number in the .json next to it, server logs in benchmarks/results/logs-<time>/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from harness import (
    DST_UNAME_ESCAPED,
    HERE,
    ROOT,
    TARGET_PREFIX,
    EtlWsgi,
    FakeTarget,
    Proc,
    Server,
    build_raw_echo,
    cpu_seconds,
    duplex_put,
    escape_uname,
    free_port,
    http_ok,
    object_body,
    peak_snapshot,
    raise_nofile,
    request_once,
    reset_peak,
    rss_snapshot,
    run_wrk,
    src_uname,
    steal_seconds,
    wait_idle,
    wait_memory_handed_back,
)

BENCH_VENV = ROOT / ".bench-venv"
MIB = 1 << 20
#: Buffered check: growth may exceed the body by this much. A body of N bytes in one buffer
#: takes N bytes plus its object header, so one page more (N + 4 KiB), and other allocations
#: come and go while the request runs: the last runs measured 255.87-256.32 MiB for 256 MiB.
BUFFERED_SLACK_MIB = 1
PY_SERVERS = ("etl-wsgi", "ais-flask", "ais-fastapi")
#: Cores a worker process uses when it serves some of wrk's connections (idle ones use ~0).
BUSY_WORKER_CORES = 0.05
ALL_SERVERS = (*PY_SERVERS, "raw", "nginx")
MODES = ("hpush", "hpull", "directput")
TRANSFORMS = ("echo", "md5")
ETL_CLASSES = {"echo": "Echo", "md5": "Md5", "stream": "EchoStream"}
AIS_CLASSES = {"echo": "Echo", "md5": "Md5", "stream": "EchoStream"}
HPUSH_PATH = "/b/obj"


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


def fmt_size(n: int) -> str:
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult} {unit}"
    return f"{n} B"


def expected_output(transform: str, data: bytes) -> bytes:
    return hashlib.md5(data).hexdigest().encode() if transform == "md5" else data


# --------------------------------------------------------------------------------------------
# servers


class Context:
    def __init__(self, args: argparse.Namespace, workdir: Path, logdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.logdir = logdir
        self.target: FakeTarget | None = None
        self.raw_bin: Path | None = None
        self.running: list[Server] = []
        self.lock = threading.Lock()

    def start(self, server: Server) -> Server:
        with self.lock:
            self.running.append(server)
        server.start()
        return server

    def stop(self, server: Server) -> None:
        try:
            server.stop()
        finally:
            with self.lock:
                if server in self.running:
                    self.running.remove(server)

    def stop_all(self) -> None:
        for server in reversed(list(self.running)):
            try:
                self.stop(server)
            except Exception as exc:  # keep stopping the others
                print(f"failed to stop {server.name}: {exc}", file=sys.stderr)

    def make(self, kind: str, transform: str, tag: str = "") -> Server:
        assert self.target is not None
        args = self.args
        target_env = {"AIS_TARGET_URL": self.target.target_url}
        log = self.logdir / f"{kind}-{transform}{tag}.log".replace(" ", "")
        if kind == "etl-wsgi":
            env = dict(target_env)
            env.update(args.etl_env)
            return EtlWsgi(kind, ETL_CLASSES[transform], args.workers, env, log)
        if kind in ("ais-flask", "ais-fastapi"):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "AIS_"))}
            env.pop("PYTHONPATH", None)
            env.update(target_env)
            env["VIRTUAL_ENV"] = str(BENCH_VENV)
            env["PATH"] = f"{BENCH_VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
            env["PYTHONPATH"] = str(HERE)
            port = free_port()
            if kind == "ais-flask":
                env["BENCH_AIS_CLASS"] = "Flask" + AIS_CLASSES[transform]
                cmd = [
                    str(BENCH_VENV / "bin" / "gunicorn"),
                    "ais_servers:app",
                    "--bind",
                    f"127.0.0.1:{port}",
                    "--workers",
                    str(args.ais_workers),
                ]
            else:
                env["BENCH_AIS_CLASS"] = "FastAPI" + AIS_CLASSES[transform]
                cmd = [
                    str(BENCH_VENV / "bin" / "uvicorn"),
                    "ais_servers:server.app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    str(args.ais_workers),
                    "--log-level",
                    "info",
                    "--ws-max-size",
                    "17179869184",
                    "--ws-ping-interval",
                    "0",
                    "--ws-ping-timeout",
                    "86400",
                    "--no-access-log",
                ]
            return Proc(kind, cmd, port, log, env=env, cwd=HERE)
        if kind == "raw":
            assert self.raw_bin is not None
            port = free_port()
            return Proc(kind, [str(self.raw_bin), str(port)], port, log)
        raise ValueError(kind)


# --------------------------------------------------------------------------------------------
# one throughput cell


def request_spec(server: str, mode: str, size: int, node_url: str) -> tuple[str, list[str]]:
    """(wrk script, its arguments) for a server and mode."""
    obj_path = "/" + escape_uname(src_uname(size))
    if server == "nginx":  # the fake target itself: GET an object, PUT into the sink
        if mode == "hpull":
            return "hpull.lua", [TARGET_PREFIX + obj_path]
        return "hpush.lua", [str(size), f"{TARGET_PREFIX}/{DST_UNAME_ESCAPED}?owt=3&uuid=X"]
    if mode == "hpush":
        return "hpush.lua", [str(size), HPUSH_PATH]
    if mode == "hpull":
        return "hpull.lua", [obj_path]
    return "directput.lua", [str(size), node_url, HPUSH_PATH]


def send_check(
    server: Server, kind: str, script: str, sargs: list[str], body: bytes
) -> tuple[int, dict[str, str], bytes] | str:
    """The request a wrk script would send, once; (status, headers, body) or a failure text."""
    if kind == "raw":  # streams the echo back while reading: needs a full-duplex client
        res = duplex_put(server.port, sargs[1], len(body), timeout=60)
        if res["body_bytes"] == len(body) and res["mismatch_at"] is None:
            return res["status"], res.get("headers", {}), body
        return f"raw echo: {res}"
    try:
        if script == "hpull.lua":
            return request_once(server.port, "GET", sargs[0])
        path = sargs[2] if script == "directput.lua" else sargs[1]
        hdrs = {"Content-Type": "application/octet-stream"}
        if script == "directput.lua":
            hdrs["Ais-Node-Url"] = sargs[1]
        return request_once(server.port, "PUT", path, body, hdrs)
    except OSError as exc:
        return f"check request failed: {type(exc).__name__}: {exc}"


def check_once(server: Server, kind: str, mode: str, transform: str, size: int, node: str) -> str:
    """One request with an exact check of status and reply; '' if right, else the problem."""
    body = object_body(size)
    script, sargs = request_spec(kind, mode, size, node)
    reply = send_check(server, kind, script, sargs, body)
    if isinstance(reply, str):
        return reply
    status, headers, data = reply
    if kind == "nginx":
        want_status, want = 200, (body if mode == "hpull" else b"")
    elif mode == "directput":
        want_status, want = 204, b""
        length = headers.get("ais-direct-put-length")
        if length != str(len(expected_output(transform, body))):
            return f"direct put: status {status}, Ais-Direct-Put-Length {length!r}, {data[:200]!r}"
    else:
        want_status, want = 200, expected_output(transform, body)
    if status == want_status and data == want:
        return ""
    return (
        f"{mode}: status {status} (want {want_status}), {len(data)} B (want {len(want)} B), "
        f"body {data[:200]!r}"
    )


def cell_seconds(args: argparse.Namespace, conns: int, size: int) -> int:
    """Measured seconds of a cell: at least --seconds, and long enough for --rounds replies per
    connection at --assumed-mib-s (each connection has one object in flight: 256 x 16 MiB at
    800 MiB/s is 5 s per request), at most --max-cell-seconds. All connections start together,
    so replies come in waves: with few replies per connection, req/s is quantized."""
    needed = args.rounds * conns * size / (args.assumed_mib_s * MIB)
    return round(min(max(args.seconds, needed), max(args.seconds, args.max_cell_seconds)))


def warmup_connections(args: argparse.Namespace, conns: int, size: int) -> int:
    """Warm-up with at most 64 MiB in flight: enough to reach every worker and code path, and
    abandoned in-flight requests are cheap for the server to finish."""
    return max(args.wrk_threads, min(conns, (64 * MIB) // size))


def judge(cell: dict, res: dict, kind: str, mode: str, transform: str, size: int) -> None:
    """Fill the cell's numbers from a wrk result and list what went wrong."""
    if "failed" in res:
        cell["problems"].append(res["failed"])
        cell.update(rps=0.0, mib_s=0.0, p50_ms=None, p99_ms=None, errors_total=None)
        return
    dur = res["duration_us"] / 1e6
    n = res["requests"]
    lat = res["latency_us"]
    cell.update(
        requests=n,
        duration_s=dur,
        rounds=n / cell["connections"],
        rps=n / dur if dur else 0.0,
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        max_ms=lat["max"] / 1000,
        p99_p50=lat["p99"] / lat["p50"] if lat["p50"] else None,
        errors=res["errors"],
        errors_total=sum(res["errors"].values()),
    )
    cell["mib_s"] = cell["rps"] * size / MIB
    if cell["errors_total"]:
        bad = ", ".join(f"{k} {v}" for k, v in res["errors"].items() if v)
        cell["problems"].append(f"wrk errors: {bad}")
    if n == 0:
        cell["problems"].append(f"no request completed in {dur:.0f} s")
        return
    # wrk counts every byte read, including replies still in flight at the end, so only a
    # lower bound is meaningful: fewer bytes than the bodies means short replies.
    expect = 0 if mode == "directput" else len(expected_output(transform, b"x" * size))
    cell["bytes_per_reply"] = res["bytes"] / n
    if kind != "nginx" and res["bytes"] / n < expect:
        cell["problems"].append(
            f"short replies: {res['bytes'] / n:.0f} B read per reply, body is {expect} B"
        )


def settle(ctx: Context, server: Server, cell: dict | None = None) -> None:
    """Let the server (and the fake target) finish what wrk abandoned before going on."""
    assert ctx.target is not None
    target = ctx.target
    waited = wait_idle(lambda: server.pids() + target.pids(), max_wait=ctx.args.settle_max)
    if cell is not None:
        cell["settle_s"] = waited
        if waited is None:
            cell["notes"].append(f"still busy {ctx.args.settle_max:.0f} s after the cell")


def run_cell(
    ctx: Context,
    server: Server,
    kind: str,
    mode: str,
    transform: str,
    size: int,
    conns: int,
    warm: bool = True,
) -> dict:
    args = ctx.args
    assert ctx.target is not None
    script, sargs = request_spec(kind, mode, size, ctx.target.node_url())
    seconds = cell_seconds(args, conns, size)
    cell: dict = {
        "mode": mode,
        "transform": transform,
        "size": size,
        "connections": conns,
        "server": kind,
        "seconds": seconds,
        "problems": [],
        "notes": [],
    }
    workers_before = sorted(server.worker_pids())
    if warm and args.warmup > 0:
        wconns = warmup_connections(args, conns, size)
        run_wrk(script, server.url, sargs, wconns, args.warmup, threads=args.wrk_threads)
        settle(ctx, server)
    pids = server.pids()
    reset_peak(pids)
    cell["loadavg_before"] = os.getloadavg()[0]
    before = ctx.target.counters()
    cpu_before = {pid: cpu_seconds([pid]) for pid in pids}
    steal_before = steal_seconds()
    res = run_wrk(
        script, server.url, sargs, conns, seconds, threads=args.wrk_threads, timeout_s=args.timeout
    )
    steal = steal_seconds() - steal_before
    after = ctx.target.counters()
    cpu = {pid: cpu_seconds([pid]) - t for pid, t in cpu_before.items()}
    if before and after and mode != "hpush":
        # -1: the counters request itself
        cell["target_accepts"] = after["accepts"] - before["accepts"] - 1
        # a direct put is 2 requests in nginx: the sink, and its proxied empty-200 answer
        per = 2 if mode == "directput" and kind != "nginx" else 1
        cell["target_requests"] = (after["requests"] - before["requests"] - 1) // per
    peaks = peak_snapshot(pids)
    cell["rss_peak_sum_mib"] = sum(peaks.values()) / 1024
    cell["rss_peak_max_mib"] = max(peaks.values(), default=0) / 1024
    cell["wrk"] = res
    judge(cell, res, kind, mode, transform, size)
    if cell.get("duration_s"):
        per_proc = {str(pid): t / cell["duration_s"] for pid, t in cpu.items()}
        cell["cpu_cores_per_process"] = per_proc
        cell["cpu_cores"] = sum(per_proc.values())
        cell["cpu_cores_max_process"] = max(per_proc.values(), default=0.0)
    note_steal(cell, steal)
    if cell.get("rounds") is not None and 0 < cell["rounds"] < 3:
        cell["notes"].append(f"only {cell['rounds']:.1f} replies per connection")
    if kind in PY_SERVERS and cell.get("cpu_cores_per_process"):
        busy_workers_note(cell, args.workers if kind == "etl-wsgi" else args.ais_workers)
    workers_after = sorted(server.worker_pids())
    if not server.alive():
        cell["problems"].append("server process died")
    elif kind in PY_SERVERS and workers_after != workers_before:
        cell["problems"].append(
            f"worker processes changed (restarted/killed): {workers_before} -> {workers_after}"
        )
    settle(ctx, server, cell)
    if cell["problems"]:
        cell["log_tail"] = server.log_tail(30)
    return cell


def note_steal(cell: dict, steal: float) -> None:
    """The CPU the hypervisor took during the cell, noted when it is a twentieth of a core."""
    if cell.get("duration_s"):
        cell["steal_cores"] = steal / cell["duration_s"]
        if cell["steal_cores"] >= 0.05:
            cell["notes"].append(f"VM steal {cell['steal_cores']:.2f} cores")


def busy_workers_note(cell: dict, workers: int) -> None:
    """Note a cell where fewer of a server's workers did the work than it was started with.

    uvicorn's workers share one listening socket, and which of them accept wrk's connections
    is down to chance: FastAPI whose four workers ran as two on the two cores was faster
    than as four (hpush md5 1 KiB, benchmarks/README.md).
    """
    per_process = cell["cpu_cores_per_process"].values()
    busy = sum(1 for cores in per_process if cores > BUSY_WORKER_CORES)
    if busy < workers:
        cell["notes"].append(f"{busy} of {workers} workers busy")


def print_log_tail(row: dict) -> None:
    """The server's log tail under a cell or memory row that had problems."""
    if row["problems"] and row.get("log_tail"):
        print("    server log tail:\n    " + row["log_tail"].replace("\n", "\n    "), flush=True)


def print_cell(cell: dict) -> None:
    mark = "ok" if not cell["problems"] else "!!! " + "; ".join(cell["problems"])
    if cell.get("notes"):
        mark += " (" + "; ".join(cell["notes"]) + ")"
    p50 = f"{cell['p50_ms']:.2f}" if cell.get("p50_ms") is not None else "-"
    p99 = f"{cell['p99_ms']:.2f}" if cell.get("p99_ms") is not None else "-"
    print(
        f"{cell['mode']:>9} {cell['transform']:>4} {fmt_size(cell['size']):>7} "
        f"c{cell['connections'] or '-':<4} {cell['server']:>11}: {cell['rps']:>9.0f} req/s "
        f"{cell['mib_s']:>8.1f} MiB/s  p50 {p50:>8} ms  p99 {p99:>8} ms  "
        f"RSS {cell['rss_peak_sum_mib']:>7.0f} MiB  {mark}",
        flush=True,
    )
    print_log_tail(cell)


def runs_in(kind: str, mode: str) -> bool:
    """raw is an echo server (hpush only); nginx is the target itself (hpull and direct put)."""
    return not ((kind == "raw" and mode != "hpush") or (kind == "nginx" and mode == "hpush"))


def checked(
    ctx: Context, servers: dict[str, Server], mode: str, transform: str, size: int
) -> tuple[list[str], list[dict]]:
    """The servers whose check request got the right reply, and a failed cell for the others."""
    assert ctx.target is not None
    node = ctx.target.node_url()
    active, failed = [], []
    for kind, server in servers.items():
        if not runs_in(kind, mode):
            continue
        problem = check_once(server, kind, mode, transform, size, node)
        if not problem:
            active.append(kind)
            continue
        cell = {
            "mode": mode,
            "transform": transform,
            "size": size,
            "connections": None,
            "server": kind,
            "rps": 0.0,
            "mib_s": 0.0,
            "rss_peak_sum_mib": 0.0,
            "problems": [f"wrong reply to the check request: {problem}"],
            "log_tail": server.log_tail(30),
        }
        print_cell(cell)
        failed.append(cell)
    return active, failed


def run_group(ctx: Context, kinds: list[str], mode: str, transform: str, size: int) -> list[dict]:
    """The cells of one mode, transform and size, on freshly started servers (a server's
    memory and backlog from a previous group must not weigh on the next)."""
    assert ctx.target is not None
    cells: list[dict] = []
    servers: dict[str, Server] = {}
    handback = wait_memory_handed_back(ctx.args.settle_max)  # the last group's freed memory
    try:
        for kind in kinds:
            if runs_in(kind, mode):
                servers[kind] = (
                    ctx.target
                    if kind == "nginx"
                    else ctx.start(ctx.make(kind, transform, tag=f"-{mode}-{fmt_size(size)}"))
                )
        active, cells = checked(ctx, servers, mode, transform, size)
        limit = ctx.args.max_inflight_mib * MIB
        conns_list = [c for c in ctx.args.connections if not limit or c * size <= limit]
        for conns in conns_list:
            for kind in active:
                warm = conns == conns_list[0]  # the next cells find the server warm
                cell = run_cell(ctx, servers[kind], kind, mode, transform, size, conns, warm)
                cell["handback_wait_s"] = handback
                print_cell(cell)
                cells.append(cell)
    finally:
        for kind, server in servers.items():
            if kind != "nginx":
                ctx.stop(server)
    return cells


def throughput_one(ctx: Context, transform: str) -> list[dict]:
    """Every cell of one transform; per cell, the servers run one after another."""
    args = ctx.args
    kinds = [k for k in args.servers if k in PY_SERVERS or transform == "echo"]
    sizes = [
        s for s in args.sizes if transform != "md5" or not args.md5_sizes or s in args.md5_sizes
    ]
    cells: list[dict] = []
    for mode in args.modes:
        for size in sizes:
            cells += run_group(ctx, kinds, mode, transform, size)
    return cells


def throughput(ctx: Context) -> list[dict]:
    cells: list[dict] = []
    for transform in ctx.args.transforms:
        cells += throughput_one(ctx, transform)
    return cells


# --------------------------------------------------------------------------------------------
# memory


def warm_up(server: Server, n: int = 16) -> None:
    """Small requests on fresh connections, so every worker has served before we measure."""

    def one() -> None:
        try:
            duplex_put(server.port, HPUSH_PATH, 256 * 1024, timeout=30)
        except OSError:
            pass

    threads = [threading.Thread(target=one) for _ in range(n)]
    for i in range(0, n, 4):
        for t in threads[i : i + 4]:
            t.start()
        for t in threads[i : i + 4]:
            t.join()


def reply_problems(res: dict, total: int) -> list[str]:
    """What is wrong with one echo through duplex_put()."""
    problems = []
    if res.get("error"):
        problems.append(res["error"])
    if res.get("writer_error"):
        problems.append(f"writer: {res['writer_error']}")
    if res.get("status") != 200:
        problems.append(f"status {res.get('status')}")
    if res.get("body_bytes") != total:
        problems.append(f"echoed {res.get('body_bytes')} of {total} bytes")
    if res.get("mismatch_at") is not None:
        problems.append(f"echoed bytes differ from offset {res['mismatch_at']}")
    return problems


def memory_one(ctx: Context, kind: str, transform: str, total: int, repeat: int = 1) -> dict:
    """``repeat`` echoes of ``total`` bytes, one after another, on one fresh server: the median
    time, and the peak RSS growth over all of them."""
    server = ctx.make(kind, transform, tag=f"-memory-{total // MIB}MiB")
    row: dict = {"server": kind, "transform": transform, "bytes": total, "problems": []}
    ctx.start(server)
    try:
        warm_up(server)
        time.sleep(0.5)
        pids = server.pids()
        workers_before = sorted(server.worker_pids())
        before = rss_snapshot(pids)
        reset_peak(pids)
        times = []
        for _ in range(repeat):
            res = duplex_put(server.port, HPUSH_PATH, total, timeout=ctx.args.stream_timeout)
            times.append(res.get("elapsed_s"))
            row["problems"] += reply_problems(res, total)
            if row["problems"]:
                break
        peaks = peak_snapshot(pids)
        growth = {pid: (peaks[pid] - before[pid]) / 1024 for pid in pids}
        row.update(
            status=res.get("status"),
            elapsed_s=statistics.median(times),
            elapsed_all_s=times,
            body_bytes=res.get("body_bytes"),
            rss_before_mib={str(p): v / 1024 for p, v in before.items()},
            rss_peak_mib={str(p): v / 1024 for p, v in peaks.items()},
            growth_max_mib=max(growth.values(), default=0.0),
            growth_sum_mib=sum(growth.values()),
            processes=len(pids),
        )
        if not server.alive():
            row["problems"].append("server process died")
        elif kind in PY_SERVERS and sorted(server.worker_pids()) != workers_before:
            row["problems"].append("worker processes changed (restarted/killed)")
        if row["problems"]:
            row["log_tail"] = server.log_tail(30)
    finally:
        ctx.stop(server)
    mark = "ok" if not row["problems"] else "!!! " + "; ".join(row["problems"])
    print(
        f"memory {transform:>6} {fmt_size(total):>8} {kind:>11}: "
        f"{row.get('elapsed_s') or 0:7.2f} s  peak RSS growth max/process "
        f"{row.get('growth_max_mib', 0):7.1f} MiB, sum {row.get('growth_sum_mib', 0):7.1f} MiB  "
        f"{mark}",
        flush=True,
    )
    print_log_tail(row)
    return row


def memory(ctx: Context) -> dict:
    args = ctx.args
    out: dict = {"stream": [], "buffered": []}
    # raw first: the baseline of the streaming test
    kinds = [k for k in ("raw", *PY_SERVERS) if k in args.servers]
    if args.stream_mib:
        for kind in kinds:  # raw first when selected: the baseline
            transform = "echo" if kind == "raw" else "stream"
            total = args.stream_mib * MIB
            out["stream"].append(memory_one(ctx, kind, transform, total, args.stream_repeat))
    if args.buffered_mib:
        for kind in kinds:
            out["buffered"].append(memory_one(ctx, kind, "echo", args.buffered_mib * MIB))
    return out


# --------------------------------------------------------------------------------------------
# report


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fr(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def cell_name(c: dict) -> str:
    return f"{c['mode']} {c['transform']} {fmt_size(c['size'])} c{c['connections']}"


def group_ratios(key: tuple, group: dict[str, dict]) -> dict:
    """etl-wsgi's req/s over each other server's in one cell (a failed cell counts as 0)."""

    def rps(kind: str) -> float | None:
        c = group.get(kind)
        return None if c is None else (0.0 if c["problems"] else c["rps"])

    mode, transform, size, conns = key
    w, flask, fast = rps("etl-wsgi"), rps("ais-flask"), rps("ais-fastapi")
    best = max((x for x in (flask, fast) if x is not None), default=None)
    return {
        "mode": mode,
        "transform": transform,
        "size": size,
        "connections": conns,
        "vs_fastapi": ratio(w, fast),
        "vs_flask": ratio(w, flask),
        "vs_best_ais": ratio(w, best),
        "vs_raw": ratio(w, rps("raw")),
        "vs_nginx": ratio(w, rps("nginx")),
        "p99_p50": group.get("etl-wsgi", {}).get("p99_p50"),
    }


def ratio_checks(r: dict) -> list[dict]:
    """The issue's targets (item 6) that apply to one cell."""
    wanted: list[tuple[str, float | None, float, bool]] = []
    if r["mode"] == "hpush":
        wanted.append(
            ("etl-wsgi / ais-fastapi >= 1.0 (every hpush cell)", r["vs_fastapi"], 1, True)
        )
    else:
        wanted.append((f"etl-wsgi / best aistore >= 1.0 ({r['mode']})", r["vs_best_ais"], 1, True))
    if r["size"] in (1024, 64 * 1024):
        wanted.append(("etl-wsgi / ais-flask >= 2.0 (1 KiB, 64 KiB)", r["vs_flask"], 2, True))
    if r["mode"] == "hpush" and r["transform"] == "echo" and r["size"] == 16 * MIB:
        wanted.append(("etl-wsgi / raw >= 0.8 (16 MiB echo)", r["vs_raw"], 0.8, True))
    if r["transform"] == "md5" and r["size"] == 16 * MIB:
        wanted.append(("md5 16 MiB: etl-wsgi / best aistore >= 1.0", r["vs_best_ais"], 1, True))
    wanted.append(("etl-wsgi p99/p50 <= 5 (64 and 256 connections)", r["p99_p50"], 5, False))
    return [
        {
            "check": name,
            "cell": cell_name(r),
            "value": value,
            "ok": value >= target if higher else value <= target,
        }
        for name, value, target, higher in wanted
        if value is not None
    ]


def analyse(cells: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per-cell ratios and the issue's targets (item 6)."""
    by: dict[tuple, dict[str, dict]] = {}
    for c in cells:
        if c.get("connections") is not None:
            key = (c["mode"], c["transform"], c["size"], c["connections"])
            by.setdefault(key, {})[c["server"]] = c
    order = {m: i for i, m in enumerate(MODES)}
    ratios = sorted(
        (group_ratios(key, group) for key, group in by.items()),
        key=lambda r: (order[r["mode"]], r["transform"], r["size"], r["connections"]),
    )
    checks = [check for r in ratios for check in ratio_checks(r)]
    checks += [
        {"check": "etl-wsgi: no errors", "cell": cell_name(c), "value": None, "ok": False}
        for c in cells
        if c["server"] == "etl-wsgi" and c["problems"] and c.get("connections") is not None
    ]
    return ratios, checks


def memory_checks(mem: dict) -> list[dict]:
    checks = []
    stream = {r["server"]: r for r in mem.get("stream", [])}
    raw = stream.get("raw")
    base = raw.get("elapsed_s") if raw and not raw["problems"] else None
    for r in mem.get("stream", []):
        r["x_raw"] = ratio(r.get("elapsed_s"), base)
    w = stream.get("etl-wsgi")
    if w:
        size, bad = fmt_size(w["bytes"]), bool(w["problems"])
        if w["x_raw"] is not None:
            ok = w["x_raw"] <= 2.0 and not bad
            checks.append(
                {
                    "check": "streaming echo time <= 2x raw",
                    "cell": size,
                    "value": w["x_raw"],
                    "ok": ok,
                }
            )
        growth = w.get("growth_max_mib")
        ok = growth is not None and growth < 64 and not bad
        checks.append(
            {"check": "streaming peak RSS growth < 64 MiB", "cell": size, "value": growth, "ok": ok}
        )
    for r in mem.get("buffered", []):
        growth = (r.get("growth_max_mib") or 0) * MIB
        r["growth_per_body"] = growth / r["bytes"]
        if r["server"] == "etl-wsgi":
            ok = growth <= r["bytes"] + BUFFERED_SLACK_MIB * MIB and not r["problems"]
            checks.append(
                {
                    "check": f"buffered RSS growth <= 1x body + {BUFFERED_SLACK_MIB} MiB",
                    "cell": fmt_size(r["bytes"]),
                    "value": r["growth_per_body"],
                    "ok": ok,
                }
            )
    return checks


def ok_text(problems: list[str], notes: list[str] | None = None) -> str:
    text = "yes" if not problems else "**NO**: " + "; ".join(problems)
    return text + (" (" + "; ".join(notes) + ")" if notes else "")


def md_header(meta: dict) -> list[str]:
    a = meta["args"]
    return [
        f"# etl-wsgi side by side: {meta['label']} run, {meta['date']}\n",
        f"- machine: {meta['cpus']} CPUs, {meta['mem_gib']:.0f} GiB, {meta['platform']}; load "
        f"average {meta['loadavg_start']:.2f} at start, {meta.get('loadavg_end', 0):.2f} at the "
        "end (other processes on the machine compete for the same cores)",
        f"- repo: {meta['git']}; aistore {meta['aistore']}; {meta['wrk']}; {meta['nginx']}",
        f"- etl-wsgi: gunicorn gevent, {a['workers']} workers, extra env {a['etl_env'] or '{}'}; "
        f"aistore: FlaskServer gunicorn sync {a['ais_workers']} workers, FastAPIServer uvicorn "
        f"{a['ais_workers']} workers; nginx fake target 1 worker; raw: C echo server",
        f"- wrk: {a['wrk_threads']} threads, closed loop, {a['seconds']} s per cell (stretched "
        f"to {a['rounds']:g} replies per connection at {a['assumed_mib_s']:g} MiB/s, at most "
        f"{a['max_cell_seconds']:g} s: column 's'), {a['warmup']:g} s warm-up per server, "
        "mode, transform and size; ratios are req/s of etl-wsgi over the other server, same "
        "cell\n",
    ]


def md_checks(checks: list[dict]) -> list[str]:
    if not checks:
        return []
    out = [
        "## Targets of issue 4 (item 6)\n",
        "| check | cells | passed | worst | worst cell |",
        "|---|---|---|---|---|",
    ]
    groups: dict[str, list[dict]] = {}
    for c in checks:
        groups.setdefault(c["check"], []).append(c)
    for name, items in groups.items():
        passed = sum(1 for c in items if c["ok"])
        valued = [c for c in items if c["value"] is not None]
        pick = max if "<" in name else min
        worst = pick(valued, key=lambda c: c["value"]) if valued else items[0]
        out.append(f"| {name} | {len(items)} | {passed} | {fr(worst['value'])} | {worst['cell']} |")
    return [*out, ""]


def md_mode(mode: str, transform: str, cells: list[dict], ratios: list[dict]) -> list[str]:
    order = {k: i for i, k in enumerate(ALL_SERVERS)}
    sel = [
        c
        for c in cells
        if c["mode"] == mode and c["transform"] == transform and c.get("connections")
    ]
    if not sel:
        return []
    sel.sort(key=lambda c: (c["size"], c["connections"], order[c["server"]]))
    out = [
        f"## {mode}, {transform}\n",
        "| size | conns | server | req/s | MiB/s | p50 ms | p99 ms | p99/p50 | RSS MiB | "
        "CPU cores | busiest process | target conns | s | replies/conn | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sel:
        out.append(
            f"| {fmt_size(c['size'])} | {c['connections']} | {c['server']} | {c['rps']:.0f} | "
            f"{c['mib_s']:.1f} | {fr(c.get('p50_ms'))} | {fr(c.get('p99_ms'))} | "
            f"{fr(c.get('p99_p50'), 1)} | {c['rss_peak_sum_mib']:.0f} | "
            f"{fr(c.get('cpu_cores'))} | {fr(c.get('cpu_cores_max_process'))} | "
            f"{c.get('target_accepts', '-')} | {c.get('seconds', '-')} | "
            f"{fr(c.get('rounds'), 1)} | {ok_text(c['problems'], c.get('notes'))} |"
        )
    out += [
        "",
        "| size | conns | etl-wsgi / FastAPI | / Flask | / best aistore | / raw | / nginx | "
        "etl-wsgi p99/p50 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ratios:
        if r["mode"] == mode and r["transform"] == transform:
            out.append(
                f"| {fmt_size(r['size'])} | {r['connections']} | {fr(r['vs_fastapi'])} | "
                f"{fr(r['vs_flask'])} | {fr(r['vs_best_ais'])} | {fr(r['vs_raw'])} | "
                f"{fr(r['vs_nginx'])} | {fr(r['p99_p50'], 1)} |"
            )
    return [*out, ""]


def md_memory(mem: dict) -> list[str]:
    out = []
    if mem.get("stream"):
        out += [
            "## Streaming echo, peak RSS (median time of the repeats)\n",
            "| server | bytes | time s | x raw | RSS growth max/process MiB | sum MiB | "
            "processes | ok |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in mem["stream"]:
            out.append(
                f"| {r['server']} | {fmt_size(r['bytes'])} | {fr(r.get('elapsed_s'))} | "
                f"{fr(r.get('x_raw'))} | {fr(r.get('growth_max_mib'), 1)} | "
                f"{fr(r.get('growth_sum_mib'), 1)} | {r.get('processes', '-')} | "
                f"{ok_text(r['problems'])} |"
            )
        out.append("")
    if mem.get("buffered"):
        out += [
            "## Buffered echo, RSS growth\n",
            "| server | bytes | time s | RSS growth max/process MiB | growth / body | ok |",
            "|---|---|---|---|---|---|",
        ]
        for r in mem["buffered"]:
            out.append(
                f"| {r['server']} | {fmt_size(r['bytes'])} | {fr(r.get('elapsed_s'))} | "
                f"{fr(r.get('growth_max_mib'), 1)} | {fr(r.get('growth_per_body'))} | "
                f"{ok_text(r['problems'])} |"
            )
        out.append("")
    if mem:
        out.append(
            "Growth = peak RSS during the request (VmHWM, reset just before) minus RSS before "
            "it, per process; 'max/process' is the worker that served the request (one request "
            "runs in one worker), 'sum' adds every process of the server (master included). Each "
            "server was started fresh and served 16 small requests first (lazy imports, "
            "buffers). Elapsed: first byte sent to last byte received, one connection.\n"
        )
    return out


def md_problems(problems: list[dict]) -> list[str]:
    out = ["## Problems\n"]
    if not problems:
        out.append("None: every cell had zero errors and the expected status and replies.\n")
    for p in problems:
        where = (
            f"{p.get('mode', 'memory')} {p['transform']} "
            f"{fmt_size(p.get('size') or p['bytes'])} c{p.get('connections')} {p['server']}"
        )
        out.append(f"- **{where}**: {'; '.join(p['problems'])}")
        if p.get("log_tail"):
            tail = "\n".join(p["log_tail"].splitlines()[-12:])
            out.append("\n  ```\n  " + tail.replace("\n", "\n  ") + "\n  ```")
    return out


def all_problems(cells: list[dict], mem: dict) -> list[dict]:
    rows = cells + mem.get("stream", []) + mem.get("buffered", [])
    return [r for r in rows if r["problems"]]


TABLE_LEGEND = (
    "RSS MiB: sum over the server's processes of their peak RSS during the cell (VmHWM, reset "
    "before the cell). CPU cores: the server's CPU time during the cell over its duration (all "
    "processes; busiest process: the one that used most). Target conns: TCP connections the "
    "fake target accepted during the cell (nginx stub_status; a pooled server opens them "
    "once, during warm-up; nginx's own kept-alive connections to its internal empty-200 "
    "answerer may add a few). nginx rows: wrk straight to the fake target (its ceiling). "
    's: measured seconds; replies/conn: replies per connection in the cell. "VM steal": CPU '
    "the hypervisor took during the cell (/proc/stat), noted from 0.05 cores; each group "
    "starts once the VM has handed the memory freed by the previous one back to its host.\n"
)


def markdown(meta: dict, cells: list[dict], ratios: list[dict], checks: list[dict], mem: dict):
    out = md_header(meta) + md_checks(checks)
    for mode in MODES:
        for transform in TRANSFORMS:
            out += md_mode(mode, transform, cells, ratios)
    if cells:
        out.append(TABLE_LEGEND)
    out += md_memory(mem) + md_problems(all_problems(cells, mem))
    return "\n".join(out) + "\n"


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def metadata(args: argparse.Namespace) -> dict:
    git = tool_version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "etl_wsgi", "gunicorn.conf.py"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    aistore = tool_version(
        [
            str(BENCH_VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('aistore'))",
        ]
    )
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "label": args.label,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git": git + (" + uncommitted etl_wsgi changes" if dirty else ""),
        "aistore": aistore,
        "wrk": tool_version(["wrk", "--version"]).split(" Copyright")[0],
        "nginx": tool_version(["nginx", "-v"]),
        "cpus": os.cpu_count(),
        "mem_gib": mem_kib / (1 << 20),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg()[0],
        "args": {
            k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, dict))
        },
    }


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="2 s cells, a reduced matrix")
    p.add_argument("--seconds", type=float, help="measured seconds per cell (default 5; quick 2)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per cell (0: none)")
    p.add_argument("--sizes", help="object sizes, e.g. 1K,64K,1M,16M (quick: 1K,64K,16M)")
    p.add_argument("--md5-sizes", help="sizes md5 runs at (default: all; quick: 16M)")
    p.add_argument("--connections", help="concurrent connections, e.g. 64,256")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--transforms", default=",".join(TRANSFORMS))
    p.add_argument("--servers", default=",".join(ALL_SERVERS), help=",".join(ALL_SERVERS))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="etl-wsgi workers")
    p.add_argument("--ais-workers", type=int, default=4, help="aistore servers' workers")
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=60.0, help="wrk per-request timeout, s")
    p.add_argument(
        "--rounds", type=float, help="replies per connection a cell lasts for (default 4; quick 2)"
    )
    p.add_argument(
        "--assumed-mib-s",
        type=float,
        default=800.0,
        help="throughput assumed when stretching cells with much data in flight",
    )
    p.add_argument(
        "--max-cell-seconds", type=float, help="cap of a stretched cell (default 60; quick 20)"
    )
    p.add_argument(
        "--max-inflight-mib",
        type=int,
        help="skip cells with more than this in flight, connections x size (quick: 1024)",
    )
    p.add_argument(
        "--settle-max", type=float, default=60.0, help="max wait for servers to go idle, s"
    )
    p.add_argument("--stream-mib", type=int, help="streaming test MiB (default 1024; quick 256)")
    p.add_argument("--buffered-mib", type=int, default=256, help="buffered test MiB (0: skip)")
    p.add_argument("--stream-timeout", type=float, default=300.0)
    p.add_argument(
        "--stream-repeat", type=int, default=3, help="streaming echoes per server (median time)"
    )
    p.add_argument("--no-throughput", action="store_true", help="only the memory tests")
    p.add_argument("--no-memory", action="store_true", help="only the throughput matrix")
    p.add_argument(
        "--etl-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for etl-wsgi (repeatable), e.g. an ETL_* setting to compare",
    )
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    args.label = "quick" if args.quick else "full"
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 5.0
    sizes = args.sizes or ("1K,64K,16M" if args.quick else "1K,64K,1M,16M")
    args.sizes = [parse_size(s) for s in sizes.split(",")]
    md5 = args.md5_sizes or ("16M" if args.quick else "")
    args.md5_sizes = [parse_size(s) for s in md5.split(",") if s]
    args.connections = [int(c) for c in (args.connections or "64,256").split(",")]
    args.modes = [m for m in args.modes.split(",") if m]
    args.transforms = [t for t in args.transforms.split(",") if t]
    args.servers = [s for s in args.servers.split(",") if s]
    for name, got, allowed in (
        ("--modes", args.modes, MODES),
        ("--transforms", args.transforms, TRANSFORMS),
        ("--servers", args.servers, ALL_SERVERS),
    ):
        bad = set(got) - set(allowed)
        if bad:
            p.error(f"{name}: unknown {sorted(bad)}; choose from {','.join(allowed)}")
    if args.rounds is None:
        args.rounds = 2.0 if args.quick else 4.0
    if args.max_cell_seconds is None:
        args.max_cell_seconds = 20.0 if args.quick else 60.0
    if args.max_inflight_mib is None:
        args.max_inflight_mib = 1024 if args.quick else 0
    if args.stream_mib is None:
        args.stream_mib = 256 if args.quick else 1024
    env = {}
    for item in args.etl_env:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--etl-env {item!r}: expected KEY=VALUE")
        env[key] = value
    args.etl_env = env
    return args


def preflight(args: argparse.Namespace) -> None:
    missing = [tool for tool in ("wrk", "nginx") if not _which(tool)]
    if missing:
        sys.exit(f"missing {missing}: run benchmarks/run.sh, which installs them")
    if {"ais-flask", "ais-fastapi"} & set(args.servers) and not (
        BENCH_VENV / "bin" / "uvicorn"
    ).exists():
        sys.exit(f"no {BENCH_VENV}: run benchmarks/run.sh, which creates it")


def _which(tool: str) -> bool:
    from shutil import which

    return which(tool) is not None or Path("/usr/sbin", tool).exists()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preflight(args)
    raise_nofile()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    logdir = outdir / f"logs-{stamp}"
    meta = metadata(args)
    cells: list[dict] = []
    mem: dict = {}
    interrupted = False
    crashed = ""
    with tempfile.TemporaryDirectory(prefix="etl-bench-") as tmp:
        ctx = Context(args, Path(tmp), logdir)
        try:
            ctx.raw_bin = build_raw_echo(outdir / "build")
            sizes = sorted(set(args.sizes))
            ctx.target = FakeTarget(Path(tmp), sizes)
            ctx.start(ctx.target)
            assert http_ok(ctx.target.port, "/health")
            print(
                f"fake target (nginx) on {ctx.target.url}; AIS_TARGET_URL="
                f"{ctx.target.target_url}; logs in {logdir}",
                flush=True,
            )
            if not args.no_throughput:
                cells = throughput(ctx)
            if not args.no_memory:
                mem = memory(ctx)
        except KeyboardInterrupt:
            interrupted = True
            print("\ninterrupted: stopping every server", file=sys.stderr)
        except Exception:
            crashed = traceback.format_exc()
            print(f"\n!!! benchmark failed, stopping every server:\n{crashed}", file=sys.stderr)
        finally:
            ctx.stop_all()
    meta["loadavg_end"] = os.getloadavg()[0]
    ratios, checks = analyse(cells)
    checks += memory_checks(mem)
    report = markdown(meta, cells, ratios, checks, mem)
    if interrupted:
        report = "**Interrupted: partial results.**\n\n" + report
    if crashed:
        report = f"**The benchmark failed: partial results.**\n\n```\n{crashed}```\n\n" + report
    base = outdir / f"side_by_side-{stamp}"
    data = {"meta": meta, "cells": cells, "ratios": ratios, "checks": checks, "memory": mem}
    base.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    base.with_suffix(".md").write_text(report)
    print("\n" + report)
    print(f"results: {base}.md, {base}.json; server logs: {logdir}")
    problems = all_problems(cells, mem)
    if problems:
        print(
            f"!!! {len(problems)} cell(s) with errors; see 'Problems' in the report",
            file=sys.stderr,
        )
    return 130 if interrupted else (1 if problems or crashed else 0)


if __name__ == "__main__":
    sys.exit(main())
