"""Build dist/elkeid-agent.pyz: one file for every CPython 3.9-3.13 on one
architecture. Run by ``./build.sh zipapp`` (and ``./build.sh packages`` for
each architecture); needs pip and this machine's package registry.

    python packaging/build_zipapp.py --arch x86_64 --out dist/elkeid-agent.pyz

Layout of the file:
- a ``#!/bin/sh`` preamble that runs the first python3 on PATH on the file
  itself (a zip archive may carry any prefix);
- ``__main__.py`` (a one-line refusal on unsupported Pythons) and
  ``_elkeid_boot.py`` (cache and extraction; see its docstring);
- ``elkeid_zipapp.json``: version, architecture, supported ABIs, build id;
- ``site-packages/``: elkeid_agent (without the development AgentCenter),
  grpcio's Python code once plus its compiled ``cygrpc`` for each of
  cp39..cp313 side by side (each file name carries its ABI, so they never
  clash), cffi likewise (its ``_cffi_backend``), protobuf and cryptography
  (one abi3 build each: one compiled module serves every ABI), pycparser,
  typing_extensions and PyYAML's pure-Python package.

The build id is a SHA-256 over every path, mode and content under
site-packages; the bootstrap names its cache directory after it. Output is
reproducible: fixed timestamps, sorted entries.

``--version V`` stamps V into the archive's copy of elkeid_agent (test
builds of an update, say): metadata, preamble and ``--version`` all say V;
the checkout is never written.
"""

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# One grpcio release with wheels for all five ABIs (1.80.1 is the newest with
# a cp39 wheel; docs/operations.md), the protobuf runtime the checked-in
# gencode needs, grpcio's one dependency.
GRPCIO = ("grpcio", "1.80.1")
PROTOBUF = ("protobuf", "6.33.6")
TYPING_EXTENSIONS = ("typing_extensions", "4.16.0")
# The services file's YAML reader. Only its pure-Python package is bundled
# (one set of .py files serves every CPython; yaml falls back to it when its
# C extension is absent), taken from the cp39 wheel of the architecture.
PYYAML = ("pyyaml", "6.0.3")
PURE_ONLY = ("pyyaml",)
# Update signatures (elkeid_agent/update/) are checked with cryptography: its
# cp39-abi3 wheel serves every CPython 3.9-3.13 (its authors exclude 3.9.0
# and 3.9.1 for a CPython bug that breaks it, hence the 3.9.2 given to pip;
# docs/operations.md). On CPython it needs cffi's compiled backend, one per
# ABI like grpcio's (2.0.0 is the newest cffi with a cp39 wheel), cffi needs
# pycparser (2.23 is the newest for 3.9), and on 3.9/3.10 typing_extensions
# >= 4.13.2 (bundled above).
CRYPTOGRAPHY = ("cryptography", "50.0.2")
CFFI = ("cffi", "2.0.0")
PYCPARSER = ("pycparser", "2.23")
# The only modules compiled once per ABI (name without the ABI tag): stage()
# insists on all five ABIs of each, and on no other.
PER_ABI_MODULES = ("_cffi_backend", "grpc/_cython/cygrpc")
ABI_TAGGED = re.compile(r"\.(cpython-3\d+-[^/]+)\.so$")
# What --version accepts: a file-name-safe version (the bootstrap names its
# cache directory after it; see _VERSION_DIR there).
VERSION_SYNTAX = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+~_-]{0,63}")
_VERSION_LINE = re.compile(r'^__version__\s*=\s*"([^"]+)"', re.M)
PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
# The optional C hot path (accel/): one stable-ABI binary per architecture
# serves every CPython 3.9-3.13. Built with the host gcc for the host's
# architecture, with Debian's cross gcc for the other (build.sh installs
# gcc-aarch64-linux-gnu); without a compiler the zipapp runs pure Python.
ACCEL_SOURCE = os.path.join(ROOT, "accel", "elkeid_accel.c")
ACCEL_MODULE = "elkeid_agent/_accel.abi3.so"
ACCEL_LIMITED_API = "0x03090000"
CROSS_GCC = {"x86_64": "x86_64-linux-gnu-gcc", "aarch64": "aarch64-linux-gnu-gcc"}
ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
FIXED_TIME = (2020, 1, 1, 0, 0, 0)

