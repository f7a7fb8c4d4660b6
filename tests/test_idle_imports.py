"""What a connected, idle agent has imported: the parts it only needs when
something happens (an update, a plugin fetch, service discovery, an HTTP
health check, the status endpoint) are imported then, not at start
(docs/performance.md "Memory"). A real ``python -m elkeid_agent run`` against
the development AgentCenter, its ``sys.modules`` read from inside it by
elkeid_devtools.memprobe's wrapper."""

import os

from harness import AgentProc, wait_until
from elkeid_devtools.memprobe import INSIDE, inside_dump

PY = os.environ.get("ELKEID_TEST_PYTHON") or __import__("sys").executable

# Module -> what imports it when it is needed.
NOT_AT_IDLE = {
    "cryptography": "update signature checks (update/verify.py)",
    "yaml": "the services file (there is none here)",
    "sqlite3": "the update journal (update/journal.py), opened when an update runs",
    "urllib.request": "plugin downloads, service discovery, HTTP health checks",
    "http.client": "the same",
    "email": "http.client",
    "tarfile": "plugin archives (plugins/fetch.py)",
    "zipfile": "reading an update's zipapp metadata (osfx/install.py)",
    "elkeid_agent.runtime.status": "the opt-in status endpoint",
    "elkeid_agent.runtime.debug": "SIGUSR1's debug endpoint",
}


def test_idle_agent_has_not_imported_what_it_does_not_use(tmp_path, devcenter):
    out = str(tmp_path / "dump.json")
    agent = AgentProc(tmp_path / "agent", ["--agent-id", "idle-imports", "--server",
                                          devcenter.grpc] + devcenter.cert_args,
                      command=[PY, "-c", INSIDE, out, "-m", "run"])
    try:
        devcenter.wait_agent("idle-imports", timeout=60)
        # Past start-up: the updaters, the plugin and services supervisors and
        # the first heartbeat exist by now.
        wait_until(lambda: devcenter.records(1000, agent_id="idle-imports"), 30, 0.2,
                   "a heartbeat")
        info = inside_dump(out)
    finally:
        agent.stop()
    modules = set(info["modules"])
    # The wrapper is not fooling us: the agent's own parts are there.
    assert {"elkeid_agent.app", "elkeid_agent.transport.stream", "elkeid_agent.update.updater",
            "elkeid_agent.plugins.supervisor", "elkeid_agent.services.supervisor",
            "grpc"} <= modules
    loaded = {name: why for name, why in NOT_AT_IDLE.items() if name in modules}
    assert not loaded, "imported at idle: %s" % loaded
