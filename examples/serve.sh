#!/usr/bin/env bash
# Install etl-wsgi into .venv and serve an example transformer (gunicorn, gevent workers) on
# 127.0.0.1:8000 with `etl-wsgi serve`. Then, from another shell:
#   curl -X PUT --data-binary 'hello etl' http://127.0.0.1:8000/bucket/obj.txt
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e .
# AIS sets AIS_TARGET_URL in a real pod; this one is only used for direct put and hpull GETs.
export AIS_TARGET_URL="${AIS_TARGET_URL:-http://127.0.0.1:8080/v1/etl/_object/demo/s3cr3tABCD}"
exec .venv/bin/etl-wsgi serve "${ETL_EXAMPLE:-examples.upper:Upper}" --bind "${ETL_BIND:-127.0.0.1:8000}"
