import asyncio
import gzip
import json
import logging
import os
import threading

import pytest

from elkeid_agent.runtime import logs
from elkeid_agent import wire
from elkeid_agent.errors import LocalFault
from elkeid_agent.metrics import Registry


def _logger(name):
    log = logging.getLogger("elkeid_test." + name)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    return log


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def setup(tmp_path):
    handles = []

    def make(name, **kw):
        h = logs.setup_logging(str(tmp_path), Registry(), logger_name="elkeid_test." + name, **kw)
        h.logger.propagate = False
        handles.append(h)
        return h

    yield make
    for h in handles:
        h.close()


def test_json_lines_match_the_go_layout(setup, tmp_path):
    h = setup("json")
    h.logger.debug("not written at info level")
    line_no = _current_line() + 1
    h.logger.info("plugin %s started", "collector", extra={"fields": {"pid": 42, "ok": True}})
    h.file_handler.flush()
    (obj,) = _lines(tmp_path / "log" / "elkeid-agent.log")
    assert obj["level"] == "info"
    assert obj["timestamp"].isdigit()
    assert obj["source"] == "tests/test_logs.py:%d" % line_no
    assert obj["msg"] == "plugin collector started"
    assert obj["pid"] == 42 and obj["ok"] is True
    assert list(obj)[:4] == ["level", "timestamp", "source", "msg"]


def _current_line():
    import inspect
    return inspect.currentframe().f_back.f_lineno


def test_reserved_fields_exceptions_and_odd_values(setup, tmp_path):
    h = setup("odd")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        h.logger.exception("failed", extra={"fields": {"msg": "shadow", "path": tmp_path}})
    h.logger.warning("bad format %d", "not-a-number")
    h.file_handler.flush()
    first, second = _lines(tmp_path / "log" / "elkeid-agent.log")
    assert first["level"] == "error"
    assert first["msg"] == "failed"
    assert first["fields.msg"] == "shadow"
    assert first["path"] == str(tmp_path)
    assert "RuntimeError: boom" in first["error"]
    assert second["level"] == "warn"
    assert "bad format" in second["msg"]


def test_rotation_keeps_gzip_backups_in_order(setup, tmp_path):
    h = setup("rotate", max_bytes=2000, backups=3)
    for i in range(200):
        h.logger.info("line", extra={"fields": {"seq": i}})
    h.file_handler.flush()
    assert h.file_handler.drain(30)
    log_dir = tmp_path / "log"
    names = sorted(os.listdir(log_dir))
    assert names == ["elkeid-agent.log", "elkeid-agent.log.1.gz",
                     "elkeid-agent.log.2.gz", "elkeid-agent.log.3.gz"]
    seqs = {}
    for name in names:
        path = log_dir / name
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            seqs[name] = [json.loads(line)["seq"] for line in f]
        assert seqs[name], name
    # Newest in the live file, then .1.gz, .2.gz, .3.gz: strictly older.
    chain = [seqs["elkeid-agent.log"], seqs["elkeid-agent.log.1.gz"],
             seqs["elkeid-agent.log.2.gz"], seqs["elkeid-agent.log.3.gz"]]
    for newer, older in zip(chain, chain[1:]):
        assert min(newer) == max(older) + 1
    assert chain[0][-1] == 199
    assert os.path.getsize(log_dir / "elkeid-agent.log") <= 2000
    assert h.file_handler.metrics.get("log_rotations") >= 3


def test_failed_compression_is_counted_and_logging_goes_on(setup, tmp_path):
    (tmp_path / "log").mkdir()
    # A directory where the temporary .gz would be written makes it fail.
    (tmp_path / "log" / "elkeid-agent.log.1.gz.tmp").mkdir()
    h = setup("rotfail", max_bytes=500, backups=2)
    for i in range(30):
        h.logger.info("line", extra={"fields": {"seq": i}})
    h.file_handler.flush()
    assert h.file_handler.drain(30)
    assert h.file_handler.metrics.get("log_rotate_errors") >= 1
    assert not [n for n in os.listdir(tmp_path / "log") if ".rotated." in n]
    last = _lines(tmp_path / "log" / "elkeid-agent.log")[-1]
    assert last["seq"] == 29
    assert os.path.getsize(tmp_path / "log" / "elkeid-agent.log") <= 500


