"""Debian roots for the install tests, built once by debootstrap and cached.

``rootfs_tar(include)`` returns a tar of a minbase Debian bookworm root with
the ``include`` packages added, built on first use (about a minute) and kept
under ``test_cache()/debootstrap/``, keyed by everything that goes into it.
The chroot test (sysvinit mode) and the live-systemd test use different
package sets, hence different tars, from this one recipe.

Test caches live outside the home directory: ``$ELKEID_TEST_CACHE``, else
``/var/tmp/elkeid-agent-tests`` (``/var/tmp`` survives reboots, as a cache
should, and is not anybody's home).
"""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess

import pytest

SUITE = "bookworm"
RECIPE = 1  # bump when the way a root is made changes


def test_cache():
    return os.environ.get("ELKEID_TEST_CACHE") or "/var/tmp/elkeid-agent-tests"


def in_ci():
    """CI (env CI=true) must fail where a developer's machine may skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason):
    """A prerequisite is missing: skip with the reason, but fail in CI,
    which is root, has apt and must run these tests."""
    if in_ci():
        pytest.fail("CI must run this test, but: " + reason, pytrace=False)
    pytest.skip(reason)


def debian_arch():
    return {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]


def host_mirror():
    """$ELKEID_TEST_DEBIAN_MIRROR, else the first Debian URI this machine's
    apt uses (so a machine behind a mirror builds from it), else Debian's."""
    env = os.environ.get("ELKEID_TEST_DEBIAN_MIRROR")
    if env:
        return env
    sources = []
    try:
        d = "/etc/apt/sources.list.d"
        sources = [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith(".sources")]
    except OSError:
        pass
    for path in sources:
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key.strip() == "URIs":
                        for uri in value.split():
                            if uri.startswith("http") and "security" not in uri:
                                return uri
        except OSError:
            pass
    try:
        with open("/etc/apt/sources.list") as f:
            for line in f:
                words = line.split()
                if len(words) >= 3 and words[0] == "deb":
                    uri = next((w for w in words[1:] if w.startswith("http")), None)
                    if uri and "security" not in uri:
                        return uri
    except OSError:
        pass
    return "http://deb.debian.org/debian"


def rootfs_tar(include):
    """The cached minbase root with ``include`` (built with debootstrap on
    first use; concurrent first uses build it once)."""
    include = tuple(include)
    mirror = host_mirror()
    key = hashlib.sha256(json.dumps([SUITE, "minbase", include, mirror, debian_arch(),
                                     RECIPE]).encode()).hexdigest()[:12]
    cache = os.path.join(test_cache(), "debootstrap")
    tar = os.path.join(cache, "%s-minbase-%s-%s.tar" % (SUITE, debian_arch(), key))
    if os.path.exists(tar):
        return tar
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(tar):
            return tar
        work = tar + ".root"
        shutil.rmtree(work, ignore_errors=True)
        p = subprocess.run(["debootstrap", "--variant=minbase", "--include=" + ",".join(include),
                            "--arch=" + debian_arch(), SUITE, work, mirror],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1200)
        if p.returncode != 0:
            shutil.rmtree(work, ignore_errors=True)
            raise AssertionError("debootstrap failed:\n" + p.stdout.decode()[-3000:])
        subprocess.run(["tar", "-C", work, "-cf", tar + ".tmp", "."], check=True)
        os.replace(tar + ".tmp", tar)
        shutil.rmtree(work, ignore_errors=True)
    return tar


def extract(tar, dest):
    os.makedirs(dest)
    subprocess.run(["tar", "-C", dest, "-xf", tar], check=True)


def tree(root, uncompared):
    """Every path under ``root`` (relative, directories included) except
    those under the ``uncompared`` prefixes (each ending in "/")."""
    out = set()
    for base, dirs, files in os.walk(root):
        rel = os.path.relpath(base, root)
        rel = "" if rel == "." else rel + "/"
        if any(rel.startswith(u) for u in uncompared):
            dirs[:] = []
            continue
        for name in dirs + files:
            if not any((rel + name + "/").startswith(u) for u in uncompared):
                out.add(rel + name)
    return out
