"""services.heartbeat: the heartbeat message and its line framing."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from elkeid_agent.services import heartbeat as hb

GOOD = {"agent_id": "svc-1", "pid": 1234, "status": "running", "cpu": 5.0,
        "memory": 102400, "timestamp": "2025-12-05T10:00:00Z"}


def test_plain_json_and_json_rpc_forms():
    h = hb.parse(json.dumps(GOOD).encode())
    assert (h.agent_id, h.pid, h.status, h.cpu, h.memory) == ("svc-1", 1234, "running", 5.0,
                                                             102400)
    assert hb.rpc_reply(h) == b""
    call = {"jsonrpc": "2.0", "method": "heartbeat", "params": GOOD, "id": 7}
    h = hb.parse(json.dumps(call))
    assert h.rpc and h.rpc_id == 7 and h.agent_id == "svc-1"
    assert json.loads(hb.rpc_reply(h)) == {"jsonrpc": "2.0", "id": 7,
                                           "result": {"message": "heartbeat received"}}
    notification = dict(call)
    del notification["id"]
    assert hb.rpc_reply(hb.parse(json.dumps(notification))) == b""
    minimal = {k: GOOD[k] for k in ("agent_id", "pid", "status", "timestamp")}
    assert hb.parse(json.dumps(minimal)).cpu is None
    assert hb.parse(json.dumps(dict(minimal, timestamp="2025-12-05T10:00:00.5+08:00")))


@pytest.mark.parametrize("change,reason", [
    ({"agent_id": ""}, "bad_field"), ({"agent_id": 5}, "bad_field"),
    ({"pid": "1"}, "bad_field"), ({"pid": 0}, "bad_field"), ({"pid": True}, "bad_field"),
    ({"pid": 2 ** 40}, "bad_field"), ({"status": "fine"}, "bad_field"),
    ({"timestamp": "yesterday"}, "bad_field"), ({"timestamp": 1700000000}, "bad_field"),
    ({"cpu": -1}, "bad_field"), ({"cpu": "high"}, "bad_field"),
    ({"memory": 1.5}, "bad_field"), ({"memory": -5}, "bad_field"),
])
def test_each_bad_field(change, reason):
    with pytest.raises(hb.HeartbeatError) as e:
        hb.parse(json.dumps(dict(GOOD, **change)))
    assert e.value.reason == reason


@pytest.mark.parametrize("data,reason", [
    (b"\xff\xfe", "not_utf8"), (b"{", "not_json"), (b"[1, 2]", "bad_shape"),
    (b'{"cpu": NaN}', "not_json"), (b"[" * 100000 + b"]" * 100000, "not_json"),
    (b'{"jsonrpc": "1.0", "method": "heartbeat"}', "bad_rpc"),
    (b'{"jsonrpc": "2.0", "method": "shutdown", "params": {}}', "bad_rpc"),
    (b'{"jsonrpc": "2.0", "method": "heartbeat", "params": {}, "id": [1]}', "bad_rpc"),
])
def test_garbage_is_refused_with_a_reason(data, reason):
    with pytest.raises(hb.HeartbeatError) as e:
        hb.parse(data)
    assert e.value.reason == reason


def test_line_splitter_bounds_lines_and_counts_what_it_drops():
    s = hb.LineSplitter(max_line=10)
    assert s.feed(b"abc\nde") == ([b"abc"], 0)
    assert s.feed(b"f\n\n  \n") == ([b"def"], 0)
    # 25 bytes without a newline: dropped once, through its newline.
    assert s.feed(b"x" * 25) == ([], 1)
    assert s.feed(b"y" * 25) == ([], 0)
    assert s.feed(b"zz\nok\n") == ([b"ok"], 0)
    assert s.feed(b"0123456789A\nfine\n") == ([b"fine"], 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_heartbeat_error(data):
    try:
        hb.parse(data)
    except hb.HeartbeatError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=20))
def test_splitter_never_returns_a_line_over_the_limit_or_with_a_newline(chunks):
    s = hb.LineSplitter(max_line=16)
    for c in chunks:
        lines, dropped = s.feed(c)
        assert dropped >= 0
        assert all(len(line) <= 16 and b"\n" not in line for line in lines)
