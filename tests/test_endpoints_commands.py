"""Endpoint choice and command decisions (sans-I/O), and the service
discovery lookup against real loopback peers that break HTTP."""

import json

import pytest

from elkeid_agent.control import commands
from elkeid_agent.transport import endpoints
from elkeid_agent.errors import ServerFault
from elkeid_agent.metrics import Registry
from elkeid_agent.pb import grpc_pb2 as pb
from elkeid_agent.settings import Endpoints
from rawserver import DEEP_JSON, RawServer


def sd(data, code=0):
    return json.dumps({"code": code, "data": data, "msg": ""}).encode()


def test_sd_reply_sorted_by_weight():
    body = sd([{"ip": "10.0.0.1", "port": 6751, "weight": 1},
               {"ip": "10.0.0.2", "port": 6751, "weight": 5},
               {"ip": "fd00::1", "port": 6751, "weight": 1}])
    assert endpoints.parse_sd_reply(body) == ["10.0.0.2:6751", "10.0.0.1:6751", "[fd00::1]:6751"]


@pytest.mark.parametrize("body,needle", [
    (b"<html>", "not JSON"),
    (b"[]", "not a JSON object"),
    (sd([], code=1), "code 1"),
    (sd([]), "no servers"),
    (json.dumps({"code": 0}).encode(), "no servers"),
    (sd([{"ip": "10.0.0.1", "port": "6751"}, {"ip": 5, "port": 1}, {"ip": "x y", "port": 1},
         {"ip": "10.0.0.1", "port": 0}, "str"]), "none usable"),
    (b"\xff\xfe", "not JSON"),
])
def test_sd_garbage_is_a_server_fault(body, needle):
    with pytest.raises(ServerFault) as e:
        endpoints.parse_sd_reply(body)
    assert needle in str(e.value)


