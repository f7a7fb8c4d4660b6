"""Getting a plugin onto disk: reuse, download, verify, unpack, swap.

Blocking code, meant for an executor thread. The order is the point:

1. The executable already at ``plugin/<name>/<name>`` is reused when its
   sha256 equals ``signature`` (or ``sha256`` when signature is empty).
2. Otherwise each URL is tried in turn (http/https only, also after
   redirects; 2xx only; ``download_max_bytes``; one deadline for the whole
   download) into a 0600 file inside a dot-directory of ``plugin/``, hashing
   as the bytes arrive. Nothing is made executable or unpacked unless the
   hash equals ``sha256``.
3. A verified ``tar.gz`` is unpacked into a fresh staging directory by hand
   (``tarfile`` only reads): regular files and directories only - no
   ``..``, absolute names, links, devices, fifos or sparse files; at most
   ``extract_max_members`` members and ``extract_max_bytes`` bytes, counted
   from the headers before any data is written. It must contain
   ``<name>`` as a regular file.
4. ``commit`` swaps the result into place: one ``rename`` for an
   executable, ``renameat2(RENAME_EXCHANGE)`` of the directories for an
   archive (two renames where the kernel or filesystem lacks it). Files the
   old version left that the archive does not contain (logs, state) move
   into the new directory first, as Elkeid's extract-over-the-old-dir would
   keep them. Modes: directories and executables 0700, other files keep
   their owner bits only.

Every failure raises ``FetchError`` with a message fit for the server and
leaves no partial file behind.
"""

import hashlib
import os
import shutil
import stat
import time
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from .. import __version__
from ..errors import AgentError

_CHUNK = 256 * 1024
TMP_PREFIX = "."  # plugin names never start with a dot


class FetchError(AgentError):
    """A plugin could not be put on disk; the message says why."""


class Cancelled(FetchError):
    pass


def _check_cancel(cancel):
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled: the agent is shutting down")


def sha256_file(path, cancel=None):
    """Hex sha256 of a regular file, or None when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        h = hashlib.sha256()
        while True:
            _check_cancel(cancel)
            chunk = f.read(_CHUNK)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


# ------------------------------------------------------------------ download

# urllib.request (with http.client and email), tarfile and ctypes are
# imported when a plugin is fetched, not at start: together they are about
# 3 MB of an idle agent that may never fetch (docs/performance.md "Memory").

def _opener():
    import urllib.error
    import urllib.request

    class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            scheme = urlsplit(newurl).scheme.lower()
            if scheme not in ("http", "https"):
                raise urllib.error.HTTPError(newurl, code, "redirect to a %r URL refused"
                                             % scheme, headers, fp)
            return super().redirect_request(req, fp, code, msg, headers, newurl)
    return urllib.request.build_opener(HttpOnlyRedirects())


def download_one(url, dest, want_sha256, max_bytes, deadline, cancel=None, opener=None):
    """Stream ``url`` into ``dest`` (created 0600), verifying the hash.
    Raises FetchError; ``dest`` is removed on any failure."""
    import http.client
    import urllib.error
    import urllib.request
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError("unsupported URL scheme %r" % scheme)
    opener = opener or _opener()
    request = urllib.request.Request(url, headers={"User-Agent": "elkeid-agent/" + __version__})
    ok = False
    try:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError("download deadline passed")
        try:
            resp = opener.open(request, timeout=min(60.0, remaining))
        except urllib.error.HTTPError as exc:
            raise FetchError("HTTP %s %s" % (exc.code, exc.reason)) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FetchError("cannot connect: %s" % reason) from None
        except http.client.HTTPException as exc:  # BadStatusLine, LineTooLong ...
            raise FetchError("bad HTTP answer: %s" % _describe(exc)) from None
        with resp:
            status = getattr(resp, "status", 200)
            if not 200 <= status < 300:
                raise FetchError("HTTP status %d" % status)
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise FetchError("Content-Length %s exceeds the %d byte limit" % (length, max_bytes))
            read = getattr(resp, "read1", resp.read)
            h = hashlib.sha256()
            total = 0
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            with os.fdopen(fd, "wb") as out:
                while True:
                    _check_cancel(cancel)
                    if time.monotonic() > deadline:
                        raise FetchError("download took longer than allowed")
                    try:
                        chunk = read(_CHUNK)
                    except (OSError, http.client.HTTPException, ValueError) as exc:
                        # TLS errors are OSErrors; a short body is IncompleteRead.
                        raise FetchError("read failed: %s" % _describe(exc)) from None
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > max_bytes:
                        raise FetchError("body exceeds the %d byte limit" % max_bytes)
                    h.update(chunk)
                    out.write(chunk)
            got = h.hexdigest()
            if got != want_sha256.lower():
                raise FetchError("sha256 mismatch: got %s, want %s" % (got, want_sha256.lower()))
            ok = True
    finally:
        if not ok:
            _unlink(dest)


def download(urls, dest, want_sha256, max_bytes, timeout, cancel=None, opener=None):
    """Try each URL in order until one yields the right bytes in ``dest``."""
    if not urls:
        raise FetchError("no download URL and no matching local file")
    if len(want_sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in want_sha256):
        raise FetchError("sha256 %r is not 64 hex digits" % want_sha256)
    deadline = time.monotonic() + timeout
    errors = []
    for url in urls:
        _check_cancel(cancel)
        try:
            download_one(url, dest, want_sha256, max_bytes, deadline, cancel, opener)
            return url
        except Cancelled:
            raise
        except FetchError as exc:
            errors.append("%s: %s" % (_safe_url(url), exc))
        except Exception as exc:  # whatever one URL does, the next one is tried
            errors.append("%s: unexpected %s" % (_safe_url(url), _describe(exc)))
    raise FetchError("every download URL failed: " + "; ".join(errors))


def _describe(exc):
    """Type and message, bounded: IncompleteRead's repr alone says little."""
    text = str(exc) or repr(exc)
    return ("%s: %s" % (type(exc).__name__, text))[:300]


