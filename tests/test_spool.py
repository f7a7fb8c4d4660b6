"""The disk spool (buffer/spool.py): the frame and segment format as pure
functions (property tests), then the file layer on real directories: order
across restarts, torn tails cut, either codec read by either build, the
quota, another version's segments, a full disk, an unwritable or vanished
directory, and the record queue on top of it."""

import asyncio
import logging
import os
import re
import shutil
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from elkeid_agent import wire
from elkeid_agent.buffer import spool as sp
from elkeid_agent.buffer.queue import AGENT, HIGH, NORMAL, SPOOLED, RecordQueue
from elkeid_agent.buffer.spool import (FRAME, CorruptFrame, InlineIO, MiB, SegmentError, Spool,
                                       decode_frame, encode_frame, encode_segment_header,
                                       get_codec, parse_segment_header, scan_segment)
from elkeid_agent.metrics import Registry
from elkeid_agent.state import AgentState

needs_snappy = pytest.mark.skipif(sp.SNAPPY is None, reason="python-snappy not installed")
CODECS = ["none", "zlib"] + (["snappy"] if sp.SNAPPY is not None else [])
records_st = st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=40)


def rec(i, pad=150, ts=None):
    return wire.encode_record(7400, 1700000000 + i if ts is None else ts,
                              {"seq": str(i), "pad": "p" * pad})


def seq_of(body):
    return int(wire.decode_record(body)[2]["seq"])


# ---------------------------------------------------------------- pure format

@settings(max_examples=150, deadline=None)
@given(records=records_st, codec=st.sampled_from(CODECS),
       times=st.tuples(st.integers(-2**40, 2**40), st.integers(-2**40, 2**40)))
def test_frame_round_trip(records, codec, times):
    c = get_codec(codec)
    data = encode_frame(records, c, 1234, times[0], times[1])
    h, out = decode_frame(data, c)
    assert out == records
    assert (h.count, h.first, h.last, h.sealed_ms, h.size) == (
        len(records), times[0], times[1], 1234, len(data))


@settings(max_examples=150, deadline=None)
@given(records=records_st, codec=st.sampled_from(CODECS), data=st.data())
def test_every_damaged_byte_is_caught(records, codec, data):
    c = get_codec(codec)
    frame = bytearray(encode_frame(records, c, 1, 2, 3))
    i = data.draw(st.integers(0, len(frame) - 1))
    frame[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptFrame):
        decode_frame(bytes(frame), c)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=3000), repeat=st.integers(1, 50))
def test_pure_python_snappy_reads_what_python_snappy_writes(data, repeat):
    if sp.SNAPPY is None:
        pytest.skip("python-snappy not installed")
    # Repetition makes the compressor emit overlapping copies.
    raw = data * repeat
    assert sp.snappy_decompress_py(sp.SNAPPY.compress(raw)) == raw


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=400))
def test_pure_python_snappy_refuses_garbage_without_crashing(data):
    try:
        sp.snappy_decompress_py(data)
    except CorruptFrame:
        pass


def segment_bytes(codec, batches):
    c = get_codec(codec)
    out = bytearray(encode_segment_header(codec))
    ends = []
    for batch in batches:
        out += encode_frame(batch, c)
        ends.append(len(out))
    return bytes(out), ends


def reader(buf):
    return lambda offset, n: buf[offset:offset + n]


def test_segment_scan_cuts_a_torn_tail_at_every_byte_of_the_last_frame():
    buf, ends = segment_bytes("zlib", [[rec(i) for i in range(j, j + 5)] for j in (0, 5, 10)])
    last_start = ends[-2]
    for cut in range(last_start + 1, len(buf)):
        for verify in (True, False):
            s = scan_segment(reader(buf[:cut]), cut, verify)
            assert [off for off, _h in s.frames] == [len(encode_segment_header("zlib")),
                                                     ends[0]]
            assert s.end == last_start and s.problem == "torn", (cut, verify)
    whole = scan_segment(reader(buf), len(buf), True)
    assert len(whole.frames) == 3 and whole.end == len(buf) and whole.problem is None


