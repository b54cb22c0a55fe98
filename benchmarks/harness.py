"""Process and measurement plumbing for side_by_side.py (standard library only).

- :class:`Proc`: a server started as a subprocess in its own session (so its workers can be
  killed as a group), waited for with ``GET /health`` or a caller-given probe; log in a file.
- :class:`EtlWsgi`: etl-wsgi through :class:`etl_wsgi.testing.GunicornServer` (the real
  ``gunicorn -c gunicorn.conf.py`` entry point on a pre-bound 127.0.0.1 socket).
- :class:`FakeTarget`: nginx playing the AIS target: serves ``GET`` of the pre-generated objects
  under ``AIS_TARGET_URL`` (hpull) and swallows ``PUT`` bodies with an empty ``200`` (direct put).
- :func:`build_raw_echo`: compiles raw_echo.c (the C loopback ceiling) into the build folder.
- :func:`run_wrk`: one wrk run with a script from ``wrk/``; returns the ``BENCH_JSON`` line.
- :func:`duplex_put`: one HTTP PUT whose body is written by a thread while the caller reads
  the response, for the streaming and big-buffer memory tests.
- ``/proc`` helpers: process trees, ``VmRSS``/``VmHWM``, resetting the peak (``clear_refs``).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WRK_DIR = HERE / "wrk"

#: What AIS puts in AIS_TARGET_URL: <target>/v1/etl/_object/<etl name>/<secret>.
TARGET_PREFIX = "/v1/etl/_object/bench/s3cr3tABCD"
#: Direct-put destination as the target writes it in Ais-Node-Url (uname escaped, query kept).
DST_UNAME_ESCAPED = "ais%2F@%23%2Fdst%2Fobj"


def src_uname(size: int) -> str:
    """The object a hpull cell reads: uname ``ais/@#/b/obj<size>``."""
    return f"ais/@#/b/obj{size}"


def escape_uname(uname: str) -> str:
    """How AIS (and every ETL server) escapes a uname in a URL path: ``/`` -> ``%2F``."""
    return quote(uname, safe="@")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------
# /proc


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    seen = [pid]
    i = 0
    while i < len(seen):
        seen.extend(c for c in children(seen[i]) if c not in seen)
        i += 1
    return [p for p in seen if os.path.exists(f"/proc/{p}")]


