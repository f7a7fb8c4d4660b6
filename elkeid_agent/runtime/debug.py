"""Operator debugging aids behind the agent's signals (docs/protocol.md section 7).

Owns:

* ``stack_dump()``: every thread's stack and every asyncio task's await
  chain, as text;
* ``DebugEndpoint``: what SIGUSR1 toggles, a loopback-only HTTP server
  (``httpd.LoopbackHTTPServer``) with ``/debug/stacks`` and
  ``/debug/metrics``, whose address is written to a file (0600) so an
  operator or ``elkeidctl`` can find an ephemeral port;
* ``release_memory()``: what SIGUSR2 does, a full garbage collection and,
  on glibc, ``malloc_trim(0)`` to hand freed heap back to the kernel.

Signal handlers are installed by the app (``loop.add_signal_handler``);
nothing here raises into them: failures are logged and counted.
"""

import asyncio
import gc
import logging
import os
import sys
import threading
import traceback

from .httpd import LoopbackHTTPServer

log = logging.getLogger(__name__)

# Await chains deeper than this are cut: a runaway recursion must not turn
# one request into megabytes of text.
_MAX_CHAIN = 64


def stack_dump(loop=None, max_tasks=1000):
    """Text with the stack of every thread and of every task of ``loop``
    (default: the running loop, if any).

    Tasks are shown by walking the coroutine await chain: Task.get_stack()
    only gives the outermost frame of a suspended coroutine, which rarely
    says where it is actually waiting."""
    out = []
    current = threading.get_ident()
    threads = {t.ident: t for t in threading.enumerate()}
    frames = sys._current_frames()
    try:
        out.append("# %d threads\n" % len(frames))
        for ident in sorted(frames):
            thread = threads.get(ident)
            notes = []
            if thread is not None and thread.daemon:
                notes.append("daemon")
            if ident == current:
                notes.append("current")
            out.append("\nThread %s (ident %d%s):\n" % (
                thread.name if thread is not None else "?", ident,
                "".join(", " + n for n in notes)))
            out.extend(traceback.format_stack(frames[ident]))
    finally:
        del frames  # frames reference their locals; do not keep them alive

    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
    if loop is not None:
        tasks = sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name())
        out.append("\n# %d asyncio tasks\n" % len(tasks))
        for task in tasks[:max_tasks]:
            out.append("\n" + _task_text(task))
        if len(tasks) > max_tasks:
            out.append("\n... %d more tasks not shown\n" % (len(tasks) - max_tasks))
    return "".join(out)


def _task_text(task):
    coro = task.get_coro()
    lines = ["Task %s (%s):\n" % (task.get_name(), _qualname(coro))]
    frames = []
    awaiting = None
    node = coro
    for _ in range(_MAX_CHAIN):
        frame = (getattr(node, "cr_frame", None) or getattr(node, "gi_frame", None)
                 or getattr(node, "ag_frame", None))
        if frame is not None:
            frames.append((frame, frame.f_lineno))
        nxt = (getattr(node, "cr_await", None) or getattr(node, "gi_yieldfrom", None)
               or getattr(node, "ag_await", None))
        if nxt is None:
            break
        if not any(hasattr(nxt, a) for a in ("cr_frame", "gi_frame", "ag_frame")):
            awaiting = nxt  # a Future or another awaitable object: the leaf
            break
        node = nxt
    else:
        lines.append("  (await chain cut at %d frames)\n" % _MAX_CHAIN)
    lines.extend(traceback.StackSummary.extract(frames).format())
    if awaiting is not None:
        # ``await fut`` leaves a bare future iterator at the leaf; the task
        # knows the future itself, whose repr says what it is waiting for.
        waiter = getattr(task, "_fut_waiter", None)
        lines.append("  awaiting %s\n" % _short_repr(waiter if waiter is not None else awaiting))
    return "".join(lines)


def _qualname(coro):
    return getattr(coro, "__qualname__", None) or type(coro).__name__


def _short_repr(obj, limit=200):
    try:
        text = repr(obj)
    except Exception:
        text = "<%s>" % type(obj).__name__
    return text if len(text) <= limit else text[:limit] + "..."


