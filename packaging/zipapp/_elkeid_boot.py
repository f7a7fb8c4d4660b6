"""Bootstrap of the elkeid-agent zipapp (Python 3.9+, standard library only).

Why not shiv's bootstrap: it needs Python 3.6 syntax before it can say a
Python is too old, it caches under ~/.shiv (no HOME under systemd, a
read-only home for root, another user's home for nobody), and it has one
site-packages, while this archive carries grpcio's and cffi's compiled
modules for five CPython ABIs. The layout is shiv's (``site-packages/`` in
the archive, extracted once into a cache directory named by a content hash)
and so is the idea; the rules below are what a host agent needs:

* The cache directory is named by the archive's build id, a SHA-256 of
  everything under ``site-packages/`` computed at build time, plus the
  running interpreter's ABI. An upgrade that replaces the file gets a new
  directory whatever its path or mtime; stale code is never run.
* Of the compiled modules tagged with an ABI (``*.cpython-3XY-*.so``:
  grpcio's cygrpc, cffi's _cffi_backend) only the running ABI's are
  extracted; abi3 ones (``*.abi3.so``: protobuf's, cryptography's _rust)
  serve every ABI and are always extracted.
* Extraction goes to a private temporary directory in the cache root,
  flushed to disk, then renamed into place: two instances starting at once
  both succeed, one of them wins the rename, nobody sees a half tree.
* The cache root is the first usable of: $ELKEID_AGENT_CACHE;
  /var/cache/elkeid-agent (root); $CACHE_DIRECTORY (systemd);
  $XDG_CACHE_HOME/elkeid-agent or ~/.cache/elkeid-agent; /tmp/elkeid-agent-UID;
  a fresh private directory under /tmp removed at exit. "Usable" means a
  directory owned by us, not writable by others, writable, on a filesystem
  that is neither read-only nor noexec (shared objects cannot be mapped
  from noexec mounts).
* Before the rename a child ``python -m compileall`` writes the bytecode
  of every module for the running interpreter: the agent never compiles
  in its own process, whose heap would keep the compiler's leftovers.
* Each running process holds a shared flock on its directory's ``.complete``
  marker; at start the bootstrap removes every other version directory that
  nobody holds.
* ``elkeidctl``, the update guard and ``--version``/``--help`` need no compiled code: they are
  imported straight from the archive, so they never touch the cache.

Set ELKEID_AGENT_BOOT_TRACE=1 to get one line on stderr saying which cache
directory was used and how long the bootstrap took.
"""

import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile

META = "elkeid_zipapp.json"
SITE = "site-packages/"
MARKER = ".complete"
# VERSION-BUILDID-cpXY; a version is what build_zipapp.py --version accepts.
_VERSION_DIR = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+~_-]{0,63}-[0-9a-f]{16}-cp3[0-9]+$")
_TMP_PREFIX = ".elkeid-tmp-"
_TRASH_PREFIX = ".elkeid-trash-"
_EXT_TAG = re.compile(r"\.cpython-[0-9]+[a-z]*-[^/]*\.so$")
# Interrupted extractions older than this are removed by later starts.
_STALE_TMP_SECONDS = 3600

_held = []  # open marker fds: our shared locks live as long as the process


class BootError(Exception):
    pass


def _die(msg):
    sys.stderr.write("elkeid-agent: %s\n" % msg)
    sys.exit(1)


def abi_suffix():
    """'.cpython-311-x86_64-linux-gnu.so' for the running interpreter."""
    import importlib.machinery
    for s in importlib.machinery.EXTENSION_SUFFIXES:
        if s.startswith(".cpython-"):
            return s
    return importlib.machinery.EXTENSION_SUFFIXES[0]


def py_tag():
    return "cp%d%d" % sys.version_info[:2]


def wants_archive_only(argv0, args):
    """True for commands that need no compiled module (elkeidctl, --version)."""
    if os.path.basename(argv0 or "").startswith("elkeidctl"):
        return True
    return bool(args) and args[0] in ("ctl", "update-guard", "--version", "-h", "--help")


# ---------------------------------------------------------------- cache roots

def candidate_roots(environ, euid, home_of):
    """[(base dir, creatable parent)] in the order they are tried."""
    out = []

    def add(path, make_parent=False):
        if path and os.path.isabs(path) and path not in [p for p, _ in out]:
            out.append((path, make_parent))

    add(environ.get("ELKEID_AGENT_CACHE", ""))
    if euid == 0:
        add("/var/cache/elkeid-agent")
    add(environ.get("CACHE_DIRECTORY", "").split(":")[0])
    xdg = environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        add(os.path.join(xdg, "elkeid-agent"), True)
    home = environ.get("HOME", "")
    if not os.path.isabs(home):
        home = home_of(euid) or ""
    if os.path.isabs(home) and home != "/":
        add(os.path.join(home, ".cache", "elkeid-agent"), True)
    tmp = environ.get("TMPDIR", "")
    tmp = tmp if os.path.isabs(tmp) else "/tmp"
    add(os.path.join(tmp, "elkeid-agent-%d" % euid))
    return out