PREAMBLE = """\
#!/bin/sh
# elkeid-agent {version} ({arch}): a Python zipapp for CPython 3.9-3.13.
# This shell preamble runs the archive that follows with a python3 from PATH
# (or $ELKEID_PYTHON); `python3.X elkeid-agent.pyz ...` works as well.
if [ -n "${{ELKEID_PYTHON:-}}" ]; then exec "$ELKEID_PYTHON" -sE "$0" "$@"; fi
for p in python3 python3.13 python3.12 python3.11 python3.10 python3.9; do
    if command -v "$p" >/dev/null 2>&1; then exec "$p" -sE "$0" "$@"; fi
done
echo "elkeid-agent: no python3 in PATH ($PATH); install CPython 3.9 to 3.13" >&2
exit 127
"""


def say(msg):
    sys.stderr.write("==> %s\n" % msg)
    sys.stderr.flush()


class BuildError(Exception):
    pass


def version(package=os.path.join(ROOT, "elkeid_agent")):
    """__version__ of the elkeid_agent package at ``package`` (the one place
    the version is kept)."""
    with open(os.path.join(package, "__init__.py")) as f:
        m = _VERSION_LINE.search(f.read())
    if not m:
        raise BuildError("no __version__ in elkeid_agent/__init__.py")
    return m.group(1)


def check_version(v):
    if not VERSION_SYNTAX.fullmatch(v):
        raise BuildError("bad version %r: 1 to 64 letters, digits and . + ~ _ -, "
                         "starting with a letter or digit" % v)


def stamp_version(site, v):
    """Make the staged elkeid_agent under ``site`` say it is version ``v``."""
    check_version(v)
    init = os.path.join(site, "elkeid_agent", "__init__.py")
    with open(init) as f:
        text, n = _VERSION_LINE.subn('__version__ = "%s"' % v, f.read(), count=1)
    if n != 1:
        raise BuildError("no __version__ in %s" % init)
    with open(init, "w") as f:
        f.write(text)


# ---------------------------------------------------------------- wheels

def _cached(wheels, project, ver, tag_part, arch):
    prefix = ("%s-%s-" % (project, ver)).lower()
    for name in sorted(os.listdir(wheels)):
        if name.lower().startswith(prefix) and tag_part in name and name.endswith(".whl") and \
                (arch in name or name.endswith("-none-any.whl")):
            return os.path.join(wheels, name)
    return None


def fetch(wheels, project, ver, python, abi, arch, tag_part):
    """A wheel from the cache dir, downloaded with pip if missing."""
    found = _cached(wheels, project, ver, tag_part, arch)
    if found:
        return found
    say("downloading %s==%s for %s %s" % (project, ver, abi, arch))
    # --no-cache-dir: the wheel is kept in ``wheels``; pip's own cache would
    # be a second copy under ~/.cache/pip (the tests build zipapps too).
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
           "--no-cache-dir", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", "--abi", abi, "-d", wheels,
           "%s==%s" % (project, ver)]
    if not tag_part.endswith("none-any"):
        cmd[5:5] = ["--platform", "manylinux2014_%s" % arch]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise BuildError("pip download %s==%s (%s, %s) failed:\n%s"
                         % (project, ver, abi, arch, r.stdout.decode("utf-8", "replace")))
    found = _cached(wheels, project, ver, tag_part, arch)
    if not found:
        raise BuildError("pip download %s==%s (%s, %s) gave no matching wheel in %s"
                         % (project, ver, abi, arch, wheels))
    return found


def wheels_for(arch, wheels):
    os.makedirs(wheels, exist_ok=True)
    out = []
    for py in PYTHONS:
        abi = "cp" + py.replace(".", "")
        for project, ver in (GRPCIO, CFFI):
            out.append(fetch(wheels, project, ver, py, abi, arch, "-%s-%s-" % (abi, abi)))
    out.append(fetch(wheels, PROTOBUF[0], PROTOBUF[1], "3.9", "abi3", arch, "-abi3-"))
    out.append(fetch(wheels, CRYPTOGRAPHY[0], CRYPTOGRAPHY[1], "3.9.2", "abi3", arch,
                     "-cp39-abi3-"))
    for project, ver in (TYPING_EXTENSIONS, PYCPARSER):
        out.append(fetch(wheels, project, ver, "3.9", "none", arch, "-py3-none-any"))
    out.append(fetch(wheels, PYYAML[0], PYYAML[1], "3.9", "cp39", arch, "-cp39-cp39-"))
    return out


