"""The benchmark commands run as users run them and count what they move.
They print numbers; nothing here judges speed, only that the tools work and
that every record sent was accounted for."""

import re
import subprocess
import sys

from elkeid_devtools.launchers import ROOT, _env


def run(*args, timeout=300):
    out = subprocess.run([sys.executable, "-m"] + list(args), cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    text = out.stdout.decode("utf-8", "replace")
    assert out.returncode == 0, text
    return text


def test_agent_push_bench(tmp_path):
    text = run("elkeid_devtools.bench", "--records", "3000", "--repeat", "1", "--skip-idle",
               "--dir", str(tmp_path))
    rows = dict((m.group(1), m.groups()[1:]) for m in re.finditer(
        r"^(none|gzip)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+(\d+)$", text, re.M))
    assert set(rows) == {"none", "gzip"}, text
    for rate, cpu, messages, dropped in rows.values():
        assert float(rate) > 0 and float(cpu) > 0 and int(messages) >= 1 and dropped == "0"
    assert "ratio gzip/none: rate" in text


def test_plugin_benches_in_process_and_through_the_agent(tmp_path):
    text = run("elkeid_devtools.plugin_bench", "--plugins", "1", "--seconds", "1",
               "--rate", "2000")
    m = re.search(r"^1\s+(\d+)\s+[\d.]+\s+[\d.]+\s+\d+%\s+[\d.]+MB\s+\d+%\s+(\d+)$", text, re.M)
    assert m and int(m.group(1)) > 0 and m.group(2) == "0", text
    assert "check_record (used)" in text
    text = run("elkeid_devtools.plugin_bench", "--e2e", "--plugins", "1", "--seconds", "1",
               "--rate", "2000", "--dir", str(tmp_path))
    m = re.search(r"^1\s+(\d+)\s+[\d.]+\s+\d+%\s+[\d.]+MB\s*$", text, re.M)
    assert m and int(m.group(1)) > 0, text


def test_spool_bench_writes_and_replays_every_record(tmp_path):
    text = run("elkeid_devtools.spool_bench", "--records", "3000", "--repeat", "1",
               "--dir", str(tmp_path))
    rows = re.findall(r"^(random|redundant)\s+(snappy|zlib|none)\s+(\d+)\s+([\d.]+)\s+(\d+)"
                      r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", text, re.M)
    assert {(r[0], r[1]) for r in rows} >= {("random", "zlib"), ("redundant", "none")}, text
    for row in rows:
        assert float(row[2]) > 0 and float(row[4]) > 0 and row[8] == "0", text


PERF_ROWS = ("CPU/record at 5,000/s", "agent CPU at 5,000/s", "latency p50 at 5,000/s",
             "latency p99 at 5,000/s", "full speed, agent on 1 core", "CPU/record at full speed",
             "CPU at full speed", "limit at full speed", "lossless max, agent on 1 core",
             "lossless max, CPUQuota=10%", "idle RSS", "idle CPU", "RSS at 5,000/s",
             "idle RSS, zipapp", "RSS at 5,000/s, zipapp", "spool write", "spool replay")


def test_perf_table_quick_prints_every_row_with_numbers(tmp_path):
    saved = tmp_path / "results.json"
    text = run("elkeid_devtools.perf_table", "--quick", "--only", "accel", "--no-zipapp",
               "--dir", str(tmp_path / "scratch"), "--save", str(saved))
    lines = {}
    for line in text.splitlines():
        for label in PERF_ROWS:
            if line.startswith(label + "  "):
                lines.setdefault(label, line[len(label):].strip())
    assert set(lines) == set(PERF_ROWS), text
    number = r"[\d,]+(?:\.\d+)?"
    for label in ("CPU/record at 5,000/s", "CPU/record at full speed"):
        assert re.match(number + " us", lines[label]), text
    for label in ("latency p50 at 5,000/s", "latency p99 at 5,000/s"):
        assert re.match(number + " ms", lines[label]), text
    for label in ("idle RSS", "RSS at 5,000/s"):
        assert re.match(number + " MB", lines[label]), text
    assert re.match(r"agent \d+% devcenter \d+% plugin \d+%", lines["CPU at full speed"]), text
    assert re.match(r"(agent|agent's sender|devcenter|plugin|core \d+: devcenter|none)\b",
                    lines["limit at full speed"]), text
    found = number + r"/s \(agent " + number + r" us/record\)"
    assert re.match("(< %s/s|%s)" % (number, found), lines["lossless max, agent on 1 core"]), text
    assert re.match("(< %s/s|%s|n/a \\()" % (number, found),
                    lines["lossless max, CPUQuota=10%"]), text
    assert lines["idle RSS, zipapp"].startswith("-"), text  # --no-zipapp
    for label in ("spool write", "spool replay"):
        assert re.match(number + "/s " + number + " MB/s", lines[label]), text
    assert re.search(r"^  machine: \d+ vCPU, .+; Python [\d.]+; grpcio ", text, re.M), text
    # Every step of the lossless search accounted for each record written.
    steps = re.findall(r"delivered (\d+) of (\d+),", text)
    assert steps and all(a == b for a, b in steps), text
    # The saved results render to the same table.
    out = text.splitlines()
    rule = next(i for i, line in enumerate(out) if line.startswith("-----"))
    table = "\n".join(out[rule - 1:]).rstrip()  # from the header line on
    assert run("elkeid_devtools.perf_table", "--render", str(saved)).rstrip() == table


def test_bench_plugin_writes_whole_stamped_frames_of_the_set_size():
    import os
    import struct
    import threading
    from elkeid_agent import wire
    from elkeid_devtools import bench_plugin

    burst = bench_plugin.Burst(200)
    r, w = os.pipe()
    producer = bench_plugin.Producer(w, 20000, burst)
    stop = threading.Event()
    worker = threading.Thread(target=producer.run, args=(stop,))
    worker.start()
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(r, 1 << 20), b"")))
    reader.start()
    threading.Timer(0.7, stop.set).start()
    worker.join()
    os.close(w)
    reader.join()
    os.close(r)
    data = b"".join(chunks)
    pads, stamps, n = set(), set(), 0
    while data:
        size = struct.unpack("<I", data[:4])[0]
        data_type, _ts, fields = wire.decode_record(data[4:4 + size], True)
        data = data[4 + size:]
        assert size == 200 and data_type == bench_plugin.DATA_TYPE
        pads.add(fields["pad"])
        stamps.add(fields["stamp"])
        n += 1
    assert n == producer.written > 0
    assert len(pads) == min(n, bench_plugin.POOL)  # distinct records, not one repeated
    assert all(s.isdigit() and int(s) > 0 for s in stamps)
    assert len(stamps) >= 2  # one stamp per write, several 200 ms writes


