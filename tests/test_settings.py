"""Settings precedence, specified_env parsing, validation errors."""

import os

import pytest

from elkeid_agent import settings as S
from elkeid_agent.errors import ConfigError


def write_env(tmp_path, text):
    (tmp_path / "specified_env").write_text(text)


def test_defaults(tmp_path):
    s = S.load({}, {}, workdir=str(tmp_path))
    assert s.server_name == "elkeid.com"
    assert s.heartbeat_interval == 60
    assert s.compression == "auto"
    assert s.region == "default"
    assert s.path(s.ca) == str(tmp_path / "cert/ca.crt")
    assert s.configured_regions() == []


def test_precedence_cli_env_file(tmp_path):
    write_env(tmp_path, "specified_idc=file-idc\nSPECIFIED_AGENT_ID=from-file\nELKEID_COMPRESSION=gzip\n")
    s = S.load({}, {}, workdir=str(tmp_path))
    assert (s.idc, s.agent_id, s.compression) == ("file-idc", "from-file", "gzip")
    s = S.load({}, {"SPECIFIED_AGENT_ID": "from-env", "ELKEID_COMPRESSION": "none"},
               workdir=str(tmp_path))
    assert (s.agent_id, s.compression) == ("from-env", "none")
    s = S.load({"agent_id": "from-cli", "compression": "auto"},
               {"SPECIFIED_AGENT_ID": "from-env"}, workdir=str(tmp_path))
    assert (s.agent_id, s.compression) == ("from-cli", "auto")


def test_regions(tmp_path):
    write_env(tmp_path, "ELKEID_SERVER=10.0.0.1:6751\nELKEID_PUBLIC_SERVER_EU=1.2.3.4:443\n"
                        "ELKEID_SERVICE_DISCOVERY_EU=10.9.9.9:8088\nspecified_region=eu\n")
    s = S.load({}, {"ELKEID_SERVER_NAME": "x.elkeid.com"}, workdir=str(tmp_path))
    assert s.region == "eu"
    assert [k for k, _m, _a in s.endpoints.ordered()] == ["service_discovery", "public_server"]
    assert s.configured_regions() == ["default", "eu"]
    assert s.server_name == "x.elkeid.com"
    s = S.load({"server": "127.0.0.1:9"}, {}, workdir=str(tmp_path))
    assert s.regions["default"].server == "127.0.0.1:9"


@pytest.mark.parametrize("cli,env,needle", [
    ({"server": "nohost"}, {}, "--server must be HOST:PORT"),
    ({"server": "h:70000"}, {}, "HOST:PORT"),
    ({"compression": "snappy"}, {}, "compression must be one of none|gzip|auto"),
    ({"heartbeat_interval": "often"}, {}, "heartbeat interval must be a number"),
    ({"heartbeat_interval": "0"}, {}, "between"),
    ({}, {"ELKEID_HEARTBEAT_INTERVAL": "nan"}, "from environment ELKEID_HEARTBEAT_INTERVAL"),
    ({}, {"service_type": "upstart"}, "service_type must be one of"),
    ({}, {"ELKEID_SERVER_EU": "bad value"}, "ELKEID_SERVER_EU must be HOST:PORT"),
    ({"agent_id": "a b"}, {}, "bad agent id"),
    ({}, {"ELKEID_PLUGIN_BACKOFF": "0,,10"}, "plugin backoff must be 1-32"),
    ({}, {"ELKEID_PLUGIN_BACKOFF": "0,-1"}, "from environment ELKEID_PLUGIN_BACKOFF"),
    ({}, {"ELKEID_PLUGIN_MAX_FAILURES": "0"}, "plugin max failures must be between"),
    ({}, {"ELKEID_PLUGIN_CPU_LIMIT_PERCENT": "half"}, "plugin CPU limit percent must be a number"),
    ({}, {"ELKEID_PLUGIN_RSS_LIMIT_MB": "1.5"}, "plugin RSS limit MB must be a number"),
    ({}, {"ELKEID_SPOOL_MAX_MB": "-1"}, "spool max MB must be between 0 and"),
    ({"spool_max_mb": "lots"}, {}, "got 'lots' (from command line --spool-max-mb)"),
    ({}, {"ELKEID_RECONNECT_MAX_DELAY": "0"}, "reconnect max delay must be between"),
])
def test_bad_values_name_the_setting(tmp_path, cli, env, needle):
    with pytest.raises(ConfigError) as e:
        S.load(cli, env, workdir=str(tmp_path))
    assert needle in str(e.value)


def test_env_file_bad_lines_are_reported_not_fatal(tmp_path):
    write_env(tmp_path, "# comment\n\nnot a pair\n1bad=x\nspecified_idc=\"quoted idc\"\n"
                        "export service_type=sysvinit\nunterminated='x\nspecified_region=eu\n")
    s = S.load({}, {}, workdir=str(tmp_path))
    assert s.idc == "quoted idc"
    assert s.service_type == "sysvinit"
    assert s.region == "eu"
    assert [n for n, _ in s.env_file_problems] == [3, 4, 7]


