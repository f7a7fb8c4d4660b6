"""The README's demo, run as ``./build.sh demo`` runs it: the development
AgentCenter, a real agent, and the sample plugin deployed through the HTTP
command API. The demo exits non-zero when any record kind never arrived."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from elkeid_devtools.launchers import ROOT, _env, processes_mentioning, wait_until


def _demo(base, seconds="8"):
    out = subprocess.run(
        [sys.executable, "-m", "elkeid_devtools.demo", "--dir", str(base), "--seconds", seconds,
         "--heartbeat-interval", "1"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=180)
    text = out.stdout.decode("utf-8", "replace")
    assert out.returncode == 0, text
    rows = [line.split(None, 3) for line in text.splitlines()
            if len(line.split()) > 2 and line[:2].isdigit() and line[2] == ":"]
    return text, rows


def test_demo_deploys_the_sample_plugin_through_the_command_api(tmp_path):
    text, rows = _demo(tmp_path)
    assert {"1000", "1001", "9001", "9003"} <= {r[1] for r in rows}, text
    assert '"status": "healthy"' in text
    assert "token=demo-echo: succeed (hello from the demo)" in text
    with open(os.path.join(str(tmp_path), "sample-command.json")) as f:
        sent = json.load(f)
    (cfg,) = sent["command"]["config"]
    assert cfg["name"] == "sample" and cfg["download_url"][0].startswith("http://127.0.0.1:")
    assert os.path.exists(os.path.join(str(tmp_path), "agent", "plugin", "sample", "sample"))
    assert "agent stopped (exit 0)" in text


def _plugin_pids(rows):
    return {m.group(1) for r in rows if r[1] in ("1001", "9001")
            for m in [re.search(r"\bpid=(\d+)", r[3])] if m}


def test_a_second_run_in_the_same_dir_reports_only_its_own_records(tmp_path):
    """.demo/ (and its database) is kept between runs: the second run must
    show, count and health-check its own plugin, not the first run's."""
    first_text, first_rows = _demo(tmp_path)
    started = time.time()
    text, rows = _demo(tmp_path)
    assert rows, text
    pids = _plugin_pids(rows)
    assert len(pids) == 1 and not pids & _plugin_pids(first_rows), (first_text, text)
    day = time.strftime("%Y%m%d", time.localtime(started))
    if day == time.strftime("%Y%m%d"):  # rows show the time of day only
        since = time.strftime("%H:%M:%S", time.localtime(int(started)))
        assert all(r[0] >= since for r in rows), (since, text)
    assert '"status": "healthy"' in text
    (echo,) = [r for r in rows if r[1] == "9003"]
    stored = re.search(r"stored in \S+ by this run: (.*)", text).group(1)
    assert "1 x 9003" in stored and echo




def test_demo_cut_short_by_its_reader_exits_quietly_and_leaves_nothing_running(tmp_path):
    base, err = tmp_path / "demo", tmp_path / "stderr"
    cmd = "%s -m elkeid_devtools.demo --dir %s --seconds 120 --heartbeat-interval 1 2>%s | head -3" \
        % (shlex.quote(sys.executable), shlex.quote(str(base)), shlex.quote(str(err)))
    try:
        out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                             timeout=180)
        assert len(out.stdout.splitlines()) == 3, out.stdout
        text = err.read_text()
        assert "Traceback" not in text and "BrokenPipe" not in text, text
        # The devcenter, the agent and its plugin all went with the demo.
        wait_until(lambda: not processes_mentioning(str(base)), 60,
                   what="the demo's children to exit")
    finally:
        for pid in processes_mentioning(str(base)):
            os.kill(pid, signal.SIGKILL)


def test_demo_rejects_a_bad_interval(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "elkeid_devtools.demo", "--dir", str(tmp_path),
         "--heartbeat-interval", "0"], cwd=ROOT, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert out.returncode == 2
    assert b"--heartbeat-interval must be > 0" in out.stderr
