"""The builds the self-update tests update between (tests/update_builds.py)
and the signing tool (elkeid_devtools/signing.py): each broken build fails
the way its docstring says, against the real development AgentCenter; the
packages carry the zipapp and the version they were given; signatures
verify with the public key and fail on any changed byte.
"""

import base64
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

from update_builds import CRASH_STATUS, SYSTEM_PY, pyz_agent
from elkeid_devtools import signing

V1, V2 = "1.7.1.0", "1.7.2.0"
HEARTBEAT = 1000
QUIET_SECONDS = 10


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One extraction cache for the module's zipapp runs."""
    return tmp_path_factory.mktemp("zipapp-cache")


def run(argv, timeout=120, **kw):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                       **kw)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def heartbeat_versions(devcenter, agent_id):
    return {r["version"] for r in devcenter.records(HEARTBEAT, agent_id)}


# ---------------------------------------------------------------- zipapps

def test_a_normal_build_carries_its_stamped_version_to_the_server(builds, devcenter, tmp_path,
                                                                   cache):
    pyz = builds.make_pyz(str(tmp_path), V1)
    with zipfile.ZipFile(pyz) as zf:
        assert json.loads(zf.read("elkeid_zipapp.json"))["version"] == V1
    rc, out, err = run([SYSTEM_PY, pyz, "--version"], env=dict(os.environ,
                                                               ELKEID_AGENT_CACHE=str(cache)))
    assert (rc, out.strip()) == (0, "elkeid-agent " + V1), err
    agent = pyz_agent(pyz, tmp_path / "wd", devcenter, "builds-normal", cache=cache)
    try:
        devcenter.wait_records(HEARTBEAT, lambda r: r["version"] == V1, count=2,
                               agent_id="builds-normal", timeout=60)
    finally:
        rc = agent.stop()
    assert rc == 0, agent.log_text()
    assert heartbeat_versions(devcenter, "builds-normal") == {V1}


def test_builds_are_cached_and_callers_get_their_own_copy(builds, tmp_path):
    first = builds.make_pyz(str(tmp_path / "a"), V2)
    cached = os.path.join(builds.cache, "pyz", builds.build_id[:16], V2, "elkeid-agent.pyz")
    before = os.stat(cached)
    with open(first, "r+b") as f:  # a caller spoiling its copy must not spoil the next one
        f.seek(100)
        f.write(b"\0")
    second = builds.make_pyz(str(tmp_path / "b"), V2)
    after = os.stat(cached)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with open(second, "rb") as f, open(cached, "rb") as g:
        assert f.read() == g.read()
    assert os.stat(second).st_mode & 0o111
    with zipfile.ZipFile(builds.make_pyz(str(tmp_path / "c"), V2, "noconnect")) as zf:
        stream = zf.read("site-packages/elkeid_agent/transport/stream.py").decode()
    assert "test fault noconnect" in stream


@pytest.mark.parametrize("fault", ["crash", "crash_after:0", "crash_after:x", "noconnect:1"])
def test_an_unknown_fault_is_refused_before_building(builds, tmp_path, fault):
    with pytest.raises(ValueError, match="unknown fault"):
        builds.make_pyz(str(tmp_path), V1, fault)
    assert os.listdir(str(tmp_path)) == []


def test_fault_import_dies_at_start_but_answers_version(builds, devcenter, tmp_path, cache):
    pyz = builds.make_pyz(str(tmp_path), V2, "import")
    env = dict(os.environ, ELKEID_AGENT_CACHE=str(cache))
    rc, out, err = run([SYSTEM_PY, pyz, "--version"], env=env)
    assert (rc, out.strip()) == (0, "elkeid-agent " + V2), err
    rc, out, err = run([SYSTEM_PY, pyz, "run", "--workdir", str(tmp_path / "wd"),
                        "--server", devcenter.grpc, "--agent-id", "builds-import"]
                       + devcenter.cert_args, env=env)
    assert rc == 1, (rc, err)
    assert "RuntimeError: test fault import" in err
    assert not os.path.exists(str(tmp_path / "wd" / "machine-id"))  # never got to start
    assert devcenter.records(agent_id="builds-import") == []


