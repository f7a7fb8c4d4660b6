"""Finding and stopping the agent's processes in sysvinit mode.

The agent is the live holder of /var/run/elkeid-agent.pid. Its processes
are that pid, everything below it in the process tree, and everything in
its cgroup (which also catches plugins whose parent already exited). Never
pid 1, never elkeidctl itself or the processes that started it (the agent
may be running dpkg, which runs the post-install, which runs us).

A stop lasts up to STOP_TIMEOUT, long enough for a pid to be reused: each
process is remembered as a ``ProcessIdentity`` (pidfd or start time) when
first seen, and only that process is ever signalled, never whatever holds
its number later.
"""

import signal

from .layout import ORPHAN_GRACE, STOP_TIMEOUT


def descendants(procs, pid):
    """pids below ``pid`` in the process tree (not ``pid`` itself)."""
    children = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = set(), list(children.get(pid, ()))
    while todo:
        child = todo.pop()
        if child not in out and child != pid:
            out.add(child)
            todo.extend(children.get(child, ()))
    return out


def ancestors(procs, pid):
    out = set()
    while pid in procs and pid not in out and pid > 1:
        out.add(pid)
        pid = procs[pid].ppid
    return out


class AgentProcesses:
    """The agent's process set, tracked across a stop. A context manager:
    leaving it closes the pidfds it holds."""

    def __init__(self, fx, cgroup, agent_pid):
        self.fx = fx
        self.cgroup = cgroup
        self.agent_pid = agent_pid
        self.agent = None   # ProcessIdentity of the agent, once seen
        self.known = {}     # pid -> ProcessIdentity of every process seen
        self._first = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for ident in self.known.values():
            ident.close()
        self.known.clear()

    def _same(self, ident, procs):
        """``ident`` is still the process that holds its pid in ``procs``."""
        p = procs.get(ident.pid)
        return p is not None and p.start == ident.start

    def _remember(self, p):
        ident = self.known.get(p.pid)
        if ident is not None and ident.start == p.start:
            return ident
        if ident is not None:
            ident.close()  # that process is gone; this is another one
            del self.known[p.pid]
        ident = self.fx.identify(p)
        if ident is not None:
            self.known[p.pid] = ident
        return ident

    def current(self):
        """{pid: ProcessIdentity} of the live processes that belong to the
        agent now (and of ones seen before that are still the same
        processes: plugins outlive their parent during a stop), and the
        process table they came from."""
        fx = self.fx
        procs = fx.processes()
        if self._first:
            self._first = False
            p = procs.get(self.agent_pid) if self.agent_pid and self.agent_pid > 1 else None
            self.agent = self._remember(p) if p is not None else None
        found = set(self.cgroup.members()) if self.cgroup is not None else set()
        if self.agent is not None and self._same(self.agent, procs):
            found.add(self.agent.pid)
            found |= descendants(procs, self.agent.pid)
        # A remembered pid now naming another process is a stranger's.
        found |= {pid for pid, ident in self.known.items() if self._same(ident, procs)}
        found -= ancestors(procs, fx.getpid()) | {0, 1, fx.getpid()}
        out = {}
        for pid in sorted(found):
            p = procs.get(pid)
            if p is None or not fx.alive(pid):
                continue
            ident = self._remember(p)
            if ident is not None:
                out[pid] = ident
        return out, procs

    def agent_running(self, found):
        return self.agent is not None and found.get(self.agent.pid) is self.agent


def agent_pids(fx, cgroup, agent_pid):
    """The agent's pids right now (status, cgroup --apply)."""
    with AgentProcesses(fx, cgroup, agent_pid) as tracker:
        return set(tracker.current()[0])


def stop(fx, cgroup, agent_pid, say):
    """SIGTERM the agent, wait for its processes to exit, SIGKILL whatever
    is left after STOP_TIMEOUT. Returns the pids that had to be killed."""
    with AgentProcesses(fx, cgroup, agent_pid) as tracker:
        return _stop(fx, tracker, say)


def _stop(fx, tracker, say):
    found, _procs = tracker.current()
    if not found:
        return []
    start = fx.monotonic()
    agent_gone_at = None
    if tracker.agent_running(found):
        fx.kill(tracker.agent, signal.SIGTERM)
    else:
        # No agent (0: sweeping leftovers of a crashed one). kill(0) would hit
        # our own process group - the shell, cron or dpkg that ran us.
        agent_gone_at = start - ORPHAN_GRACE
    orphans_termed = False
    next_note = start + 5.0
    while True:
        found, procs = tracker.current()
        if not found:
            return []
        now = fx.monotonic()
        if agent_gone_at is None and not tracker.agent_running(found):
            agent_gone_at = now
        if agent_gone_at is not None and not orphans_termed and now - agent_gone_at >= ORPHAN_GRACE:
            # The agent exited without stopping everything it started.
            _signal_all(fx, found, procs, signal.SIGTERM)
            orphans_termed = True
        if now - start >= STOP_TIMEOUT:
            say("elkeid-agent did not stop within %d s; killing %d process(es): %s"
                % (STOP_TIMEOUT, len(found), " ".join(map(str, sorted(found)))))
            _signal_all(fx, found, procs, signal.SIGKILL)
            deadline = fx.monotonic() + 5.0
            while tracker.current()[0] and fx.monotonic() < deadline:
                fx.sleep(0.1)
            return sorted(found)
        if now >= next_note:
            say("waiting for %d process(es) to exit..." % len(found))
            next_note += 5.0
        fx.sleep(0.1)


def _signal_all(fx, found, procs, sig):
    for pid in sorted(found):
        ident = found[pid]
        p = procs.get(pid)
        if p is not None and p.pgid == pid:
            fx.kill(ident, sig, group=True)  # plugins lead their own process group
        fx.kill(ident, sig)
