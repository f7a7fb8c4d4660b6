"""deb and rpm packages, the systemd unit, the sysvinit script, the cron file
and the install scripts (docs/protocol.md section 7).

The packages are built once per session with ``./build.sh packages``. The
install scripts run for real in a private mount namespace, where
/etc/elkeid holds a recording stand-in for elkeidctl, so both the deb
(``configure``/``remove``) and the rpm (``1``/``2``/``0``) conventions are
exercised. tests/test_packaging_chroot.py installs the real .deb.
"""

import configparser
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "packaging"))
import build_zipapp  # noqa: E402

from elkeid_agent.ctl import layout  # noqa: E402

VERSION = build_zipapp.version()
ARCHES = {"amd64": "x86_64", "arm64": "aarch64"}
SCRIPTS = os.path.join(ROOT, "packaging", "scripts")
FILES = {
    "/etc/elkeid": ("dir", 0o700),
    "/etc/elkeid/elkeid-agent": ("file", 0o700),
    "/etc/elkeid/elkeidctl": ("link", "elkeid-agent"),
    "/etc/elkeid/elkeid-agent.service": ("file", 0o600),
    "/etc/elkeid/elkeid-agent.sysvinit": ("file", 0o700),
    "/etc/elkeid/elkeid-agent.cron": ("file", 0o600),
}


def sh(*argv, **kw):
    p = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


@pytest.fixture(scope="session")
def packages(tmp_path_factory):
    """``./build.sh packages`` into a directory of this test run's own, so
    the tests never overwrite the developer's dist/."""
    dist = str(tmp_path_factory.mktemp("dist"))
    env = dict(os.environ, ELKEID_VENV=sys.prefix, ELKEID_DIST_DIR=dist)
    rc, out, err = sh(os.path.join(ROOT, "build.sh"), "packages", cwd=ROOT, env=env)
    assert rc == 0, err
    out = {}
    for arch in ARCHES:
        for fmt in ("deb", "rpm"):
            path = os.path.join(dist, "elkeid-agent_%s_%s.%s" % (VERSION, arch, fmt))
            assert os.path.isfile(path), err
            out[arch, fmt] = path
    return out


@pytest.fixture
def rpmq(tmp_path):
    """``rpm -qp ...`` with a database of its own: rpm's default database
    for a query is ~/.rpmdb, which it would create in the home directory."""
    need("rpm")
    db = str(tmp_path / "rpmdb")

    def query(*args):
        return sh("rpm", "--dbpath", db, "-qp", *args)
    return query


def need(tool):
    if not shutil.which(tool):
        pytest.skip("%s is not installed (.ci/run installs it)" % tool)


def script(name):
    with open(os.path.join(SCRIPTS, name)) as f:
        return f.read()


# ---------------------------------------------------------------- rpm

@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_rpm_file_list_modes_and_metadata(packages, arch, rpmq):
    path = packages[arch, "rpm"]
    rc, out, err = rpmq("-l", path)
    assert rc == 0, err
    assert sorted(out.split()) == sorted(FILES)
    rc, out, err = rpmq("--qf", "[%{FILENAMES} %{FILEMODES:octal} %{FILEUSERNAME} "
                        "%{FILEGROUPNAME} %{FILELINKTOS}\\n]", path)
    assert rc == 0, err
    for line in out.strip().splitlines():
        name, mode, user, group, *link = line.split()
        kind, want = FILES[name]
        assert (user, group) == ("root", "root")
        mode = int(mode, 8)
        if kind == "link":
            assert link == [want]
        else:
            assert mode & 0o7777 == want, (name, oct(mode))
    rc, out, err = rpmq("--qf", "%{NAME} %{EPOCH} %{VERSION} %{RELEASE} %{ARCH}", path)
    assert out == "elkeid-agent 3 %s 1 %s" % (VERSION, ARCHES[arch])
    rc, out, err = rpmq("--requires", path)
    assert "python3 >= 3.9 or python39" in out