def test_fault_noconnect_runs_and_logs_but_never_reaches_the_server(builds, devcenter, tmp_path,
                                                                    cache):
    pyz = builds.make_pyz(str(tmp_path), V2, "noconnect")
    # Attempts every 0.5, 1, 2, 4 s: several of them within the quiet period.
    agent = pyz_agent(pyz, tmp_path / "wd", devcenter, "builds-noconnect", cache=cache,
                      env={"ELKEID_RECONNECT_DELAY": "0.5"})
    try:
        agent.wait_log("elkeid-agent %s starting" % V2, timeout=60)
        deadline = time.monotonic() + QUIET_SECONDS
        while time.monotonic() < deadline:
            assert agent.alive, agent.log_text()
            assert "builds-noconnect" not in [a.get("agent_id") for a in devcenter.agents()]
            time.sleep(0.5)
        log = agent.log_text(stderr=False)
        assert len(re.findall("test fault noconnect: not dialling", log)) >= 3, log
    finally:
        rc = agent.stop()
    assert rc == 0, agent.log_text()
    # What the heartbeats queued while it ran is what it could not deliver.
    # Queued heartbeats: with the disk spool they wait there for the next
    # start, without it they are reported lost.
    m = re.search(r"(\d+) records (could not be delivered before exit|not delivered before "
                  r"exit are in the spool)", agent.log_text(False))
    assert m and int(m.group(1)) >= 2, agent.log_text()
    assert devcenter.records(agent_id="builds-noconnect") == []


def test_fault_crash_after_connects_then_exits_70(builds, devcenter, tmp_path, cache):
    pyz = builds.make_pyz(str(tmp_path), V2, "crash_after:3")
    agent = pyz_agent(pyz, tmp_path / "wd", devcenter, "builds-crash", cache=cache)
    try:
        devcenter.wait_records(HEARTBEAT, lambda r: r["version"] == V2,
                               agent_id="builds-crash", timeout=60)
        rc = agent.proc.wait(60)
    finally:
        agent.stop()
    assert rc == CRASH_STATUS, agent.log_text()
    log = agent.log_text(stderr=False)
    assert "test fault crash_after: exiting with status %d in 3.0 s" % CRASH_STATUS in log
    assert "shutting down" not in log  # os._exit: no graceful path


# ---------------------------------------------------------------- packages

@pytest.fixture(scope="module")
def v1_pyz(builds, tmp_path_factory):
    return builds.make_pyz(str(tmp_path_factory.mktemp("v1")), V1)


def test_make_deb_packs_the_given_zipapp_with_the_given_version(builds, v1_pyz, tmp_path):
    if not shutil.which("dpkg-deb"):
        pytest.skip("dpkg-deb is not installed")
    deb = builds.make_deb(str(tmp_path), v1_pyz, V1)
    assert os.path.basename(deb) == "elkeid-agent_%s_amd64.deb" % V1
    rc, out, err = run(["dpkg-deb", "-f", deb, "Version", "Architecture"])
    assert rc == 0, err
    assert out.split() == ["Version:", "3:%s-1" % V1, "Architecture:", "amd64"]
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE,
                          check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.getmember("./etc/elkeid/elkeid-agent")
        packed = tar.extractfile(member).read()
    with open(v1_pyz, "rb") as f:
        assert packed == f.read()
    assert stat.S_IMODE(member.mode) == 0o700
    # The same inputs again: the cached package, a fresh copy.
    again = builds.make_deb(str(tmp_path / "again"), v1_pyz, V1)
    with open(deb, "rb") as f, open(again, "rb") as g:
        assert f.read() == g.read()


