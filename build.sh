#!/usr/bin/env bash
# One entry point for developers and CI:
#   ./build.sh demo      development AgentCenter + agent on loopback with mTLS
#   ./build.sh test      every test (what CI runs)
#   ./build.sh bench     benchmarks (print numbers; never part of the tests)
#   ./build.sh proto     regenerate elkeid_agent/pb/grpc_pb2.py from proto/
# Each sets up .venv (python3 -m venv + pip from PyPI) on first use.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${ELKEID_VENV:-.venv}
PY=${PYTHON:-python3}

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

venv() {
    local stamp="$VENV/.installed" want
    want=$(cat pyproject.toml | sha256sum | cut -c1-16)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
    say "setting up $VENV (first run only)"
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
        || die "$PY is older than 3.9"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" || die "python3 -m venv failed (install python3-venv)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]' \
        || die "pip install failed"
    echo "$want" > "$stamp"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    test)
        venv
        say "running tests"
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    demo)
        venv
        exec "$VENV/bin/python" -m elkeid_agent.demo "$@"
        ;;
    bench)
        venv
        exec "$VENV/bin/python" -m elkeid_agent.bench "$@"
        ;;
    proto)
        venv
        say "generating elkeid_agent/pb/grpc_pb2.py"
        "$VENV/bin/python" -m grpc_tools.protoc -Iproto --python_out=elkeid_agent/pb proto/grpc.proto
        ;;
    *)
        sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
        [ -z "$cmd" ] && exit 2
        die "unknown command: $cmd"
        ;;
esac