def test_rotation_never_holds_the_loop_and_loses_no_line(tmp_path):
    """gzip through a seam that blocks until released: while it is held,
    the loop that logs (and so rotates) keeps running its timers."""
    release = threading.Event()
    compressing = threading.Event()

    def slow_gzip(source, dest):
        compressing.set()
        release.wait(60)
        logs._gzip_file(source, dest)

    metrics = Registry()
    log = _logger("slowrot")
    handler = logs.GzipRotatingFileHandler(str(tmp_path / "agent.log"), 1000, 10, metrics,
                                           compress=slow_gzip)
    handler.setFormatter(logs.JSONFormatter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    async def main():
        loop = asyncio.get_running_loop()
        ticks = []
        timer = loop.call_later(0.01, lambda: None)

        def tick():
            nonlocal timer
            ticks.append(loop.time())
            timer = loop.call_later(0.01, tick)
        tick()
        seq = 0
        while not compressing.is_set():     # logging on the loop thread rotates
            log.info("line", extra={"fields": {"seq": seq}})
            seq += 1
            await asyncio.sleep(0)
        # The rotated file is still being compressed; the loop logs on and
        # its timer fires again and again meanwhile.
        seen = len(ticks)
        deadline = loop.time() + 30
        while len(ticks) < seen + 5 and loop.time() < deadline:
            log.info("line", extra={"fields": {"seq": seq}})
            seq += 1
            await asyncio.sleep(0.005)
        held = len(ticks) - seen
        release.set()
        timer.cancel()
        return seq, held

    try:
        seq, held = asyncio.run(main())
        assert held >= 5
        handler.flush()
        assert handler.drain(30)
    finally:
        release.set()
        log.removeHandler(handler)
        handler.close()
    seen = []
    names = sorted(os.listdir(tmp_path))
    assert not [n for n in names if ".rotated." in n or n.endswith(".tmp")], names
    for name in names:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(tmp_path / name, "rt", encoding="utf-8") as f:
            seen.extend(json.loads(line)["seq"] for line in f)
    # Every line written since the oldest kept backup is there exactly once.
    assert sorted(seen) == list(range(min(seen), seq))
    assert min(seen) == 0 or len([n for n in names if n.endswith(".gz")]) == 10


def test_rotated_files_left_by_a_crash_are_compressed_at_start(tmp_path):
    (tmp_path / "agent.log.rotated.3").write_text('{"seq": 1}\n')
    metrics = Registry()
    handler = logs.GzipRotatingFileHandler(str(tmp_path / "agent.log"), 1000, 5, metrics)
    try:
        assert handler.drain(30)
    finally:
        handler.close()
    with gzip.open(tmp_path / "agent.log.1.gz", "rt") as f:
        assert json.loads(f.read())["seq"] == 1
    assert not (tmp_path / "agent.log.rotated.3").exists()


def test_unwritable_log_dir_is_a_local_fault(tmp_path):
    (tmp_path / "log").write_text("a file where the directory should be")
    with pytest.raises(LocalFault, match="cannot write the log file"):
        logs.setup_logging(str(tmp_path), Registry())


def test_console_output_and_close_restores_logger(setup, tmp_path, capsys):
    log = logging.getLogger("elkeid_test.console")
    log.setLevel(logging.WARNING)
    h = setup("console", console=True)
    assert log.level == logging.INFO
    h.logger.info("hello", extra={"fields": {"name": "x", "ratio": 0.5}})
    err = capsys.readouterr().err
    assert "INFO" in err and "hello" in err and "name=x" in err and "ratio=0.50000000" in err
    h.close()
    assert log.level == logging.WARNING
    assert log.handlers == []
    log.info("after close")
    assert "after close" not in capsys.readouterr().err


# ------------------------------------------------------------ remote 1010

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _remote(name, per_minute=60, sink=None, **kw):
    metrics = Registry()
    sent = []
    clock = Clock()
    handler = logs.RemoteLogHandler(sink or sent.append, metrics, per_minute=per_minute,
                                    clock=clock, wall=lambda: 1700000000, **kw)
    log = _logger(name)
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    return log, handler, metrics, sent, clock


def test_only_errors_become_1010_with_string_fields():
    log, _, metrics, sent, _ = _remote("levels")
    log.info("info is local only")
    log.warning("so is a warning")
    log.error("disk %s full", "/var", extra={"fields": {"free": 0, "ratio": 0.25, "level": "x"}})
    log.critical("fatal")
    assert len(sent) == 2
    data_type, ts, fields = wire.decode_record(sent[0])
    assert data_type == 1010 and ts > 0
    assert fields["level"] == "error"
    assert fields["msg"] == "disk /var full"
    assert fields["source"].startswith("tests/test_logs.py:")
    assert fields["free"] == "0" and fields["ratio"] == "0.25000000"
    assert fields["fields.level"] == "x"
    assert wire.decode_record(sent[1])[2]["level"] == "fatal"
    assert metrics.get("log_remote_sent") == 2


def test_rate_limit_summarizes_what_was_suppressed():
    log, _, metrics, sent, clock = _remote("rate", per_minute=3)
    for i in range(5):
        log.error("storm %d", i)
    assert [wire.decode_record(b)[2]["msg"] for b in sent] == ["storm 0", "storm 1", "storm 2"]
    assert metrics.get("log_remote_suppressed") == 2
    clock.now += 20  # 3 per minute: one token back after 20 s
    log.error("after the storm")
    log.error("no token left")
    assert len(sent) == 5
    summary = wire.decode_record(sent[3])
    assert summary[0] == 1010 and summary[1] == 1700000000
    assert summary[2]["suppressed"] == "2" and summary[2]["level"] == "warn"
    assert wire.decode_record(sent[4])[2]["msg"] == "after the storm"
    assert metrics.get("log_remote_suppressed") == 3
    clock.now += 3600  # the bucket never holds more than per_minute
    for i in range(10):
        log.error("burst %d", i)
    msgs = [wire.decode_record(b)[2]["msg"] for b in sent[5:]]
    assert msgs[1:] == ["burst 0", "burst 1", "burst 2"]
    assert "not sent" in msgs[0]


def test_zero_per_minute_sends_nothing():
    log, _, metrics, sent, _ = _remote("off", per_minute=0)
    log.error("x")
    assert sent == [] and metrics.get("log_remote_suppressed") == 1


def test_a_sink_that_logs_does_not_recurse():
    sent = []

    def sink(body):
        sent.append(body)
        log.error("the sink itself failed")

    log, _, metrics, _, _ = _remote("recurse", sink=sink)
    log.error("original")
    assert [wire.decode_record(b)[2]["msg"] for b in sent] == ["original"]
    assert metrics.get("log_remote_errors", reason="recursion") == 1


def test_a_raising_sink_is_counted_not_raised():
    def sink(body):
        raise RuntimeError("queue gone")

    log, _, metrics, _, _ = _remote("raise", sink=sink)
    log.error("x")
    log.error("y")
    assert metrics.get("log_remote_errors", reason="sink") == 2


def test_off_loop_threads_hand_over_to_the_loop():
    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        log, handler, _, _, _ = _remote(
            "threads", sink=lambda b: calls.append((threading.get_ident(), b)), loop=loop)
        loop_thread = threading.get_ident()
        log.error("on the loop")
        assert len(calls) == 1  # delivered synchronously on the loop thread
        await loop.run_in_executor(None, log.error, "from a worker")
        for _ in range(10):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.01)
        assert [t for t, _ in calls] == [loop_thread, loop_thread]
        assert wire.decode_record(calls[1][1])[2]["msg"] == "from a worker"
        return handler

    handler = asyncio.run(main())
    # The loop is closed now: logging from here must not raise.
    log = logging.getLogger("elkeid_test.threads")
    log.error("after the loop closed")
    assert handler.metrics.get("log_remote_errors", reason="loop_closed") == 1


def test_task_failure_record():
    body = logs.task_failure_record("tok-1", "no such plugin", now=1234)
    assert wire.decode_record(body) == (
        5100, 1234, {"token": "tok-1", "msg": "no such plugin", "status": "failed"})
