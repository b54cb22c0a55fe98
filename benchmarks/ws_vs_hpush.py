"""WebSocket vs hpush on the same server, same run (issue 3): requests/s for 1 KiB and 64 KiB.

    python benchmarks/ws_vs_hpush.py [--seconds 10] [--connections 16] [--workers 2]

Starts ``gunicorn -c gunicorn.conf.py`` (gevent) serving ``Echo`` on 127.0.0.1, then drives it
with ``loadclient.js`` (Node, closed loop: each connection sends an object and waits for its
reply, as an AIS target worker does) over hpush (``PUT`` with the body) and ws (control frame +
data frame). Prints a table with ws/hpush ratios; writes JSON to benchmarks/results/.
Node's ``ws`` package is installed by ``npm install`` in this folder (run.sh does it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from etl_wsgi.testing import GunicornServer  # noqa: E402

SIZES = (1024, 64 * 1024)


def run_client(mode: str, url: str, size: int, connections: int, seconds: float) -> dict:
    out = subprocess.run(
        ["node", str(HERE / "loadclient.js"), mode, url, str(size), str(connections), str(seconds)],
        check=True,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    env = {"AIS_TARGET_URL": "http://127.0.0.1:9/v1/etl/_object/bench/s3cr3tABCD"}
    server = GunicornServer(
        "etl_wsgi.app:create_app('transformers:Echo')",
        env,
        args.workers,
        config=str(ROOT / "gunicorn.conf.py"),
        pythonpath=[str(HERE), str(ROOT)],
        cwd=str(ROOT),
    )
    rows = []
    with server:
        for size in SIZES:
            for mode in ("hpush", "ws"):
                run_client(mode, server.url, size, args.connections, 1.0)  # warm-up
                rows.append(run_client(mode, server.url, size, args.connections, args.seconds))
    print(
        f"ws vs hpush: Echo, {args.workers} gevent workers, {args.connections} connections, "
        f"{args.seconds:.0f} s per cell, closed loop"
    )
    header = ("size", "mode", "req/s", "MiB/s", "p50 ms", "p99 ms", "errors")
    print("{:>8} {:>6} {:>10} {:>9} {:>8} {:>8} {:>7}".format(*header))
    for r in rows:
        print(
            f"{r['size']:>8} {r['mode']:>6} {r['rps']:>10.0f} {r['mib_s']:>9.1f} "
            f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>7}"
        )
    for size in SIZES:
        by = {r["mode"]: r for r in rows if r["size"] == size}
        print(f"ratio ws/hpush at {size} B: {by['ws']['rps'] / by['hpush']['rps']:.2f}x")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"ws_vs_hpush-{int(time.time())}.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
