#!/usr/bin/env bash
# One command for the benchmarks: installs what they need, then runs them.
#
#   bash benchmarks/run.sh                          # everything: side-by-side (full), ws-vs-hpush
#   bash benchmarks/run.sh side-by-side [--quick] [options]   # see side_by_side.py --help
#   bash benchmarks/run.sh ws-vs-hpush [--seconds 10 --connections 16 --workers 2]
#   bash benchmarks/run.sh install                  # only install
#
# Installs, idempotently: Debian's wrk and nginx (apt-get, as root or with sudo), the project's
# .venv (etl-wsgi, editable), a separate .bench-venv with aistore[etl]==2.0.0 for the reference
# servers (aistore is never a dependency of etl-wsgi), Node's ws package for ws-vs-hpush.
# raw_echo.c is compiled by side_by_side.py into benchmarks/results/build/.
# Output: tables on stdout; JSON and markdown in benchmarks/results/ (gitignored).
set -euo pipefail
cd "$(dirname "$0")/.."

what="${1:-all}"
case "$what" in
side-by-side | ws-vs-hpush | all | install) [ $# -gt 0 ] && shift ;;
*)
    echo "usage: $0 [side-by-side|ws-vs-hpush|all|install] [options of that benchmark]" >&2
    exit 2
    ;;
esac
if [ "$what" = all ] && [ $# -gt 0 ]; then
    echo "'all' takes no options; run side-by-side or ws-vs-hpush with options" >&2
    exit 2
fi

log=benchmarks/results/install.log
mkdir -p benchmarks/results
: >"$log"

install_debian() {
    local missing=()
    command -v wrk >/dev/null || missing+=(wrk)
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    command -v gcc >/dev/null || missing+=(gcc)
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get install -y "${missing[@]}" >>"$log" 2>&1 || {
        "${sudo[@]}" apt-get update >>"$log" 2>&1
        "${sudo[@]}" apt-get install -y "${missing[@]}" >>"$log" 2>&1
    } || {
        echo "apt-get install ${missing[*]} failed; see $log" >&2
        exit 1
    }
}

install_venv() {
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install -q -e . >>"$log" 2>&1 || {
        echo "pip install -e . failed; see $log" >&2
        exit 1
    }
}

install_bench_venv() {
    local check="import importlib.metadata as m, fastapi, uvicorn, flask, gunicorn, httpx, uvloop
assert m.version('aistore') == '2.0.0', m.version('aistore')"
    [ -x .bench-venv/bin/python ] || python3 -m venv .bench-venv
    .bench-venv/bin/python -c "$check" 2>/dev/null && return 0
    echo "installing aistore[etl]==2.0.0 into .bench-venv"
    .bench-venv/bin/pip install -q 'aistore[etl]==2.0.0' >>"$log" 2>&1 || {
        echo "pip install aistore[etl]==2.0.0 failed; see $log" >&2
        exit 1
    }
    .bench-venv/bin/python -c "$check"
}

install_node() {
    (cd benchmarks && npm install --silent --no-audit --no-fund)
}

install_debian
install_venv
case "$what" in
side-by-side) install_bench_venv ;;
ws-vs-hpush) install_node ;;
all | install)
    install_bench_venv
    install_node
    ;;
esac

case "$what" in
side-by-side) exec .venv/bin/python benchmarks/side_by_side.py "$@" ;;
ws-vs-hpush) exec .venv/bin/python benchmarks/ws_vs_hpush.py "$@" ;;
all)
    status=0
    .venv/bin/python benchmarks/side_by_side.py || status=$?
    .venv/bin/python benchmarks/ws_vs_hpush.py || status=$?
    exit $status
    ;;
install) echo "installed: wrk, nginx, gcc, .venv, .bench-venv (aistore 2.0.0), node ws" ;;
esac
