"""Blocking work off the event loop, in separate bounded pools by kind.

One shared default executor lets one kind of slow work starve the others:
five plugin URLs that never answer would hold every thread while a service
discovery lookup, a plugin restart's stderr read or an upload waits behind
them. Each kind gets its own small pool, so a stall stays within its kind.

Workers are daemon threads: a blocking call that never returns (a
blackholed download past its socket timeout) must not keep the process
alive at exit, which ``concurrent.futures`` would (it joins its workers).
Each pool also bounds how many jobs may wait; past that ``run`` raises
``Saturated`` at once (counted) instead of queueing without limit.

Threads start when jobs arrive and exit after ``IDLE_SECONDS`` without one:
an idle agent keeps no thread per kind for work that came once (a burst of
health probes, statvfs rounds), and the next job starts a thread again.
"""

import asyncio
import collections
import logging
import threading

log = logging.getLogger(__name__)

# kind -> (threads, jobs allowed to wait). Sized for what each kind does at
# once in normal operation, with room for a few stuck jobs.
KINDS = {
    "download": (4, 64),      # plugin downloads, hashing and extraction
    "discovery": (2, 8),      # service-discovery HTTP lookups
    "process": (2, 256),      # reading a dead plugin's last stderr line, /proc samples
    "housekeeping": (1, 16),  # stderr truncation, directory sizes
    "upload": (1, 4),         # reading files for task 1050
    "files": (1, 64),         # fsync of specified_env, log rotation (gzip)
    "collect": (4, 32),       # statvfs for host metrics: each hung network mount holds a thread
    "probe": (4, 64),         # local services' HTTP health probes
    "update": (1, 8),         # update downloads, hashing, signatures, backups, dpkg-deb
}


IDLE_SECONDS = 60.0


class Saturated(Exception):
    """Too many jobs of one kind are already waiting."""


class _Pool:
    def __init__(self, kind, threads, backlog, idle_seconds=IDLE_SECONDS):
        self.kind = kind
        self.threads = threads
        self.backlog = backlog
        self.idle_seconds = idle_seconds
        self._started = 0
        self._jobs = collections.deque()
        self._cond = threading.Condition()
        self._workers = []
        self._idle = 0
        self._closed = False

    def submit(self, loop, fut, fn, args):
        with self._cond:
            if self._closed:
                raise RuntimeError("executor %s is shut down" % self.kind)
            if len(self._jobs) >= self.backlog:
                raise Saturated("%d %s jobs already waiting" % (len(self._jobs), self.kind))
            self._jobs.append((loop, fut, fn, args))
            # Idle workers may not have woken for earlier jobs yet: compare
            # with the jobs waiting, or a burst would all go to one thread.
            if len(self._jobs) > self._idle and len(self._workers) < self.threads:
                t = threading.Thread(target=self._work, name="elkeid-%s-%d"
                                     % (self.kind, self._started), daemon=True)
                self._started += 1
                self._workers.append(t)
                t.start()
            else:
                self._cond.notify()

    def _work(self):
        while True:
            with self._cond:
                self._idle += 1
                while not self._jobs and not self._closed:
                    if not self._cond.wait(self.idle_seconds) and not self._jobs \
                            and not self._closed:
                        # Idle too long: leave. submit() starts a new thread
                        # for a job that finds no idle one.
                        self._idle -= 1
                        self._workers.remove(threading.current_thread())
                        return
                self._idle -= 1
                if not self._jobs:
                    return
                loop, fut, fn, args = self._jobs.popleft()
            try:
                result, error = fn(*args), None
            except BaseException as e:  # handed to the awaiting coroutine
                result, error = None, e
            try:
                loop.call_soon_threadsafe(_settle, fut, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def waiting(self):
        return len(self._jobs)

    def workers(self):
        with self._cond:
            return len(self._workers)

    def close(self):
        with self._cond:
            self._closed = True
            dropped, self._jobs = list(self._jobs), collections.deque()
            self._cond.notify_all()
        for loop, fut, _fn, _args in dropped:
            try:
                loop.call_soon_threadsafe(fut.cancel)
            except RuntimeError:
                pass


def _settle(fut, result, error):
    if fut.done():  # the caller gave up (cancelled, timed out)
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class Executors:
    def __init__(self, metrics=None, kinds=None, idle_seconds=IDLE_SECONDS):
        self.metrics = metrics
        self._pools = {kind: _Pool(kind, n, backlog, idle_seconds)
                       for kind, (n, backlog) in (kinds or KINDS).items()}
        if metrics is not None:
            metrics.describe("executor_saturated",
                             "blocking jobs refused: their pool's backlog was full")
            for kind, pool in self._pools.items():
                metrics.set("executor_waiting", pool.waiting, kind=kind)

    async def run(self, kind, fn, *args):
        """Run ``fn(*args)`` in the ``kind`` pool; raises what it raises.
        Cancelling the awaiting coroutine abandons the job's result (the
        thread itself cannot be interrupted)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        try:
            self._pools[kind].submit(loop, fut, fn, args)
        except Saturated:
            if self.metrics is not None:
                self.metrics.inc("executor_saturated", kind=kind)
            raise
        return await fut

    def close(self):
        for pool in self._pools.values():
            pool.close()
