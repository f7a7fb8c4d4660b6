"""Supervision policy: settings, restart/backoff decisions, resource limits.

Sans-I/O: every class here is fed times and numbers and returns decisions;
nothing sleeps, spawns or reads /proc. The supervisor feeds them from its
timers and from /proc samples.
"""

import signal
from dataclasses import dataclass, field, fields as dc_fields
from typing import Dict, Tuple

MiB = 1024 * 1024


@dataclass
class Policy:
    """Every knob of plugin supervision, with the reason for its default.
    ``PluginSupervisor(**overrides)`` replaces any of them by name."""

    # The required schedule: restart at once, then after 10 s, 30 s, 60 s.
    backoff: Tuple[float, ...] = (0.0, 10.0, 30.0, 60.0)
    # A run this long counts as healthy and forgives earlier failures
    # (the requirement: "距离上次重启超过5分钟，重置计数").
    healthy_reset: float = 300.0
    # restart.max_retries of the requirements: after this many failed runs in a row the
    # plugin is marked fatal and left alone until the server re-sends it.
    max_failures: int = 10
    # docs/protocol.md section 1: close pipes, wait up to 10 s, SIGKILL the group.
    stop_timeout: float = 10.0
    # After SIGKILL a process normally goes at once; one that does not within
    # this long is stuck in the kernel (D state): reported and left to its
    # exit watch, so a stop or restart never waits on it without limit.
    kill_timeout: float = 5.0
    # The required health_check defaults: 50 % of one core, 500 MB, for 60 s.
    cpu_limit: float = 0.5
    rss_limit: int = 500 * MiB
    limit_window: float = 60.0
    # How often CPU/RSS are sampled for the limits (and healthy resets).
    sample_interval: float = 5.0
    # Largest frame body accepted from a plugin. The record queue refuses
    # records over 4 MiB anyway and AgentCenter takes 10 MiB per message.
    max_frame: int = 4 * MiB
    # Tasks waiting for a plugin that does not read fd 3.
    task_queue_max: int = 64
    # docs/protocol.md section 2: 10 minutes, 512 MiB per download.
    download_timeout: float = 600.0
    download_max_bytes: int = 512 * MiB
    # An archive may not unpack to more than this (a 600 MB file of zeros
    # is a 600 KB download), nor hold more members than this.
    extract_max_bytes: int = 512 * MiB
    extract_max_members: int = 10000
    # <name>.stderr is truncated when it grows past this (it has no rotation
    # in Elkeid and a chatty plugin would fill the disk).
    stderr_max_bytes: int = 16 * MiB
    # du of each plugin dir for the 1001 heartbeat, refreshed this often.
    du_interval: float = 60.0
    # Per-plugin ingest cap in bytes/s; 0 = none. Excess is not dropped: the
    # pipe is paused, so the plugin blocks in write (backpressure).
    ingest_max_bytes_per_sec: float = 0.0
    # Above this share of the record queue's byte budget the sender is not
    # keeping up. A pipe read of at least ``heavy_read`` bytes (a plugin
    # writing as fast as the pipe takes it) is then followed by a hold:
    # that pipe is not read again until the queue is back under high water,
    # or for ``hold_max`` seconds at most. Light producers are never held,
    # heavy ones cannot evict their records or starve the sender on the
    # loop, and during an outage the queue's own overflow policy (spool or
    # drop) still gets a heavy plugin's data, one read per ``hold_max``.
    queue_high_water: float = 0.5
    heavy_read: int = 64 * 1024
    hold_max: float = 0.5
    # Kernel buffer of the fd 4 pipe (default 64 KiB): 1 MiB lets one read
    # take ~5000 records of 200 bytes and gives a plugin slack. 0 = default.
    pipe_buffer: int = 1024 * 1024
    # Readers get this long to drain a pipe after its plugin exited.
    drain_timeout: float = 2.0
    # pidfd (Linux >= 5.3) to watch exits; False forces the thread fallback.
    use_pidfd: bool = True
    # Extra environment for every plugin (the agent's own is not inherited).
    env: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_overrides(cls, **overrides):
        known = {f.name for f in dc_fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError("unknown plugin policy setting(s): %s" % ", ".join(unknown))
        policy = cls(**overrides)
        policy.validate()
        return policy

    def validate(self):
        if not self.backoff or any(d < 0 for d in self.backoff):
            raise ValueError("backoff must be a non-empty list of delays >= 0")
        self.backoff = tuple(float(d) for d in self.backoff)
        for name in ("healthy_reset", "stop_timeout", "limit_window", "sample_interval",
                     "download_timeout", "du_interval", "drain_timeout", "kill_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError("%s must be > 0" % name)
        for name in ("max_failures", "max_frame", "task_queue_max", "download_max_bytes",
                     "extract_max_bytes", "extract_max_members", "stderr_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError("%s must be >= 1" % name)
        if not 0 < self.queue_high_water <= 1:
            raise ValueError("queue_high_water must be in (0, 1]")
        if self.hold_max <= 0 or self.heavy_read < 1:
            raise ValueError("hold_max must be > 0 and heavy_read >= 1")
        if self.pipe_buffer < 0:
            raise ValueError("pipe_buffer must be >= 0 (0 keeps the kernel default)")
        if self.cpu_limit < 0 or self.rss_limit < 0 or self.ingest_max_bytes_per_sec < 0:
            raise ValueError("limits must be >= 0 (0 disables)")


@dataclass
class Decision:
    fatal: bool
    delay: float
    failures: int


class RestartPolicy:
    """When to restart a plugin whose process ended without being asked to.

    ``failures`` counts failed runs in a row. A run that lasted at least
    ``healthy_reset`` seconds, or a ``check_healthy`` call after that long,
    sets it back to zero."""

    def __init__(self, policy):
        self.backoff = policy.backoff
        self.healthy_reset = policy.healthy_reset
        self.max_failures = policy.max_failures
        self.failures = 0
        self.started_at = None

    def on_start(self, now):
        self.started_at = now

    def check_healthy(self, now):
        """True when this call forgave earlier failures (the caller clears the
        plugin's abnormal reason)."""
        if self.failures and self.started_at is not None \
                and now - self.started_at >= self.healthy_reset:
            self.failures = 0
            return True
        return False

    def on_failure(self, now):
        """The run that started at ``on_start`` ended badly: restart after
        ``delay`` seconds, or give up (fatal)."""
        if self.started_at is not None and now - self.started_at >= self.healthy_reset:
            self.failures = 0
        self.started_at = None
        self.failures += 1
        if self.failures >= self.max_failures:
            return Decision(True, 0.0, self.failures)
        delay = self.backoff[min(self.failures - 1, len(self.backoff) - 1)]
        return Decision(False, delay, self.failures)

    def reset(self):
        self.failures = 0
        self.started_at = None


class LimitEvaluator:
    """CPU and RSS limits sustained over a window.

    Fed cumulative CPU seconds and current RSS of one process; a sample over
    a limit starts (or continues) an "over" period that began at the previous
    sample; any sample under every limit ends it. ``sample`` returns a
    message once a period has lasted ``window`` seconds."""

    def __init__(self, cpu_limit, rss_limit, window):
        self.cpu_limit = cpu_limit
        self.rss_limit = rss_limit
        self.window = window
        self._last = None  # (now, cpu_seconds)
        self._over_since = None
        self.cpu = 0.0
        self.rss = 0

    def sample(self, now, cpu_seconds, rss):
        last = self._last
        self._last = (now, cpu_seconds)
        self.rss = rss
        if last is None or now <= last[0]:
            return None
        self.cpu = max(0.0, (cpu_seconds - last[1]) / (now - last[0]))
        over = []
        if self.cpu_limit and self.cpu > self.cpu_limit:
            over.append("cpu %.0f%% > %.0f%%" % (self.cpu * 100, self.cpu_limit * 100))
        if self.rss_limit and rss > self.rss_limit:
            over.append("rss %d MiB > %d MiB" % (rss // MiB, self.rss_limit // MiB))
        if not over:
            self._over_since = None
            return None
        if self._over_since is None:
            self._over_since = last[0]
        if now - self._over_since >= self.window:
            held = now - self._over_since
            self._over_since = None
            return "%s for %.0f s" % (", ".join(over), held)
        return None


class TokenBucket:
    """Byte-rate limiter: ``charge`` returns how long to pause (0 = go on)."""

    def __init__(self, rate, burst=None, now=0.0):
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self.tokens = self.burst
        self.stamp = now

    def charge(self, now, amount):
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= amount
        if self.tokens >= 0:
            return 0.0
        return -self.tokens / self.rate


class RateMeter:
    """Rates of cumulative counters between two reads (the 1001 heartbeat
    reports per-second rates since the previous heartbeat, as Elkeid does)."""

    def __init__(self, now, *values):
        self.stamp = now
        self.values = values

    def rates(self, now, *values):
        elapsed = now - self.stamp
        out = tuple((v - old) / elapsed if elapsed > 0 else 0.0
                    for v, old in zip(values, self.values))
        self.stamp = now
        self.values = values
        return out


def describe_exit(code):
    """'exited with code 3' / 'killed by signal 9 (SIGKILL)'."""
    if code is None:
        return "exited"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        return "killed by signal %d (%s)" % (-code, name)
    return "exited with code %d" % code
