"""The Python plugin SDK against real pipes (in-process, no agent)."""

import logging
import os
import struct
import threading
import time

import pytest

from elkeid_agent import sdk, wire
from elkeid_agent.plugins.ingest import FrameDecoder, task_frame


class Pipes:
    """Three pipes standing in for fds 3, 4, 5."""

    def __init__(self):
        self.task_r, self.task_w = os.pipe()
        self.rec_r, self.rec_w = os.pipe()
        self.high_r, self.high_w = os.pipe()
        for fd in (self.rec_r, self.high_r):
            os.set_blocking(fd, False)

    def client(self, high=True, **kw):
        return sdk.Client(self.task_r, self.rec_w, self.high_w if high else None, **kw)

    @staticmethod
    def read(fd):
        out = b""
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                return out
            if not chunk:
                return out
            out += chunk

    def close_all(self):
        for fd in (self.task_r, self.task_w, self.rec_r, self.rec_w, self.high_r, self.high_w):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pipes():
    p = Pipes()
    yield p
    p.close_all()


def frames(data):
    bodies, err = FrameDecoder(1 << 24).feed(data)
    assert err is None
    return bodies


def test_send_record_writes_exactly_the_encoded_record(pipes):
    c = pipes.client(flusher=False)
    c.send_record(6000, {"a": "1", "n": 5}, timestamp=1700000000)
    assert pipes.read(pipes.rec_r) == b""  # buffered, like Go
    c.flush()
    data = pipes.read(pipes.rec_r)
    body = wire.encode_record(6000, 1700000000, {"a": "1", "n": "5"})
    assert data == struct.pack("<I", len(body)) + body
    assert wire.decode_record(frames(data)[0]) == (6000, 1700000000, {"a": "1", "n": "5"})


def test_default_timestamp_is_now(pipes):
    c = pipes.client(flusher=False)
    before = int(time.time())
    c.send_record(1, {})
    c.flush()
    _, ts, _ = wire.decode_record(frames(pipes.read(pipes.rec_r))[0])
    assert before <= ts <= int(time.time())


def test_buffer_flushes_itself_when_full(pipes):
    c = pipes.client(flusher=False, buffer_size=1000)
    body = wire.encode_record(1, 1, {"pad": "x" * 90})
    for _ in range(9):
        c.send_raw(body)
    assert pipes.read(pipes.rec_r) == b""
    c.send_raw(body)                                  # crosses 1000 bytes
    assert len(frames(pipes.read(pipes.rec_r))) == 10


def test_background_flusher(pipes):
    c = pipes.client(flush_interval=0.05)
    c.send_record(1, {"x": "y"}, 1)
    deadline = time.monotonic() + 10
    data = b""
    while not data and time.monotonic() < deadline:
        time.sleep(0.02)
        data = pipes.read(pipes.rec_r)
    assert frames(data) == [wire.encode_record(1, 1, {"x": "y"})]
    c.close()


def test_high_priority_goes_to_fd5_when_offered(pipes):
    c = pipes.client(flusher=False)
    assert c.has_high_priority_pipe
    c.send_record_high_priority(2, {"h": "1"}, 1)
    c.send_record(3, {"n": "1"}, 1)
    c.flush()
    assert frames(pipes.read(pipes.high_r)) == [wire.encode_record(2, 1, {"h": "1"})]
    assert frames(pipes.read(pipes.rec_r)) == [wire.encode_record(3, 1, {"n": "1"})]


def test_high_priority_falls_back_to_fd4(pipes):
    c = pipes.client(high=False, flusher=False)
    assert not c.has_high_priority_pipe
    c.send_record_high_priority(2, {}, 1)
    c.send_record(3, {}, 1)
    c.flush()
    assert [wire.decode_record(b)[0] for b in frames(pipes.read(pipes.rec_r))] == [2, 3]


def test_env_selects_fd5(monkeypatch):
    monkeypatch.setenv(sdk.HIGH_PRIORITY_ENV, "1")
    c = sdk.Client(flusher=False)
    assert c._high.fd == 5
    monkeypatch.setenv(sdk.HIGH_PRIORITY_ENV, "")
    assert not sdk.Client(flusher=False).has_high_priority_pipe


