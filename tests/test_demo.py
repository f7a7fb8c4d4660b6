"""The README's demo, run as ``./build.sh demo`` runs it: the development
AgentCenter, a real agent, and the sample plugin deployed through the HTTP
command API. The demo exits non-zero when any record kind never arrived."""

import json
import os
import subprocess
import sys

from elkeid_devtools.launchers import ROOT, _env


def test_demo_deploys_the_sample_plugin_through_the_command_api(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "elkeid_devtools.demo", "--dir", str(tmp_path), "--seconds", "8",
         "--heartbeat-interval", "1"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=180)
    text = out.stdout.decode("utf-8", "replace")
    assert out.returncode == 0, text
    rows = [line.split()[1] for line in text.splitlines()
            if len(line.split()) > 2 and line[:2].isdigit() and line[2] == ":"]
    assert {"1000", "1001", "9001", "9003"} <= set(rows), text
    assert '"status": "healthy"' in text
    assert "token=demo-echo: succeed (hello from the demo)" in text
    with open(os.path.join(str(tmp_path), "sample-command.json")) as f:
        sent = json.load(f)
    (cfg,) = sent["command"]["config"]
    assert cfg["name"] == "sample" and cfg["download_url"][0].startswith("http://127.0.0.1:")
    assert os.path.exists(os.path.join(str(tmp_path), "agent", "plugin", "sample", "sample"))
    assert "agent stopped (exit 0)" in text


def test_demo_rejects_a_bad_interval(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "elkeid_devtools.demo", "--dir", str(tmp_path),
         "--heartbeat-interval", "0"], cwd=ROOT, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert out.returncode == 2
    assert b"--heartbeat-interval must be > 0" in out.stderr
