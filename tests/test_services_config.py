"""services.config: the local services file, every problem with its code,
path and line; hostile documents never raise."""

import json
import os
import stat

import pytest
from hypothesis import given, settings, strategies as st

from elkeid_agent.services import config

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "fixtures", "daemon-example.yaml")


@pytest.fixture
def binary(tmp_path):
    path = tmp_path / "svc"
    path.write_text("#!/bin/sh\nexec sleep 3600\n")
    path.chmod(0o755)
    return str(path)


def problems(text, filename="services.yaml", **kw):
    cfg, found = config.parse(text, filename, workdir="/var/lib/elkeid", ncpu=2, **kw)
    assert (cfg is None) == bool(found)
    return [(p.code, p.path, p.line) for p in found], found


def test_the_design_example_loads_as_written():
    cfg, found = config.load(EXAMPLE, workdir="/etc/elkeid", ncpu=2)
    assert found == []
    assert [s.id for s in cfg.services] == ["filebeat-logs", "telegraf-metrics", "node-exporter"]
    ne = cfg.services[2]
    assert ne.type == "node_exporter" and ne.health_check.heartbeat_timeout == 0
    assert ne.health_check.http_endpoint == "http://localhost:9100/metrics"
    assert ne.health_check.memory_threshold == 104857600
    assert ne.restart.backoff_base == 10 and ne.restart.policy == "always"
    assert cfg.services[0].args[:2] == ("-c", "/etc/filebeat/filebeat.yml")
    assert cfg.update.max_backups == 5 and cfg.update.verify_timeout == 300
    # One warning line each for the sections elkeid-agent's settings replace.
    assert len(cfg.warnings) == 2
    assert cfg.warnings[0].startswith("daemon line ") and "--workdir" in cfg.warnings[0]
    assert cfg.warnings[1].startswith("manager line ") and "--server" in cfg.warnings[1]
    # The binaries are not on this machine: each service is reported, the file is valid.
    for p in cfg.start_problems:
        assert p.code == "D3001" and p.path.endswith(".binary_path") and p.line > 0


def test_agent_defaults_are_inherited_field_by_field(binary):
    text = """
agent_defaults:
  health_check: {interval: 10s, cpu_threshold: 20}
  restart: {max_retries: 3}
agents:
  - id: a
    type: custom
    binary_path: %s
    health_check: {interval: 1m30s}
    restart: {policy: on-failure}
""" % binary
    cfg, found = config.parse(text, workdir="/var/lib/elkeid", ncpu=2)
    assert found == []
    s = cfg.services[0]
    assert s.health_check.interval == 90 and s.health_check.cpu_threshold == 20
    assert s.health_check.heartbeat_timeout == 90  # the design's default
    assert s.restart.max_retries == 3 and s.restart.policy == "on-failure"
    assert s.work_dir == "/var/lib/elkeid/services/a"
    assert cfg.start_problems == []


def test_json_with_the_same_structure_and_lines(binary):
    doc = {"agents": [{"id": "a", "type": "custom", "binary_path": binary,
                       "restart": {"policy": "sometimes"}}]}
    text = json.dumps(doc, indent=2)
    found, _ = problems(text, "services.json")
    line = text.splitlines().index('        "policy": "sometimes"') + 1
    assert found == [("D1002", "agents[0].restart.policy", line)]
    cfg, ok = config.parse(json.dumps({"agents": [{"id": "a", "type": "custom",
                                                     "binary_path": binary}]}),
                           "x.json", workdir="/w", ncpu=1)
    assert ok == [] and cfg.services[0].id == "a"


