"""First contact: ``elkeid-agent run`` says what is wrong. Real agent
processes: fatal misconfiguration exits 1 with one line, a failed dial is
diagnosed on stderr and counted, the curated stderr lines, ``run --help``
and docs/devcenter.md's commands run as written."""

import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request

import pytest

from elkeid_agent.transport import diagnose
from elkeid_devtools.devcenter import certs
from elkeid_devtools.launchers import ROOT, _env
from harness import AgentProc, unwrap, wait_until

DOCS = os.path.join(ROOT, "docs", "devcenter.md")


def lines_of(agent):
    with open(agent.stderr_path, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


def exit_of(agent, timeout=60):
    try:
        return agent.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        agent.stop()
        raise AssertionError("agent still running %d s after start: %s"
                             % (timeout, lines_of(agent)))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    base = tmp_path_factory.mktemp("bundles")
    good = certs.write_bundle(str(base / "good"))
    other = certs.write_bundle(str(base / "other"))  # a CA of its own
    garbage = base / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    return good, other, str(garbage)


def tls_args(ca, cert, key):
    return ["--ca", ca, "--cert", cert, "--key", key]


# ------------------------------------------------------------ fatal start-up

FATAL = {
    "missing CA": (lambda g, o, x, wd: tls_args(os.path.join(wd, "nope.crt"), g.client_crt,
                                                 g.client_key), "cannot read TLS ca {wd}/nope.crt"),
    "garbage CA": (lambda g, o, x, wd: tls_args(x, g.client_crt, g.client_key),
                   "TLS ca {x} holds no PEM certificate"),
    "garbage cert": (lambda g, o, x, wd: tls_args(g.ca, x, g.client_key),
                     "TLS cert {x} holds no PEM certificate"),
    "garbage key": (lambda g, o, x, wd: tls_args(g.ca, g.client_crt, x),
                    "TLS key {x} is not an unencrypted PEM private key"),
    "key of another certificate": (lambda g, o, x, wd: tls_args(g.ca, g.client_crt, o.client_key),
                                   "TLS key {o.client_key} does not match the certificate"),
}


@pytest.mark.parametrize("case", sorted(FATAL))
def test_bad_tls_file_stops_start_up_with_one_line(case, bundles, tmp_path):
    good, other, garbage = bundles
    wd = str(tmp_path / "wd")
    make_args, expected = FATAL[case]
    agent = AgentProc(wd, ["--server", "127.0.0.1:9"] + make_args(good, other, garbage, wd))
    assert exit_of(agent) == 1
    out = lines_of(agent)
    assert len(out) == 1, out
    assert out[0].startswith("elkeid-agent: ")
    assert expected.format(wd=wd, x=garbage, o=other) in out[0]


def test_no_endpoint_for_the_region_stops_start_up(bundles, tmp_path):
    good, _other, _garbage = bundles
    agent = AgentProc(tmp_path / "wd", tls_args(good.ca, good.client_crt, good.client_key))
    assert exit_of(agent) == 1
    out = lines_of(agent)
    assert len(out) == 1, out
    assert "no AgentCenter endpoint configured for region 'default'" in out[0]


def test_unusable_workdir_stops_start_up(bundles, tmp_path):
    good, _other, _garbage = bundles
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    wd = blocker / "workdir"
    agent = AgentProc(wd, ["--server", "127.0.0.1:9"]
                      + tls_args(good.ca, good.client_crt, good.client_key))
    assert exit_of(agent) == 1
    out = lines_of(agent)
    assert len(out) == 1, out
    assert out[0].startswith("elkeid-agent: workdir %s is unusable" % wd), out


# ------------------------------------------------------------ dial diagnosis

def metric(agent, name, **labels):
    """Read one counter from the agent's /debug/metrics (SIGUSR1 turns it on)."""
    addr_file = os.path.join(agent.workdir, "tmp", "debug.addr")
    if not os.path.exists(addr_file):
        agent.signal(signal.SIGUSR1)
        wait_until(lambda: os.path.exists(addr_file) and open(addr_file).read().strip(), 30,
                   what="debug.addr")
    with open(addr_file) as f:
        addr = f.read().strip()
    with urllib.request.urlopen("http://%s/debug/metrics" % addr, timeout=10) as r:
        text = r.read().decode()
    label = ",".join('%s="%s"' % kv for kv in sorted(labels.items()))
    m = re.search(r"^elkeid_agent_%s\{%s\} (\S+)$" % (name, re.escape(label)), text, re.M)
    return float(m.group(1)) if m else 0.0


def assert_diagnosed(agent, address, reason, needle):
    line = "WARN cannot connect to %s (private): " % address
    wait_until(lambda: any(l.startswith(line) and needle in l for l in lines_of(agent)), 60,
               what="%r on stderr" % needle)
    # Still retrying: the counter keeps rising while the line is rate-limited.
    wait_until(lambda: metric(agent, "dial_failures", reason=reason) >= 3, 60,
               what="dial_failures{reason=%s} >= 3" % reason)
    assert agent.alive
    shown = [l for l in lines_of(agent) if l.startswith(line)]
    assert len(shown) == 1, shown  # one line per endpoint and reason per minute
    assert agent.stop() == 0


def dial(tmp_path, address, tls, *extra):
    env = {"ELKEID_DIAL_TIMEOUT": "1", "ELKEID_RECONNECT_DELAY": "0.2"}
    return AgentProc(tmp_path / "wd", ["--server", address, "--agent-id", "diag"] + tls
                     + list(extra), env=env)


def test_refused_dial_is_diagnosed(bundles, tmp_path):
    good, _other, _garbage = bundles
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % s.getsockname()[1]
    s.close()  # nothing listens there now
    agent = dial(tmp_path, address, tls_args(good.ca, good.client_crt, good.client_key))
    assert_diagnosed(agent, address, "refused", "connection refused")


def test_silent_server_is_diagnosed_as_timeout(bundles, tmp_path):
    good, _other, _garbage = bundles
    with socket.socket() as s:  # listens, never accepts, never answers
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        address = "127.0.0.1:%d" % s.getsockname()[1]
        agent = dial(tmp_path, address, tls_args(good.ca, good.client_crt, good.client_key))
        assert_diagnosed(agent, address, "timeout", "did not answer TLS within 1 s")


def test_server_of_another_ca_is_diagnosed(devcenter, bundles, tmp_path):
    _good, other, _garbage = bundles
    c = devcenter.certs
    agent = dial(tmp_path, devcenter.grpc, tls_args(other.ca, os.path.join(c, "client.crt"),
                                                    os.path.join(c, "client.key")))
    assert_diagnosed(agent, devcenter.grpc, "unknown_ca",
                     "is not signed by our CA %s" % other.ca)


def test_wrong_server_name_is_diagnosed(devcenter, tmp_path):
    agent = dial(tmp_path, devcenter.grpc, devcenter.cert_args, "--server-name", "other.example")
    assert_diagnosed(agent, devcenter.grpc, "server_name",
                     "does not carry the server name other.example (it carries DNS:elkeid.com)")


def test_client_certificate_of_another_ca_is_diagnosed(devcenter, bundles, tmp_path):
    _good, other, _garbage = bundles
    agent = dial(tmp_path, devcenter.grpc, tls_args(os.path.join(devcenter.certs, "ca.crt"),
                                                    other.client_crt, other.client_key))
    # The rejection, and why: the certificate in use does not chain to our CA.
    assert_diagnosed(agent, devcenter.grpc, "client_cert_unknown_ca",
                     "rejected our client certificate %s" % other.client_crt)
    assert "TLS cert %s is not signed by the CA %s" % (
        other.client_crt, os.path.join(devcenter.certs, "ca.crt")) in agent.log_text()


# ------------------------------------------------------------ curated stderr

def test_stderr_says_start_connect_and_disconnect_and_nothing_else(devcenter, tmp_path):
    agent = AgentProc(tmp_path / "wd", ["--server", devcenter.grpc, "--agent-id", "talk",
                                        "--heartbeat-interval", "0.2"] + devcenter.cert_args,
                      env={"ELKEID_RECONNECT_DELAY": "0.2"})
    try:
        connected = "INFO connected to %s (private)" % devcenter.grpc
        wait_until(lambda: connected in lines_of(agent), 60, what="connected line")
        devcenter.wait_records(1000, agent_id="talk", count=3)
        status, _body = devcenter.request("POST", "/conn/reset", {"agent_id": "talk"})
        assert status == 200
        wait_until(lambda: lines_of(agent).count(connected) >= 2, 60, what="reconnect line")
    finally:
        assert agent.stop() == 0
    out = lines_of(agent)
    assert out[0].startswith("INFO elkeid-agent ") and "starting: id talk, workdir " in out[0]
    assert any(l.startswith("WARN transfer stream lost (") for l in out), out
    # Everything else (heartbeats, batches, shutdown detail) stays in the file log.
    for line in out:
        assert re.match(r"^(INFO|WARN|ERROR|FATAL) ", line), line
        assert "{" not in line[:8], line
    assert len(out) < 10, out


# ------------------------------------------------------------ --help, docs

def test_run_help_documents_every_flag_and_its_default():
    r = subprocess.run([sys.executable, "-m", "elkeid_agent", "run", "--help"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    body = text.split("options:", 1)[-1] if "options:" in text else text.split("arguments:")[-1]
    # Option entries start at two spaces; their help may wrap onto later lines.
    entries = re.split(r"\n  (?=-)", "\n" + body.strip("\n"))
    flags = [e for e in entries if e.strip() and not e.lstrip().startswith("-h")]
    assert len(flags) >= 12, text
    for entry in flags:
        words = " ".join(entry.split())
        assert "(default: " in words, entry


def shell_blocks(markdown, heading):
    """The ``` blocks under ``heading`` until the next heading, as argv
    lists (continuations joined, comments dropped)."""
    section = markdown.split(heading, 1)[1]
    section = re.split(r"\n#{2,} ", section, 1)[0]  # "# " lines are shell comments
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", section, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line))
    return out


PROGRAMS = {"elkeid-devcenter": [sys.executable, "-m", "elkeid_devtools.devcenter"],
            "elkeid-agent": [sys.executable, "-m", "elkeid_agent"]}


def test_devcenter_doc_commands_run_as_written(tmp_path):
    with open(DOCS, encoding="utf-8") as f:
        doc = f.read()
    server = shell_blocks(doc, "## Running it")[0]  # the next block is its output
    [agent_cmd] = shell_blocks(doc, "### Pointing an agent at it")
    assert server[0] == "elkeid-devcenter" and agent_cmd[0] == "elkeid-agent"
    # Only the ports change: fixed ones may be taken on a shared machine.
    server = PROGRAMS[server[0]] + [a.replace(":6751", ":0").replace(":6752", ":0")
                                    for a in server[1:]] + ["--quiet"]
    dc = subprocess.Popen(server, cwd=str(tmp_path), env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL)
    agent = None
    try:
        first = dc.stdout.readline().decode()
        m = re.search(r"grpc=127\.0\.0\.1:(\d+) http=(\S+)", first)
        assert m, first
        argv = PROGRAMS[agent_cmd[0]] + [a.replace(":6751", ":" + m.group(1))
                                         for a in agent_cmd[1:]]
        log_path = tmp_path / "agent.out"
        with open(log_path, "wb") as out:
            agent = subprocess.Popen(argv, cwd=str(tmp_path), env=_env(), stdout=out,
                                     stderr=out, stdin=subprocess.DEVNULL)

        def agents():
            with urllib.request.urlopen("http://%s/conn/list" % m.group(2), timeout=10) as r:
                return unwrap(json.loads(r.read().decode()), "agents")
        wait_until(lambda: agent.poll() is not None or agents(), 60, what="agent connected")
        assert agent.poll() is None, log_path.read_text()
    finally:
        for p in (agent, dc):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
    assert agent.returncode == 0


# ------------------------------------------------------------ pure parts

def test_classify_names_each_cause():
    a = "127.0.0.1:1"
    assert diagnose.classify(ConnectionRefusedError(111, "x"), "tcp", a).reason == "refused"
    assert diagnose.classify(socket.timeout("t"), "tcp", a, 2).text.startswith("TCP connect")
    assert diagnose.classify(socket.timeout("t"), "tls", a, 2).reason == "timeout"
    e = ssl.SSLCertVerificationError(1, "x")
    e.verify_code, e.verify_message = 20, "unable to get local issuer certificate"
    assert diagnose.classify(e, "tls", a, ca="/ca").reason == "unknown_ca"
    e = ssl.SSLError(1, "x")
    e.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    d = diagnose.classify(e, "read", a, cert="/c")
    assert d.reason == "client_cert_rejected" and "certificate required" in d.text
    e = ssl.SSLError(1, "x")
    e.reason = "WRONG_VERSION_NUMBER"
    assert diagnose.classify(e, "tls", a).reason == "not_tls"
    assert diagnose.classify(ssl.SSLEOFError(8, "eof"), "read", a).reason == \
        "client_cert_rejected"
    assert diagnose.classify(OSError(113, "No route to host"), "tcp", a).reason == "unreachable"


def test_server_name_matching():
    names = ["DNS:elkeid.com", "DNS:*.svc.example", "IP:127.0.0.1"]
    assert diagnose.name_matches("ELKEID.com", names)
    assert diagnose.name_matches("a.svc.example", names)
    assert not diagnose.name_matches("a.b.svc.example", names)
    assert not diagnose.name_matches("svc.example", names)
    assert diagnose.name_matches("127.0.0.1", names)
    assert not diagnose.name_matches("127.0.0.2", names)
    assert not diagnose.name_matches("other.example", names)