def _home_of(uid):
    try:
        import pwd
        return pwd.getpwuid(uid).pw_dir
    except (ImportError, KeyError):
        return None


def _fs_problem(path):
    """Why shared objects cannot live on ``path``'s filesystem, or None."""
    try:
        vfs = os.statvfs(path)
    except OSError as e:
        return e.strerror or str(e)
    if vfs.f_flag & getattr(os, "ST_RDONLY", 1):
        return "read-only filesystem"
    if vfs.f_flag & getattr(os, "ST_NOEXEC", 8):
        return "noexec filesystem"
    return None


def usable_root(base, make_parent, euid):
    """Create ``base`` (0700) if needed and check it is safe and usable.
    Returns None when it is, else the reason it is not."""
    import stat as _stat
    parent = os.path.dirname(base)
    try:
        if make_parent and not os.path.isdir(parent):
            # ~/.cache may be missing, but never create a home directory.
            if not os.path.isdir(os.path.dirname(parent)):
                return "%s does not exist" % os.path.dirname(parent)
            why = _fs_problem(os.path.dirname(parent))
            if why:
                return why
            os.mkdir(parent, 0o700)
        if not os.path.lexists(base):
            why = _fs_problem(parent)  # do not leave a useless directory behind
            if why:
                return why
        try:
            os.mkdir(base, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(base)
    except OSError as e:
        return e.strerror or str(e)
    if not _stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != euid:
        return "owned by uid %d, not %d" % (st.st_uid, euid)
    if st.st_mode & 0o022:
        try:
            os.chmod(base, 0o700)
        except OSError as e:
            return "writable by others and cannot chmod: %s" % e.strerror
    if not os.access(base, os.W_OK | os.X_OK):
        return "not writable"
    return _fs_problem(base)


# ---------------------------------------------------------------- extraction

def _foreign_extension(name, suffix):
    """A compiled module built for another CPython ABI."""
    return bool(_EXT_TAG.search(name)) and not name.endswith(suffix)


def extract(zf, base, name, build_id, suffix):
    """Extract site-packages (this ABI only) to ``base/name`` atomically.
    True if our tree is now in place (and held), False if a concurrent
    instance put its identical tree there first."""
    target = os.path.join(base, name)
    tmp = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=base)
    try:
        for info in zf.infolist():
            fname = info.filename
            if not fname.startswith(SITE) or fname.endswith("/") or \
                    _foreign_extension(fname, suffix):
                continue
            rel = fname[len(SITE):]
            if rel.startswith("/") or ".." in rel.split("/"):
                raise BootError("unsafe path in archive: %r" % fname)
            dest = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            mode = (info.external_attr >> 16) & 0o777 or 0o644
            with zf.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.chmod(dest, mode & 0o755)
        _precompile(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(build_id + "\n")
        _flush(tmp)
        # Lock the marker before the tree becomes visible, so no other
        # instance's clean-up can take it for an unused old version.
        import fcntl
        fd = os.open(os.path.join(tmp, MARKER), os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            os.rename(tmp, target)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another instance won the race
            return False
        _held.append(fd)
        return True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _precompile(tree):
    """Write the bytecode of every module in ``tree`` for this interpreter,
    in a child process. Without it the agent's first start from a new cache
    (every install, every update) compiles each module it imports, and the
    compiler's leftovers stay in its heap for as long as it runs: about 5 MB
    of RSS (docs/performance.md "Memory"). A failure here costs only that:
    Python compiles on import as before."""
    import subprocess
    if not sys.executable:
        return
    try:
        with open(os.devnull, "wb") as null:
            subprocess.call([sys.executable, "-sE", "-m", "compileall", "-q", tree],
                            stdin=null, stdout=null, stderr=null, timeout=600)
    except (OSError, subprocess.SubprocessError):
        pass


def _flush(path):
    """Make the extracted tree durable before it becomes visible: a crash
    right after the rename must not leave empty files behind a marker."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
    os.sync()


def hold(target, build_id):
    """Take a shared lock on ``target``'s marker. False if ``target`` is not
    a complete extraction of ``build_id`` (missing, half, or just removed)."""
    import fcntl
    marker = os.path.join(target, MARKER)
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        content = os.pread(fd, 200, 0).decode("ascii", "replace").strip()
        same = os.stat(marker).st_ino == os.fstat(fd).st_ino
    except OSError:
        os.close(fd)
        return False
    if content != build_id or not same:
        os.close(fd)
        return False
    _held.append(fd)
    return True


def discard(base, name):
    """Move a directory out of the way (atomically), then delete it."""
    trash = tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=base)
    try:
        os.rename(os.path.join(base, name), os.path.join(trash, name))
    except OSError:
        pass
    shutil.rmtree(trash, ignore_errors=True)


def clean_old(base, keep):
    """Remove version directories no running process holds, and leftovers
    of interrupted extractions. Only names this bootstrap creates."""
    import fcntl
    now = time.time()
    try:
        names = os.listdir(base)
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(base, name)
        if name == keep:
            continue
        if name.startswith(_TRASH_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
            continue
        if name.startswith(_TMP_PREFIX):
            try:
                if now - os.lstat(path).st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass
            continue
        if not _VERSION_DIR.match(name):
            continue
        try:
            fd = os.open(os.path.join(path, MARKER), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            discard(base, name)  # no marker: never complete
            removed.append(name)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # in use by a running process
            continue
        try:
            discard(base, name)
            removed.append(name)
        finally:
            os.close(fd)
    return removed


def ensure_extracted(zf, meta, environ=None, euid=None, home_of=_home_of, trace=None):
    """The site-packages directory for this archive and interpreter."""
    environ = os.environ if environ is None else environ
    euid = os.geteuid() if euid is None else euid
    build_id, suffix = meta["build_id"], abi_suffix()
    name = "%s-%s-%s" % (meta["version"], build_id[:16], py_tag())
    reasons = []
    for base, make_parent in candidate_roots(environ, euid, home_of):
        why = usable_root(base, make_parent, euid)
        if why is not None:
            reasons.append("%s: %s" % (base, why))
            continue
        target = os.path.join(base, name)
        state = "reused"
        try:
            for _attempt in range(3):
                if hold(target, build_id):
                    break
                if os.path.lexists(target):
                    discard(base, name)  # incomplete or not ours: replace it
                if extract(zf, base, name, build_id, suffix):
                    state = "extracted"
                    break
            else:
                raise BootError("%s keeps disappearing" % target)
        except (OSError, BootError) as e:
            reasons.append("%s: %s" % (base, getattr(e, "strerror", None) or e))
            continue
        clean_old(base, name)
        if trace:
            trace("%s %s" % (state, target))
        return target
    # Last resort: a fresh private directory, removed when we exit.
    base = None
    try:
        base = tempfile.mkdtemp(prefix="elkeid-agent-%d-" % euid)
        why = usable_root(base, False, euid)
        if why is not None:
            raise BootError(why)
        extract(zf, base, name, build_id, suffix)
        target = os.path.join(base, name)
        import atexit
        atexit.register(shutil.rmtree, base, True)
        if trace:
            trace("extracted %s (private, removed at exit)" % target)
        return target
    except (OSError, BootError) as e:
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
        reasons.append("private temporary directory: %s" % (getattr(e, "strerror", None) or e))
    raise BootError("no usable cache directory to extract to (%s); set ELKEID_AGENT_CACHE "
                    "to a writable directory on an exec-mounted filesystem" % "; ".join(reasons))


# ---------------------------------------------------------------- main

def prepare_site(argv):
    """Put this archive's site-packages for the running Python first on
    sys.path (extracting it if ``argv`` runs the agent) and return it;
    one line on stderr and exit 1 if it cannot."""
    os.environ.pop("ELKEID_AGENT_REEXEC", None)
    started = time.monotonic()
    archive = os.path.dirname(os.path.abspath(__file__))
    tracing = os.environ.get("ELKEID_AGENT_BOOT_TRACE") == "1"
    notes = []
    try:
        with zipfile.ZipFile(archive) as zf:
            meta = json.loads(zf.read(META).decode("utf-8"))
            suffix = abi_suffix()
            if suffix[1:-3] not in meta["abi"]:
                _die("this build (%s, for %s) has no compiled modules for this Python "
                     "(%s %s); supported: %s"
                     % (meta["version"], meta["arch"], sys.version.split()[0], suffix[1:-3],
                        ", ".join(a.split("-")[1] for a in meta["abi"])))
            if wants_archive_only(argv[0], argv[1:]):
                site = os.path.join(archive, SITE.rstrip("/"))
                notes.append("archive-only")
            else:
                site = ensure_extracted(zf, meta, trace=notes.append)
    except BootError as e:
        _die(str(e))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        _die("cannot read the archive %s: %s" % (archive, e))
    sys.path.insert(0, site)
    if tracing:
        sys.stderr.write("elkeid-agent boot: %s in %.1f ms\n"
                         % ("; ".join(notes), (time.monotonic() - started) * 1000))
    return site


def main():
    prepare_site(sys.argv)
    from elkeid_agent.cli import main as cli_main
    sys.exit(cli_main())