def test_segment_scan_with_verify_cuts_damaged_frames_at_the_end_only():
    buf, ends = segment_bytes("zlib", [[rec(1)], [rec(2)], [rec(3)]])
    bad = bytearray(buf)
    bad[ends[2] - 3] ^= 0xFF  # inside the last frame's payload: a tear
    s = scan_segment(reader(bytes(bad)), len(bad), True)
    assert len(s.frames) == 2 and s.end == ends[1] and s.problem == "crc"
    # Headers alone cannot see it; the read will (decode_frame's crc).
    assert len(scan_segment(reader(bytes(bad)), len(bad), False).frames) == 3
    bad = bytearray(buf)
    bad[ends[1] - 3] ^= 0xFF  # the middle one: damage, the last frame is kept
    s = scan_segment(reader(bytes(bad)), len(bad), True)
    assert len(s.frames) == 3 and s.end == len(buf) and s.problem is None


@pytest.mark.parametrize("header, reason", [
    (encode_segment_header("zlib", version=2), "version"),
    (encode_segment_header("lz4"), "codec"),
    (b"NOTSPOOL\x01\x04zlib\x00\x00\x00\x00", "magic"),
    (encode_segment_header("zlib")[:-1] + b"\x00", "header_crc"),
    (encode_segment_header("zlib")[:9], "truncated"),
])
def test_segment_headers_this_version_cannot_read(header, reason):
    with pytest.raises(SegmentError) as e:
        parse_segment_header(header)
    assert e.value.reason == reason


def test_cursor_round_trip_and_damage():
    good = sp.encode_cursor(12, 3456, 7)
    assert sp.parse_cursor(good) == (12, 3456, 7)
    for i in range(len(good) - 1):
        bad = bytearray(good)
        bad[i] ^= 0x01
        assert sp.parse_cursor(bytes(bad)) is None
    assert sp.parse_cursor(b"") is None and sp.parse_cursor(b"\xff" * 40) is None


# ---------------------------------------------------------------- the file layer

def make(tmp_path, max_mb=64, metrics=None, state=None, **kw):
    s = Spool(str(tmp_path / "spool"), max_mb * MiB, metrics or Registry(), state or AgentState(),
              io=InlineIO(), **kw)
    s.open_now()
    return s


def fill(s, seqs, **kw):
    for i in seqs:
        body = rec(i, **kw)
        assert s.spill((body,), len(body))


def drain(s, settle=True, max_records=4096, max_bytes=2 * MiB):
    out = []
    while s.pending():
        taken, mark = s.take(max_records, max_bytes)
        assert taken
        out.extend(taken)
        if settle:
            s.settled(mark)
    return out


def drain_queue(q, max_records):
    """The seqs of every record the queue gives out, batch after batch."""
    got = []
    while q.pending():
        got.extend(seq_of(b) for b in q.take_batch(max_records, 2 * MiB))
    return got


def test_records_come_back_in_order_after_a_restart(tmp_path):
    s = make(tmp_path)
    fill(s, range(5000))
    first, mark = s.take(1000, 10 * MiB)
    assert [seq_of(b) for b in first] == list(range(1000))
    s.settled(mark)
    second, mark2 = s.take(500, 10 * MiB)
    s.close_now()  # the second take was never settled: it must come back
    s2 = make(tmp_path)
    assert s2.pending() == 4000
    assert [seq_of(b) for b in drain(s2)] == list(range(1000, 5000))
    s2.close_now()
    s3 = make(tmp_path)
    assert s3.pending() == 0
    # Every settled segment is gone; only the new empty one remains.
    assert len([n for n in os.listdir(tmp_path / "spool") if n.endswith(".seg")]) == 1


