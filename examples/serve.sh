#!/usr/bin/env bash
# Install etl-wsgi into .venv and serve the bundled example transformer under gunicorn (gevent)
# on 127.0.0.1:8000. Then, from another shell:
#   curl -X PUT --data-binary 'hello etl' http://127.0.0.1:8000/bucket/obj.txt
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e .
# AIS sets AIS_TARGET_URL in a real pod; this one is only used for direct put and hpull GETs.
export AIS_TARGET_URL="${AIS_TARGET_URL:-http://127.0.0.1:8080/v1/etl/_object/demo/s3cr3tABCD}"
export ETL_BIND="${ETL_BIND:-127.0.0.1:8000}"
exec .venv/bin/gunicorn -c gunicorn.conf.py "etl_wsgi.app:create_app(\"${ETL_EXAMPLE:-examples.upper:Upper}\")"
