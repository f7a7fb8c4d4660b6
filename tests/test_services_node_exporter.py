"""The real node_exporter of Debian (``prometheus-node-exporter``) under the
supervisor, with its /metrics as the HTTP probe: SIGKILL -> restarted
within the backoff; SIGSTOP (the probe times out) -> restarted."""

import asyncio
import os
import signal
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from services_fixtures.rig import Rig  # noqa: E402

EXPORTER = "/usr/bin/prometheus-node-exporter"

pytestmark = pytest.mark.skipif(not os.access(EXPORTER, os.X_OK),
                                reason="apt-get install prometheus-node-exporter")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_node_exporter_killed_or_frozen_is_restarted(tmp_path):
    port = free_port()
    entry = {"id": "node-exporter", "type": "node_exporter", "binary_path": EXPORTER,
             "args": ["--web.listen-address=127.0.0.1:%d" % port,
                      "--collector.disable-defaults", "--collector.loadavg"],
             "health_check": {"interval": "0.3s", "heartbeat_timeout": "0s",
                              "cpu_threshold": 0, "memory_threshold": 0,
                              "http_endpoint": "http://127.0.0.1:%d/metrics" % port,
                              "http_timeout": "0.5s"},
             "restart": {"backoff_base": "1s", "backoff_max": "2s"}}

    async def main():
        rig = Rig(tmp_path, stop_timeout=2.0)
        await rig.boot([entry])
        try:
            st = await rig.wait("node-exporter", lambda s: s["health"] == "healthy",
                                timeout=60, what="first probe answered")
            first = st["pid"]
            os.kill(first, signal.SIGKILL)
            st = await rig.wait("node-exporter", lambda s: s["restarts"] == 1 and
                                s["health"] == "healthy", timeout=60)
            assert "SIGKILL" in st["last_exit"]
            second = st["pid"]
            assert second != first
            os.kill(second, signal.SIGSTOP)
            st = await rig.wait("node-exporter", lambda s: s["restarts"] == 2 and
                                s["health"] == "healthy", timeout=90)
            assert st["pid"] != second and "http_failed" in st["last_error"]
            assert rig.metrics.get("service_health_restarts", service="node-exporter",
                                   check="http_failed") == 1
        finally:
            await rig.close()

    asyncio.run(asyncio.wait_for(main(), 240))