def test_unread_rewinds_to_the_oldest_batch_that_went_back(tmp_path):
    s = make(tmp_path)
    fill(s, range(300))
    b1, m1 = s.take(100, MiB)
    b2, m2 = s.take(100, MiB)
    s.unread(m2)
    s.unread(m1)  # newest first, as the queue's requeue does
    assert s.pending() == 300
    assert [seq_of(b) for b in drain(s)] == list(range(300))


def test_a_reader_that_catches_up_takes_records_not_yet_written(tmp_path):
    s = make(tmp_path)
    fill(s, range(10))  # far less than a frame: still the tail
    taken, mark = s.take(100, MiB)
    assert [seq_of(b) for b in taken] == list(range(10))
    s.settled(mark)
    s.close_now()
    assert make(tmp_path).pending() == 0


def test_settled_positions_decide_what_a_restart_resends(tmp_path):
    s = make(tmp_path, frame_bytes=4096)
    fill(s, range(2000))
    for _ in range(5):
        taken, mark = s.take(137, MiB)
        s.settled(mark)
    unsettled, _mark = s.take(100, MiB)
    s.tick()
    s._sync()
    s.close_now()
    s2 = make(tmp_path, frame_bytes=4096)
    again = drain(s2)
    # Resent from the last settled record, mid-frame: nothing before it,
    # everything after it, the unsettled batch included.
    assert [seq_of(b) for b in again] == list(range(685, 2000))


@pytest.mark.parametrize("cut_from_end", range(1, FRAME.size + 40, 7))
def test_torn_tail_is_cut_and_counted_on_open(tmp_path, cut_from_end):
    m = Registry()
    s = make(tmp_path, frame_bytes=2000)
    fill(s, range(200))
    s.close_now()
    segs = sorted(p for p in (tmp_path / "spool").iterdir() if p.suffix == ".seg")
    newest = [p for p in segs if p.stat().st_size > 40][-1]
    frames = scan_segment(reader(newest.read_bytes()), newest.stat().st_size, True).frames
    last_off, last_h = frames[-1]
    size = newest.stat().st_size
    os.truncate(newest, size - cut_from_end)
    s2 = make(tmp_path, metrics=m, frame_bytes=2000)
    assert newest.stat().st_size == last_off
    assert m.get("spool_corrupt_frames", reason="torn") == 1
    assert m.get("spool_cut_bytes") == size - cut_from_end - last_off
    got = [seq_of(b) for b in drain(s2)]
    assert got == list(range(200 - last_h.count))


@pytest.mark.parametrize("which", ["oldest", "newest"])
def test_a_damaged_frame_is_dropped_and_counted_never_sent(tmp_path, which):
    m = Registry()
    opts = dict(max_mb=1, codec_name="none", frame_bytes=8000)
    s = make(tmp_path, **opts)
    fill(s, range(2000))
    s.close_now()
    segs = sorted(p for p in (tmp_path / "spool").iterdir() if p.stat().st_size > 40)
    assert len(segs) >= 2
    seg = segs[0] if which == "oldest" else segs[-1]
    before = sum(h.count for p in segs[:segs.index(seg)]
                 for _o, h in scan_segment(reader(p.read_bytes()), p.stat().st_size, False).frames)
    frames = scan_segment(reader(seg.read_bytes()), seg.stat().st_size, False).frames
    assert len(frames) >= 3
    # Damage inside, not at the end: the frames after it are kept.
    off, h = frames[1]
    data = bytearray(seg.read_bytes())
    data[off + FRAME.size + 5] ^= 0xFF
    seg.write_bytes(bytes(data))
    s2 = make(tmp_path, metrics=m, **opts)
    got = [seq_of(b) for b in drain(s2)]
    first_lost = before + frames[0][1].count
    lost = set(range(first_lost, first_lost + h.count))
    assert got == [i for i in range(2000) if i not in lost]
    assert m.get("spool_dropped_records", reason="corrupt") == h.count
    assert m.get("spool_corrupt_frames", reason="crc") == 1
    assert m.get("spool_cut_bytes") == 0


