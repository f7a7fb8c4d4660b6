"""The one-file zipapp: every CPython 3.9-3.13, unsupported Pythons, the
cache rules (no HOME, read-only home, unprivileged user, hostile /tmp,
noexec), concurrent first starts, upgrades, the bundled cryptography
verifying signatures on each Python, version stamping, and a real
connection to the development AgentCenter from each Python.

The archive is built once per session from this checkout (wheels cached in
build/wheels/ARCH; the first run downloads them from the package registry).
"""

import glob
import importlib.util
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zipfile

import pytest

from harness import DevCenterProc, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "packaging"))
import build_zipapp  # noqa: E402

ARCH = build_zipapp.ARCHES[os.uname().machine]
SUPPORTED = ("3.9", "3.10", "3.11", "3.12", "3.13")
SYSTEM_PY = "/usr/bin/python3"
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"
VERSION = build_zipapp.version()


def _load_boot():
    spec = importlib.util.spec_from_file_location(
        "_elkeid_boot", os.path.join(ROOT, "packaging", "zipapp", "_elkeid_boot.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


boot = _load_boot()


def pyenv(version):
    found = sorted(glob.glob("/root/.pyenv/versions/%s.*/bin/python" % version))
    if not found:
        pytest.skip("no pyenv CPython %s on this machine" % version)
    return found[-1]


@pytest.fixture(scope="session")
def pyz(builds):
    """The zipapp, in a directory every user may read."""
    d = tempfile.mkdtemp(prefix="elkeid-pyz-")
    os.chmod(d, 0o755)
    yield builds.make_pyz(d, VERSION)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def devcenter(tmp_path_factory):
    dc = DevCenterProc(tmp_path_factory.mktemp("devcenter-zipapp"))
    yield dc
    dc.stop()


def variant(tmp_path, site_dir, name, version=None, touch=None):
    """A zipapp of another version and/or content than the staged tree's."""
    site = site_dir
    if touch:
        site = str(tmp_path / ("site-" + name))
        shutil.copytree(site_dir, site)
        with open(os.path.join(site, "elkeid_agent", "errors.py"), "a") as f:
            f.write("\n# %s\n" % touch)
    out = str(tmp_path / (name + ".pyz"))
    build_zipapp.build(ARCH, out, None, site_override=site, version=version)
    return out


def env_for(cache=None, **extra):
    env = {"PATH": BASE_PATH, "ELKEID_AGENT_BOOT_TRACE": "1", "LANG": "C.UTF-8"}
    if cache:
        env["ELKEID_AGENT_CACHE"] = str(cache)
    env.update(extra)
    return env


def run(argv, env, timeout=120, **kw):
    p = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout, **kw)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


# An agent command that imports everything (grpc included) and then stops at
# a settings error: proves the compiled modules load, without a server.
IMPORT_ALL = ["run", "--workdir", "/nonexistent-elkeid", "--heartbeat-interval", "bogus"]


def assert_imported_all(rc, out, err):
    assert rc == 2, (rc, out, err)
    assert "heartbeat interval must be a number" in err, err
    assert "Traceback" not in err


# ---------------------------------------------------------------- archive

def test_archive_layout_and_metadata(pyz):
    with zipfile.ZipFile(pyz) as zf:
        names = set(zf.namelist())
        meta = json.loads(zf.read("elkeid_zipapp.json"))
    assert {"__main__.py", "_elkeid_boot.py", "elkeid_zipapp.json"} <= names
    assert meta["version"] == VERSION and meta["arch"] == ARCH
    assert meta["abi"] == sorted("cpython-%s-%s-linux-gnu" % (v.replace(".", ""), ARCH)
                                 for v in SUPPORTED)
    for v in SUPPORTED:
        tag = "cpython-%s-%s-linux-gnu" % (v.replace(".", ""), ARCH)
        assert "site-packages/grpc/_cython/cygrpc.%s.so" % tag in names
        assert "site-packages/_cffi_backend.%s.so" % tag in names
    # What update signatures are checked with: one abi3 build for every ABI.
    assert {"site-packages/cryptography/hazmat/bindings/_rust.abi3.so",
            "site-packages/cryptography/hazmat/primitives/asymmetric/ed25519.py",
            "site-packages/cryptography-%s.dist-info/licenses/LICENSE.APACHE"
            % build_zipapp.CRYPTOGRAPHY[1],
            "site-packages/cffi/__init__.py", "site-packages/pycparser/__init__.py"} <= names
    assert not [n for n in names if "elkeid_devtools" in n or "devcenter" in n
                or "sample_plugin" in n]
    # PyYAML's pure-Python package only: one copy serves every CPython.
    assert "site-packages/yaml/__init__.py" in names
    assert not [n for n in names if n.startswith("site-packages/_yaml") or
                (n.startswith("site-packages/yaml/") and n.endswith(".so"))]
    assert "site-packages/elkeid_agent/ctl/__init__.py" in names
    with open(pyz, "rb") as f:
        assert f.read(10) == b"#!/bin/sh\n"
    assert os.stat(pyz).st_mode & 0o111


def test_build_id_is_a_content_hash(tmp_path, site_dir):
    a = build_zipapp.build_id(site_dir)
    assert a == build_zipapp.build_id(site_dir)
    copy = str(tmp_path / "copy")
    shutil.copytree(site_dir, copy)
    with open(os.path.join(copy, "elkeid_agent", "errors.py"), "a") as f:
        f.write("#\n")
    assert build_zipapp.build_id(copy) != a


def test_stage_insists_on_every_abi_of_each_per_abi_module(tmp_path):
    wheels = build_zipapp.wheels_for(ARCH, os.path.join(ROOT, "build", "wheels", ARCH))
    without = [w for w in wheels if not os.path.basename(w).startswith("cffi-%s-cp312-"
                                                                        % build_zipapp.CFFI[1])]
    assert len(without) == len(wheels) - 1
    site = tmp_path / "site"
    site.mkdir()
    with pytest.raises(build_zipapp.BuildError) as e:
        build_zipapp.stage(ARCH, without, str(site))
    assert "compiled _cffi_backend for " in str(e.value)
    assert "cpython-312-%s-linux-gnu" % ARCH in str(e.value)  # in the expected list only


# ---------------------------------------------------------------- version stamp

def test_version_stamp_reaches_metadata_preamble_and_agent(site_dir, tmp_path):
    before = build_zipapp.build_id(site_dir)
    out = str(tmp_path / "stamped.pyz")
    meta = build_zipapp.build(ARCH, out, None, site_override=site_dir, version="9.9.9-test")
    with zipfile.ZipFile(out) as zf:
        assert json.loads(zf.read("elkeid_zipapp.json")) == meta
        init = zf.read("site-packages/elkeid_agent/__init__.py").decode()
    assert meta["version"] == "9.9.9-test" and meta["build_id"] != before
    assert '__version__ = "9.9.9-test"\n' in init
    with open(out, "rb") as f:
        assert ("# elkeid-agent 9.9.9-test (%s)" % ARCH).encode() in f.read(200)
    rc, o, err = run([out, "--version"], env_for(tmp_path / "c"))
    assert (rc, o.strip()) == (0, "elkeid-agent 9.9.9-test"), err
    rc, o, err = run([SYSTEM_PY, out, "ctl", "--version"], env_for(tmp_path / "c"))
    assert (rc, o.strip()) == (0, "elkeidctl (elkeid-agent 9.9.9-test)"), err
    # The shared staged tree is what it was: stamping worked on a copy.
    assert build_zipapp.version(os.path.join(site_dir, "elkeid_agent")) == VERSION
    assert build_zipapp.build_id(site_dir) == before


def test_cache_of_a_stamped_version_is_removed_once_unused(pyz, tmp_path, site_dir):
    """Versions with - ~ + _ or a leading letter name cache directories too."""
    cache = tmp_path / "c"
    stamped = variant(tmp_path, site_dir, "rc", version="v9.9.9-rc1~test_x+y")
    assert_imported_all(*run([SYSTEM_PY, stamped] + IMPORT_ALL, env_for(cache)))
    [old] = os.listdir(str(cache))
    assert old.startswith("v9.9.9-rc1~test_x+y-")
    assert_imported_all(*run([SYSTEM_PY, pyz] + IMPORT_ALL, env_for(cache)))
    [current] = os.listdir(str(cache))
    assert current.startswith(VERSION + "-")


@pytest.mark.parametrize("bad", ["", "-1.0", ".1", "1.0 beta", "1.0\n", 'x"y', "a/b", "1" * 65])
def test_bad_version_is_refused_in_one_line(tmp_path, bad):
    out, wheels = tmp_path / "x.pyz", tmp_path / "wheels"
    rc, o, err = run([sys.executable, os.path.join(ROOT, "packaging", "build_zipapp.py"),
                      "--arch", ARCH, "--out", str(out), "--wheels", str(wheels),
                      "--version=" + bad], env_for())
    assert rc == 1 and o == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("build_zipapp: error: bad version %r" % bad)
    assert not out.exists() and not wheels.exists()  # refused before any download


# ---------------------------------------------------------------- interpreters

@pytest.mark.parametrize("version", SUPPORTED)
def test_runs_on_every_supported_cpython(pyz, tmp_path, version):
    py = pyenv(version)
    rc, out, err = run([py, pyz, "--version"], env_for(tmp_path / "c"))
    assert (rc, out.strip()) == (0, "elkeid-agent " + VERSION), err
    assert_imported_all(*run([py, pyz] + IMPORT_ALL, env_for(tmp_path / "c")))
    [d] = os.listdir(str(tmp_path / "c"))
    assert d.endswith("-cp" + version.replace(".", ""))
    so = glob.glob(str(tmp_path / "c" / d / "grpc" / "_cython" / "*.so"))
    assert [os.path.basename(s).split(".")[1] for s in so] == \
        ["cpython-%s-%s-linux-gnu" % (version.replace(".", ""), ARCH)]


# Run by each CPython: the agent's own bootstrap puts the zipapp's extracted
# site-packages first on sys.path, then the bundled cryptography verifies
# every case. Prints the verdicts and where the modules came from.
VERIFY_IN_ZIPAPP = r"""
import json, sys
sys.path.insert(0, sys.argv[1])  # what `python3 elkeid-agent.pyz` does
import _elkeid_boot
site = _elkeid_boot.prepare_site(["elkeid-agent", "run"])
import _cffi_backend
import cryptography
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

PADDING = {"rsa-pkcs1v15": padding.PKCS1v15(),
           "rsa-pss": padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)}


def verify(case):
    key = serialization.load_pem_public_key(case["public_key"].encode())
    args = [bytes.fromhex(case["signature"]), bytes.fromhex(case["message"])]
    if case["scheme"] in PADDING:
        args += [PADDING[case["scheme"]], hashes.SHA256()]
    try:
        key.verify(*args)
    except InvalidSignature:
        return False
    return True


with open(sys.argv[2]) as f:
    cases = json.load(f)
print(json.dumps({"site": site, "modules": [cryptography.__file__, _cffi_backend.__file__],
                  "verdicts": [verify(c) for c in cases]}))
"""


@pytest.fixture(scope="module")
def signature_cases(tmp_path_factory):
    """A file of signatures made here (the test venv's cryptography), and the
    verdict each must get: genuine, one byte of the signature changed, or
    a changed message."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
    signers = [("ed25519", ed_key, ed_key.sign),
               ("rsa-pkcs1v15", rsa_key,
                lambda m: rsa_key.sign(m, padding.PKCS1v15(), hashes.SHA256())),
               ("rsa-pss", rsa_key, lambda m: rsa_key.sign(m, pss, hashes.SHA256()))]
    message = os.urandom(200)
    cases, expected = [], []
    for scheme, key, sign in signers:
        pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        sig = sign(message)
        mid = len(sig) // 2
        tampered = sig[:mid] + bytes([sig[mid] ^ 0x01]) + sig[mid + 1:]
        for msg, signature, valid in ((message, sig, True), (message, tampered, False),
                                      (message + b"\n", sig, False)):
            cases.append({"scheme": scheme, "public_key": pem.decode(), "message": msg.hex(),
                          "signature": signature.hex()})
            expected.append(valid)
    path = tmp_path_factory.mktemp("signatures") / "cases.json"
    path.write_text(json.dumps(cases))
    return str(path), expected


@pytest.mark.parametrize("version", SUPPORTED)
def test_bundled_cryptography_verifies_signatures_on_every_cpython(pyz, tmp_path, version,
                                                                   signature_cases):
    py = pyenv(version)
    cases, expected = signature_cases
    cache = tmp_path / "c"
    rc, out, err = run([py, "-sE", "-c", VERIFY_IN_ZIPAPP, pyz, cases], env_for(cache))
    assert rc == 0, err
    got = json.loads(out)
    assert got["verdicts"] == expected
    # From the agent's extraction, not from that Python's own site-packages.
    assert got["site"].startswith(str(cache) + os.sep)
    assert all(m.startswith(got["site"] + os.sep) for m in got["modules"]), got
    # cffi's backend for this ABI only; cryptography's abi3 module whatever the ABI.
    assert [os.path.basename(p) for p in glob.glob(os.path.join(got["site"], "_cffi_backend*"))] \
        == ["_cffi_backend.cpython-%s-%s-linux-gnu.so" % (version.replace(".", ""), ARCH)]
    assert os.path.isfile(os.path.join(got["site"], "cryptography", "hazmat", "bindings",
                                       "_rust.abi3.so"))


@pytest.mark.parametrize("version", ["3.8", "3.6", "2.7"])
def test_unsupported_python_says_so_in_one_line(pyz, tmp_path, version):
    py = pyenv(version)
    empty = tmp_path / "bin"
    empty.mkdir()
    rc, out, err = run([py, pyz, "--version"], {"PATH": str(empty)})
    assert rc == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("elkeid-agent: Python %s " % version)
    assert "needs CPython 3.9 to 3.13" in lines[0]


def test_unsupported_python_hands_over_to_a_supported_one(pyz, tmp_path):
    py = pyenv("3.8")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(os.path.realpath(SYSTEM_PY), str(bindir / "python3.11"))
    rc, out, err = run([py, pyz, "ctl", "--version"], {"PATH": str(bindir)})
    assert (rc, out.strip()) == (0, "elkeidctl (elkeid-agent %s)" % VERSION), err


@pytest.mark.parametrize("shell", ["sh", "dash", "bash", "direct"])
def test_shell_preamble(pyz, tmp_path, shell):
    if shell != "direct" and not shutil.which(shell):
        pytest.skip("no " + shell)
    argv = [pyz] if shell == "direct" else [shell, pyz]
    rc, out, err = run(argv + ["--version"], env_for(tmp_path / "c"))
    assert (rc, out.strip()) == (0, "elkeid-agent " + VERSION), err


def test_preamble_without_any_python(pyz, tmp_path):
    rc, out, err = run(["/bin/sh", pyz, "--version"], {"PATH": str(tmp_path)})
    assert rc == 127
    assert "no python3 in PATH" in err


def test_argv0_elkeidctl_dispatches_to_elkeidctl_without_extracting(pyz, tmp_path):
    link = tmp_path / "elkeidctl"
    os.symlink(pyz, str(link))
    rc, out, err = run([str(link), "--version"], env_for(tmp_path / "c"))
    assert (rc, out.strip()) == (0, "elkeidctl (elkeid-agent %s)" % VERSION), err
    assert "archive-only" in err
    assert not (tmp_path / "c").exists() or os.listdir(str(tmp_path / "c")) == []
    rc, out, err = run([str(link), "frobnicate"], env_for(tmp_path / "c"))
    assert rc == 2 and "unknown command 'frobnicate'" in err


# ---------------------------------------------------------------- cache rules

def test_second_start_reuses_the_extraction(pyz, tmp_path):
    cache = tmp_path / "c"
    rc, out, err = run([SYSTEM_PY, pyz] + IMPORT_ALL, env_for(cache))
    assert "boot: extracted" in err
    rc, out, err = run([SYSTEM_PY, pyz] + IMPORT_ALL, env_for(cache))
    assert "boot: reused" in err
    assert_imported_all(rc, out, err)
    assert stat.S_IMODE(os.stat(str(cache)).st_mode) == 0o700


def test_extraction_writes_the_bytecode_of_every_module(pyz, tmp_path):
    """Compiled once, in a child, at extraction: the agent's first start
    after an install or update loads bytecode instead of compiling (whose
    leftovers would stay in its heap), and modules it imports later (an
    update's cryptography) come compiled too."""
    cache = tmp_path / "c"
    rc, out, err = run([SYSTEM_PY, pyz] + IMPORT_ALL, env_for(cache))
    assert_imported_all(rc, out, err)
    assert "boot: extracted" in err
    tag = subprocess.check_output([SYSTEM_PY, "-c", "import sys; "
                                   "print(sys.implementation.cache_tag)"]).decode().strip()
    [d] = os.listdir(str(cache))
    sources = []
    for base, _dirs, files in os.walk(str(cache / d)):
        if "__pycache__" not in base:
            sources += [os.path.join(base, n) for n in files if n.endswith(".py")]
    missing = [p for p in sources if not os.path.exists(
        importlib.util.cache_from_source(p).replace(sys.implementation.cache_tag, tag))]
    assert sources and not missing, missing[:10]
    assert any(p.endswith(os.path.join("cryptography", "__init__.py")) for p in sources)


def test_incomplete_extraction_is_replaced(pyz, tmp_path):
    cache = tmp_path / "c"
    run([SYSTEM_PY, pyz] + IMPORT_ALL, env_for(cache))
    [d] = os.listdir(str(cache))
    os.unlink(str(cache / d / ".complete"))
    os.unlink(str(cache / d / "elkeid_agent" / "cli.py"))
    rc, out, err = run([SYSTEM_PY, pyz] + IMPORT_ALL, env_for(cache))
    assert_imported_all(rc, out, err)
    assert "boot: extracted" in err
    assert os.listdir(str(cache)) == [d]


def test_two_instances_starting_at_once(pyz, tmp_path):
    cache = tmp_path / "c"
    procs = [subprocess.Popen([SYSTEM_PY, pyz] + IMPORT_ALL, env=env_for(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(6)]
    results = [(p.wait(120), p.stdout.read().decode(), p.stderr.read().decode()) for p in procs]
    for rc, out, err in results:
        assert_imported_all(rc, out, err)
    assert len(os.listdir(str(cache))) == 1, os.listdir(str(cache))


def test_upgrade_replacing_the_file_never_runs_stale_code(pyz, tmp_path, site_dir):
    """Same path, same size class, same mtime: the content hash decides."""
    cache = tmp_path / "c"
    installed = str(tmp_path / "elkeid-agent")
    shutil.copy(pyz, installed)
    rc, out, err = run([SYSTEM_PY, installed] + IMPORT_ALL, env_for(cache))
    [old] = os.listdir(str(cache))
    new = variant(tmp_path, site_dir, "v2", touch="same version, other content")
    st = os.stat(installed)
    tmp = installed + ".new"
    shutil.copy(new, tmp)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, installed)  # what dpkg and rpm do
    rc, out, err = run([SYSTEM_PY, installed] + IMPORT_ALL, env_for(cache))
    assert_imported_all(rc, out, err)
    assert "boot: extracted" in err
    [current] = os.listdir(str(cache))  # the old version, unused, was removed
    assert current != old and current.startswith(VERSION + "-")
    with open(str(cache / current / "elkeid_agent" / "errors.py")) as f:
        assert "same version, other content" in f.read()


def test_old_version_in_use_is_kept_until_its_process_exits(pyz, tmp_path, site_dir, devcenter):
    cache = tmp_path / "c"
    installed = str(tmp_path / "elkeid-agent")
    shutil.copy(pyz, installed)
    workdir = tmp_path / "wd"
    # A running agent of the old version (no server: it keeps retrying; valid
    # TLS files, without which it would refuse to start).
    agent = subprocess.Popen([SYSTEM_PY, installed, "run", "--workdir", str(workdir),
                              "--server", "127.0.0.1:9", "--agent-id", "zipapp-keep"]
                             + devcenter.cert_args,
                             env=env_for(cache), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        wait_until(lambda: os.path.exists(str(workdir / "machine-id")), 60,
                   what="the old agent to start")
        [old] = os.listdir(str(cache))
        shutil.copy(variant(tmp_path, site_dir, "v3", version="9.9.9"), installed + ".new")
        os.replace(installed + ".new", installed)
        rc, out, err = run([SYSTEM_PY, installed] + IMPORT_ALL, env_for(cache))
        assert_imported_all(rc, out, err)
        names = sorted(os.listdir(str(cache)))
        assert old in names and len(names) == 2 and names[1].startswith("9.9.9-")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
    run([SYSTEM_PY, installed] + IMPORT_ALL, env_for(cache))
    assert [n for n in os.listdir(str(cache)) if not n.startswith("9.9.9-")] == []


def test_stale_temporary_and_trash_directories_are_removed(pyz, tmp_path):
    cache = tmp_path / "c"
    cache.mkdir(mode=0o700)
    tmp_old = cache / ".elkeid-tmp-abandoned"
    tmp_old.mkdir()
    os.utime(str(tmp_old), (time.time() - 7200, time.time() - 7200))
    tmp_new = cache / ".elkeid-tmp-inflight"
    tmp_new.mkdir()
    (cache / ".elkeid-trash-x").mkdir()
    (cache / "unrelated-file").write_text("not ours")
    run([SYSTEM_PY, pyz] + IMPORT_ALL, env_for(cache))
    names = os.listdir(str(cache))
    assert ".elkeid-tmp-abandoned" not in names and ".elkeid-trash-x" not in names
    assert ".elkeid-tmp-inflight" in names  # may belong to a starting instance
    assert "unrelated-file" in names


def test_candidate_roots_order():
    roots = boot.candidate_roots({"ELKEID_AGENT_CACHE": "/x", "CACHE_DIRECTORY": "/c:/d",
                                  "XDG_CACHE_HOME": "/xdg", "HOME": "/home/u",
                                  "TMPDIR": "/t"}, 0, lambda uid: "/root")
    assert [r for r, _ in roots] == ["/x", "/var/cache/elkeid-agent", "/c",
                                     "/xdg/elkeid-agent", "/home/u/.cache/elkeid-agent",
                                     "/t/elkeid-agent-0"]
    roots = boot.candidate_roots({"HOME": "relative"}, 1000, lambda uid: "/home/pw")
    assert [r for r, _ in roots] == ["/home/pw/.cache/elkeid-agent", "/tmp/elkeid-agent-1000"]
    roots = boot.candidate_roots({}, 65534, lambda uid: "/")
    assert [r for r, _ in roots] == ["/tmp/elkeid-agent-65534"]


def test_usable_root_refuses_unsafe_directories(tmp_path):
    euid = os.geteuid()
    target = tmp_path / "link"
    os.symlink(str(tmp_path), str(target))
    assert boot.usable_root(str(target), False, euid) == "not a directory"
    other = tmp_path / "other"
    other.mkdir()
    os.chown(str(other), 12345, 12345)
    assert "owned by uid 12345" in boot.usable_root(str(other), False, euid)
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(str(loose), 0o777)
    assert boot.usable_root(str(loose), False, euid) is None
    assert stat.S_IMODE(os.stat(str(loose)).st_mode) == 0o700


# ---------------------------------------------------------------- hosts (namespaces)

def _unshare_available():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "true"], stderr=subprocess.DEVNULL).returncode == 0


needs_mount_ns = pytest.mark.skipif(not _unshare_available(),
                                    reason="needs root and unshare -m (mount namespaces)")


def in_namespace(script, tmp_path, env):
    """Run a shell script in a private mount namespace."""
    return run(["unshare", "-m", "/bin/sh", "-ec", script], env, timeout=180)


@needs_mount_ns
def test_root_under_systemd_with_no_home_uses_var_cache(pyz, tmp_path):
    varcache = tmp_path / "var-cache"
    varcache.mkdir()
    script = ('mount --bind %s /var/cache; exec %s %s %s'
              % (varcache, SYSTEM_PY, pyz, " ".join(IMPORT_ALL)))
    rc, out, err = in_namespace(script, tmp_path, {"PATH": BASE_PATH,
                                                   "ELKEID_AGENT_BOOT_TRACE": "1"})
    assert_imported_all(rc, out, err)
    assert "extracted /var/cache/elkeid-agent/%s-" % VERSION in err
    assert len(os.listdir(str(varcache / "elkeid-agent"))) == 1


@needs_mount_ns
def test_root_with_read_only_home_and_var_cache(pyz, tmp_path):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    script = ('mount -o bind,ro %s /var/cache; mount --bind %s /root; '
              'mount -o remount,ro,bind /root; exec %s %s %s'
              % (home, home, SYSTEM_PY, pyz, " ".join(IMPORT_ALL)))
    rc, out, err = in_namespace(script, tmp_path, {
        "PATH": BASE_PATH, "HOME": "/root", "TMPDIR": str(tmp), "ELKEID_AGENT_BOOT_TRACE": "1"})
    assert_imported_all(rc, out, err)
    assert "extracted %s/elkeid-agent-0/" % tmp in err, err


@needs_mount_ns
def test_nowhere_to_extract_is_one_clear_line(pyz, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # After the attempt, list the noexec TMPDIR (on stdout): nothing may be left.
    script = ('mount -o bind,ro %s /var/cache; mount -t tmpfs -o noexec tmpfs %s; '
              'rc=0; %s %s %s || rc=$?; ls -A %s; exit $rc'
              % (tmp, tmp, SYSTEM_PY, pyz, " ".join(IMPORT_ALL), tmp))
    rc, out, err = in_namespace(script, tmp_path, {"PATH": BASE_PATH, "HOME": "/nonexistent",
                                                   "TMPDIR": str(tmp)})
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("elkeid-agent: no usable cache directory")
    assert "noexec filesystem" in lines[0] and "read-only file" in lines[0].lower()
    assert "ELKEID_AGENT_CACHE" in lines[0]
    assert out == ""  # the private directory it tried was removed again


def _as_nobody():
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _world_tmp():
    d = tempfile.mkdtemp(prefix="elkeid-zipapp-tmp-")
    os.chmod(d, 0o1777)
    return d


def test_unprivileged_user_without_a_home(pyz):
    tmp = _world_tmp()
    try:
        rc, out, err = run(_as_nobody() + [SYSTEM_PY, pyz] + IMPORT_ALL,
                           {"PATH": BASE_PATH, "TMPDIR": tmp, "ELKEID_AGENT_BOOT_TRACE": "1"})
        assert_imported_all(rc, out, err)
        base = os.path.join(tmp, "elkeid-agent-65534")
        assert "extracted %s/" % base in err
        st = os.stat(base)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (65534, 0o700)
        rc, out, err = run(_as_nobody() + [SYSTEM_PY, pyz] + IMPORT_ALL,
                           {"PATH": BASE_PATH, "TMPDIR": tmp, "ELKEID_AGENT_BOOT_TRACE": "1"})
        assert "reused %s/" % base in err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("trap", ["owned-by-root", "symlink"])
def test_unprivileged_user_is_not_fooled_by_a_planted_directory(pyz, trap):
    tmp = _world_tmp()
    try:
        planted = os.path.join(tmp, "elkeid-agent-65534")
        if trap == "symlink":
            os.symlink("/etc", planted)
        else:
            os.mkdir(planted)
            os.chmod(planted, 0o777)
        rc, out, err = run(_as_nobody() + [SYSTEM_PY, pyz] + IMPORT_ALL,
                           {"PATH": BASE_PATH, "TMPDIR": tmp, "ELKEID_AGENT_BOOT_TRACE": "1"})
        assert_imported_all(rc, out, err)
        assert "(private, removed at exit)" in err
        if trap == "owned-by-root":
            assert os.listdir(planted) == []
        # the private directory is gone again
        assert sorted(os.listdir(tmp)) == ["elkeid-agent-65534"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- the real thing

@pytest.mark.slow
@pytest.mark.parametrize("version", SUPPORTED)
def test_agent_from_zipapp_connects_to_devcenter(pyz, tmp_path, devcenter, version):
    py = pyenv(version)
    agent_id = "zipapp-cp%s" % version.replace(".", "")
    # The bundled pure-Python PyYAML reads the services file: a bad entry is
    # reported with its line.
    services = tmp_path / "services.yaml"
    services.write_text("agents:\n  - id: x\n    type: custom\n    binary_path: /bin/true\n"
                        "    restart: {policy: sometimes}\n")
    argv = [py, pyz, "run", "--workdir", str(tmp_path / "wd"), "--server", devcenter.grpc,
            "--agent-id", agent_id, "--heartbeat-interval", "0.5",
            "--services", str(services)] + devcenter.cert_args
    agent = subprocess.Popen(argv, env=env_for(tmp_path / "cache"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    log = tmp_path / "wd" / "log" / "elkeid-agent.log"
    try:
        conn = devcenter.wait_agent(agent_id, timeout=60)
        assert conn["agent_id"] == agent_id
        devcenter.wait_records(1000, agent_id=agent_id, timeout=30)
        wait_until(lambda: log.exists() and "D1002 %s:5: agents[0].restart.policy" % services
                   in log.read_text(), 30, what="the services file's problem in the log")
    finally:
        agent.send_signal(signal.SIGTERM)
        rc = agent.wait(30)
        err = agent.stderr.read().decode("utf-8", "replace")
    assert rc == 0, err
    assert "Traceback" not in err


def test_agent_from_zipapp_feeds_the_systemd_watchdog(pyz, tmp_path, devcenter):
    """What systemd sees of a Type=notify unit: READY=1, WATCHDOG=1 before
    each WatchdogSec runs out (here 4 s; the unit says 180 s), STOPPING=1."""
    import socket
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    env = env_for(tmp_path / "cache", NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="4000000")
    argv = [SYSTEM_PY, pyz, "run", "--workdir", str(tmp_path / "wd"), "--server", devcenter.grpc,
            "--agent-id", "zipapp-watchdog"] + devcenter.cert_args
    agent = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while "READY=1" not in sock.recv(4096).decode():
            pass
        last = time.monotonic()
        gaps = []
        while len(gaps) < 3:
            if "WATCHDOG=1" in sock.recv(4096).decode():
                now = time.monotonic()
                gaps.append(now - last)
                last = now
        # systemd kills the unit when a whole WatchdogSec passes without a ping.
        assert max(gaps) < 4.0, gaps
        agent.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in sock.recv(4096).decode():
            pass
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
        rc = agent.wait(30)
        sock.close()
    assert rc == 0, agent.stderr.read().decode()


# ---------------------------------------------------------------- accel/

ACCEL_IN_ZIPAPP = r"""
import sys
sys.path.insert(0, sys.argv[1])  # what `python3 elkeid-agent.pyz` does
import _elkeid_boot
site = _elkeid_boot.prepare_site(["elkeid-agent", "run"])
from elkeid_agent import native
print(native.ACTIVE, native.accel.__file__.startswith(site) if native.ACTIVE else native.REASON)
"""


def _elf_machine(data_or_path):
    r = subprocess.run(["readelf", "-h", data_or_path], stdout=subprocess.PIPE, check=True)
    return [line.split(":", 1)[1].strip() for line in r.stdout.decode().splitlines()
            if line.strip().startswith("Machine:")][0]


MACHINES = {"x86_64": "Advanced Micro Devices X86-64", "aarch64": "AArch64"}


def test_zipapp_carries_accel_for_its_arch(pyz, tmp_path):
    with zipfile.ZipFile(pyz) as zf:
        data = zf.read("site-packages/" + build_zipapp.ACCEL_MODULE)
    so = tmp_path / "_accel.abi3.so"
    so.write_bytes(data)
    assert _elf_machine(str(so)) == MACHINES[ARCH]
    import test_accel
    assert "PyModule_Create2" in test_accel.check_stable_abi(str(so))


@pytest.mark.parametrize("version", ["3.9", "3.13"])
def test_agent_from_zipapp_runs_the_c_path(pyz, tmp_path, version):
    """One abi3 binary for every CPython: the oldest and the newest."""
    rc, out, err = run([pyenv(version), "-c", ACCEL_IN_ZIPAPP, pyz], env_for(tmp_path / "c"))
    assert (rc, out.split()) == (0, ["True", "True"]), (out, err)
    rc, out, err = run([pyenv(version), "-c", ACCEL_IN_ZIPAPP, pyz],
                       env_for(tmp_path / "c", ELKEID_ACCEL="0"))
    assert (rc, out.strip()) == (0, "False ELKEID_ACCEL=0"), (out, err)


@pytest.mark.parametrize("arch", sorted(MACHINES))
def test_accel_builds_for_both_architectures(tmp_path, arch):
    if build_zipapp.accel_compiler(arch) is None:
        from debroot import unavailable
        unavailable("no C compiler for %s (%s)" % (arch, build_zipapp.CROSS_GCC[arch]))
    out = str(tmp_path / "_accel.abi3.so")
    assert build_zipapp.build_accel(arch, out)
    assert _elf_machine(out) == MACHINES[arch]
    import test_accel
    assert "PyModule_Create2" in test_accel.check_stable_abi(out)


def test_no_compiler_means_a_pure_zipapp_and_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(build_zipapp, "accel_compiler", lambda arch: None)
    out = str(tmp_path / "_accel.abi3.so")
    assert build_zipapp.build_accel("aarch64", out) is False
    assert not os.path.exists(out)
    err = capsys.readouterr()
    lines = (err.out + err.err).strip().splitlines()
    assert lines == ["==> accel/ not built for aarch64 (no C compiler for aarch64 "
                     "(aarch64-linux-gnu-gcc)); the zipapp runs the pure-Python path"], lines