@pytest.mark.parametrize("snippet,path,fragment", [
    ("    colour: red\n", "agents[0].colour", "unknown key"),
    ("    enabled: 'yes'\n", "agents[0].enabled", "true or false"),
    ("    args: -c\n", "agents[0].args", "list of strings"),
    ("    args: [[1]]\n", "agents[0].args[0]", "expected a string"),
    ("    env: {1BAD: x}\n", "agents[0].env.1BAD", "environment variable"),
    ("    work_dir: relative/dir\n", "agents[0].work_dir", "absolute"),
    ("    socket_path: /%s\n" % ("s" * 120), "agents[0].socket_path", "107 bytes"),
    ("    health_check: {interval: -5s}\n", "agents[0].health_check.interval", "negative"),
    ("    health_check: {interval: 0}\n", "agents[0].health_check.interval", "greater than 0"),
    ("    health_check: {heartbeat_timeout: soon}\n",
     "agents[0].health_check.heartbeat_timeout", "not a duration"),
    ("    health_check: {cpu_threshold: 250}\n", "agents[0].health_check.cpu_threshold",
     "out of range"),
    ("    health_check: {memory_threshold: -1}\n", "agents[0].health_check.memory_threshold",
     "negative"),
    ("    health_check: {http_endpoint: 'ftp://x/'}\n",
     "agents[0].health_check.http_endpoint", "http://"),
    ("    restart: {policy: sometimes}\n", "agents[0].restart.policy", "one of"),
    ("    restart: {max_retries: 2.5}\n", "agents[0].restart.max_retries", "whole number"),
    ("    restart: {backoff_base: 1m, backoff_max: 10s}\n", "agents[0].restart.backoff_max",
     "less than backoff_base"),
    ("    type: systemd\n", "agents[0].type", "one of"),
])
def test_each_bad_field_is_reported_with_code_path_and_line(binary, snippet, path, fragment):
    base = "agents:\n  - id: a\n    binary_path: %s\n" % binary
    if "type:" not in snippet:
        base += "    type: custom\n"
    text = base + snippet
    found, full = problems(text)
    assert [f[:2] for f in found] == [("D1002", path)], full
    assert found[0][2] == len(text.splitlines()), full
    assert fragment in full[0].message


def test_duplicate_ids_missing_keys_and_duplicate_yaml_keys(binary):
    text = ("agents:\n"
            "  - {id: a, type: custom, binary_path: %s}\n"
            "  - {id: a, type: custom, binary_path: %s}\n"
            "  - {type: custom}\n" % (binary, binary))
    found, full = problems(text)
    assert ("D1002", "agents[1].id", 3) in found
    assert any(f[1] == "agents[2]" and "'id'" in p.message for f, p in zip(found, full))
    found, full = problems("agents: []\nagents: []\n")
    assert found == [("D1002", "", 2)] and "duplicate key 'agents'" in full[0].message


def test_an_id_ending_in_a_newline_is_refused(binary):
    # A "$" anchor matches before a final newline: the id would name a unit,
    # a work directory and a journal component with a newline in it.
    found, full = problems('agents:\n  - {id: "a\\n", type: custom, binary_path: %s}\n'
                           % binary)
    assert [f[:2] for f in found] == [("D1002", "agents[0].id")], full


def test_a_binary_that_cannot_run_is_a_start_problem_not_a_file_problem(tmp_path):
    path = tmp_path / "noexec"
    path.write_text("x")
    path.chmod(stat.S_IRUSR)
    text = ("agents:\n  - {id: a, type: custom, binary_path: %s}\n"
            "  - {id: b, type: custom, binary_path: /nonexistent/bin}\n"
            "  - {id: c, type: custom, binary_path: /nonexistent/bin, enabled: false}\n" % path)
    cfg, found = config.parse(text, workdir="/w", ncpu=1)
    assert found == []
    assert [(p.code, p.path, p.line) for p in cfg.start_problems] == [
        ("D3001", "agents[0].binary_path", 2), ("D3001", "agents[1].binary_path", 3)]
    if os.geteuid() != 0:  # root may execute anything with an x bit only
        assert "not executable" in cfg.start_problems[0].message


@pytest.mark.parametrize("text,fragment", [
    ("agents: [", "not valid YAML"),
    ("a: *missing\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ("a: &a [1,1,1,1,1,1,1,1]\n" + "".join(
        "%s: &%s [*%s,*%s,*%s,*%s,*%s,*%s,*%s,*%s]\n" % ((chr(98 + i), chr(98 + i))
                                                          + (chr(97 + i),) * 8)
        for i in range(9)), "too large"),
    ("key: !!python/object:os.system x\n", "not valid YAML"),
])
def test_hostile_documents_are_load_errors(text, fragment):
    cfg, found = config.parse(text, workdir="/w", ncpu=1)
    assert cfg is None and found
    assert any(fragment in p.message for p in found), found