@pytest.mark.parametrize("writer, reader_has_snappy", [
    ("zlib", False), ("zlib", True), ("none", False),
    pytest.param("snappy", False, marks=needs_snappy), pytest.param("snappy", True, marks=needs_snappy)])
def test_either_build_reads_what_the_other_wrote(tmp_path, writer, reader_has_snappy):
    s = make(tmp_path, codec_name=writer, frame_bytes=3000)
    fill(s, range(400))
    s.close_now()
    seg = sorted((tmp_path / "spool").glob("*.seg"))[0]
    assert parse_segment_header(seg.read_bytes()[:64])[0] == writer
    # A build without python-snappy: the same code with no module to use.
    s2 = make(tmp_path, snappy_module=sp.SNAPPY if reader_has_snappy else None)
    assert s2.codec.name == ("snappy" if reader_has_snappy else "zlib")
    assert [seq_of(b) for b in drain(s2)] == list(range(400))


def test_past_the_quota_the_oldest_segments_go_counted_and_logged(tmp_path, caplog):
    m = Registry()
    s = make(tmp_path, max_mb=1, metrics=m, codec_name="none", frame_bytes=16 * 1024)
    assert s.quota == MiB and s.segment_bytes == 128 * 1024
    with caplog.at_level(logging.ERROR, logger="elkeid_agent.buffer"):
        fill(s, range(20000), ts=None)  # ~3.8 MB of records into a 1 MiB quota
        s.drops.flush()
    assert s.disk_bytes <= s.quota
    dropped = m.get("spool_dropped_records", reason="quota")
    assert dropped > 0
    got = [seq_of(b) for b in drain(s)]
    # The newest survive, in order, and what is missing is exactly what was counted.
    assert got == list(range(20000 - len(got), 20000))
    assert dropped == 20000 - len(got)
    assert logged_drops(caplog, "spool dropped", "quota") == dropped
    # The first line names the record time of seq 0, the oldest lost.
    assert "record times 2023-11-14T22:13:20Z to " in caplog.records[0].getMessage()