def test_rpm_scripts_are_ours(packages, rpmq):
    rc, out, err = rpmq("--scripts", packages["amd64", "rpm"])
    assert rc == 0, err
    parts = re.split(r"^(\w+) scriptlet \(using (\S+)\):\n", out, flags=re.M)
    found = {parts[i]: (parts[i + 1], parts[i + 2]) for i in range(1, len(parts), 3)}
    for rpm_name, ours in (("preinstall", "preinstall.sh"), ("postinstall", "postinstall.sh"),
                           ("preuninstall", "preremove.sh")):
        interpreter, text = found[rpm_name]
        assert interpreter == "/bin/sh"
        assert text.strip() == script(ours).strip()
    assert set(found) == {"preinstall", "postinstall", "preuninstall"}


# ---------------------------------------------------------------- deb

@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_deb_contents_and_control(packages, arch, tmp_path):
    need("dpkg-deb")
    path = packages[arch, "deb"]
    rc, out, err = sh("dpkg-deb", "-f", path, "Package", "Version", "Architecture", "Depends",
                      "Conflicts")
    assert rc == 0, err
    fields = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert fields["Version"] == "3:%s-1" % VERSION and fields["Architecture"] == arch
    assert fields["Depends"].startswith("python3 (>= 3.9) | python3.9")
    assert fields["Conflicts"] == "elkeid-agent-tx"
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", path], stdout=subprocess.PIPE).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = {"/" + m.name.lstrip("./").rstrip("/"): m for m in tf.getmembers()}
        members = {k: v for k, v in members.items() if k not in ("/", "/etc")}
        assert sorted(members) == sorted(FILES)
        for name, (kind, want) in FILES.items():
            m = members[name]
            if kind == "link":
                assert m.issym() and m.linkname == want
            else:
                assert m.mode & 0o7777 == want, (name, oct(m.mode))
        pyz = tf.extractfile("./etc/elkeid/elkeid-agent").read()
    control = tmp_path / "control"
    assert sh("dpkg-deb", "-e", path, str(control))[0] == 0
    for deb_name, ours in (("preinst", "preinstall.sh"), ("postinst", "postinstall.sh"),
                           ("prerm", "preremove.sh")):
        assert (control / deb_name).read_text().strip() == script(ours).strip()
    assert not (control / "conffiles").exists()
    # The zipapp inside is built for the package's architecture.
    elf_machine = {"amd64": 62, "arm64": 183}[arch]  # EM_X86_64, EM_AARCH64
    with zipfile.ZipFile(io.BytesIO(pyz)) as zf:
        meta = json.loads(zf.read("elkeid_zipapp.json"))
        sos = [n for n in zf.namelist() if n.endswith(".so")]
        machines = {n: int.from_bytes(zf.open(n).read(20)[18:20], "little") for n in sos}
    assert meta["arch"] == ARCHES[arch] and meta["version"] == VERSION
    assert len([n for n in sos if "cygrpc" in n]) == 5
    assert all(ARCHES[arch] in n or n.endswith(".abi3.so") for n in sos), sos
    assert set(machines.values()) == {elf_machine}, machines


def test_packaged_zipapp_runs_here(packages, tmp_path):
    need("dpkg-deb")
    arch = {v: k for k, v in ARCHES.items()}[os.uname().machine]
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", packages[arch, "deb"]],
                          stdout=subprocess.PIPE).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        tf.extractall(str(tmp_path))
    ctl = tmp_path / "etc" / "elkeid" / "elkeidctl"
    rc, out, err = sh(str(ctl), "--version", env={"PATH": "/usr/bin:/bin"})
    assert (rc, out.strip()) == (0, "elkeidctl (elkeid-agent %s)" % VERSION), err


# ---------------------------------------------------------------- build.sh test: system tools

FAKE_APT = """#!/bin/sh
echo "$@" >> "$FAKE_APT_CALLS"
echo "Reading package lists... (apt noise)"
case " $* " in *" install "*) exit "${FAKE_APT_INSTALL_RC:-0}" ;; esac
exit 0
"""