def test_make_rpm_packs_the_given_zipapp_with_the_given_version(builds, v1_pyz, tmp_path):
    if not shutil.which("rpm") or not shutil.which("rpm2archive"):
        pytest.skip("rpm or rpm2archive is not installed")
    rpm = builds.make_rpm(str(tmp_path), v1_pyz, V2)
    rc, out, err = run(["rpm", "--dbpath", str(tmp_path / "rpmdb"), "-qp", "--qf",
                        "%{EPOCH} %{VERSION} %{RELEASE} %{ARCH}", rpm])
    assert (rc, out) == (0, "3 %s 1 x86_64" % V2), err
    with open(rpm, "rb") as f:
        tgz = subprocess.run(["rpm2archive", "-"], stdin=f, stdout=subprocess.PIPE,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
        packed = tar.extractfile("./etc/elkeid/elkeid-agent").read()
    with open(v1_pyz, "rb") as f:
        assert packed == f.read()


def test_package_one_refuses_bad_arguments_in_one_line(tmp_path, v1_pyz):
    build_sh = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "build.sh")
    env = dict(os.environ, ELKEID_VENV=sys.prefix)
    for args, says in (([v1_pyz, V1, "i386", "deb"], "usage: ./build.sh package-one"),
                       ([v1_pyz, V1, "i386", "deb", "x.deb"], "architecture must be amd64"),
                       ([v1_pyz, V1, "amd64", "tgz", "x.deb"], "package format must be deb"),
                       ([str(tmp_path / "none.pyz"), V1, "amd64", "deb", "x.deb"],
                        "no zipapp at %s" % (tmp_path / "none.pyz"))):
        rc, out, err = run([build_sh, "package-one"] + args, env=env, cwd=str(tmp_path))
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1, err
        assert lines[0].startswith("build.sh: error: ") and says in lines[0], err
    assert os.listdir(str(tmp_path)) == []


# ---------------------------------------------------------------- signing

def verify(public_pem, signature, data, scheme):
    """cryptography's own verification; raises InvalidSignature."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = serialization.load_pem_public_key(public_pem)
    if isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(signature, data)
    else:
        key.verify(signature, data, signing.rsa_padding(scheme), hashes.SHA256())


def flipped(data, index):
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


KEYS = [("ed25519", "pkcs1v15"), ("rsa", "pkcs1v15"), ("rsa", "pss")]


@pytest.mark.parametrize("kind,scheme", KEYS)
def test_signatures_verify_and_a_changed_byte_fails(kind, scheme):
    from cryptography.exceptions import InvalidSignature
    private, public = signing.generate(kind)
    data = os.urandom(4096)
    signature = signing.sign(private, data, scheme)
    assert len(signature) == (64 if kind == "ed25519" else signing.RSA_BITS // 8)
    verify(public, signature, data, scheme)
    for bad_data, bad_signature in ((flipped(data, 0), signature),
                                    (flipped(data, len(data) - 1), signature),
                                    (data, flipped(signature, len(signature) // 2))):
        with pytest.raises(InvalidSignature):
            verify(public, bad_signature, bad_data, scheme)
    other_private, other_public = signing.generate(kind)
    with pytest.raises(InvalidSignature):
        verify(other_public, signature, data, scheme)


@pytest.mark.parametrize("kind,scheme", KEYS)
def test_signing_command_line(kind, scheme, tmp_path):
    from cryptography.exceptions import InvalidSignature
    tool = [sys.executable, "-m", "elkeid_devtools.signing"]
    prefix = str(tmp_path / "release")
    rc, out, err = run(tool + ["keygen", "--type", kind, "--out", prefix])
    assert rc == 0, err
    assert stat.S_IMODE(os.stat(prefix + ".key").st_mode) == 0o600
    with open(prefix + ".pub", "rb") as f:
        public = f.read()
    assert public.startswith(b"-----BEGIN PUBLIC KEY-----")
    package = tmp_path / "elkeid-agent.pyz"
    package.write_bytes(os.urandom(10000))
    rc, out, err = run(tool + ["sign", "--key", prefix + ".key", "--scheme", scheme,
                               str(package)])
    assert rc == 0, err
    signature = (tmp_path / "elkeid-agent.pyz.sig").read_bytes()
    assert base64.b64decode(out.strip(), validate=True) == signature
    verify(public, signature, package.read_bytes(), scheme)
    with pytest.raises(InvalidSignature):
        verify(public, signature, flipped(package.read_bytes(), 5000), scheme)


def test_signing_refuses_what_is_not_a_private_key(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"data")
    rc, out, err = run([sys.executable, "-m", "elkeid_devtools.signing", "sign", "--key",
                        str(target), str(target)])
    assert rc == 1 and out == ""
    assert err.startswith("signing: error: not an unencrypted PEM private key")
    assert not (tmp_path / "f.sig").exists()
    with pytest.raises(signing.SigningError, match="key type must be"):
        signing.generate("dsa")
    private, _ = signing.generate("rsa")
    with pytest.raises(signing.SigningError, match="signature scheme must be"):
        signing.sign(private, b"x", "raw")