def test_quota_is_never_more_than_half_the_free_space(tmp_path):
    vfs = os.statvfs(str(tmp_path))
    free = vfs.f_bavail * vfs.f_frsize
    s = make(tmp_path, max_mb=1 << 22)
    assert abs(s.quota - free // 2) < 64 * MiB


def test_another_versions_segments_are_quarantined_and_the_agent_is_abnormal(tmp_path):
    d = tmp_path / "spool"
    d.mkdir()
    (d / "0000000000000001.seg").write_bytes(encode_segment_header("zlib", version=9) + b"x" * 500)
    (d / "0000000000000002.seg").write_bytes(encode_segment_header("lz4") + b"y" * 300)
    good, _ = segment_bytes("zlib", [[rec(i) for i in range(10)]])
    (d / "0000000000000003.seg").write_bytes(good)
    m, state = Registry(), AgentState()
    s = make(tmp_path, metrics=m, state=state)
    assert [seq_of(b) for b in drain(s)] == list(range(10))
    assert m.get("spool_quarantined_segments", reason="version") == 1
    assert m.get("spool_quarantined_segments", reason="codec") == 1
    assert sorted(os.listdir(d / "quarantine")) == ["0000000000000001.seg.version",
                                                    "0000000000000002.seg.codec"]
    assert state.state == "abnormal" and "quarantine" in state.reasons()[0]
    assert s.available  # the rest of the quota is still usable
    fill(s, range(5))
    assert len(drain(s)) == 5


def test_a_quarantine_filling_the_quota_leaves_memory_alone(tmp_path):
    d = tmp_path / "spool" / "quarantine"
    d.mkdir(parents=True)
    (d / "old.seg.version").write_bytes(b"z" * (2 * MiB))
    m, state = Registry(), AgentState()
    s = make(tmp_path, max_mb=2, metrics=m, state=state, frame_bytes=4096,
             retry_seconds=0.0)
    for i in range(100):  # the first frame finds no room
        s.spill((rec(i),), len(rec(i)))
    assert not s.available
    assert "no room left" in " ".join(state.reasons())
    q = RecordQueue(64 * 1024, m, spool=s, agent_reserve=0)
    for i in range(2000):
        q.put(rec(i))
    assert m.total("queue_dropped_records") > 0  # memory alone, drops counted
    shutil.rmtree(d)
    s.tick()
    assert s.available and state.state == "running"


def test_a_spool_dir_that_is_a_file_leaves_memory_alone_and_abnormal(tmp_path):
    (tmp_path / "spool").write_text("not a directory")
    m, state = Registry(), AgentState()
    s = make(tmp_path, metrics=m, state=state)
    assert not s.available
    assert state.state == "abnormal" and "spool" in state.keys()
    q = RecordQueue(64 * 1024, m, spool=s, agent_reserve=0)
    for i in range(2000):
        assert q.put(rec(i))
    assert m.total("queue_dropped_records") > 0
    assert m.get("spool_errors", op="open") == 1


def test_a_vanished_directory_stops_spooling_until_it_can_be_made_again(tmp_path):
    m, state = Registry(), AgentState()
    s = make(tmp_path, metrics=m, state=state, frame_bytes=4096, retry_seconds=0.0)
    fill(s, range(100))
    shutil.rmtree(tmp_path / "spool")
    s._sync()
    assert not s.available and "vanished" in state.reasons()[0]
    s.tick()  # the retry makes the directory again
    assert s.available and state.state == "running"
    fill(s, range(100, 150))
    got = [seq_of(b) for b in drain(s)]
    # What was on disk is gone with the directory (counted); nothing else.
    assert got[-50:] == list(range(100, 150))
    assert m.get("spool_dropped_records", reason="unreadable") == 100 - (len(got) - 50)


def test_an_idle_spool_skips_the_sync_but_still_checks_its_directory(tmp_path):
    """The tick syncs what changed within the fsync interval; with nothing
    changed it leaves the I/O thread alone except for the directory check
    every IDLE_CHECK_SECONDS, which still sees the directory vanish."""
    now = [1000.0]
    state = AgentState()
    s = make(tmp_path, state=state, frame_bytes=4096, clock=lambda: now[0])
    syncs = []
    real_sync = s._files.sync
    s._files.sync = lambda cursor: (syncs.append(now[0]), real_sync(cursor))[1]
    fill(s, range(100))
    now[0] += sp.FSYNC_INTERVAL
    s.tick()
    assert syncs == [now[0]]  # records were spilled: synced at the interval
    for _ in range(int(sp.IDLE_CHECK_SECONDS / sp.FSYNC_INTERVAL) - 1):
        now[0] += sp.FSYNC_INTERVAL
        s.tick()
    assert len(syncs) == 1  # nothing written or settled since
    taken, mark = s.take(10, MiB)
    s.settled(mark)
    now[0] += sp.FSYNC_INTERVAL
    s.tick()
    assert len(syncs) == 2  # the cursor moved
    shutil.rmtree(tmp_path / "spool")
    now[0] += sp.IDLE_CHECK_SECONDS
    s.tick()
    assert len(syncs) == 3
    assert not s.available and "vanished" in state.reasons()[0]


def mount(*args):
    try:
        return subprocess.run(["mount"] + list(args), capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.fixture
def tiny_fs(tmp_path):
    where = tmp_path / "tiny"
    where.mkdir()
    if not mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", "-l", str(where)])


def test_a_full_disk_stops_spooling_keeps_what_was_taken_and_recovers(tiny_fs):
    m, state = Registry(), AgentState()
    s = Spool(str(tiny_fs / "spool"), 64 * MiB, m, state, io=InlineIO(), codec_name="none",
              frame_bytes=32 * 1024, retry_seconds=0.0, free_share=1.0)
    s.open_now()
    (tiny_fs / "filler").write_bytes(b"f" * (s.quota - 600 * 1024))  # the quota was set at open
    q = RecordQueue(256 * 1024, m, spool=s, agent_reserve=0)
    q.outage(True)
    accepted = [i for i in range(20000) if q.put(rec(i))]
    assert m.get("spool_errors", op="write") >= 1
    assert state.state == "abnormal" and "No space left" in state.reasons()[0]
    assert not s.available
    # Frames that failed to be written are still sent from memory; the
    # rest is counted as dropped by the memory queue.
    q.outage(False)
    got = drain_queue(q, 4096)
    assert got == sorted(got)
    assert len(got) + m.total("queue_dropped_records") == 20000 == len(accepted)
    os.unlink(tiny_fs / "filler")
    s.tick()
    assert s.available and state.state == "running"


@pytest.fixture
def read_only_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if not mount("--bind", str(d), str(d)) or not mount("-o", "remount,bind,ro", str(d)):
        subprocess.run(["umount", "-l", str(d)])
        pytest.skip("cannot make a read-only bind mount here (needs root)")
    yield d
    subprocess.run(["umount", "-l", str(d)])


def test_a_read_only_directory_is_abnormal_from_the_start(read_only_dir):
    m, state = Registry(), AgentState()
    s = Spool(str(read_only_dir), 64 * MiB, m, state, io=InlineIO())
    s.open_now()
    assert not s.available
    assert "Read-only file system" in state.reasons()[0]


# ---------------------------------------------------------------- the queue on the spool

def test_queue_overflow_goes_to_the_spool_and_comes_back_first_in_order(tmp_path):
    m = Registry()
    s = make(tmp_path, metrics=m)
    q = RecordQueue(64 * 1024, m, spool=s, agent_reserve=8 * 1024)
    for i in range(3000):
        assert q.put(rec(i))
    assert m.total("queue_dropped_records") == 0
    assert s.pending() > 0 and q.bytes <= 64 * 1024
    q.put_own(b"heartbeat")
    first = q.take_batch(100, MiB)
    # The agent's own record first, then the spool (the oldest plugin records).
    assert first[0] == b"heartbeat" and first.segments[:2] == ((AGENT, 1), (SPOOLED, 99))
    assert [seq_of(b) for b in first[1:]] + drain_queue(q, 700) == list(range(3000))


def test_during_an_outage_plugin_records_go_to_disk_and_heartbeats_stay_in_memory(tmp_path):
    m = Registry()
    s = make(tmp_path, metrics=m)
    q = RecordQueue(10 * MiB, m, spool=s)
    for i in range(100):
        q.put(rec(i), HIGH if i % 2 else NORMAL)
    q.outage(True)
    assert q.count == 0 and s.pending() == 100
    for i in range(100, 200):
        q.put(rec(i))
        q.put_own(rec(10000 + i))
    assert q.count == 100 and s.pending() == 200  # heartbeats only in memory
    q.outage(False)
    b = q.take_batch(4096, 10 * MiB)
    assert b.segments == ((AGENT, 100), (SPOOLED, 200))


def test_requeue_of_a_spooled_batch_rewinds_the_spool(tmp_path):
    m = Registry()
    s = make(tmp_path, metrics=m)
    q = RecordQueue(32 * 1024, m, spool=s, agent_reserve=0)
    for i in range(1000):
        q.put(rec(i))
    b1 = q.take_batch(50, MiB)
    b2 = q.take_batch(50, MiB)
    q.requeue(b2)
    q.requeue(b1)
    assert drain_queue(q, 333) == list(range(1000))


def test_stop_spool_reads_keeps_the_spool_for_the_next_start(tmp_path):
    m = Registry()
    s = make(tmp_path, metrics=m)
    q = RecordQueue(10 * MiB, m, spool=s)
    q.outage(True)
    for i in range(50):
        q.put(rec(i))
    q.put_own(b"own")
    q.stop_spool_reads()
    assert q.pending() == 1 and q.take_batch(10, MiB) == [b"own"]
    q.put(rec(50))
    assert q.save_to_spool() == 0  # already there: the outage sent it
    s.close_now()
    assert [seq_of(b) for b in drain(make(tmp_path))] == list(range(51))


def test_queue_drops_without_a_spool_are_logged_with_count_and_times(caplog):
    m = Registry()
    q = RecordQueue(2000, m, agent_reserve=0)
    with caplog.at_level(logging.ERROR, logger="elkeid_agent.buffer"):
        for i in range(100):
            q.put(rec(i, ts=1700000000 + i))
        q.drops.flush()
    dropped = m.total("queue_dropped_records")
    # Without a loop the first drop is logged at once, the rest when due.
    assert dropped > 0 and len(caplog.records) == 2
    assert logged_drops(caplog, "record queue dropped", "normal overflow") == dropped
    assert "record times 2023-11-14T22:13:20Z to " in caplog.records[0].getMessage()


def test_on_the_loop_a_burst_of_drops_is_one_line(caplog):
    async def main():
        m = Registry()
        q = RecordQueue(2000, m, agent_reserve=0)
        q.drops.every = 0.3
        for i in range(100):
            q.put(rec(i, ts=1700000000 + i))
        await asyncio.sleep(1.2)
        return m.total("queue_dropped_records")
    with caplog.at_level(logging.ERROR, logger="elkeid_agent.buffer"):
        dropped = asyncio.run(main())
    assert len(caplog.records) == 1
    assert logged_drops(caplog, "record queue dropped", "normal overflow") == dropped
    assert "record times 2023-11-14T22:13:20Z to 2023-11-14T22:14:49Z" in \
        caplog.records[0].getMessage()


def logged_drops(caplog, prefix, reason):
    """The records the drop lines of ``prefix`` say were lost for ``reason``."""
    total = 0
    for r in caplog.records:
        m = re.search(r"%s (\d+) records \(\d+ bytes; %s (\d+)\)" % (prefix, reason),
                      r.getMessage())
        if m:
            assert m.group(1) == m.group(2)
            total += int(m.group(1))
    return total


def test_crc_covers_the_length_field():
    c = get_codec("zlib")
    data = bytearray(encode_frame([b"a" * 100, b"b" * 50], c))
    stored = int.from_bytes(data[:4], "little")
    data[:4] = (stored - 1).to_bytes(4, "little")
    with pytest.raises(CorruptFrame) as e:
        decode_frame(bytes(data)[:-1], c)
    assert e.value.reason == "crc"


def test_a_disk_slower_than_the_producers_keeps_the_order_through_memory(tmp_path):
    """While the I/O thread is stuck, the write backlog fills, the spool
    refuses, records wait in memory; once it drains they go in first."""
    import threading

    async def main():
        m = Registry()
        s = Spool(str(tmp_path / "spool"), 64 * MiB, m, AgentState(), frame_bytes=16 * 1024,
                  backlog_bytes=256 * 1024)
        await s.start()
        stuck = threading.Event()
        s._io.submit(stuck.wait)  # a disk that does not answer
        q = RecordQueue(8 * MiB, m, spool=s)
        q.outage(True)
        for i in range(5000):
            q.put(rec(i))
        assert not s.available and q.count > 0  # memory holds what the spool refused
        stuck.set()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if s.available:
                break
        for i in range(5000, 6000):
            q.put(rec(i))
        q.outage(False)
        got = drain_queue(q, 1000)
        await s.close()
        return got, m.total("queue_dropped_records") + m.total("spool_dropped_records")
    got, dropped = asyncio.run(main())
    assert got == list(range(6000)) and dropped == 0


def test_frames_not_yet_written_are_read_from_their_encoded_bytes(tmp_path):
    import threading

    async def main():
        s = Spool(str(tmp_path / "spool"), 64 * MiB, Registry(), AgentState(), frame_bytes=4096)
        await s.start()
        stuck = threading.Event()
        s._io.submit(stuck.wait)
        fill(s, range(500))
        pending = [f for f in s._frames if not f.on_disk]
        # Waiting for the disk, each frame holds its encoded bytes only.
        assert len(pending) > 3 and all(f.records is None and f.data for f in pending[:-1])
        first, mark = s.take(200, MiB)
        s.settled(mark)
        stuck.set()
        rest = []
        while s.pending():
            await asyncio.sleep(0.01)
            taken, mark = s.take(100, MiB)
            rest.extend(taken)
            if mark is not None:
                s.settled(mark)
        await s.close()
        return [seq_of(b) for b in first + rest]
    assert asyncio.run(main()) == list(range(500))


def test_records_spooled_after_a_fully_settled_cursor_survive_a_kill(tmp_path):
    expected = []
    for r in range(3):
        s = make(tmp_path)
        assert [seq_of(b) for b in drain(s)] == expected
        s._sync()  # the cursor: everything so far is settled
        expected = list(range(r * 100, r * 100 + 100))
        fill(s, expected)
        s._seal(True)
        # Killed here: no close, no newer cursor.
    assert [seq_of(b) for b in drain(make(tmp_path))] == expected


def test_new_segments_number_past_a_cursor_whose_segment_is_gone(tmp_path):
    s = make(tmp_path)
    fill(s, range(100))
    s._seal(True)
    drain(s)
    s.close_now()          # segment 1, all settled
    make(tmp_path).close_now()  # 1 deleted; segment 2 made, empty: the cursor names it
    s = make(tmp_path)     # 2 deleted (empty); the next must not be numbered below it
    fill(s, range(100, 150))
    s._seal(True)          # killed here, the cursor still naming segment 2
    assert [seq_of(b) for b in drain(make(tmp_path))] == list(range(100, 150))


def test_an_outage_moves_memory_to_the_spool_a_chunk_per_loop_iteration(tmp_path):
    async def main():
        m = Registry()
        s = Spool(str(tmp_path / "spool"), 64 * MiB, m, AgentState())
        await s.start()
        q = RecordQueue(8 * MiB, m, spool=s)
        for i in range(20000):  # ~3.8 MB in memory when the stream goes down
            q.put(rec(i))
        q.outage(True)
        assert q.count == 20000  # nothing encoded yet: the loop is not held
        for i in range(20000, 21000):
            q.put(rec(i))    # behind the older ones, in memory for now
            if i % 100 == 0:
                await asyncio.sleep(0)
        for _ in range(500):
            if not q.count:
                break
            await asyncio.sleep(0.01)
        moved_all = q.count == 0
        q.outage(False)
        got = drain_queue(q, 4096)
        await s.close()
        return moved_all, got, m.total("queue_dropped_records")
    moved_all, got, dropped = asyncio.run(main())
    assert moved_all and got == list(range(21000)) and dropped == 0


def test_a_read_only_spool_is_still_read_and_what_it_cannot_read_stays_put(read_only_dir):
    # The read-only mount shows what was put under it before: remount rw briefly.
    subprocess.run(["mount", "-o", "remount,bind,rw", str(read_only_dir)], check=True)
    (read_only_dir / "0000000000000001.seg").write_bytes(encode_segment_header("lz4") + b"x")
    good, _ = segment_bytes("zlib", [[rec(i) for i in range(10)]])
    (read_only_dir / "0000000000000002.seg").write_bytes(good)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(read_only_dir)], check=True)
    m, state = Registry(), AgentState()
    s = Spool(str(read_only_dir), 64 * MiB, m, state, io=InlineIO())
    s.open_now()
    assert not s.available
    assert "spool:unreadable" in state.keys() and "cannot move it aside" in " ".join(state.reasons())
    assert (read_only_dir / "0000000000000001.seg").exists()
    # What it can read is still sent.
    assert [seq_of(b) for b in drain(s)] == list(range(10))
