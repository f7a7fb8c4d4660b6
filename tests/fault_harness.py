"""The fault suite's harness (tests/test_faults.py): a server that counts
what arrived by sequence number and survives its own restarts, the load a
plugin produces, and the faults themselves (network and mount namespaces).

- ``SeqServer``: the devcenter in ``--store seq`` mode on one fixed gRPC
  port, stopped, SIGKILLed and started again on that port and on the same
  data, so the agent redials the same address and the counts go on.
- ``Load``: the numbered load plugin (plugins_fixtures/seq_load.py), its
  progress files (how many records each run put into its pipe) and its
  stop switch. ``tally`` sets what the server counted against what was
  produced: unique, duplicates, missing.
- ``Blackhole``: two network namespaces made by the test, joined by a veth
  pair with link-local addresses that exist only inside them. The agent
  runs in one; the other holds a relay to the devcenter on this machine's
  loopback. ``drop()`` makes both namespaces drop the other's packets
  (nftables input rules): nothing is refused, nothing answers.
- ``spool_tmpfs_command`` / ``in_mounts_of``: the agent in a private mount
  namespace of its own, on a small tmpfs that can be filled and remounted
  read-only while it runs; nothing outside that namespace sees the mount.

Nothing here targets an address outside 127.0.0.0/8 or the namespaces it
creates. Without root or the tools (ip, nft, nsenter, unshare) the cases
that need them skip; in CI they fail (debroot.unavailable).
"""

import ctypes
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections import namedtuple

from debroot import unavailable
from elkeid_agent import wire
from elkeid_agent.settings import Settings
from elkeid_devtools.launchers import PY, DevCenterProc, wait_until
from test_plugins_e2e import plugin_config
from test_queue_e2e import free_port

# The disk spool (issue 11, elkeid_agent/buffer/spool.py) is what the
# zero-loss promises of an outage longer than the memory queue rest on.
# Until it exists the cases that need it report their counts and xfail.
SPOOL = importlib.util.find_spec("elkeid_agent.buffer.spool") is not None
NEEDS_SPOOL = "needs the disk spool (issue 11): the agent keeps records in memory only"

# (case, Tally, note) of every case that ran, for the closing summary that
# conftest.py prints.
REPORTS = []

DEFAULTS = Settings()


def record_size(pad):
    """Bytes of one load record (the run id and seq at their usual widths)."""
    return len(wire.encode_record(7400, int(time.time()),
                                  {"run": "1700000000000-12345", "seq": "1000000", "pad": "p" * pad}))


