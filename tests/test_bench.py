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
