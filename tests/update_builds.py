"""Real builds for the tests that update a running agent: zipapps stamped
with any version, some broken on purpose, and .deb/.rpm packages of them.

The site-packages tree of this machine's zipapp is staged once per session
(the ``site_dir`` fixture); every build starts from a copy of it, so the
checkout's elkeid_agent/ never changes. ``make_pyz(out_dir, version,
fault=None)`` stamps ``__version__`` in the copy's elkeid_agent/__init__.py
(the zipapp's metadata and the agent's heartbeats carry it) and appends one
fault to the copy:

``"import"``
    ``raise RuntimeError(...)`` at the end of elkeid_agent/app.py: ``run``
    dies at import with a traceback and status 1 (``--version``, which
    does not import app.py, still answers);
``"noconnect"``
    ``Transport._connect`` in elkeid_agent/transport/stream.py replaced by
    one that logs ``test fault noconnect`` and reports failure without
    dialling: the agent runs, heartbeats into its queue and logs, but
    never reaches a server (its connect loop backs off and retries);
``"crash_after:N"``
    ``Agent.start`` in elkeid_agent/app.py wrapped so that N seconds
    (N > 0, may be fractional) after it completes the process ends with
    ``os._exit(70)`` (``CRASH_STATUS``): no shutdown, no flush;
``"slow_shutdown:N"``
    ``Agent.shutdown`` wrapped so that it logs ``test fault slow_shutdown``
    and waits N seconds before it begins: a window in which the agent is
    known to be shutting down (for a re-exec, say).

Built zipapps are cached under the session's directory by (version, fault,
build id of the staged site) and packages by (zipapp content, version,
architecture, format), so tests that ask for the same build share one;
callers get a copy in ``out_dir`` that they may change. Packages come from
``./build.sh package-one`` (nfpm with the repository's nfpm.yaml, the same
steps as ``./build.sh packages``).
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from elkeid_agent.plugins.fetch import sha256_file
from harness import AgentProc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "packaging"))
import build_zipapp  # noqa: E402

ARCH = build_zipapp.ARCHES[os.uname().machine]
SYSTEM_PY = "/usr/bin/python3"
CRASH_STATUS = 70
# Also a safe file name and a valid dpkg/rpm upstream version.
_VERSION = re.compile(r"^[0-9][0-9A-Za-z.+~]*$")

_IMPORT_FAULT = '''

# --- test fault "import" (tests/update_builds.py): this build cannot start.
raise RuntimeError("test fault import: elkeid_agent.app refuses to load")
'''
_NOCONNECT_FAULT = '''

# --- test fault "noconnect" (tests/update_builds.py): never reach a server.
async def _test_fault_never_connect(self):
    log.warning("test fault noconnect: not dialling any AgentCenter")
    return False


Transport._connect = _test_fault_never_connect
'''
_CRASH_AFTER_FAULT = '''

# --- test fault "crash_after" (tests/update_builds.py): exit %(seconds)r s after start-up.
def _test_fault_crash_later(start):
    async def start_then_crash(self):
        await start(self)
        log.warning("test fault crash_after: exiting with status %(status)d in %(seconds)r s")
        asyncio.get_running_loop().call_later(%(seconds)r, os._exit, %(status)d)
    return start_then_crash


Agent.start = _test_fault_crash_later(Agent.start)
'''

_SLOW_SHUTDOWN_FAULT = '''

# --- test fault "slow_shutdown" (tests/update_builds.py): %(seconds)r s before shutting down.
def _test_fault_slow_shutdown(shutdown):
    async def wait_then_shut_down(self):
        log.warning("test fault slow_shutdown: shutting down in %(seconds)r s")
        await asyncio.sleep(%(seconds)r)
        await shutdown(self)
    return wait_then_shut_down


Agent.shutdown = _test_fault_slow_shutdown(Agent.shutdown)
'''


def stage_site(site):
    """Fill ``site`` (created) with this machine's zipapp site-packages,
    from the wheels cached in build/wheels/ARCH (downloaded when missing)."""
    os.makedirs(site)
    build_zipapp.stage(ARCH, build_zipapp.wheels_for(
        ARCH, os.path.join(ROOT, "build", "wheels", ARCH)), site)
    return site


@pytest.fixture(scope="session")
def site_dir(tmp_path_factory):
    """The staged site-packages tree, once per session (read-only by
    convention: builds change a copy of it)."""
    return stage_site(str(tmp_path_factory.mktemp("site") / "site-packages"))


@pytest.fixture(scope="session")
def builds(tmp_path_factory, site_dir):
    """The session's ``UpdateBuilds``."""
    return UpdateBuilds(str(tmp_path_factory.mktemp("update-builds")), site_dir)