def replay_bound(rate, size, breaks=1):
    """Most duplicates ``breaks`` broken streams may cost: each resends its
    replay window (transport/delivery.py: what was written in the last
    ``replay_seconds`` or has less than IN_FLIGHT_BYTES written after it,
    at most ``replay_max_bytes``), plus the batch in flight."""
    from elkeid_agent.transport.delivery import IN_FLIGHT_BYTES
    window = min(max(rate * DEFAULTS.replay_seconds, IN_FLIGHT_BYTES // size),
                 DEFAULTS.replay_max_bytes // size)
    return breaks * int(window + DEFAULTS.batch_max_records)


# ------------------------------------------------------------------ the server

class SeqServer:
    """The devcenter (``--store seq``) at a fixed address across restarts."""

    def __init__(self, base, read_rate=0):
        self.base = str(base)
        os.makedirs(self.base, exist_ok=True)
        self.certs = os.path.join(self.base, "certs")
        self.db = os.path.join(self.base, "dc.db")
        self.grpc = "127.0.0.1:%d" % free_port()
        self.read_rate = read_rate
        self.incarnation = 0
        self.dc = None
        self.start()

    def start(self):
        self.incarnation += 1
        args = ["--grpc", self.grpc]
        if self.read_rate:
            args += ["--read-rate", str(self.read_rate)]
        self.dc = DevCenterProc(os.path.join(self.base, "run%d" % self.incarnation),
                                certs=self.certs, store="seq", db=self.db, extra_args=args)
        return self

    @property
    def running(self):
        return self.dc is not None and self.dc.proc.poll() is None

    def stop(self):
        """SIGTERM: the devcenter closes its streams and exits."""
        if self.dc is not None:
            self.dc.stop()

    def kill(self):
        """SIGKILL mid-stream: whatever it had not counted is gone."""
        if self.running:
            self.dc.proc.kill()
            self.dc.proc.wait()
        self.dc.stop()

    @property
    def cert_args(self):
        return self.dc.cert_args

    def seq(self, agent_id):
        status, body = self.dc.request("GET", "/seq?agent_id=%s" % agent_id)
        assert status == 200, body
        return body["data"]["agents"].get(agent_id, {})

    def heartbeat(self, agent_id):
        """The agent's last heartbeat (1000) fields, or {} if not connected."""
        for a in self.dc.agents():
            if a.get("agent_id") == agent_id:
                return a.get("last_heartbeat") or {}
        return {}

    def wait_agent(self, agent_id, timeout=120):
        return self.dc.wait_agent(agent_id, timeout=timeout)


def dropped_by_agent(heartbeat):
    """Records the agent says it dropped: the memory queue's count plus any
    the spool reports (its heartbeat fields spool_*drop*)."""
    total = int(heartbeat.get("queue_dropped", 0))
    for key, value in heartbeat.items():
        if key.startswith("spool_") and "drop" in key:
            total += int(value)
    return total


# ------------------------------------------------------------------ the load

Tally = namedtuple("Tally", "produced unique duplicates missing runs")


class Load:
    """The numbered load plugin: its config and what its runs produced."""

    def __init__(self, base, rate, pad=40):
        self.dir = os.path.join(str(base), "progress")
        os.makedirs(self.dir, exist_ok=True)
        self.stop_path = os.path.join(str(base), "stop-load")
        self.rate = rate
        self.pad = pad
        self.record_size = record_size(pad)

    def config(self, files, url_base=None):
        """The plugin's config for the command API, served by ``files``; a
        ``url_base`` (scheme://host:port) replaces the loopback one, for an
        agent that reaches the file server through a relay."""
        cfg = plugin_config(files, "seqload", "seq_load.py", detail=json.dumps(
            {"rate": self.rate, "pad": self.pad, "progress": self.dir, "stop": self.stop_path}))
        if url_base is not None:
            cfg["download_url"] = [url_base + u.split(":%d" % files.port, 1)[1]
                                   for u in cfg["download_url"]]
        return cfg

    def runs(self):
        """{run: progress dict} of every run so far."""
        out = {}
        for name in os.listdir(self.dir):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.dir, name)) as f:
                    p = json.load(f)
            except (OSError, ValueError):
                continue  # being replaced right now: the next look reads it
            out[p["run"]] = p
        return out

    def produced(self):
        return sum(p["written"] for p in self.runs().values())

    def wait_running(self, records=1, timeout=60):
        """Until the plugin's runs have put ``records`` into the pipe."""
        return wait_until(lambda: self.produced() >= records, timeout, 0.2,
                          "the load plugin to write %d records" % records)

    def stop(self, timeout=30):
        """Stop producing; wait until the newest run says it is done (an
        older run died with its agent and will never say so)."""
        with open(self.stop_path, "w"):
            pass

        def newest_done():
            runs = self.runs()
            if not runs:
                return False
            newest = max(runs, key=lambda r: int(r.split("-", 1)[0]))
            return runs[newest]["done"]
        wait_until(newest_done, timeout, 0.1, "the load plugin to stop")


def tally(server, agent_id, load):
    """What the server counted against what the load produced."""
    seen = server.seq(agent_id)
    produced = load.runs()
    unique = duplicates = missing = 0
    for run in set(seen) | set(produced):
        s = seen.get(run, {"unique": 0, "duplicates": 0, "highest": -1, "missing": 0})
        written = produced.get(run, {}).get("written", 0)
        unique += s["unique"]
        duplicates += s["duplicates"]
        # Gaps below the highest number counted, and the tail never counted.
        missing += s["missing"] + max(0, written - 1 - s["highest"])
    return Tally(sum(p["written"] for p in produced.values()), unique, duplicates, missing,
                 len(set(seen) | set(produced)))


def settle(server, agent_id, load, quiet=15.0, timeout=600):
    """Stop the load, then wait until every record produced was counted, or
    until the counts stood still for ``quiet`` seconds with the agent
    connected; returns the final Tally."""
    load.stop()
    server.wait_agent(agent_id, timeout=180)
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        t = tally(server, agent_id, load)
        now = time.monotonic()
        if t.missing == 0 or now > deadline:
            return t
        if t != last:
            last, since = t, now
        elif now - since >= quiet:
            return t
        time.sleep(0.5)


def report(case, t, note=""):
    REPORTS.append((case, t, note))
    print("%s: produced=%d unique=%d duplicates=%d missing=%d runs=%d %s"
          % (case, t.produced, t.unique, t.duplicates, t.missing, t.runs, note))


def report_lines():
    lines = ["%-34s %10s %10s %10s %10s  %s" % ("case", "produced", "unique", "duplicates",
                                                "missing", "note")]
    for case, t, note in REPORTS:
        lines.append("%-34s %10d %10d %10d %10d  %s" % (case, t.produced, t.unique,
                                                        t.duplicates, t.missing, note))
    return lines


