import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import AgentProc, DevCenterProc  # noqa: E402
# Session fixtures (site_dir, builds) defined once here, so every module
# shares one staged site and one build cache.
from update_builds import builds, site_dir  # noqa: E402,F401


@pytest.fixture(scope="module")
def devcenter(tmp_path_factory):
    dc = DevCenterProc(tmp_path_factory.mktemp("devcenter"))
    yield dc
    dc.stop()


@pytest.fixture
def start_agent(tmp_path, devcenter):
    """start_agent(agent_id, *args, env=None, server=True) -> AgentProc."""
    agents = []

    def start(agent_id, *args, env=None, server=True, workdir=None):
        argv = ["--agent-id", agent_id, "--heartbeat-interval", "0.5"]
        if server:
            argv += ["--server", devcenter.grpc] + devcenter.cert_args
        a = AgentProc(workdir or tmp_path / ("agent-" + agent_id), argv + list(args), env=env)
        agents.append(a)
        return a

    yield start
    for a in agents:
        if a.alive:
            a.stop()


def pytest_terminal_summary(terminalreporter):
    """The fault cases' counts (tests/test_faults.py), when any ran."""
    faults = sys.modules.get("fault_harness")
    if faults is not None and faults.REPORTS:
        terminalreporter.write_sep("-", "fault cases: records by sequence number")
        for line in faults.report_lines():
            terminalreporter.write_line(line)
