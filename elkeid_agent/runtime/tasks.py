"""Ownership of the agent's long-lived tasks.

Every task that should live as long as the agent (the transport's connect
loop, the heartbeat timer, the plugin monitor ...) is started through one
``TaskOwner``, which awaits it. A task that raises, or returns while the
owner is not closing, is a bug or the effect of hostile input: the owner
logs it with its traceback, counts it (``tasks_crashed{task}``), marks the
agent abnormal (``task:<name>``) and starts it again after a backoff. Once
the new incarnation has stayed up for ``healthy_after`` seconds the
abnormal mark is cleared and the backoff starts over. Nothing is
fire-and-forget: one-shot jobs (a plugin sync, a debug-endpoint toggle) go
through ``run_once`` so their failures are logged and counted too, and
``close()`` cancels and awaits everything that is left.
"""

import asyncio
import logging
import time

log = logging.getLogger(__name__)

RESTART_DELAYS = (1.0, 5.0, 15.0, 60.0)  # the last repeats
HEALTHY_AFTER = 60.0


class TaskOwner:
    def __init__(self, metrics, state, restart_delays=RESTART_DELAYS,
                 healthy_after=HEALTHY_AFTER, clock=time.monotonic):
        self.metrics = metrics
        self.state = state
        self.restart_delays = tuple(restart_delays)
        self.healthy_after = healthy_after
        self._clock = clock
        self._tasks = {}     # name -> asyncio.Task of the supervising wrapper
        self._once = set()   # one-shot jobs still running
        self._closing = False
        metrics.describe("tasks_crashed", "long-lived tasks that raised or ended unexpectedly")
        metrics.describe("tasks_restarted", "long-lived tasks started again after a crash")
        metrics.describe("jobs_failed", "one-shot jobs that raised")

    # ------------------------------------------------------------ long-lived

    def spawn(self, name, factory):
        """Run ``factory()`` (a coroutine function) for the owner's lifetime,
        restarting it whenever it ends."""
        if name in self._tasks:
            raise ValueError("task %s is already owned" % name)
        task = asyncio.ensure_future(self._supervise(name, factory))
        self._tasks[name] = task
        return task

    def running(self, name):
        task = self._tasks.get(name)
        return task is not None and not task.done()

    async def _supervise(self, name, factory):
        failures = 0
        while True:
            started = self._clock()
            clear = None
            if failures:
                clear = asyncio.get_running_loop().call_later(
                    self.healthy_after, self._healthy, name)
            try:
                await factory()
                problem = "ended unexpectedly"
                exc_info = None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the rule: no exception ends a long-lived task
                problem = "crashed: %s: %s" % (type(e).__name__, _first_line(e))
                exc_info = e
            finally:
                if clear is not None:
                    clear.cancel()
            if self._closing:
                return
            if self._clock() - started >= self.healthy_after:
                failures = 0
            delay = self.restart_delays[min(failures, len(self.restart_delays) - 1)]
            failures += 1
            self.metrics.inc("tasks_crashed", task=name)
            self.state.set_abnormal("task:" + name, "task %s %s" % (name, problem))
            log.error("task %s %s; restarting in %.0f s", name, problem, delay,
                      exc_info=exc_info)
            await asyncio.sleep(delay)
            self.metrics.inc("tasks_restarted", task=name)

    def _healthy(self, name):
        self.state.clear("task:" + name)
        log.info("task %s is running again", name)

    # ------------------------------------------------------------ one-shot

    def run_once(self, name, coro):
        """Run one job to completion; its failure is logged and counted, and
        ``close()`` cancels it if it is still running."""
        task = asyncio.ensure_future(coro)
        self._once.add(task)
        task.add_done_callback(lambda t: self._job_done(name, t))
        return task

    def _job_done(self, name, task):
        self._once.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.metrics.inc("jobs_failed", job=name)
            log.error("%s failed: %s: %s", name, type(exc).__name__, _first_line(exc),
                      exc_info=exc)

    # ------------------------------------------------------------ shutdown

    async def cancel(self, name):
        """Stop one long-lived task and wait for it."""
        task = self._tasks.pop(name, None)
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def close(self):
        self._closing = True
        tasks = list(self._tasks.values()) + list(self._once)
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