def run_build_sh_test_with_fake_apt(tmp_path, install_rc):
    """``./build.sh test`` on a PATH where none of the tests' system tools
    exist, as root (a fake id), with a recording apt-get and a stand-in
    for the venv's python (the pytest run)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env", "dirname", "cat", "sha256sum", "cut", "mktemp", "rm"):
        os.symlink(shutil.which(tool), str(bin_dir / tool))
    for name, text in (("apt-get", FAKE_APT), ("id", "#!/bin/sh\necho 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    # build.sh's venv() stamp: what the editable install was made from
    stamp = hashlib.sha256()
    for name in ("pyproject.toml", "setup.py", "accel/elkeid_accel.c"):
        with open(os.path.join(ROOT, name), "rb") as f:
            stamp.update(f.read())
    (venv / ".installed").write_text(stamp.hexdigest()[:16] + "\n")
    (venv / "bin" / "python").write_text("#!/bin/sh\necho \"pytest ran: $*\"\n")
    (venv / "bin" / "python").chmod(0o755)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"PATH": str(bin_dir), "ELKEID_VENV": str(venv), "TMPDIR": str(tmp),
           "FAKE_APT_CALLS": str(tmp_path / "calls"), "FAKE_APT_INSTALL_RC": str(install_rc)}
    rc, out, err = sh(os.path.join(ROOT, "build.sh"), "test", "-x", cwd=ROOT, env=env)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() \
        else []
    return rc, out, err, calls, sorted(os.listdir(str(tmp)))


def test_build_sh_installs_missing_tools_quietly_waiting_for_the_dpkg_lock(tmp_path):
    rc, out, err, calls, left = run_build_sh_test_with_fake_apt(tmp_path, 0)
    assert rc == 0, err
    assert out == "pytest ran: -m pytest -x\n"
    tools = ("debootstrap rpm systemd prometheus-node-exporter systemd-container nftables "
             "iproute2 util-linux")
    assert err.splitlines() == ["==> installing %s for the tests" % tools,
                                "==> running tests"]
    assert calls == ["-o DPkg::Lock::Timeout=600 update -q",
                     "-o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends " + tools]
    assert left == []  # the log of a successful run is removed


def test_build_sh_shows_apts_output_when_it_fails(tmp_path):
    rc, out, err, calls, left = run_build_sh_test_with_fake_apt(tmp_path, 100)
    assert rc != 0 and out == ""  # no test run
    assert err.count("Reading package lists... (apt noise)") == 2
    assert ("build.sh: error: apt-get install debootstrap rpm systemd prometheus-node-exporter "
            "systemd-container nftables iproute2 util-linux failed") in err
    assert len(left) == 1 and left[0] in err  # kept, and named


# ---------------------------------------------------------------- unit, init script, cron

def unit():
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(os.path.join(ROOT, "packaging", "elkeid-agent.service"))
    return cp


def test_unit_has_elkeids_settings_plus_notify_and_watchdog():
    s = unit()["Service"]
    assert s["ExecStart"].split()[0] == "/etc/elkeid/elkeid-agent"
    expected = {"WorkingDirectory": "/etc/elkeid", "Restart": "always", "RestartSec": "45",
                "KillMode": "control-group", "MemoryMax": "250M", "CPUQuota": "10%",
                "Delegate": "yes", "EnvironmentFile": "-/etc/elkeid/specified_env",
                "Type": "notify"}
    assert {k: s[k] for k in expected} == expected
    # The agent pings at least every WatchdogSec/2 and at least every
    # heartbeat: the watchdog must allow a few missed heartbeats.
    from elkeid_agent.settings import Settings
    assert int(s["WatchdogSec"]) >= 3 * Settings().heartbeat_interval
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def verify(tmp_path, text):
    """systemd-analyze verify of unit ``text`` installed in a scratch root
    (with this machine's stock units and an executable agent file)."""
    need("systemd-analyze")
    root = tmp_path / "root"
    units = next((d for d in ("/usr/lib/systemd/system", "/lib/systemd/system")
                  if os.path.isdir(d)), None)
    if units is None:
        pytest.skip("no systemd unit directory to verify against")
    shutil.copytree(units, str(root / "usr/lib/systemd/system"), symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/elkeid").mkdir(parents=True)
    agent = root / "etc/elkeid/elkeid-agent"
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o700)
    (root / "etc/systemd/system/elkeid-agent.service").write_text(text)
    rc, out, err = sh("systemd-analyze", "verify", "--man=no", "--root=%s" % root,
                      "/etc/systemd/system/elkeid-agent.service")
    return rc, (out + err).strip()


def unit_text():
    with open(os.path.join(ROOT, "packaging", "elkeid-agent.service")) as f:
        return f.read()


def test_unit_passes_systemd_analyze_verify(tmp_path):
    assert verify(tmp_path, unit_text()) == (0, "")


def test_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a bad value is reported."""
    rc, output = verify(tmp_path, unit_text().replace("KillMode=control-group",
                                                      "KillMode=everything"))
    assert "Failed to parse kill mode" in output


def test_cron_file_is_elkeidctls_line():
    with open(os.path.join(ROOT, "packaging", "elkeid-agent.cron")) as f:
        assert f.read() == layout.CRON_LINE == "* * * * * root /etc/elkeid/elkeidctl check\n"


def test_sysvinit_script_header_and_usage(tmp_path):
    path = os.path.join(ROOT, "packaging", "elkeid-agent.sysvinit")
    text = open(path).read()
    assert "### BEGIN INIT INFO" in text and "# Provides:          elkeid-agent" in text
    assert "# Default-Start:     2 3 4 5" in text and "# chkconfig: 2345" in text
    for shell in ("sh", "dash", "bash"):
        if shutil.which(shell):
            assert sh(shell, "-n", path)[0] == 0
    rc, out, err = sh("sh", path, "bogus")
    # without /etc/elkeid/elkeidctl on this machine it says so; with it, usage
    assert rc in (2, 5)
    assert "Usage:" in err or "elkeidctl is missing" in err


@pytest.mark.parametrize("name", ["preinstall.sh", "postinstall.sh", "preremove.sh"])
def test_scripts_parse_in_every_shell(name):
    for shell in ("sh", "dash", "bash", "busybox sh"):
        argv = shell.split()
        if not shutil.which(argv[0]):
            continue
        rc, out, err = sh(*(argv + ["-n", os.path.join(SCRIPTS, name)]))
        assert rc == 0, (shell, err)


# ---------------------------------------------------------------- scripts, for real

def _unshare_ok():
    return os.geteuid() == 0 and shutil.which("unshare") and \
        subprocess.run(["unshare", "-m", "true"], stderr=subprocess.DEVNULL).returncode == 0


needs_ns = pytest.mark.skipif(not _unshare_ok(), reason="needs root and unshare -m")

FAKE_CTL = """#!/bin/sh
echo "$*" >> /etc/elkeid/ctl.log
case " $* " in *" $ELKEID_FAKE_FAIL "*) echo "fake elkeidctl: $1 went wrong" >&2; exit 1;; esac
case "$1" in
    status) [ -f /etc/elkeid/specified_env ] || exit 6 ;;
    enable) echo "elkeidctl: warning: a warning worth showing" >&2 ;;
    start) echo "elkeid-agent started (pid 1)"
           [ -z "$ELKEID_FAKE_START_WARNING" ] || echo "elkeidctl: warning: $ELKEID_FAKE_START_WARNING" >&2 ;;
