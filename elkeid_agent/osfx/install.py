"""Host effects of updates: how the agent is installed, package managers,
file switches, restarts through the service manager.

The updater and the guard (elkeid_agent/update/) reach the host only
through ``InstallEffects``; this file is what a reviewer reads to know what
an update may do: run ``dpkg``/``dpkg-deb``/``dpkg-query``, ``rpm``,
``systemctl``, ``systemd-run``; copy and rename files in the agent's own
directories; start the guard and (where no service manager runs the agent)
the agent itself; under sysvinit run ``elkeidctl restart``, read the
agent's pid file and move the guard out of the agent's cgroups.
"""

import json
import os
import subprocess

from . import proc_start_ticks
from .services import SAFE_PATH, ServiceProcessEffects, process_state

SERVICE = "elkeid-agent.service"
META = "elkeid_zipapp.json"
_CHUNK = 1 << 20


def staging_path(dst):
    """Where ``copy_file`` writes ``dst`` before renaming it into place (a
    killed copy leaves it behind)."""
    return dst + ".part"


class InstallError(Exception):
    """A host step of an update failed; the message says which and why."""


def zipapp_meta(path):
    """The build metadata of an elkeid-agent zipapp, or None when ``path``
    is not one. zipfile is imported here, when an update is checked: the
    idle agent does not need it."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read(META).decode("utf-8"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return meta if isinstance(meta, dict) and meta.get("name") == "elkeid-agent" else None


def running(pid, start):
    """``pid`` is still the process that started at ``start`` ticks and has
    not exited (a zombie nobody reaped yet has exited)."""
    return bool(pid) and proc_start_ticks(pid) == start and \
        process_state(pid) not in ("Z", "X", "")


class InstallEffects:
    def __init__(self, processes=None):
        self.processes = processes or ServiceProcessEffects()

    # ------------------------------------------------------------ facts

    def run(self, argv, timeout=300.0, env=None):
        """(returncode, combined output); 127 when the tool is missing."""
        env = dict(env if env is not None else os.environ)
        env.setdefault("PATH", SAFE_PATH)
        env["DEBIAN_FRONTEND"] = "noninteractive"
        try:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=timeout, env=env)
        except FileNotFoundError:
            return 127, "%s: command not found" % argv[0]
        except subprocess.TimeoutExpired:
            return 124, "%s: no answer within %d s" % (" ".join(argv[:2]), timeout)
        except OSError as e:
            return 126, "%s: %s" % (argv[0], e.strerror or e)
        return p.returncode, p.stdout.decode("utf-8", "replace")

    def install_kind(self, archive):
        """How the running agent is installed: ``deb`` or ``rpm`` when a
        package manager owns ``archive``, ``pyz`` for a zipapp nobody owns,
        ``source`` for anything else (a checkout, ``python -m``)."""
        if not archive or zipapp_meta(archive) is None:
            return "source"
        rc, out = self.run(["dpkg-query", "-S", archive], 30)
        if rc == 0 and out.split(":", 1)[0].strip() == "elkeid-agent":
            return "deb"
        rc, out = self.run(["rpm", "-qf", "--qf", "%{NAME}", archive], 30)
        if rc == 0 and out.strip() == "elkeid-agent":
            return "rpm"
        return "pyz"

    def manager(self, service_type):
        """Who restarts the agent: ``systemd`` when this process runs in
        elkeid-agent.service, ``sysvinit`` when the settings say so (the
        agent holds the pid file; cron's check restarts it), else ``none``
        (started by hand: the agent re-executes itself)."""
        try:
            with open("/proc/self/cgroup") as f:
                if "/" + SERVICE in f.read():
                    return "systemd"
        except OSError:
            pass
        return "sysvinit" if service_type == "sysvinit" else "none"

    def host_arch(self, family):
        if family == "deb":
            rc, out = self.run(["dpkg", "--print-architecture"], 30)
            return out.strip() if rc == 0 else ""
        return os.uname().machine

    def package_facts(self, path, kind):
        """{"name", "version", "arch"} read from a package or zipapp;
        InstallError when the file is not a valid one."""
        if kind == "pyz":
            meta = zipapp_meta(path)
            if meta is None:
                raise InstallError("not an elkeid-agent zipapp (no %s in it)" % META)
            return {"name": "elkeid-agent", "version": str(meta.get("version", "")),
                    "arch": str(meta.get("arch", ""))}
        if kind == "deb":
            rc, out = self.run(["dpkg-deb", "-f", path, "Package", "Version", "Architecture"], 60)
            if rc != 0:
                raise InstallError("not a valid .deb: %s" % _one_line(out, 2))
            f = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
            return {"name": f.get("Package", ""), "version": f.get("Version", ""),
                    "arch": f.get("Architecture", "")}
        if kind == "rpm":
            rc, out = self.run(["rpm", "-qp", "--nosignature", "--nodigest", "--qf",
                                "%{NAME}\\n%{VERSION}\\n%{ARCH}\\n", path], 60)
            lines = out.strip().splitlines()
            if rc != 0 or len(lines) < 3:
                raise InstallError("not a valid .rpm: %s" % _one_line(out, 2))
            return {"name": lines[-3], "version": lines[-2], "arch": lines[-1]}
        raise InstallError("unknown package kind %r" % kind)

    def installed_version(self, family):
        """The elkeid-agent version the package manager records, '' if none."""
        if family == "deb":
            rc, out = self.run(["dpkg-query", "-W", "-f", "${Version}", "elkeid-agent"], 30)
        else:
            rc, out = self.run(["rpm", "-q", "--qf", "%{VERSION}", "elkeid-agent"], 30)
        return out.strip() if rc == 0 else ""

    # ------------------------------------------------------------ files

    def copy_file(self, src, dst, mode=0o600):
        """Copy with fsync; OSError (ENOSPC ...) leaves no partial ``dst``."""
        tmp = staging_path(dst)
        try:
            with open(src, "rb") as fin:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
                with os.fdopen(fd, "wb") as fout:
                    while True:
                        chunk = fin.read(_CHUNK)
                        if not chunk:
                            break
                        fout.write(chunk)
                    fout.flush()
                    os.fsync(fout.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, dst)
        except BaseException:
            _unlink(tmp)
            raise
        _fsync_dir(os.path.dirname(dst))

    def replace_file(self, src, target):
        """Put a copy of ``src`` at ``target`` atomically (a copy in the
        target's directory, then one rename), keeping the target's mode."""
        try:
            mode = os.stat(target).st_mode & 0o7777
        except OSError:
            mode = 0o700
        staged = os.path.join(os.path.dirname(target),
                              ".%s.new" % os.path.basename(target))
        self.copy_file(src, staged, mode)
        os.replace(staged, target)
        _fsync_dir(os.path.dirname(target))

    def remove(self, path):
        _unlink(path)

    # ------------------------------------------------------------ packages

    def install_package(self, path, family, allow_downgrade=False):
        """``dpkg -i`` / ``rpm -Uvh`` (as the Go agent does); InstallError
        with the tool's last output lines on failure."""
        if family == "deb":
            argv = ["dpkg", "--force-confold", "-i", path]
        else:
            argv = ["rpm", "-Uvh"] + (["--oldpackage"] if allow_downgrade else []) + [path]
        rc, out = self.run(argv, 600)
        if rc != 0:
            raise InstallError("%s exited with %d: %s" % (" ".join(argv[:-1]), rc,
                                                           _one_line(out, 3)))
        return out

    # ------------------------------------------------------------ service manager

    def systemctl(self, *args, timeout=120.0):
        rc, out = self.run(["systemctl"] + list(args), timeout)
        if rc != 0:
            raise InstallError("systemctl %s failed (%d): %s"
                               % (" ".join(args), rc, _one_line(out)))
        return out

    def unit_state(self):
        """MainPID, ActiveState, SubState, NRestarts of elkeid-agent.service."""
        props = self.processes.unit_properties(
            SERVICE, ["MainPID", "ActiveState", "SubState", "NRestarts", "ExecMainStatus"])
        return props

    # ------------------------------------------------------------ sysvinit

    def ctl(self, workdir, action):
        """``elkeidctl --workdir WORKDIR ACTION`` run in this process (the
        guard restarts a sysvinit agent the way an operator would); its
        exit code."""
        from ..ctl import main as ctl_main
        return ctl_main(["--workdir", workdir, action])

    def pidfile_holder(self, path):
        """pid of the live process holding the agent's pid file, else None."""
        from .service import ServiceEffects
        return ServiceEffects().pidfile_holder(path)

    def leave_agent_cgroup(self, pid, warn):
        """Move ``pid`` out of the sysvinit agent's cgroups (a guard must
        outlive the agent's stop)."""
        from ..ctl.cgroups import AgentCgroup
        from .service import ServiceEffects
        AgentCgroup(ServiceEffects()).release(pid, warn)

    def spawn_detached(self, argv, cwd, env, log_path, manager, unit=""):
        """Start ``argv`` so that it outlives the agent: a transient unit
        under systemd (KillMode=control-group would end it with the agent's
        cgroup), otherwise its own session. Returns the ``Spawned``."""
        if manager == "systemd":
            return self.processes.spawn_unit(unit, argv[0], argv[1:], cwd, env, log_path,
                                             log_path, 30)
        return self.processes.spawn_direct(argv[0], argv[1:], cwd, env, log_path, log_path)


def _one_line(output, lines=1):
    """The last ``lines`` non-empty lines of a tool's output, as one line
    (reasons go into one-line reports), at most 300 characters."""
    kept = [ln.strip() for ln in output.splitlines() if ln.strip()]
    text = " | ".join(kept[:1] if lines == 1 else kept[-lines:])
    return text[:300]


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path):
    try:
        fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