# ---------------------------------------------------------------- staging

def _keep_dist_info(name):
    """Of a wheel's .dist-info, what says what it is and its licence terms."""
    return name.endswith(("/METADATA", "/top_level.txt", "/LICENSE")) or \
        ".dist-info/licenses/" in name


def stage(arch, wheels, site):
    """Fill ``site`` (a fresh directory) with everything the agent runs on."""
    per_abi = {}  # compiled module, without its ABI tag -> the ABIs it came for
    seen = {}
    for whl in wheels:
        pure = os.path.basename(whl).lower().startswith(PURE_ONLY)
        with zipfile.ZipFile(whl) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                name = info.filename
                if name.endswith("/") or ".dist-info/" in name and not _keep_dist_info(name):
                    continue
                if pure and (name.endswith(".so") or name.startswith("_yaml/")):
                    continue
                data = zf.read(info)
                m = ABI_TAGGED.search(name)
                if m:
                    per_abi.setdefault(name[:m.start()], set()).add(m.group(1))
                if name in seen and seen[name] != data and ".dist-info/" not in name:
                    raise BuildError("%s differs between wheels (%s)" % (name, whl))
                seen[name] = data
                dest = os.path.join(site, name)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(dest, "wb") as f:
                    f.write(data)
                mode = (info.external_attr >> 16) & 0o777
                os.chmod(dest, 0o755 if name.endswith(".so") or mode & 0o111 else 0o644)
    pkg = os.path.join(ROOT, "elkeid_agent")
    for base, dirs, files in os.walk(pkg):
        rel = os.path.relpath(base, pkg)
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".pyc", ".pyo", ".so")):
                continue
            dest = os.path.join(site, "elkeid_agent", rel, name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(os.path.join(base, name), dest)
            os.chmod(dest, 0o644)
    build_accel(arch, os.path.join(site, ACCEL_MODULE))
    want = {"cpython-%s-%s-linux-gnu" % (p.replace(".", ""), arch) for p in PYTHONS}
    if sorted(per_abi) != sorted(PER_ABI_MODULES):
        raise BuildError("per-ABI compiled modules %s, expected %s"
                         % (sorted(per_abi), sorted(PER_ABI_MODULES)))
    for module, abis in sorted(per_abi.items()):
        if abis != want:
            raise BuildError("compiled %s for %s, expected %s"
                             % (module, sorted(abis), sorted(want)))
    return sorted(want)


def accel_compiler(arch):
    """The C compiler that targets ``arch``, or None."""
    host = ARCHES.get(os.uname().machine)
    names = (CROSS_GCC[arch], "gcc", "cc") if arch == host else (CROSS_GCC[arch],)
    for name in names:
        if shutil.which(name):
            return name
    return None


def build_accel(arch, out):
    """Compile accel/ for ``arch`` against the stable-ABI headers of the
    building Python into ``out``; True when built. Otherwise one line says
    why and the zipapp for ``arch`` runs the pure-Python path. The headers
    are the build host's: with Py_LIMITED_API they only describe the
    stable ABI, identical on both 64-bit little-endian Linux targets."""
    cc = accel_compiler(arch)
    include = sysconfig.get_paths()["include"]
    reason = None
    if cc is None:
        reason = "no C compiler for %s (%s)" % (arch, CROSS_GCC[arch])
    elif not os.path.exists(os.path.join(include, "Python.h")):
        reason = "no Python.h in %s" % include
    else:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cmd = [cc, "-shared", "-fPIC", "-O2", "-std=c99", "-DPy_LIMITED_API=" + ACCEL_LIMITED_API,
               "-I" + include, "-ffile-prefix-map=%s=." % ROOT, "-Wl,-s",
               ACCEL_SOURCE, "-o", out]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if r.returncode == 0:
            os.chmod(out, 0o755)
            return True
        lines = r.stdout.decode("utf-8", "replace").strip().splitlines()
        errors = [line for line in lines if "error" in line] or lines
        reason = "%s failed: %s" % (cc, errors[0].strip() if errors else "exit status %d" % r.returncode)
        if os.path.exists(out):
            os.unlink(out)
    say("accel/ not built for %s (%s); the zipapp runs the pure-Python path" % (arch, reason))
    return False


def compiled_abis(site):
    """The CPython ABIs a staged tree has compiled modules for."""
    return sorted({m.group(1) for rel, _f in _files(site) for m in [ABI_TAGGED.search(rel)] if m})


def build_id(site):
    """SHA-256 over every path, mode and content under ``site``."""
    h = hashlib.sha256()
    for rel, full in _files(site):
        st = os.stat(full)
        with open(full, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        h.update(("%s\0%o\0%s\n" % (rel, st.st_mode & 0o777, digest)).encode("utf-8"))
    return h.hexdigest()


def _files(site):
    out = []
    for base, dirs, files in os.walk(site):
        dirs.sort()
        for name in files:
            full = os.path.join(base, name)
            out.append((os.path.relpath(full, site).replace(os.sep, "/"), full))
    return sorted(out)


# ---------------------------------------------------------------- archive

def write_archive(out, site, meta):
    def entry(zf, name, data, mode):
        info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = (0o100000 | mode) << 16
        info.create_system = 3  # unix, so the mode bits are honoured
        zf.writestr(info, data, compresslevel=6)

    buf = io.BytesIO()
    buf.write(PREAMBLE.format(version=meta["version"], arch=meta["arch"]).encode("ascii"))
    with zipfile.ZipFile(buf, "w") as zf:
        for name in ("__main__.py", "_elkeid_boot.py"):
            with open(os.path.join(HERE, "zipapp", name), "rb") as f:
                entry(zf, name, f.read(), 0o644)
        entry(zf, "elkeid_zipapp.json",
              json.dumps(meta, indent=1, sort_keys=True).encode("utf-8"), 0o644)
        for rel, full in _files(site):
            with open(full, "rb") as f:
                entry(zf, "site-packages/" + rel, f.read(), os.stat(full).st_mode & 0o777)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)


def metadata(arch, site, abis):
    return {"name": "elkeid-agent", "version": version(os.path.join(site, "elkeid_agent")),
            "arch": arch, "abi": abis, "python": ">=3.9,<3.14", "build_id": build_id(site)}


def build(arch, out, wheels_dir, site_override=None, version=None):
    """Build the zipapp; returns its metadata. ``site_override`` (tests)
    is a ready site-packages directory used instead of staging one.
    ``version`` replaces elkeid_agent's __version__ in the archive; a
    site_override is copied first, so one staged tree serves several
    versions and stays as it is."""
    arch = ARCHES[arch]
    if version is not None:
        check_version(version)  # before any download
    with tempfile.TemporaryDirectory(prefix="elkeid-zipapp-") as tmp:
        site = os.path.join(tmp, "site-packages")
        if site_override is None:
            os.makedirs(site)
            abis = stage(arch, wheels_for(arch, wheels_dir), site)
        else:
            if version is None:
                site = site_override
            else:
                shutil.copytree(site_override, site)
            abis = compiled_abis(site)
        if version is not None:
            stamp_version(site, version)
        meta = metadata(arch, site, abis)
        write_archive(out, site, meta)
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=os.uname().machine, choices=sorted(ARCHES))
    p.add_argument("--out", default=os.path.join(ROOT, "dist", "elkeid-agent.pyz"))
    p.add_argument("--wheels", default=None,
                   help="wheel cache directory (default build/wheels/ARCH)")
    p.add_argument("--stage-only", metavar="DIR",
                   help="only fill DIR with the site-packages tree (tests reuse it)")
    p.add_argument("--version", metavar="V",
                   help="the version the archive says it is (test builds; default: "
                        "elkeid_agent/__init__.py's, which is left as it is)")
    args = p.parse_args(argv)
    arch = ARCHES[args.arch]
    wheels = args.wheels or os.path.join(ROOT, "build", "wheels", arch)
    try:
        if args.stage_only:
            if args.version is not None:
                check_version(args.version)
            os.makedirs(args.stage_only, exist_ok=True)
            stage(arch, wheels_for(arch, wheels), args.stage_only)
            if args.version is not None:
                stamp_version(args.stage_only, args.version)
            return 0
        meta = build(arch, args.out, wheels, version=args.version)
    except BuildError as e:
        sys.stderr.write("build_zipapp: error: %s\n" % e)
        return 1
    size = os.path.getsize(args.out)
    say("wrote %s: elkeid-agent %s for %s, %.1f MiB, CPython ABIs %s, build %s"
        % (os.path.relpath(args.out), meta["version"], meta["arch"], size / 1048576.0,
           " ".join(a.split("-")[1] for a in meta["abi"]), meta["build_id"][:16]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