def status_kib(pid: int, key: str) -> int:
    """``VmRSS``/``VmHWM``... of ``pid`` in KiB (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak(pids: Iterable[int]) -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0, ``echo 5 > clear_refs``)."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time used so far by ``pids`` (gone processes count 0)."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def steal_seconds() -> float:
    """CPU time the hypervisor took from this VM so far, all CPUs (``steal`` in /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


#: Free page reporting (virtio-balloon): the guest hands freed memory back to the host.
REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")


def wait_memory_handed_back(max_wait: float = 60.0, quiet: float = 3.0) -> float | None:
    """Wait until the VM has handed freed memory back to its host; seconds waited (None: never).

    On a VM with free page reporting the kernel reports freed memory to the host 2 s after it
    is freed and the host discards it: after a server that held GiBs exits, the host took 0.2-0.7
    of the two vCPUs (steal time) for about 25 s, in the next group's cells. Waits until the
    reported total has not grown for ``quiet`` seconds; 0 where the kernel does not report.
    """
    if not REPORTED_KIB.exists():
        return 0.0
    started = time.monotonic()
    last, since = REPORTED_KIB.read_text(), time.monotonic()
    while time.monotonic() - started < max_wait:
        time.sleep(0.5)
        now = REPORTED_KIB.read_text()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return time.monotonic() - started
    return None


def wait_idle(
    pids: Callable[[], list[int]],
    *,
    quiet: float = 0.1,
    interval: float = 0.5,
    max_wait: float = 60.0,
) -> float | None:
    """Wait until ``pids()`` use less than ``quiet`` cores; seconds waited (None: never).

    wrk stops at the end of a cell with requests in flight; a server may go on working on what
    it already accepted (reading bodies, fetching objects), which would slow down the next cell.
    """
    started = time.monotonic()
    prev = cpu_seconds(pids())
    while time.monotonic() - started < max_wait:
        time.sleep(interval)
        cur = cpu_seconds(pids())
        if (cur - prev) / interval < quiet:
            return time.monotonic() - started
        prev = cur
    return None


def rss_snapshot(pids: Iterable[int]) -> dict[int, int]:
    return {pid: status_kib(pid, "VmRSS") for pid in pids}


def peak_snapshot(pids: Iterable[int]) -> dict[int, int]:
    return {pid: status_kib(pid, "VmHWM") for pid in pids}


# --------------------------------------------------------------------------------------------
# servers


def http_ok(port: int, path: str = "/health", timeout: float = 1.0) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", path)
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


class Server:
    """What the benchmark needs from any server under test."""

    name = "?"
    port = 0

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def main_pid(self) -> int | None:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def log_tail(self, lines: int = 40) -> str:
        raise NotImplementedError

    def pids(self) -> list[int]:
        pid = self.main_pid()
        return process_tree(pid) if pid else []

    def worker_pids(self) -> list[int]:
        pid = self.main_pid()
        return [p for p in self.pids() if p != pid] if pid else []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Proc(Server):
    """A command run in its own session, logging to ``log_path``, ready when ``probe()``."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        port: int,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        probe: Callable[[], bool] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.port = port
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.probe = probe or (lambda: http_ok(self.port))
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.probe():
                return
            time.sleep(0.1)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {self.start_timeout:.0f} s:\n{tail}")

    def main_pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # workers that outlived their master, or a master that ignored SIGTERM
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class EtlWsgi(Server):
    """etl-wsgi as AIS runs it: ``gunicorn -c gunicorn.conf.py 'etl_wsgi.app:create_app(..)'``."""

    def __init__(
        self, name: str, etl_class: str, workers: int, env: Mapping[str, str], log_path: Path
    ) -> None:
        sys.path.insert(0, str(ROOT))
        from etl_wsgi.testing import GunicornServer

        self.name = name
        self.log_path = log_path
        self.server = GunicornServer(
            f"etl_wsgi.app:create_app('transformers:{etl_class}')",
            env,
            workers,
            config=str(ROOT / "gunicorn.conf.py"),
            pythonpath=[str(HERE), str(ROOT)],
            cwd=str(ROOT),
        )
        self.port = self.server.port

    def start(self) -> None:
        self.server.start(timeout=60.0)

    def main_pid(self) -> int | None:
        proc = self.server.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def alive(self) -> bool:
        return self.main_pid() is not None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.server.log().splitlines()[-lines:])
        except ValueError:  # log file closed by stop()
            return ""

    def stop(self) -> None:
        pids = self.pids()
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text(self.server.log())
        except ValueError:
            pass
        self.server.stop(timeout=15.0, sig=signal.SIGTERM)
        for pid in pids:  # a worker left behind would skew the next measurements
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


#: glibc malloc settings of the fake target: keep freed body buffers (up to 32 MiB each) in the
#: heap. By default glibc gives the heap's free top back to the kernel past 2x the last freed
#: buffer, and the next buffers fault their pages in again: with 128-256 direct puts of 16 MiB in
#: flight nginx took 114-153k page faults/s, 0.64-0.76 of a core in the kernel, and was the
#: bottleneck (etl-wsgi 66-118 req/s; 153-171 in five runs with these settings, nginx 0
#: faults/s). A target must not be what a benchmark of ETL servers measures; glibc reads this
#: in nginx's master, its workers inherit it.
NGINX_MALLOC_TUNABLES = (
    "glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=33554432"
)


class FakeTarget(Proc):
    """nginx as the AIS target: objects for hpull GETs, an empty-200 sink for direct-put PUTs."""

    def __init__(self, workdir: Path, sizes: list[int]) -> None:
        self.dir = workdir / "nginx"
        self.objects = self.dir / "objects"
        port = free_port()
        for sub in ("tmp_body", "tmp_proxy", "tmp_fcgi", "tmp_uwsgi", "tmp_scgi"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for size in sizes:
            path = self.objects / src_uname(size)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.stat().st_size != size:
                path.write_bytes(object_body(size))
        # nginx's workers drop to `nobody` unless told otherwise; let them read the tree.
        for p in [workdir, *self.dir.rglob("*"), self.dir]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        sink_port = free_port()
        body_buffer = f"{max([*sizes, 1 << 20]) // 1024 + 64}k"
        _soft, hard = _nofile()
        user = "user root;" if os.geteuid() == 0 else ""
        d = self.dir
        conf = f"""
daemon off;
master_process on;
worker_processes 1;
{user}
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile {min(hard, 65536)};
events {{ worker_connections {min(hard // 2, 16384)}; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 300s;
  keepalive_requests 1000000000;
  client_max_body_size 0;
  client_body_temp_path {d}/tmp_body;
  proxy_temp_path {d}/tmp_proxy;
  fastcgi_temp_path {d}/tmp_fcgi;
  uwsgi_temp_path {d}/tmp_uwsgi;
  scgi_temp_path {d}/tmp_scgi;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /health {{ return 200; }}
    location = /nginx_status {{ stub_status; }}
    # $uri is decoded: .../ais%2F@%23%2Fb%2Fobj1024 maps to objects/ais/@#/b/obj1024.
    location {TARGET_PREFIX}/ {{
      error_page 418 = @sink;
      if ($request_method = PUT) {{ return 418; }}
      alias {self.objects}/;
    }}
    # Direct-put sink: like a target, read the whole body, then answer 200 with an empty body.
    # (A bare `return 200` would answer as soon as the headers are in and discard the body
    # afterwards; clients that wait for the upload to finish before reading see no difference,
    # but an early answer is not what a target does.) proxy_pass reads the whole body first
    # (request buffering, in memory: client_body_buffer_size >= the largest object), then
    # asks the empty-200 server below, without the body, over kept-alive connections.
    location @sink {{
      client_body_buffer_size {body_buffer};
      proxy_pass http://empty200;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
  upstream empty200 {{
    server 127.0.0.1:{sink_port};
    keepalive 1024;
  }}
  server {{
    listen 127.0.0.1:{sink_port} backlog=4096;
    location / {{ return 200; }}
  }}
}}
"""
        (d / "nginx.conf").write_text(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        super().__init__(
            "nginx",
            [nginx, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
            port,
            d / "stdout.log",
            env={**os.environ, "GLIBC_TUNABLES": NGINX_MALLOC_TUNABLES},
        )

    def counters(self) -> dict[str, int]:
        """stub_status: connections accepted and requests served so far (all server blocks)."""
        try:
            _status, _h, body = request_once(self.port, "GET", "/nginx_status", timeout=5)
            lines = body.decode().splitlines()
            accepts, _handled, requests = (int(x) for x in lines[2].split())
            return {"accepts": accepts, "requests": requests}
        except (OSError, ValueError, IndexError):
            return {}

    @property
    def target_url(self) -> str:
        """AIS_TARGET_URL for the servers under test."""
        return f"http://127.0.0.1:{self.port}{TARGET_PREFIX}"

    def node_url(self) -> str:
        """Ais-Node-Url of a direct put to this 'target'."""
        return f"http://127.0.0.1:{self.port}/{DST_UNAME_ESCAPED}?owt=3&uuid=X"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = (self.dir / "error.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _nofile() -> tuple[int, int]:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_nofile() -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def object_body(size: int) -> bytes:
    """The object bytes every client sends (same pattern as wrk/common.lua)."""
    unit = b"0123456789abcdef"
    return (unit * (size // len(unit) + 1))[:size]


def build_raw_echo(build_dir: Path) -> Path:
    src = HERE / "raw_echo.c"
    out = build_dir / "raw_echo"
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    build_dir.mkdir(parents=True, exist_ok=True)
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc) found to build raw_echo.c")
    subprocess.run(
        [cc, "-O2", "-Wall", "-pthread", "-o", str(out), str(src)], check=True, timeout=120
    )
    return out


# --------------------------------------------------------------------------------------------
# load


def run_wrk(
    script: str,
    url: str,
    script_args: list[str],
    connections: int,
    seconds: float,
    *,
    threads: int = 2,
    timeout_s: float = 60.0,
) -> dict:
    """One wrk run; returns the parsed ``BENCH_JSON`` line (plus ``wrk_stdout`` on failure)."""
    cmd = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={int(timeout_s)}s",
        "-s",
        str(WRK_DIR / script),
        url,
        "--",
        *script_args,
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + timeout_s + 60)
    except subprocess.TimeoutExpired as exc:
        return {"failed": f"wrk did not finish: {exc}", "cmd": cmd}
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result = json.loads(line[len("BENCH_JSON ") :])
            result["cmd"] = cmd
            return result
    return {
        "failed": f"wrk exited {out.returncode} without a result",
        "wrk_stdout": out.stdout[-2000:],
        "wrk_stderr": out.stderr[-2000:],
        "cmd": cmd,
    }


def request_once(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


class _BodyReader:
    """Reads a response body off a buffered socket file, checking it against the sent bytes."""

    def __init__(self, f, pattern: bytes, chunk: int, verify: bool) -> None:
        self.f = f
        self.pattern = memoryview(pattern)
        self.period = 16
        self.view = memoryview(bytearray(chunk))
        self.chunk = chunk
        self.verify = verify
        self.count = 0
        self.mismatch_at: int | None = None

    def read(self, n: int | None) -> None:
        """Read n body bytes (None: until EOF)."""
        while n is None or n > 0:
            want = self.chunk if n is None else min(n, self.chunk)
            got = self.f.readinto(self.view[:want])
            if not got:
                if n is None:
                    return
                raise ConnectionError(f"body cut short, {n} bytes missing")
            if self.verify and self.mismatch_at is None and not self._sample_ok(got):
                self.mismatch_at = self.count
            self.count += got
            if n is not None:
                n -= got

    def _sample_ok(self, got: int) -> bool:
        """First and last 64 bytes of each read against the sent pattern (a full compare costs
        as much client CPU as the raw server's whole echo)."""
        start = self.count % self.period
        n = min(got, 64)
        head = self.view[:n] == self.pattern[start : start + n]
        tail_off = got - n
        tstart = (self.count + tail_off) % self.period
        return head and self.view[tail_off:got] == self.pattern[tstart : tstart + n]

    def read_chunked(self) -> None:
        while size := int(self.f.readline().split(b";")[0], 16):
            self.read(size)
            self.f.readline()
        while self.f.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass

    def read_response(self) -> tuple[int, dict[str, str]]:
        status = int(self.f.readline().split()[1])
        headers: dict[str, str] = {}
        while (line := self.f.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.read_chunked()
        elif "content-length" in headers:
            self.read(int(headers["content-length"]))
        else:
            self.read(None)
        return status, headers


def duplex_put(
    port: int,
    path: str,
    total: int,
    *,
    chunk: int = 1 << 20,
    timeout: float = 600.0,
    verify_echo: bool = True,
) -> dict:
    """PUT ``total`` bytes with Content-Length while reading the response concurrently.

    The body is written by a thread; this thread reads the status, headers and body (any
    framing: Content-Length, chunked, or until close) and, for echo servers, checks the bytes
    (total count exactly; content sampled at both ends of every read).
    A client that wrote everything before reading would deadlock against any streaming server
    once both directions' socket buffers fill up.
    """
    pattern = object_body(chunk + 16)  # period 16: byte o of the body is pattern[o % 16]
    payload = memoryview(pattern)[:chunk]
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {total}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    writer_error: list[BaseException] = []
    sent = [0]

    def writer() -> None:
        try:
            sock.sendall(head)
            left = total
            while left:
                n = min(left, chunk)
                sock.sendall(payload[:n])
                left -= n
                sent[0] += n
        except OSError as exc:
            writer_error.append(exc)

    started = time.perf_counter()
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    f = sock.makefile("rb", buffering=chunk)
    body = _BodyReader(f, pattern, chunk, verify_echo)
    result: dict = {"status": None}
    try:
        result["status"], result["headers"] = body.read_response()
    except (OSError, ValueError, IndexError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["elapsed_s"] = time.perf_counter() - started
    thread.join(timeout=5)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    f.close()
    sock.close()
    thread.join(timeout=5)
    result.update(body_bytes=body.count, mismatch_at=body.mismatch_at, sent_bytes=sent[0])
    if writer_error:
        result["writer_error"] = repr(writer_error[0])
    return result