def _safe_url(url):
    """A URL for messages: no credentials, bounded length."""
    try:
        parts = urlsplit(url)
        if not parts.scheme or not parts.netloc:
            return repr(url[:200])
        netloc = parts.hostname or ""
        if parts.port:
            netloc += ":%d" % parts.port
        shown = "%s://%s%s" % (parts.scheme, netloc, parts.path)
    except ValueError:
        shown = "<unparsable URL>"
    return shown[:200]


# ------------------------------------------------------------------ archives

def _member_path(name):
    """Normalised relative path of a member, or raise."""
    if not name or "\x00" in name:
        raise FetchError("archive member with an empty name")
    if name.startswith("/"):
        raise FetchError("archive member %r has an absolute path" % name)
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise FetchError("archive member %r escapes the plugin directory" % name)
        parts.append(part)
    return "/".join(parts)


def extract_tar_gz(archive, staging, max_bytes, max_members, cancel=None):
    """Unpack ``archive`` into the empty directory ``staging``."""
    import tarfile
    try:
        tf = tarfile.open(archive, mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FetchError("not a tar.gz archive: %s" % exc) from None
    total = 0
    count = 0
    with tf:
        try:
            for member in tf:
                _check_cancel(cancel)
                count += 1
                if count > max_members:
                    raise FetchError("archive has more than %d members" % max_members)
                rel = _member_path(member.name)
                if member.issym() or member.islnk():
                    raise FetchError("archive member %r is a link" % member.name)
                if member.ischr() or member.isblk() or member.isfifo():
                    raise FetchError("archive member %r is a device or fifo" % member.name)
                if member.issparse():
                    raise FetchError("archive member %r is a sparse file" % member.name)
                if not (member.isreg() or member.isdir()):
                    raise FetchError("archive member %r has unsupported type %r"
                                     % (member.name, member.type))
                if not rel:
                    continue  # "./"
                target = os.path.join(staging, rel)
                if member.isdir():
                    _makedirs(staging, rel)
                    continue
                total += member.size
                if total > max_bytes:
                    raise FetchError("archive unpacks to more than %d bytes" % max_bytes)
                parent = os.path.dirname(rel)
                if parent:
                    _makedirs(staging, parent)
                _write_member(tf, member, target, cancel)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise FetchError("corrupt archive: %s" % exc) from None


def _makedirs(root, rel):
    path = root
    for part in rel.split("/"):
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise FetchError("archive member %r is both a file and a directory" % rel)


def _write_member(tf, member, target, cancel):
    src = tf.extractfile(member)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        raise FetchError("archive member %r appears twice" % member.name) from None
    left = member.size
    with os.fdopen(fd, "wb") as out:
        while left > 0:
            _check_cancel(cancel)
            chunk = src.read(min(_CHUNK, left))
            if not chunk:
                raise FetchError("archive member %r is truncated" % member.name)
            out.write(chunk)
            left -= len(chunk)
    os.chmod(target, (member.mode & 0o700) | 0o600)


# ------------------------------------------------------------------ staging

@dataclass
class Staged:
    """A verified plugin waiting to be swapped into place."""
    name: str
    kind: str            # "exe" or "dir"
    path: str            # the file or directory to move into place
    work: str            # dot-directory to delete afterwards
    source: str = ""     # "local" is never staged; else the URL used


def plugin_dir(root, name):
    return os.path.join(root, name)


def local_ok(root, spec, cancel=None):
    want = spec.local_hash
    if not want:
        return False
    return sha256_file(os.path.join(root, spec.name, spec.name), cancel) == want


def prepare(root, spec, policy, cancel=None, opener=None, check_local=True) -> Optional[Staged]:
    """None when the local executable is good; else a Staged result.
    Raises FetchError."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    if check_local and local_ok(root, spec, cancel):
        return None
    work = _mkwork(root, spec.name, "fetch")
    try:
        payload = os.path.join(work, "payload")
        url = download(spec.urls, payload, spec.sha256, policy.download_max_bytes,
                       policy.download_timeout, cancel, opener)
        if not spec.is_archive:
            os.chmod(payload, 0o700)
            return Staged(spec.name, "exe", payload, work, url)
        tree = os.path.join(work, "tree")
        os.mkdir(tree, 0o700)
        extract_tar_gz(payload, tree, policy.extract_max_bytes, policy.extract_max_members, cancel)
        _unlink(payload)
        exe = os.path.join(tree, spec.name)
        try:
            st = os.lstat(exe)
        except FileNotFoundError:
            raise FetchError("archive does not contain the executable %r" % spec.name) from None
        if not stat.S_ISREG(st.st_mode):
            raise FetchError("archive entry %r is not a regular file" % spec.name)
        os.chmod(exe, 0o700)
        return Staged(spec.name, "dir", tree, work, url)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def commit(root, staged):
    """Swap a Staged plugin into ``root/<name>``. Raises OSError."""
    target = plugin_dir(root, staged.name)
    try:
        if staged.kind == "exe":
            os.makedirs(target, mode=0o700, exist_ok=True)
            os.chmod(target, 0o700)
            os.replace(staged.path, os.path.join(target, staged.name))
            return
        if os.path.isdir(target) and not os.path.islink(target):
            for entry in os.listdir(target):
                if not os.path.lexists(os.path.join(staged.path, entry)):
                    os.rename(os.path.join(target, entry), os.path.join(staged.path, entry))
            os.chmod(staged.path, 0o700)
            if not _exchange(staged.path, target):
                old = os.path.join(staged.work, "old")
                os.rename(target, old)
                os.rename(staged.path, target)
        else:
            if os.path.lexists(target):
                _unlink(target)
            os.chmod(staged.path, 0o700)
            os.rename(staged.path, target)
    finally:
        shutil.rmtree(staged.work, ignore_errors=True)


def discard(staged):
    if staged is not None:
        shutil.rmtree(staged.work, ignore_errors=True)


def remove_plugin_dir(root, name):
    """Delete a plugin's directory (after it was stopped)."""
    path = plugin_dir(root, name)
    if os.path.islink(path):
        _unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale(root):
    """Remove staging leftovers of an agent that died mid-fetch."""
    try:
        entries = os.listdir(root)
    except OSError:
        return []
    removed = []
    for entry in entries:
        if entry.startswith(TMP_PREFIX) and (".fetch-" in entry):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
            removed.append(entry)
    return removed


def _mkwork(root, name, what):
    for _ in range(100):
        path = os.path.join(root, "%s%s.%s-%s" % (TMP_PREFIX, name, what, os.urandom(4).hex()))
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue
    raise FetchError("cannot create a staging directory in %s" % root)


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path, ignore_errors=True)


# renameat2(RENAME_EXCHANGE): swap two paths atomically (Linux >= 3.15).
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _load_renameat2():
    import ctypes
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_UNLOADED = object()
_RENAMEAT2 = _UNLOADED  # loaded at the first swap; None where unsupported


def _exchange(a, b):
    """Atomically swap two directories; False if unsupported here."""
    global _RENAMEAT2
    if _RENAMEAT2 is _UNLOADED:
        _RENAMEAT2 = _load_renameat2()
    if _RENAMEAT2 is None:
        return False
    rc = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0