def agent_env(**extra):
    """The agent's environment in the fault cases: redial quickly, and the
    spool (when it exists) in the case's own directory."""
    env = {"ELKEID_RECONNECT_DELAY": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ------------------------------------------------------------------ privileges

def need(*tools, root=True):
    """Skip (fail in CI) unless root and every tool is on PATH."""
    if root and os.geteuid() != 0:
        unavailable("needs root (network and mount namespaces)")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        unavailable("needs %s (./build.sh test installs them)" % ", ".join(missing))


def run(*argv, check=True, stdin=None):
    result = subprocess.run(list(argv), input=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError("%s failed (%d): %s" % (" ".join(argv), result.returncode,
                                                     result.stdout.decode("utf-8", "replace")))
    return result


# ------------------------------------------------------------------ network namespaces

CLONE_NEWNET = 0x40000000


def in_netns(path, fn):
    """``fn()`` on a thread that joined the network namespace at ``path``:
    sockets it makes belong to that namespace (setns affects the calling
    thread only; that thread ends here, the sockets live on)."""
    out = {}

    def body():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                out["error"] = OSError(err, "setns %s: %s" % (path, os.strerror(err)))
                return
        finally:
            os.close(fd)
        try:
            out["value"] = fn()
        except Exception as e:  # handed to the caller's thread
            out["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class Relay:
    """TCP relay: listens on ``listen_host`` inside a network namespace and
    connects each client to ``target`` (host, port) on this one's loopback."""

    def __init__(self, netns_path, listen_host, target):
        def listener():
            s = socket.socket()
            s.bind((listen_host, 0))
            s.listen(16)
            return s
        self.sock = in_netns(netns_path, listener)
        self.port = self.sock.getsockname()[1]
        self.target = target
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


class Blackhole:
    """An agent namespace and a relay namespace joined by a veth pair."""

    AGENT_IP, RELAY_IP = "169.254.77.1", "169.254.77.2"
    TABLE = "elkeid_fault_blackhole"

    def __init__(self, tag):
        need("ip", "nft", "nsenter")
        self.agent_ns = "elkf-%s-a" % tag
        self.relay_ns = "elkf-%s-r" % tag
        self.relays = []
        run("ip", "netns", "add", self.agent_ns)
        try:
            run("ip", "netns", "add", self.relay_ns)
            run("ip", "link", "add", "elkf-a", "netns", self.agent_ns, "type", "veth",
                "peer", "name", "elkf-r", "netns", self.relay_ns)
            for ns, dev, ip in ((self.agent_ns, "elkf-a", self.AGENT_IP),
                                (self.relay_ns, "elkf-r", self.RELAY_IP)):
                run("ip", "-n", ns, "addr", "add", ip + "/30", "dev", dev)
                run("ip", "-n", ns, "link", "set", dev, "up")
                run("ip", "-n", ns, "link", "set", "lo", "up")
        except Exception:
            self.close()
            raise

    def netns_path(self, ns):
        return "/run/netns/" + ns

    def relay(self, target):
        """A relay port in the relay namespace to ``target`` (host, port)."""
        r = Relay(self.netns_path(self.relay_ns), self.RELAY_IP, target)
        self.relays.append(r)
        return r.port

    def agent_command(self):
        return ["nsenter", "--net=" + self.netns_path(self.agent_ns), "--",
                PY, "-m", "elkeid_agent", "run"]

    def drop(self):
        """From now on each side's packets vanish at the other's input."""
        for ns, peer in ((self.agent_ns, self.RELAY_IP), (self.relay_ns, self.AGENT_IP)):
            rules = ("table inet %s {\n chain input {\n"
                     "  type filter hook input priority 0; policy accept;\n"
                     "  ip saddr %s drop\n }\n}\n" % (self.TABLE, peer))
            run("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=rules.encode())

    def restore(self):
        for ns in (self.agent_ns, self.relay_ns):
            run("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", self.TABLE)

    def close(self):
        for r in self.relays:
            r.close()
        for ns in (self.agent_ns, self.relay_ns):
            run("ip", "netns", "del", ns, check=False)


# ------------------------------------------------------------------ mount namespaces

# $0 the mount point, $1 the tmpfs size; the rest is the agent's command.
_TMPFS_SCRIPT = ('m=$0; size=$1; shift; '
                 'mount -t tmpfs -o size="$size",mode=0700 elkeid-fault-spool "$m" || exit 97; '
                 'mkdir "$m/spool" || exit 98; exec "$@"')


def spool_tmpfs_command(mountpoint, size):
    """The agent's command, run in a private mount namespace with a tmpfs of
    ``size`` (e.g. "8m") on ``mountpoint`` and the directory spool in it."""
    need("unshare", "nsenter", "mount")
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _TMPFS_SCRIPT,
            str(mountpoint), size, PY, "-m", "elkeid_agent", "run"]


def in_mounts_of(pid, *argv, check=True):
    """Run ``argv`` in the mount namespace of process ``pid``."""
    return run("nsenter", "-t", str(pid), "-m", "--", *argv, check=check)


def fill(pid, path):
    """Write zeros to ``path`` (in ``pid``'s mounts) until the disk is full."""
    in_mounts_of(pid, "sh", "-c", 'cat /dev/zero > "$0"; true', str(path))


def free_bytes(pid, mountpoint):
    st = os.statvfs("/proc/%d/root%s" % (pid, mountpoint))
    return st.f_bavail * st.f_frsize


def remount_readonly(pid, mountpoint):
    in_mounts_of(pid, "mount", "-o", "remount,ro", str(mountpoint))