def test_receive_tasks_until_the_agent_closes_fd3(pipes):
    c = pipes.client(flusher=False)
    data = task_frame(9010, "p", "hello", "tok1") + task_frame(0, "", "", "")
    os.write(pipes.task_w, data[:7])
    got = []
    t = threading.Thread(target=lambda: got.extend(c.tasks()))
    t.start()
    os.write(pipes.task_w, data[7:])
    os.close(pipes.task_w)
    t.join(10)
    assert got == [sdk.Task(9010, "p", "hello", "tok1"), sdk.Task(0, "", "", "")]
    assert c.closed.is_set()
    # Records can still go out: the agent keeps reading while a plugin winds down.
    c.send_record(1, {}, 1)
    c.flush()
    assert len(frames(pipes.read(pipes.rec_r))) == 1


def test_corrupt_task_pipe(pipes):
    c = pipes.client(flusher=False)
    os.write(pipes.task_w, b"\xff\xff\xff\xff")
    with pytest.raises(sdk.ClientClosed, match="corrupt"):
        c.receive_task()
    assert c.closed.is_set()


def test_sends_fail_cleanly_when_the_agent_is_gone(pipes):
    c = pipes.client(flusher=False)
    os.close(pipes.rec_r)
    c.send_record(1, {}, 1)
    with pytest.raises(sdk.ClientClosed):
        c.flush()
    assert c.closed.is_set()
    with pytest.raises(sdk.ClientClosed):
        c.send_record(1, {}, 1)


def test_log_handler_emits_1011_like_elkeids_go_logger(pipes):
    c = pipes.client(flusher=False)
    logger = logging.getLogger("sdk-test")
    logger.propagate = False
    handler = c.log_handler(logging.WARNING)
    logger.addHandler(handler)
    try:
        logger.info("not sent")
        logger.warning("disk %s full", "/var", extra={"path": "/var", "pct": 99})
        try:
            raise ValueError("bad")
        except ValueError:
            logger.exception("crashed")
    finally:
        logger.removeHandler(handler)
    c.flush()
    recs = [wire.decode_record(b) for b in frames(pipes.read(pipes.rec_r))]
    assert [r[0] for r in recs] == [1011, 1011]
    warn = recs[0][2]
    assert warn["level"] == "warn" and warn["msg"] == "disk /var full"
    assert warn["source"].startswith("test_plugins_sdk.py:")
    assert warn["path"] == "/var" and warn["pct"] == "99" and warn["logger"] == "sdk-test"
    assert recs[0][1] > 0
    err = recs[1][2]
    assert err["level"] == "error" and "ValueError: bad" in err["stacktrace"]


def test_log_handler_samples_like_zap(pipes):
    c = pipes.client(flusher=False)
    now = [100.0]
    handler = c.log_handler(logging.INFO, clock=lambda: now[0])
    logger = logging.getLogger("sdk-sampling")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for _ in range(10):
            logger.error("same")
        logger.error("other")
        now[0] = 101.0
        logger.error("same")
    finally:
        logger.removeHandler(handler)
    c.flush()
    msgs = [wire.decode_record(b)[2]["msg"] for b in frames(pipes.read(pipes.rec_r))]
    assert msgs == ["same"] * 4 + ["other", "same"]
    assert handler.sampled_out == 6


def test_log_handler_never_raises_when_the_agent_is_gone(pipes):
    c = pipes.client(flusher=False, buffer_size=10)
    os.close(pipes.rec_r)
    handler = c.log_handler(logging.INFO)
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "m", (), None)
    handler.emit(record)
    handler.emit(record)


def test_json_formatter_keeps_native_types():
    record = logging.LogRecord("x", logging.INFO, "/a/b.py", 7, "hi %d", (3,), None)
    record.port = 8081
    import json
    out = json.loads(sdk.JsonFormatter().format(record))
    assert out["msg"] == "hi 3" and out["level"] == "info" and out["port"] == 8081
    assert out["source"] == "b.py:7" and out["ts"].endswith("Z")
