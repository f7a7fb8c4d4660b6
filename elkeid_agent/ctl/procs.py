"""Finding and stopping the agent's processes in sysvinit mode.

The agent is the live holder of /var/run/elkeid-agent.pid. Its processes
are that pid, everything below it in the process tree, and everything in
its cgroup (which also catches plugins whose parent already exited). Never
pid 1, never elkeidctl itself or the processes that started it (the agent
may be running dpkg, which runs the post-install, which runs us).
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
    """The agent's process set, tracked across a stop."""

    def __init__(self, fx, cgroup, agent_pid):
        self.fx = fx
        self.cgroup = cgroup
        self.agent_pid = agent_pid
        self.seen = set()

    def current(self):
        """Live pids that belong to the agent now (and ones seen before that
        are still alive: plugins outlive their parent during a stop)."""
        fx = self.fx
        procs = fx.processes()
        found = set(self.cgroup.members()) if self.cgroup is not None else set()
        if self.agent_pid and self.agent_pid in procs:
            found.add(self.agent_pid)
            found |= descendants(procs, self.agent_pid)
        found |= {p for p in self.seen if p in procs}
        found -= ancestors(procs, fx.getpid()) | {0, 1, fx.getpid()}
        found = {p for p in found if fx.alive(p)}
        self.seen |= found
        return found, procs


def stop(fx, cgroup, agent_pid, say):
    """SIGTERM the agent, wait for its processes to exit, SIGKILL whatever
    is left after STOP_TIMEOUT. Returns the pids that had to be killed."""
    tracker = AgentProcesses(fx, cgroup, agent_pid)
    pids, _procs = tracker.current()
    if not pids:
        return []
    start = fx.monotonic()
    agent_gone_at = None
    if agent_pid > 1:
        fx.kill(agent_pid, signal.SIGTERM)
    else:
        # No agent (0: sweeping leftovers of a crashed one). kill(0) would hit
        # our own process group - the shell, cron or dpkg that ran us.
        agent_gone_at = start - ORPHAN_GRACE
    orphans_termed = False
    next_note = start + 5.0
    while True:
        pids, procs = tracker.current()
        if not pids:
            return []
        now = fx.monotonic()
        if agent_pid not in pids and agent_gone_at is None:
            agent_gone_at = now
        if agent_gone_at is not None and not orphans_termed and now - agent_gone_at >= ORPHAN_GRACE:
            # The agent exited without stopping everything it started.
            _signal_all(fx, pids, procs, signal.SIGTERM)
            orphans_termed = True
        if now - start >= STOP_TIMEOUT:
            say("elkeid-agent did not stop within %d s; killing %d process(es): %s"
                % (STOP_TIMEOUT, len(pids), " ".join(map(str, sorted(pids)))))
            _signal_all(fx, pids, procs, signal.SIGKILL)
            deadline = fx.monotonic() + 5.0
            while tracker.current()[0] and fx.monotonic() < deadline:
                fx.sleep(0.1)
            return sorted(pids)
        if now >= next_note:
            say("waiting for %d process(es) to exit..." % len(pids))
            next_note += 5.0
        fx.sleep(0.1)


def _signal_all(fx, pids, procs, sig):
    for pid in sorted(pids):
        p = procs.get(pid)
        if p is not None and p.pgid == pid:
            fx.kill(-pid, sig)  # plugins lead their own process group
        fx.kill(pid, sig)