class DebugEndpoint:
    """The SIGUSR1 debug server: off by default, ``toggle()`` flips it.

    ``server_factory(host=, port=, metrics=, name=)`` builds the server
    (httpd.LoopbackHTTPServer unless a test passes another); ``port=0``
    takes an ephemeral port, so the address file is how it is found."""

    def __init__(self, metrics, addr_file, port=0, host="127.0.0.1",
                 server_factory=LoopbackHTTPServer):
        self.metrics = metrics
        self.addr_file = addr_file
        self.port = port
        self.host = host
        self.server_factory = server_factory
        self._server = None
        self._lock = None  # created on the loop: 3.9's Lock binds a loop at creation
        self._pages = {
            "/debug/stacks": self._stacks,
            "/debug/metrics": self._metrics,
        }
        metrics.describe("debug_endpoint_errors", "debug endpoint start/stop failures")

    def add_page(self, path, handler):
        """Another GET page (e.g. the app's settings view) for the next start."""
        if not path.startswith("/debug/"):
            raise ValueError("debug pages live under /debug/: %r" % (path,))
        self._pages[path] = handler

    @property
    def running(self):
        return self._server is not None

    @property
    def address(self):
        return self._server.address if self._server is not None else None

    async def toggle(self):
        """Start if stopped, stop if running. Returns the address when now
        running, None when now stopped (or when starting failed)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        # Two SIGUSR1 in quick succession must not start two servers.
        async with self._lock:
            if self._server is None:
                return await self._start()
            await self._stop()
            return None

    async def close(self):
        """Stop if running (at agent shutdown)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._server is not None:
                await self._stop()

    async def _start(self):
        try:
            server = self.server_factory(host=self.host, port=self.port,
                                         metrics=self.metrics, name="debug")
            server.route("GET", "/debug/", self._index)
            for path, handler in self._pages.items():
                server.route("GET", path, handler)
            await server.start()
        except (OSError, ValueError) as exc:
            self.metrics.inc("debug_endpoint_errors", reason="bind")
            log.error("debug endpoint: cannot listen on %s port %s: %s", self.host, self.port, exc)
            return None
        self._server = server
        try:
            _write_private(self.addr_file, self.address + "\n")
        except OSError as exc:
            # Without the file nobody can find an ephemeral port: do not leave
            # a server running that no one knows about.
            self.metrics.inc("debug_endpoint_errors", reason="addr_file")
            log.error("debug endpoint: cannot write %s: %s; stopping it", self.addr_file, exc)
            self._server = None
            await server.stop()
            return None
        log.warning("debug endpoint listening on http://%s/debug/ (address in %s)",
                    self.address, self.addr_file)
        return self.address

    async def _stop(self):
        server, self._server = self._server, None
        await server.stop()
        try:
            os.unlink(self.addr_file)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.metrics.inc("debug_endpoint_errors", reason="addr_file")
            log.error("debug endpoint: cannot remove %s: %s", self.addr_file, exc)
        log.warning("debug endpoint stopped")

    def _index(self, request):
        return 200, "text/plain; charset=utf-8", "".join(p + "\n" for p in sorted(self._pages))

    def _stacks(self, request):
        return 200, "text/plain; charset=utf-8", stack_dump()

    def _metrics(self, request):
        return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render_prometheus()


def _write_private(path, text):
    """Write ``text`` to ``path`` atomically with mode 0600."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = "%s.%d.tmp" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by umask; be explicit
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise


# --------------------------------------------------------------- SIGUSR2

_malloc_trim = []  # [function or None], looked up once


def _load_malloc_trim():
    # ctypes is imported only when SIGUSR2 first arrives: it is not free, and
    # most agents never get the signal.
    import ctypes
    libc = ctypes.CDLL(None)  # the process's own symbols: libc included
    fn = libc.malloc_trim     # AttributeError on musl and other non-glibc libcs
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def _statm_rss():
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_memory():
    """Collect garbage and return freed heap to the OS; never raises.

    Returns what it did: ``gc_collected`` (unreachable objects found),
    ``malloc_trim`` (True: memory was returned, False: nothing to return,
    None: not available here), and ``rss_before``/``rss_after`` in bytes
    (None where /proc is missing)."""
    result = {"rss_before": _statm_rss()}
    try:
        result["gc_collected"] = gc.collect()
    except Exception:  # a broken __del__ somewhere must not stop the rest
        result["gc_collected"] = None
    if not _malloc_trim:
        try:
            _malloc_trim.append(_load_malloc_trim())
        except Exception:
            _malloc_trim.append(None)
    trim = _malloc_trim[0]
    result["malloc_trim"] = None
    if trim is not None:
        try:
            result["malloc_trim"] = bool(trim(0))
        except Exception:
            result["malloc_trim"] = None
    result["rss_after"] = _statm_rss()
    return result