def test_env_file_binary_garbage(tmp_path):
    (tmp_path / "specified_env").write_bytes(b"\xff\xfe\x00garbage\nspecified_idc=ok\n")
    s = S.load({}, {}, workdir=str(tmp_path))
    assert s.idc == "ok"
    assert s.env_file_problems


def test_unreadable_env_file_is_a_problem_not_a_crash(tmp_path):
    (tmp_path / "specified_env").mkdir()
    s = S.load({}, {}, workdir=str(tmp_path))
    assert s.env_file_problems and "cannot read" in s.env_file_problems[0][1]


def test_write_env_file_roundtrip(tmp_path):
    write_env(tmp_path, "service_type=systemd\nspecified_idc=a\n")
    S.write_env_file(str(tmp_path), {"specified_idc": "b", "specified_region": "eu",
                                     "service_type": None})
    values, problems = S.read_env_file(str(tmp_path / "specified_env"))
    assert values == {"specified_idc": "b", "specified_region": "eu"} and not problems
    assert oct(os.stat(tmp_path / "specified_env").st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError):
        S.write_env_file(str(tmp_path), {"specified_idc": "a\nb"})


def test_plugin_policy_settings_reach_the_supervisor_policy(tmp_path):
    from elkeid_agent.plugins.policy import Policy
    write_env(tmp_path, "ELKEID_PLUGIN_BACKOFF=0,5\nELKEID_PLUGIN_RSS_LIMIT_MB=300\n"
                        "ELKEID_PLUGIN_CPU_LIMIT_PERCENT=25\n")
    s = S.load({}, {"ELKEID_PLUGIN_MAX_FAILURES": "3", "ELKEID_PLUGIN_LIMIT_WINDOW": "30",
                    "ELKEID_PLUGIN_HEALTHY_RESET": "120", "ELKEID_PLUGIN_STOP_TIMEOUT": "2.5",
                    "ELKEID_PLUGIN_CPU_LIMIT_PERCENT": "150"}, workdir=str(tmp_path))
    policy = Policy.from_overrides(**s.plugin_policy)
    assert policy.backoff == (0.0, 5.0)
    assert policy.rss_limit == 300 * 1024 * 1024
    assert policy.cpu_limit == 1.5          # environment beats specified_env
    assert (policy.max_failures, policy.limit_window) == (3, 30.0)
    assert (policy.healthy_reset, policy.stop_timeout) == (120.0, 2.5)
    assert S.public_view(s)["plugin_policy"]["backoff"] == [0.0, 5.0]
    # Unset knobs keep the defaults of docs/protocol.md section 9.
    assert Policy.from_overrides(**S.load({}, {}, workdir=str(tmp_path / "x")).plugin_policy) \
        == Policy()


def test_dial_timeout_setting(tmp_path):
    assert S.load({}, {}, workdir=str(tmp_path)).dial_timeout == 15
    assert S.load({}, {"ELKEID_DIAL_TIMEOUT": "1.5"}, workdir=str(tmp_path)).dial_timeout == 1.5
    assert S.load({"dial_timeout": "2"}, {}, workdir=str(tmp_path)).dial_timeout == 2
    with pytest.raises(ConfigError, match="dial timeout must be between"):
        S.load({}, {"ELKEID_DIAL_TIMEOUT": "0"}, workdir=str(tmp_path))


def test_tls_flags_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    from elkeid_agent import cli
    monkeypatch.chdir(tmp_path)
    s = S.load(cli._cwd_paths({"ca": "certs/ca.crt", "cert": None}),
               {"ELKEID_CERT": "mine/client.crt"}, workdir=str(tmp_path / "wd"))
    assert s.path(s.ca) == str(tmp_path / "certs/ca.crt")
    assert s.path(s.cert) == str(tmp_path / "wd/mine/client.crt")  # environment: the workdir


def test_spool_settings(tmp_path):
    s = S.load({}, {}, workdir=str(tmp_path))
    assert (s.spool_path(), s.spool_max_mb) == (str(tmp_path / "spool"), 1024)
    assert s.reconnect_max_delay == 10
    s = S.load({}, {"ELKEID_SPOOL_DIR": "elsewhere", "ELKEID_SPOOL_MAX_MB": "0",
                    "ELKEID_RECONNECT_MAX_DELAY": "3"}, workdir=str(tmp_path))
    assert (s.spool_path(), s.spool_max_mb, s.reconnect_max_delay) == (
        str(tmp_path / "elsewhere"), 0, 3)
    s = S.load({"spool_dir": "/var/spool/elkeid", "spool_max_mb": "64"},
               {"ELKEID_SPOOL_DIR": "ignored"}, workdir=str(tmp_path))
    assert (s.spool_path(), s.spool_max_mb) == ("/var/spool/elkeid", 64)