def _fault_snippet(fault):
    """(path in the site, Python text to append) for ``fault``."""
    if fault == "import":
        return "elkeid_agent/app.py", _IMPORT_FAULT
    if fault == "noconnect":
        return "elkeid_agent/transport/stream.py", _NOCONNECT_FAULT
    kind, _, arg = (fault or "").partition(":")
    if kind in ("crash_after", "slow_shutdown"):
        try:
            seconds = float(arg)
        except ValueError:
            seconds = -1.0
        if seconds > 0:
            template = _CRASH_AFTER_FAULT if kind == "crash_after" else _SLOW_SHUTDOWN_FAULT
            return "elkeid_agent/app.py", template % {"seconds": seconds,
                                                      "status": CRASH_STATUS}
    raise ValueError("unknown fault %r: use import, noconnect, crash_after:SECONDS or "
                     "slow_shutdown:SECONDS" % fault)


def copy_site(site, dest, fault):
    """A copy of the staged ``site`` at ``dest`` with ``fault`` appended;
    returns ``dest``."""
    shutil.copytree(site, dest)
    rel, snippet = _fault_snippet(fault)
    with open(os.path.join(dest, rel), "a") as f:
        f.write(snippet)
    return dest


def _copy_out(cached, out_dir, name):
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, name)
    shutil.copyfile(cached, out)
    shutil.copymode(cached, out)
    return out


class UpdateBuilds:
    """Zipapps and packages built from one staged site, cached in ``cache``."""

    def __init__(self, cache, site):
        self.cache = cache
        self.site = site
        self._build_id = None

    @property
    def build_id(self):
        """The staged site's build id (the key that tells its builds apart)."""
        if self._build_id is None:
            self._build_id = build_zipapp.build_id(self.site)
        return self._build_id

    def make_pyz(self, out_dir, version, fault=None):
        """Path of a zipapp stamped ``version`` with ``fault`` (module
        docstring) in ``out_dir``: elkeid-agent-VERSION[-FAULT].pyz."""
        if fault is not None:
            _fault_snippet(fault)  # a bad fault is refused before anything is built
        label = version + ("-" + fault.replace(":", "-") if fault else "")
        where = os.path.join(self.cache, "pyz", self.build_id[:16], label)
        cached = os.path.join(where, "elkeid-agent.pyz")
        if not os.path.exists(cached):
            os.makedirs(where, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=where) as tmp:
                site = self.site if fault is None else \
                    copy_site(self.site, os.path.join(tmp, "site-packages"), fault)
                built = os.path.join(tmp, "elkeid-agent.pyz")
                # build() stamps the version into a copy of its own.
                build_zipapp.build(ARCH, built, None, site_override=site, version=version)
                os.replace(built, cached)
        return _copy_out(cached, out_dir, "elkeid-agent-%s.pyz" % label)

    def make_deb(self, out_dir, pyz, version, arch="amd64"):
        """Path of a .deb in ``out_dir`` installing ``pyz`` as
        /etc/elkeid/elkeid-agent, package version ``version``."""
        return self._package("deb", out_dir, pyz, version, arch)

    def make_rpm(self, out_dir, pyz, version, arch="amd64"):
        """The .rpm counterpart of ``make_deb``."""
        return self._package("rpm", out_dir, pyz, version, arch)

    def _package(self, fmt, out_dir, pyz, version, arch):
        if not _VERSION.match(version):
            raise ValueError("version %r is not like 1.7.0.2" % version)
        content = sha256_file(pyz)
        if content is None:
            raise ValueError("%s is not a regular file" % pyz)
        name = "elkeid-agent_%s_%s.%s" % (version, arch, fmt)
        key = hashlib.sha256(("%s\0%s\0%s\0%s" % (content, version, arch, fmt))
                             .encode()).hexdigest()[:16]
        cached = os.path.join(self.cache, "packages", key, name)
        if not os.path.exists(cached):
            env = dict(os.environ, ELKEID_VENV=sys.prefix)
            p = subprocess.run([os.path.join(ROOT, "build.sh"), "package-one",
                                os.path.abspath(pyz), version, arch, fmt, cached],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if p.returncode != 0 or not os.path.isfile(cached):
                raise RuntimeError("./build.sh package-one %s failed (%d): %s"
                                   % (fmt, p.returncode, p.stderr.decode("utf-8", "replace")))
        return _copy_out(cached, out_dir, name)


def pyz_agent(pyz, workdir, devcenter, agent_id, *args, cache, env=None, python=SYSTEM_PY):
    """``python PYZ run`` against ``devcenter`` (mutual TLS, heartbeats every
    0.5 s) as an ``AgentProc``; ``cache`` is the zipapp's extraction cache
    (ELKEID_AGENT_CACHE), kept out of the home directory and /var/cache;
    ``env`` adds to the environment."""
    argv = ["--server", devcenter.grpc, "--agent-id", agent_id, "--heartbeat-interval", "0.5"]
    return AgentProc(workdir, argv + devcenter.cert_args + list(args),
                     env=dict(env or {}, ELKEID_AGENT_CACHE=str(cache)),
                     command=[python, pyz, "run"])
