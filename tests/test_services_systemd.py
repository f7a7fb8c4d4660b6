"""The transient-unit launcher: the systemd-run command line each service
gets, and the choice of launcher. (A live systemd is needed for the rest:
the packaging tests boot one.)"""

import os

from elkeid_agent.metrics import Registry
from elkeid_agent.osfx.services import ServiceProcessEffects, systemd_run_argv, unit_name
from elkeid_agent.runtime.executors import Executors
from elkeid_agent.services.supervisor import ServiceSupervisor
from elkeid_agent.state import AgentState


def test_systemd_run_argv():
    argv = systemd_run_argv(unit_name("node-exporter"), "/usr/bin/prometheus-node-exporter",
                            ("--web.listen-address=127.0.0.1:9100", "--x"), "/var/lib/x",
                            {"B": "2", "A": "1 2"}, "/var/lib/x/stdout.log",
                            "/var/lib/x/stderr.log", 10.0)
    assert argv == [
        "systemd-run", "--unit=elkeid-service-node-exporter.service", "--collect", "--quiet",
        "--property=Type=exec", "--property=WorkingDirectory=/var/lib/x",
        "--property=StandardInput=null",
        "--property=StandardOutput=append:/var/lib/x/stdout.log",
        "--property=StandardError=append:/var/lib/x/stderr.log",
        "--property=KillMode=control-group", "--property=TimeoutStopSec=10s",
        "--setenv=A=1 2", "--setenv=B=2",
        "--", "/usr/bin/prometheus-node-exporter", "--web.listen-address=127.0.0.1:9100", "--x"]


def test_launcher_choice(tmp_path):
    fake_init = tmp_path / "run-systemd-system"
    fake_init.mkdir()

    def launcher(service_type, systemd_dir):
        fx = ServiceProcessEffects(systemd_dir=str(systemd_dir))
        sup = ServiceSupervisor(str(tmp_path), Registry(), AgentState(), None, Executors(),
                                service_type=service_type, fx=fx)
        return sup.launcher

    has_run = any(os.access(os.path.join(d, "systemd-run"), os.X_OK)
                  for d in ServiceProcessEffects.sane_path.split(":"))
    assert launcher("systemd", fake_init) == ("systemd" if has_run else "direct")
    assert launcher("sysvinit", fake_init) == "direct"
    assert launcher("systemd", tmp_path / "absent") == "direct"


def test_run_captures_output_and_exit_code():
    fx = ServiceProcessEffects()
    assert fx.run(["sh", "-c", "echo out; echo err >&2; exit 3"], 30) == (3, "out\nerr\n")
    rc, out = fx.run(["/nonexistent/tool"], 30)
    assert rc == 127 and "cannot run" in out
    rc, _ = fx.run(["sleep", "30"], 0.2)
    assert rc == -9
