"""OS effects of ``elkeidctl``: service managers, cgroups, cron, pid files,
process discovery and signals.

``elkeid_agent.ctl`` decides *what* to do; this module is the only place
that does it. Every path the control logic passes is a host path
(``/etc/elkeid/specified_env``); ``ServiceEffects(root=...)`` re-bases them,
which is how tests run the real file logic inside a temporary directory and
replace only the methods that would touch the host's processes and service
managers (see ``tests/test_ctl.py``).

Standard library only: ``elkeidctl`` must run on a host where nothing else
of the agent works.
"""

import os
import shutil
import subprocess
import time
from collections import namedtuple

from . import ProcessIdentity, signal_process

# What a command run through the seam produced. ``output`` is stdout+stderr
# when captured, "" when the command wrote straight to the terminal.
Completed = namedtuple("Completed", "rc output")

# One process as /proc shows it; ``start`` is its start time in clock ticks
# since boot (field 22), what tells a process from a later one with its pid.
Proc = namedtuple("Proc", "pid ppid pgid start", defaults=(None,))

# Service managers and mount(8) are looked up here, as the Go elkeidctl does:
# under cron PATH is only /usr/bin:/bin.
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ServiceEffects:
    """The real thing. ``root`` re-bases every host path (default ``/``)."""

    def __init__(self, root="/"):
        self.root = os.path.abspath(root)

    # ------------------------------------------------------------ paths

    def host(self, path):
        """The real location of host path ``path``."""
        if self.root == "/":
            return path
        return os.path.join(self.root, path.lstrip("/"))

    # ------------------------------------------------------------ identity

    def geteuid(self):
        return os.geteuid()

    def getpid(self):
        return os.getpid()

    # ------------------------------------------------------------ files

    def read_bytes(self, path, limit=1 << 20):
        """File contents, or None when it does not exist. Other errors raise."""
        try:
            with open(self.host(path), "rb") as f:
                return f.read(limit)
        except FileNotFoundError:
            return None

    def read_text(self, path, limit=1 << 20):
        data = self.read_bytes(path, limit)
        return None if data is None else data.decode("utf-8", "replace")

    def write_file(self, path, data, mode=0o600):
        """Replace ``path`` atomically (temp file + rename) with ``mode``."""
        real = self.host(path)
        tmp = "%s.tmp.%d" % (real, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        os.close(fd)
        try:
            os.replace(tmp, real)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def write_control(self, path, text):
        """One write to a kernel control file (cgroup.procs, cpu.max...).

        No temp file: these are not regular files. EINTR is retried, as the
        Go elkeidctl does (golang/go#38033)."""
        data = text.encode("ascii")
        while True:
            try:
                fd = os.open(self.host(path), os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                return
            except InterruptedError:
                continue

    def exists(self, path):
        return os.path.lexists(self.host(path))

    def isdir(self, path):
        return os.path.isdir(self.host(path))

    def listdir(self, path):
        try:
            return sorted(os.listdir(self.host(path)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def makedirs(self, path, mode=0o700):
        os.makedirs(self.host(path), mode=mode, exist_ok=True)

    def remove(self, path):
        """Remove a file or symlink; True if something was removed."""
        try:
            os.unlink(self.host(path))
            return True
        except FileNotFoundError:
            return False

    def rmdir(self, path):
        """Remove an empty directory (a cgroup); True if it was removed."""
        try:
            os.rmdir(self.host(path))
            return True
        except FileNotFoundError:
            return False

    def rmtree(self, path):
        real = self.host(path)
        if os.path.islink(real) or not os.path.isdir(real):
            return self.remove(path)
        shutil.rmtree(real)
        return True

    def copy(self, src, dst, mode):
        with open(self.host(src), "rb") as f:
            data = f.read()
        self.write_file(dst, data, mode)

    def readlink(self, path):
        try:
            return os.readlink(self.host(path))
        except OSError:
            return None

    # ------------------------------------------------------------ commands

    def which(self, name):
        """Full path of a service-manager tool, or None."""
        for d in SAFE_PATH.split(":"):
            candidate = os.path.join(d, name)
            if os.path.isfile(self.host(candidate)) and os.access(self.host(candidate), os.X_OK):
                return candidate
        return None

    def run(self, argv, capture=True, timeout=120):
        """Run a tool to completion. With ``capture=False`` it writes to our
        stdout/stderr (``systemctl status`` talks to the user directly)."""
        env = dict(os.environ)
        env["PATH"] = SAFE_PATH
        try:
            if capture:
                p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, env=env, timeout=timeout)
                return Completed(p.returncode, p.stdout.decode("utf-8", "replace"))
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, env=env, timeout=timeout)
            return Completed(p.returncode, "")
        except FileNotFoundError:
            return Completed(127, "%s: command not found" % argv[0])
        except subprocess.TimeoutExpired:
            return Completed(124, "%s: timed out after %d s" % (" ".join(argv), timeout))
        except OSError as e:
            return Completed(126, "%s: %s" % (argv[0], e.strerror))

    # ------------------------------------------------------------ processes

    def processes(self):
        """Every process: {pid: Proc}. Processes that vanish mid-scan are skipped."""
        out = {}
        for name in self.listdir("/proc"):
            if not name.isdigit():
                continue
            raw = self.read_bytes_quietly("/proc/%s/stat" % name)
            p = parse_stat(raw) if raw else None
            if p is not None:
                out[p.pid] = p
        return out

    def read_bytes_quietly(self, path, limit=1 << 16):
        try:
            return self.read_bytes(path, limit)
        except OSError:
            return None

    def proc_link(self, pid, what):
        """readlink /proc/<pid>/exe or cwd; None if gone or not permitted."""
        return self.readlink("/proc/%d/%s" % (pid, what))

    def alive(self, pid):
        """True if ``pid`` exists and is not a zombie."""
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        raw = self.read_bytes_quietly("/proc/%d/stat" % pid)
        state = stat_state(raw) if raw else None
        return state not in ("Z", "X")

    def identify(self, proc):
        """The ``ProcessIdentity`` of ``proc`` (a ``Proc`` from ``processes()``)
        to signal it by later, or None if that process is gone already."""
        if self.root != "/":
            return None  # a re-based root has no processes of its own
        return ProcessIdentity.capture(proc.pid, proc.start)

    # Every signal: a pid, or a ProcessIdentity (``group=True`` for the group
    # it leads), verified to be the same process first.
    kill = staticmethod(signal_process)

    def spawn(self, argv, cwd, env, cgroup_procs=()):
        """Start ``argv`` detached (own session, stdio on /dev/null). Returns
        a handle with ``pid`` and ``poll()`` (exit status or None). The child
        writes itself into each ``cgroup_procs`` file before exec, so nothing
        it starts can escape the limits."""
        files = [self.host(p) for p in cgroup_procs]

        def enter_cgroups():
            me = str(os.getpid()).encode()
            for path in files:
                try:
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.write(fd, me)
                    finally:
                        os.close(fd)
                except OSError:
                    pass  # reported by the parent, which checks membership

        return subprocess.Popen(argv, cwd=self.host(cwd), env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True,
                                preexec_fn=enter_cgroups if files else None)

    # ------------------------------------------------------------ pid files

    def pidfile_holder(self, path):
        """pid of the live process holding pid file ``path``, else None."""
        from ..runtime.pidlock import read_holder
        return read_holder(self.host(path))

    def try_lock(self, path):
        """Take the pid-file lock ``path`` without waiting. Returns a handle
        with ``release()``, or None if another live process holds it."""
        from ..errors import LocalFault
        from ..runtime.pidlock import PidLock
        lock = PidLock(self.host(path))
        try:
            lock.acquire()
        except LocalFault:
            return None
        return lock

    # ------------------------------------------------------------ mounts

    def mount_cgroup_v1(self, options, target):
        """``mount -t cgroup -o OPTIONS cgroup TARGET`` (Go elkeidctl does this
        when a hierarchy is not mounted)."""
        return self.run(["mount", "-t", "cgroup", "-o", options, "cgroup", self.host(target)])

    def umount(self, target):
        return self.run(["umount", self.host(target)])

    # ------------------------------------------------------------ time

    def monotonic(self):
        return time.monotonic()

    def sleep(self, seconds):
        time.sleep(seconds)


def parse_stat(raw):
    """Proc(pid, ppid, pgid, start) from /proc/<pid>/stat bytes, or None
    (``start`` None when the line is cut short).

    The command name (field 2) may contain spaces and parentheses, so split
    after the *last* ')'."""
    try:
        text = raw.decode("ascii", "replace")
        pid = int(text[:text.index(" ")])
        rest = text[text.rindex(")") + 2:].split()
        start = int(rest[19]) if len(rest) > 19 else None
        return Proc(pid, int(rest[1]), int(rest[2]), start)
    except (ValueError, IndexError):
        return None


def stat_state(raw):
    try:
        text = raw.decode("ascii", "replace")
        return text[text.rindex(")") + 2:].split()[0]
    except (ValueError, IndexError):
        return None


def proc_stat_fields(raw):
    """All fields after the command name (index 0 is the state), or []."""
    try:
        text = raw.decode("ascii", "replace")
        return text[text.rindex(")") + 2:].split()
    except ValueError:
        return []


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass
