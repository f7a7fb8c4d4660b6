"""Heartbeat records: 1000 for the agent, 1001 per plugin (docs/protocol.md section 4).

Every field is a string; floats use ``%.8f`` like the Go agent's
``strconv.FormatFloat(v, 'f', 8, 64)``. Beyond Elkeid's fields the agent
adds its own drop/refusal counters (``queue_dropped`` ...), the days until
the TLS client certificate and CA expire (``cert_expire_days``,
``ca_expire_days``) and the disk
spool's depth, age and drops (``spool_*``), so data loss is visible on the
server without logging into the host.
"""

import asyncio
import os
import threading

from . import resources
from .. import wire

AGENT_HEARTBEAT, PLUGIN_HEARTBEAT = 1000, 1001

# docs/protocol.md section 4, in its order: a test checks every one is present.
AGENT_FIELDS = (
    "kernel_version", "arch", "platform", "platform_family", "platform_version", "state",
    "state_detail", "idc", "region", "net_mode", "rx_speed", "tx_speed", "cpu", "rss",
    "read_speed", "write_speed", "pid", "nfd", "start_time", "tx_tps", "rx_tps", "du", "ngr",
    "nproc", "total_mem", "load_1", "load_5", "load_15", "running_procs", "total_procs",
    "host_serial", "host_id", "host_model", "host_vendor", "dns", "gateway", "cpu_name",
    "boot_time", "cpu_usage", "mem_usage")


# The disk spool's fields when it is off (docs/protocol.md section 4).
NO_SPOOL = {"spool_records": "0", "spool_bytes": "0", "spool_oldest_age": "0.00000000",
            "spool_replay_rate": "0.00000000", "spool_dropped": "0"}


def fmt_float(value):
    return "%.8f" % value


def process_fields(stats):
    """cpu rss read_speed write_speed nfd start_time of a ProcStats."""
    return {
        "cpu": fmt_float(stats.cpu),
        "rss": str(int(stats.rss)),
        "read_speed": fmt_float(stats.read_speed),
        "write_speed": fmt_float(stats.write_speed),
        "nfd": str(int(stats.nfd)),
        "start_time": str(int(stats.start_time)),
    }


class Heartbeat:
    """Builds the heartbeat records from the running agent's parts."""

    def __init__(self, agent):
        self.agent = agent
        self.pid = os.getpid()
        # The process sampler's baseline is the process start: its first
        # sample (the first heartbeat, moments from now) is the usage since
        # start. Priming it here would make that a few-millisecond window
        # of clock-tick noise (211 % on a 2-core host).
        self.proc = resources.ProcessSampler(self.pid)
        # The system sampler reads its baseline when created: the first
        # heartbeat's cpu_usage covers the time since start-up, not boot.
        self.cpu_usage = resources.CpuUsageSampler()

    def agent_fields(self):
        a = self.agent
        s = a.settings
        h = a.host
        fields = {
            "kernel_version": h.kernel_version, "arch": h.arch, "platform": h.platform,
            "platform_family": h.platform_family, "platform_version": h.platform_version,
            "idc": s.idc, "region": s.region,
            "net_mode": a.transport.net_mode if a.transport else "unknown",
            "pid": str(self.pid),
        }
        fields["state"], fields["state_detail"] = a.state.heartbeat_fields()
        rates = a.transport.stats.rates() if a.transport else {}
        for key in ("rx_speed", "tx_speed", "tx_tps", "rx_tps"):
            fields[key] = fmt_float(rates.get(key, 0.0))
        fields.update(process_fields(self.proc.sample()))
        fields["du"] = str(resources.dir_size(s.workdir, exclude="plugin"))
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:
            tasks = 0
        fields["ngr"] = str(threading.active_count() + tasks)
        fields.update(resources.system_fields())
        fields["cpu_usage"] = fmt_float(self.cpu_usage.sample())
        # Our additions: what was dropped or refused since start.
        m = a.metrics
        fields["queue_dropped"] = str(m.total("queue_dropped_records"))
        fields["queue_records"] = str(a.queue.count)
        fields["queue_bytes"] = str(a.queue.bytes)
        fields["commands_rejected"] = str(m.total("commands_rejected"))
        tls = getattr(a, "tls", None)
        # Days (a float, negative once expired) until the client certificate
        # and the CA in use expire; 0 when unknown.
        fields["cert_expire_days"] = fmt_float(tls.days_left("cert") if tls else 0.0)
        fields["ca_expire_days"] = fmt_float(tls.days_left("ca") if tls else 0.0)
        spool = getattr(a, "spool", None)
        fields.update(spool.heartbeat_fields() if spool is not None else NO_SPOOL)
        return fields

    def records(self, now):
        out = [wire.encode_record(AGENT_HEARTBEAT, int(now), self.agent_fields())]
        plugins = self.agent.plugins
        if plugins is not None:
            out.extend(plugins.heartbeat_records(now))
        return out