def test_latency_recorder_counts_stamped_records_only():
    from elkeid_agent import wire
    from elkeid_agent.pb import grpc_pb2
    from elkeid_devtools.devcenter.latency import LatencyRecorder, percentile

    def message(stamps):
        pd = grpc_pb2.PackagedData(agent_id="a")
        for stamp in stamps:
            fields = {"x": "1"} if stamp is None else {"stamp": stamp}
            pd.records.add().MergeFromString(wire.encode_record(9100, 1, fields))
        return pd

    rec = LatencyRecorder(max_samples=3)
    now = 10_000_000_000
    rec.add_message(message([str(now - 2_000_000), "0" * 19, None, "12x", str(now - 1_000)]),
                    arrival_ns=now)
    rec.add_message(message([str(now - 5_000_000), str(now - 7_000_000)]), arrival_ns=now)
    s = rec.summary()
    assert (s["count"], s["overflow"], s["errors"]) == (3, 1, {"stamp": 1})
    assert (s["p50_us"], s["max_us"]) == (2000, 5000)
    assert percentile([1, 2, 3, 4], 0.5) == 2 and percentile(list(range(1, 101)), 0.99) == 99
    assert percentile([], 0.5) is None


def test_agent_latency_pairs_each_record_with_its_flush(tmp_path):
    from elkeid_devtools.plugin_bench import agent_latency
    flushes = tmp_path / "flushes.log"
    # Flush 1 held seq 0..9, flush 2 seq 10..19 (logged out of order).
    flushes.write_text("101.000000 19\n100.000000 9\n")
    seq_log = tmp_path / "dc.db.seq"
    seq_log.write_text(
        '{"a":"x","r":{"":[[0,5]]},"t":100.010}\n'
        '{"a":"x","r":{"":[[5,10],[10,12]]}}\n'          # no receipt time: left out
        '{"a":"x","r":{"":[[5,15]]},"t":101.030}\n'      # 5 of flush 1, 5 of flush 2
        '{"a":"x","r":{"":[[15,20],[20,25]]},"t":101.040}\n')  # 20..24: no flush logged
    lat = agent_latency(str(flushes), str(seq_log))
    assert lat["records"] == 20
    # 5 records at 10 ms, 5 at 1030 ms, 5 at 30 ms, 5 at 40 ms.
    assert abs(lat["p50"] - 0.030) < 1e-6 and abs(lat["max"] - 1.030) < 1e-6
    assert abs(lat["p99"] - 1.030) < 1e-6


def test_plugin_bench_latency_counts_every_record_it_times(tmp_path):
    text = run("elkeid_devtools.plugin_bench", "--e2e", "--latency", "--rate", "2000",
               "--seconds", "2", "--dir", str(tmp_path))
    m = re.search(r"latency over (\d+) records: p50 ([\d.]+) ms, p90 [\d.]+ ms, "
                  r"p99 ([\d.]+) ms", text)
    assert m, text
    assert int(m.group(1)) > 0 and 0 < float(m.group(2)) <= float(m.group(3)), text