@pytest.mark.parametrize("body,reason", [
    (DEEP_JSON, "too_deep"),
    (b'{"code": 0, "data": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "too_deep"),
    (b'{"code": ' + b"9" * 5000 + b"}", "not_json"),  # int() digit limit
    (b'{"code": 0, "data": [{"ip": "10.0.0.1", "port": 1, "weight": NaN}]}', "none_usable"),
    (b'{"code": 0, "data": [{"ip": "10.0.0.1", "port": 1, "weight": 1e999}]}', "none_usable"),
    (b'{"code": 0, "data": [{"ip": "10.0.0.1", "port": 1e999}, {"ip": ["x"], "port": 1},'
     b' {"ip": "10.0.0.1", "port": 99999999999999999999999}, {"ip": "10.0.0.1", "port": true}]}',
     "none_usable"),
    (b'{"code": [], "msg": {}}', "code"),
    (b'{"code": 0, "data": {"ip": "10.0.0.1"}}', "no_servers"),
    (b"123", "bad_shape"),
    (None, "not_json"),
])
def test_sd_pathological_replies_have_a_reason(body, reason):
    with pytest.raises(ServerFault) as e:
        endpoints.parse_sd_reply(body)
    assert getattr(e.value, "reason", None) == reason, e.value


def test_sd_huge_weight_integer_still_sorts():
    body = sd([{"ip": "10.0.0.1", "port": 1, "weight": 10 ** 300},
               {"ip": "10.0.0.2", "port": 1, "weight": 2}])
    assert endpoints.parse_sd_reply(body) == ["10.0.0.1:1", "10.0.0.2:1"]


def test_sd_unreachable_is_a_server_fault():
    with pytest.raises(ServerFault):
        endpoints.fetch_sd("127.0.0.1:1", timeout=2)


@pytest.mark.parametrize("reply,reason", [
    ("garbage", "bad_http"), ("midbody", "bad_http"), ("deep", "too_deep"),
    (b"", "bad_http"),  # accepts, reads the request, closes: RemoteDisconnected
])
def test_sd_broken_http_peer_is_a_server_fault(reply, reason):
    srv = RawServer(reply)
    try:
        with pytest.raises(ServerFault) as e:
            endpoints.parse_sd_reply(endpoints.fetch_sd(srv.address, timeout=10))
        assert getattr(e.value, "reason", None) == reason, e.value
    finally:
        srv.close()


def test_plan_order_and_compression():
    eps = Endpoints(service_discovery="127.0.0.1:1", server="127.0.0.1:2", public_server="127.0.0.1:3")
    assert endpoints.plan(eps, ["127.0.0.1:9"]) == [
        ("sd", "127.0.0.1:9"), ("private", "127.0.0.1:2"), ("public", "127.0.0.1:3")]
    assert endpoints.compression_for("auto", "public") == "gzip"
    assert endpoints.compression_for("auto", "private") == "none"
    assert endpoints.compression_for("auto", "sd") == "none"
    assert endpoints.compression_for("gzip", "sd") == "gzip"


def test_backoff_ceiling_doubles_to_the_cap_and_resets():
    b = endpoints.Backoff(5, 60, random=lambda: 1.0)
    assert [b.failed() for _ in range(6)] == [5, 10, 20, 40, 60, 60]
    b.connected()
    assert b.failed() == 5
    assert b.after_lost_stream() == 5


def test_backoff_is_full_jitter_below_the_ceiling():
    import random
    rng = random.Random(7)
    b = endpoints.Backoff(5, 10, random=rng.random)
    delays = [b.failed() for _ in range(2000)]
    # Uniform below the ceiling: never above the cap, spread over all of it.
    assert max(delays) < 10 and min(delays) >= 0
    assert sum(d < 2 for d in delays[10:]) > 100 and sum(d > 8 for d in delays[10:]) > 100
    lost = [b.after_lost_stream() for _ in range(500)]
    assert max(lost) < 5 and min(lost) < 1


def cmd(**kw):
    return pb.Command(**kw).SerializeToString()


def test_decide_task_routes():
    t = pb.Task(data_type=1060, object_name="elkeid-agent", token="t1")
    assert isinstance(commands.decide(cmd(task=t)), commands.AgentTask)
    t = pb.Task(data_type=1234, object_name="elkeid-agent", token="t2")
    d = commands.decide(cmd(task=t))
    assert d == commands.Invalid("t2", "unknown agent task data_type 1234")
    t = pb.Task(data_type=6000, object_name="collector", token="t3")
    assert commands.decide(cmd(task=t)).task.object_name == "collector"
    assert isinstance(commands.decide(cmd(task=pb.Task(token="t4"))), commands.Invalid)


def test_decide_configs():
    cfgs = [pb.Config(name="elkeid-agent", version="2"), pb.Config(name="a", version="1"),
            pb.Config(name="a", version="2"), pb.Config(name="b")]
    d = commands.decide(cmd(configs=cfgs))
    assert d.agent.version == "2"
    assert [(c.name, c.version) for c in d.plugins] == [("a", "2"), ("b", "")]
    # Task wins over configs; an empty Command is an empty desired state.
    d = commands.decide(cmd(task=pb.Task(object_name="a"), configs=cfgs))
    assert isinstance(d, commands.PluginTask)
    assert commands.decide(b"") == commands.Configs(None, [])


@pytest.mark.parametrize("raw", [b"\x12\x05abc", b"\xff\xff\xff", b"\x12\x03\x12\x01\xc3"])
def test_malformed_command(raw):
    assert isinstance(commands.decide(raw), commands.Invalid)


def test_dispatcher_never_raises_and_reports_tokens():
    failures = []
    m = Registry()

    def boom(_):
        raise RuntimeError("handler bug")

    d = commands.Dispatcher(m, lambda tok, msg: failures.append((tok, msg)),
                            on_configs=boom, on_agent_task=boom, on_plugin_task=boom)
    d(b"\xff\xff")
    d(cmd(task=pb.Task(data_type=7, object_name="elkeid-agent", token="tok")))
    d(cmd(task=pb.Task(object_name="p", token="tok2")))
    d(cmd())
    assert failures[0] == ("tok", "unknown agent task data_type 7")
    assert failures[1][0] == "tok2" and "handler bug" in failures[1][1]
    assert m.get("commands_rejected", reason="invalid") == 2
    assert m.get("commands_rejected", reason="handler_error") == 2