def test_unreadable_oversized_and_binary_files(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (config.MAX_FILE_BYTES + 1))
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"agents: \xff\xfe\n")
    for path, fragment in ((tmp_path / "missing.yaml", "cannot read"),
                           (big, "larger than"), (bad, "not UTF-8")):
        cfg, found = config.load(str(path), workdir="/w", ncpu=1)
        assert cfg is None and found[0].code == "D1001" and fragment in found[0].message
        assert found[0].render(path.name).startswith("D1001 %s: " % path.name)


def test_durations_and_sizes():
    assert config.parse_duration("1m30s") == 90
    assert config.parse_duration("500ms") == 0.5
    assert config.parse_duration(" 90 ") == 90 and config.parse_duration(2.5) == 2.5
    assert config.parse_duration("1h2m3.5s") == 3723.5
    for bad in ("", "5x", "1m-3s", "-1s", True, None, [], "nan", "inf", float("inf")):
        with pytest.raises(ValueError):
            config.parse_duration(bad)
    assert config.parse_size("500MB") == 500 * 10 ** 6
    assert config.parse_size("1GiB") == 2 ** 30 and config.parse_size(4096) == 4096
    for bad in ("lots", -1, True, 1.5, "1.5.5M"):
        with pytest.raises(ValueError):
            config.parse_size(bad)


def test_config_hash_changes_exactly_with_the_entry(binary):
    def spec(extra=""):
        text = "agents:\n  - id: a\n    type: custom\n    binary_path: %s\n%s" % (binary, extra)
        cfg, found = config.parse(text, workdir="/w", ncpu=1)
        assert found == []
        return cfg.services[0].config_hash()
    assert spec() == spec("    name: ''\n")
    assert spec() != spec("    args: [-v]\n")
    assert spec() != spec("    health_check: {interval: 31s}\n")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_arbitrary_text_never_raises(text):
    cfg, found = config.parse(text, workdir="/w", ncpu=1)
    assert (cfg is None) == bool(found)
    for p in found:
        assert p.code in ("D1001", "D1002") and isinstance(p.line, int)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.sampled_from(["agents", "id", "type", "binary_path",
                                                       "health_check", "restart", "args",
                                                       "env", "collectors", "update", "x"]),
                                      kids, max_size=4), max_leaves=30))
def test_arbitrary_json_structures_never_raise(doc):
    text = json.dumps(doc)
    cfg, found = config.parse(text, "s.json", workdir="/w", ncpu=1)
    assert (cfg is None) == bool(found)


def test_the_documented_example_file_is_valid():
    path = os.path.join(os.path.dirname(HERE), "examples", "services.yaml")
    cfg, found = config.load(path, workdir="/etc/elkeid", ncpu=2)
    assert found == [], [p.render("services.yaml") for p in found]
    assert [s.type for s in cfg.services] == ["filebeat", "telegraf", "node_exporter", "custom"]
    inhouse = cfg.services[3]
    assert inhouse.restart.policy == "on-failure" and inhouse.health_check.heartbeat_timeout == 90
    assert cfg.services[1].env == (("HOSTNAME_TAG", "web-01"),)
    assert cfg.collectors["disk"].interval == 60 and cfg.collectors["network"].only == ()


def test_json_in_services_yaml_loads_without_pyyaml(tmp_path):
    """What the D1001 message advises where PyYAML is missing: write the
    default file as JSON."""
    import subprocess
    import sys
    path = tmp_path / "services.yaml"
    path.write_text('{"agents": [{"id": "a", "type": "custom", "binary_path": "/bin/true"}]}')
    code = ("import sys; sys.modules['yaml'] = None\n"
            "from elkeid_agent.services import config\n"
            "cfg, found = config.load(%r, workdir='/w', ncpu=1)\n"
            "assert found == [] and cfg.services[0].id == 'a', found\n" % str(path))
    root = os.path.dirname(HERE)
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=root),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    yaml_text = tmp_path / "other.yaml"
    yaml_text.write_text("agents: []\n")
    code = ("import sys; sys.modules['yaml'] = None\n"
            "from elkeid_agent.services import config\n"
            "cfg, found = config.load(%r, workdir='/w', ncpu=1)\n"
            "print(found[0].render('other.yaml'))\n" % str(yaml_text))
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=root),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("D1001 other.yaml: PyYAML is not available")