esac
exit 0
"""


class ScriptHost:
    """/etc/elkeid, /etc/init.d, /etc/cron.d, /etc/systemd/system,
    /run/systemd and /var/cache replaced (in a mount namespace) by
    directories of the test."""

    def __init__(self, tmp_path):
        self.base = tmp_path
        self.dirs = {}
        for target in ("/etc/elkeid", "/etc/init.d", "/etc/cron.d", "/var/cache", "/run/systemd",
                       "/etc/systemd/system"):
            d = tmp_path / target.strip("/").replace("/", "_")
            d.mkdir()
            self.dirs[target] = d
        ctl = self.dirs["/etc/elkeid"] / "elkeidctl"
        ctl.write_text(FAKE_CTL)
        ctl.chmod(0o755)
        (self.dirs["/etc/elkeid"] / "elkeid-agent.sysvinit").write_text("#!/bin/sh\n# init\n")
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        for tool in ("sh", "sed", "tr", "grep", "tail", "cat", "mkdir", "cp", "chmod", "rm",
                     "umount", "printf", "python3", "echo", "true", "readlink"):
            real = shutil.which(tool, path="/usr/bin:/bin:/usr/sbin:/sbin")
            if real:
                os.symlink(real, str(self.bin / tool))

    def tool(self, name, body="exit 0"):
        p = self.bin / name
        p.write_text("#!/bin/sh\necho \"%s $*\" >> %s\n%s\n" % (name, self.base / "tools.log", body))
        p.chmod(0o755)

    def systemd_running(self):
        (self.dirs["/run/systemd"] / "system").mkdir()

    def run(self, name, *args, env=None):
        mount = shutil.which("mount", path="/usr/bin:/bin:/usr/sbin:/sbin")
        # Writable overlays of /etc and /run make room for the mount points
        # without touching this machine; the test's directories go on top.
        binds = ""
        for top in ("etc", "run"):
            for sub in ("upper-" + top, "work-" + top):
                (self.base / sub).mkdir(exist_ok=True)
            binds += ("%s -t overlay overlay -o lowerdir=/%s,upperdir=%s,workdir=%s /%s; "
                      % (mount, top, self.base / ("upper-" + top), self.base / ("work-" + top),
                         top))
        binds += "/bin/mkdir -p %s; " % " ".join(self.dirs)
        binds += "".join("%s --bind %s %s; " % (mount, d, t) for t, d in self.dirs.items())
        script_path = os.path.join(SCRIPTS, name)
        quoted = " ".join("'%s'" % a for a in args)
        e = {"PATH": str(self.bin)}
        e.update(env or {})
        return sh(shutil.which("unshare"), "-m", "/bin/sh", "-ec",
                  binds + "exec /bin/sh %s %s" % (script_path, quoted), env=e)

    def ctl_log(self):
        p = self.dirs["/etc/elkeid"] / "ctl.log"
        return p.read_text().splitlines() if p.exists() else []

    def tools_log(self):
        p = self.base / "tools.log"
        return p.read_text().splitlines() if p.exists() else []


@pytest.fixture
def host(tmp_path):
    if not _unshare_ok():
        pytest.skip("needs root and unshare -m")
    return ScriptHost(tmp_path)


@pytest.mark.parametrize("args", [("configure", ""), ("1",)])
def test_postinstall_install_on_a_systemd_host(host, args):
    host.tool("systemctl")
    host.systemd_running()
    rc, out, err = host.run("postinstall.sh", *args, env={
        "SPECIFIED_IDC": "bj1", "SPECIFIED_AGENT_ID": "host-1", "SPECIFIED_REGION": "eu"})
    assert rc == 0, err
    assert out == ""  # quiet on success...
    assert err.strip() == "elkeidctl: warning: a warning worth showing"  # ...but not on warnings
    assert host.ctl_log() == [
        "set --service_type=systemd", "enable",
        "set --idc=bj1 --id=host-1 --region=eu",  # Elkeid's script wrote --id for the region
        "service-reload", "cleanup", "start"]


@pytest.mark.parametrize("args", [("configure", "1.7.0.0"), ("2",)])
def test_postinstall_upgrade_keeps_the_service_type_and_does_not_restart(host, args):
    host.tool("systemctl")
    host.tool("update-rc.d")
    (host.dirs["/etc/elkeid"] / "specified_env").write_text("service_type=sysvinit\n")
    rc, out, err = host.run("postinstall.sh", *args, env={"SPECIFIED_IDC": "ignored"})
    assert rc == 0, err
    assert host.ctl_log() == ["enable", "service-reload", "cleanup"]
    assert (host.dirs["/etc/init.d"] / "elkeid-agent").read_text() == "#!/bin/sh\n# init\n"
    assert os.stat(str(host.dirs["/etc/init.d"] / "elkeid-agent")).st_mode & 0o777 == 0o755


def test_postinstall_picks_sysvinit_without_a_running_systemd(host):
    host.tool("systemctl")  # installed, but /run/systemd/system is absent
    host.tool("update-rc.d")
    rc, out, err = host.run("postinstall.sh", "configure", "",
                            env={"ELKEID_SERVER": "127.0.0.1:6751"})
    assert rc == 0, err
    assert host.ctl_log()[0] == "set --service_type=sysvinit"
    assert "set --server=127.0.0.1:6751" in host.ctl_log()
    assert (host.dirs["/etc/init.d"] / "elkeid-agent").exists()


def test_postinstall_failure_is_loud(host):
    host.tool("update-rc.d")
    rc, out, err = host.run("postinstall.sh", "configure", "", env={"ELKEID_FAKE_FAIL": "enable"})
    assert rc == 1
    assert "fake elkeidctl: enable went wrong" in err
    assert "elkeid-agent: post-install failed: '/etc/elkeid/elkeidctl enable' exited with " \
           "status 1" in err
    assert "start" not in host.ctl_log()


def test_postinstall_with_an_agent_that_will_not_start_warns_and_succeeds(host):
    host.tool("update-rc.d")
    rc, out, err = host.run("postinstall.sh", "configure", "", env={"ELKEID_FAKE_FAIL": "start"})
    assert rc == 0, err
    assert "fake elkeidctl: start went wrong" in err
    assert "post-install: warning: installed and enabled, but the agent did not start" in err
    assert "post-install failed" not in err
    assert "enable" in host.ctl_log() and "start" in host.ctl_log()


def test_postinstall_shows_the_warnings_of_a_successful_start(host):
    host.tool("update-rc.d")
    rc, out, err = host.run("postinstall.sh", "configure", "",
                            env={"ELKEID_FAKE_START_WARNING": "no cgroup support found"})
    assert rc == 0, err
    assert "elkeidctl: warning: no cgroup support found" in err
    assert "did not start" not in err


def test_postinstall_without_any_service_manager(host):
    rc, out, err = host.run("postinstall.sh", "configure", "")
    assert rc == 1
    assert "neither update-rc.d nor chkconfig" in err


@pytest.mark.parametrize("args", [("abort-upgrade", "1.0"), ("abort-remove",)])
def test_postinstall_abort_actions_do_nothing(host, args):
    rc, out, err = host.run("postinstall.sh", *args)
    assert (rc, out, err, host.ctl_log()) == (0, "", "", [])


@pytest.mark.parametrize("args", [("remove",), ("0",)])
def test_preremove_removes_everything(host, args):
    etc = host.dirs["/etc/elkeid"]
    (etc / "specified_env").write_text("service_type=sysvinit\n")
    for d in ("log", "plugin/collector", "tmp", "cgroup", "services/filebeat", "spool"):
        (etc / d).mkdir(parents=True)
    (etc / "spool" / "0000000000000001.seg").write_bytes(b"ELKSPOOL")
    (etc / "machine-id").write_text("x")
    (etc / "services" / "state.json").write_text("{}")
    (etc / "log" / "elkeid-agent.log").write_text("x")
    (host.dirs["/etc/init.d"] / "elkeid-agent").write_text("#!/bin/sh\n")
    (host.dirs["/etc/cron.d"] / "elkeid-agent").write_text(layout.CRON_LINE)
    (host.dirs["/var/cache"] / "elkeid-agent").mkdir()
    rc, out, err = host.run("preremove.sh", *args)
    assert (rc, out, err) == (0, "", ""), err
    assert host.ctl_log() == ["status", "disable", "stop", "services stop-all"]
    left = sorted(os.listdir(str(etc)))
    assert left == ["ctl.log", "elkeid-agent.sysvinit", "elkeidctl"]  # package files: dpkg's job
    assert os.listdir(str(host.dirs["/etc/init.d"])) == []
    assert os.listdir(str(host.dirs["/etc/cron.d"])) == []
    assert os.listdir(str(host.dirs["/var/cache"])) == []


def test_preremove_unlinks_the_unit_and_only_ours(host):
    """elkeidctl disable leaves the unit linked (known to systemd, not
    started at boot); removal takes the link away, after the stop."""
    (host.dirs["/etc/elkeid"] / "specified_env").write_text("service_type=systemd\n")
    units = host.dirs["/etc/systemd/system"]
    os.symlink("/etc/elkeid/elkeid-agent.service", str(units / "elkeid-agent.service"))
    os.symlink("/opt/other/other.service", str(units / "other.service"))
    rc, out, err = host.run("preremove.sh", "remove")
    assert (rc, out, err) == (0, "", ""), err
    assert sorted(os.listdir(str(units))) == ["other.service"]


def test_preremove_keeps_an_elkeid_agent_unit_that_is_not_ours(host):
    (host.dirs["/etc/elkeid"] / "specified_env").write_text("service_type=systemd\n")
    unit = host.dirs["/etc/systemd/system"] / "elkeid-agent.service"
    unit.write_text("[Service]\n")  # the admin's own
    assert host.run("preremove.sh", "remove")[0] == 0
    assert unit.read_text() == "[Service]\n"


@pytest.mark.parametrize("args", [("upgrade", "1.7.0.2"), ("1",), ("failed-upgrade", "x")])
def test_preremove_on_upgrade_keeps_everything(host, args):
    (host.dirs["/etc/elkeid"] / "specified_env").write_text("service_type=sysvinit\n")
    rc, out, err = host.run("preremove.sh", *args)
    assert (rc, out, err, host.ctl_log()) == (0, "", "", [])
    assert (host.dirs["/etc/elkeid"] / "specified_env").exists()


def test_preremove_with_a_missing_specified_env_still_removes(host):
    (host.dirs["/etc/init.d"] / "elkeid-agent").write_text("#!/bin/sh\n")
    rc, out, err = host.run("preremove.sh", "remove")
    assert rc == 0, err
    assert "specified_env is missing or corrupt; assuming service_type=sysvinit" in err
    assert host.ctl_log() == ["status", "set --service_type=sysvinit", "disable", "stop",
                              "services stop-all"]


def test_preremove_disable_failure_is_loud_and_stops_the_removal(host):
    (host.dirs["/etc/elkeid"] / "specified_env").write_text("service_type=systemd\n")
    (host.dirs["/etc/elkeid"] / "machine-id").write_text("x")
    rc, out, err = host.run("preremove.sh", "remove", env={"ELKEID_FAKE_FAIL": "disable"})
    assert rc == 1
    assert "pre-remove failed: '/etc/elkeid/elkeidctl disable' exited with status 1" in err
    assert (host.dirs["/etc/elkeid"] / "machine-id").exists()


def test_preremove_stop_failure_is_reported_but_removes(host):
    (host.dirs["/etc/elkeid"] / "specified_env").write_text("service_type=systemd\n")
    rc, out, err = host.run("preremove.sh", "remove", env={"ELKEID_FAKE_FAIL": "stop"})
    assert rc == 0
    assert "fake elkeidctl: stop went wrong" in err and "stopping the agent failed" in err
    assert not (host.dirs["/etc/elkeid"] / "specified_env").exists()


def test_preinstall_accepts_a_systemd_host_quietly(host):
    host.tool("systemctl")
    assert host.run("preinstall.sh", "install") == (0, "", "")


def test_preinstall_needs_cron_with_sysvinit(host):
    host.tool("update-rc.d")
    rc, out, err = host.run("preinstall.sh", "install")
    assert rc == 1 and "cron must be installed" in err
    host.tool("crontab")
    assert host.run("preinstall.sh", "install")[0] == 0


def test_preinstall_needs_a_service_manager(host):
    rc, out, err = host.run("preinstall.sh", "install")
    assert rc == 1
    assert "must have one of systemctl, update-rc.d, chkconfig" in err


def test_preinstall_needs_a_supported_python(host):
    host.tool("systemctl")
    os.unlink(str(host.bin / "python3"))
    host.tool("python3", 'echo "Python 3.6.8"; exit 1')
    rc, out, err = host.run("preinstall.sh", "install")
    assert rc == 1
    assert "no CPython 3.9 to 3.13 in PATH" in err


def test_preinstall_rejects_a_bad_service_type(host):
    host.tool("systemctl")
    rc, out, err = host.run("preinstall.sh", "install", env={"ELKEID_SERVICE_TYPE": "upstart"})
    assert rc == 1 and "ELKEID_SERVICE_TYPE must be systemd or sysvinit" in err
