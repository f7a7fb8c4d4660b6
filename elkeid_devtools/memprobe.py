"""Where the idle agent's memory goes: numbers, never assertions
(docs/performance.md "## Memory").

    python -m elkeid_devtools.memprobe [--seconds 60] [--zipapp PYZ] [--tracemalloc]

Starts the development AgentCenter, then one after another and each alone:

* ``floor``: CPython + grpc.aio + protobuf with one mutual-TLS Transfer
  stream open to it (the least any Python agent can weigh);
* ``files``: ``python -m elkeid_agent run`` from this checkout;
* ``zipapp``: ``python PYZ run`` (with ``--zipapp``), what users run.

Each runs ``--seconds`` connected, then prints VmRSS, /proc/PID/smaps grouped
by mapping (malloc arenas, thread stacks, each shared object), the threads
with the resident part of their stacks, and the modules loaded. A thread's
stack is the anonymous mapping holding the stack pointer that
/proc/PID/task/TID/syscall reports. ``--tracemalloc`` adds a second run of
the agent with tracemalloc on, its Python heap grouped by package
(tracemalloc's own bookkeeping makes that run's RSS meaningless).
"""

import argparse
import collections
import json
import os
import sys
import tempfile
import time

from .launchers import PY, AgentProc, DevCenterProc, wait_until

# The floor: what every Python agent must carry, and nothing else. The
# stream stays open until the process is killed.
FLOOR = r"""
import asyncio, sys
import grpc
from elkeid_agent.pb import grpc_pb2
target, server_name, ca, cert, key = sys.argv[1:6]
def read(p):
    with open(p, "rb") as f:
        return f.read()
async def main():
    creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    channel = grpc.aio.secure_channel(target, creds, options=[
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.default_authority", server_name)])
    call = channel.stream_stream("/grpc.Transfer/Transfer",
                                 request_serializer=grpc_pb2.PackagedData.SerializeToString,
                                 response_deserializer=grpc_pb2.Command.FromString)()
    await call.write(grpc_pb2.PackagedData(agent_id="memprobe-floor", hostname="floor"))
    async for _ in call:
        pass
asyncio.run(main())
"""

# Runs the agent in this same process (runpy) and, once the file OUT.go
# appears, writes to OUT the thread names, the loaded modules and (when
# tracemalloc is on) the Python heap by file: what /proc cannot say.
# argv: OUT, "-m" (python -m elkeid_agent) or a zipapp, the agent's arguments.
INSIDE = r"""
import json, os, runpy, sys, threading, time
out, target = sys.argv[1], sys.argv[2]
def dump():
    while not os.path.exists(out + ".go"):
        time.sleep(0.2)
    info = {"threads": [[t.name, t.native_id] for t in threading.enumerate()],
            "modules": sorted(sys.modules)}
    import tracemalloc
    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot()
        info["heap"] = [[s.traceback[0].filename, s.size, s.count]
                        for s in snap.statistics("filename")]
        info["heap_traced"] = tracemalloc.get_traced_memory()
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.rename(tmp, out)
threading.Thread(target=dump, name="memprobe", daemon=True).start()
if target == "-m":
    sys.argv = ["elkeid-agent"] + sys.argv[3:]
    runpy.run_module("elkeid_agent", run_name="__main__", alter_sys=True)
else:
    sys.argv = [target] + sys.argv[3:]
    runpy.run_path(target, run_name="__main__")
"""

ARENA_ALIGN = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit: non-main arenas are aligned to it


def read_status(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def thread_stack_pointers(pid):
    """{tid: (comm, stack pointer)}; the pointer is None when unreadable."""
    out = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        base = "/proc/%d/task/%s/" % (pid, tid)
        try:
            with open(base + "comm") as f:
                comm = f.read().strip()
            with open(base + "syscall") as f:
                fields = f.read().split()
            sp = int(fields[-2], 16) if len(fields) >= 3 else None
        except (OSError, ValueError):
            continue
        out[int(tid)] = (comm, sp)
    return out


def smaps(pid):
    """[(start, end, perms, path, {field: kB})] of /proc/PID/smaps."""
    maps = []
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and not head[0].endswith(":"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                path = head[5].strip() if len(head) > 5 else ""
                maps.append((start, end, head[1], path, {}))
            elif head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
                maps[-1][4][head[0][:-1]] = int(head[1])
    return maps


def group_mappings(pid):
    """(rows, threads): rows are (group, Rss kB, Private_Dirty kB) sorted by
    Rss; threads are (tid, comm, stack Rss kB)."""
    sps = thread_stack_pointers(pid)
    maps = smaps(pid)
    groups = collections.defaultdict(lambda: [0, 0])
    stack_of = {}
    for tid, (comm, sp) in sps.items():
        for i, (start, end, _perms, path, _f) in enumerate(maps):
            if sp is not None and start <= sp < end:
                stack_of[i] = tid
    threads = []
    for i, (start, end, perms, path, fields) in enumerate(maps):
        rss, dirty = fields.get("Rss", 0), fields.get("Private_Dirty", 0)
        if i in stack_of:
            tid = stack_of[i]
            threads.append((tid, sps[tid][0], rss))
            group = "[stack]" if path == "[stack]" else "thread stacks (anon)"
        elif path.startswith("/"):
            group = os.path.basename(path)
            if ".so" in group or group.startswith("python"):
                group = group.split(".cpython-")[0].split(".abi3")[0]
            else:
                group = "other files"
        elif path:
            group = path
        elif start % ARENA_ALIGN == 0 and perms.startswith("rw"):
            group = "glibc malloc arenas (threads)"
        else:
            group = "anon mmap (pymalloc arenas, large blocks)"
        groups[group][0] += rss
        groups[group][1] += dirty
    rows = sorted(((g, v[0], v[1]) for g, v in groups.items()), key=lambda r: -r[1])
    return rows, sorted(threads)


def heap_by_package(heap, site_dirs):
    """tracemalloc (file, size, count) rows grouped to a package name."""
    out = collections.Counter()
    stdlib = os.path.dirname(os.__file__)
    for filename, size, _count in heap:
        name = filename
        for root in site_dirs + [stdlib]:
            if filename.startswith(root + os.sep):
                rel = os.path.relpath(filename, root).split(os.sep)
                if rel[0] == "site-packages":
                    rel = rel[1:]
                name = "/".join(rel[:2]) if rel[0] in ("elkeid_agent", "google", "grpc") \
                    else rel[0]
                break
        out[name.replace(".py", "")] += size
    return out.most_common()


def measure(pid):
    return read_status(pid), group_mappings(pid)


def report(title, pid, measured, info=None, out=sys.stdout):
    info = info or {}
    names = {native: name for name, native in info.get("threads", [])}
    status, (rows, threads) = measured
    print("\n== %s (pid %d): VmRSS %s, RssAnon %s, RssFile %s, Threads %s"
          % (title, pid, status["VmRSS"], status.get("RssAnon"), status.get("RssFile"),
             status["Threads"]), file=out)
    print("%-44s %9s %9s" % ("mapping", "Rss kB", "Dirty kB"), file=out)
    for group, rss, dirty in rows:
        if rss >= 64:
            print("%-44s %9d %9d" % (group, rss, dirty), file=out)
    print("threads (stack Rss kB):", file=out)
    for tid, name, rss in threads:
        print("  %-8d %-28s %6d" % (tid, names.get(tid, name), rss), file=out)
    mods = info.get("modules")
    if mods:
        tops = collections.Counter(m.split(".")[0] for m in mods)
        print("modules: %d; by top-level package: %s" % (len(mods), ", ".join(
            "%s %d" % kv for kv in tops.most_common(25))), file=out)
    return int(status["VmRSS"].split()[0])


def inside_dump(out, timeout=60):
    """Ask an agent run under INSIDE for its dump and return it."""
    open(out + ".go", "w").close()
    wait_until(lambda: os.path.exists(out), timeout, 0.2, "the agent's dump")
    with open(out) as f:
        return json.load(f)


def run_inside(dc, base, label, target, env=None, python=(PY,)):
    """Runs the agent (``target`` "-m" or a zipapp) under INSIDE; returns
    (AgentProc, path of its dump) once it is connected."""
    out = os.path.join(base, label + ".json")
    agent_id = "memprobe-" + label
    argv = list(python) + ["-c", INSIDE, out, target, "run"]
    agent = AgentProc(os.path.join(base, label), ["--server", dc.grpc, "--agent-id", agent_id]
                      + dc.cert_args, env=env, command=argv)
    wait_until(lambda: any(a.get("agent_id") == agent_id for a in dc.agents()), 60, 0.2,
               "agent %s to connect" % agent_id)
    return agent, out


def main(argv=None):
    p = argparse.ArgumentParser(prog="memprobe", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="connected time before measuring")
    p.add_argument("--zipapp", help="also measure this zipapp")
    p.add_argument("--tracemalloc", action="store_true", help="also the Python heap by package")
    p.add_argument("--zipapp-python", default="/usr/bin/python3",
                   help="the interpreter for the zipapp, run -sE as its preamble does")
    p.add_argument("--pycache", help="compiled bytecode for the files runs goes here (and is "
                   "reused) instead of compiling every module at each start")
    p.add_argument("--only", choices=("floor", "files", "zipapp"), action="append")
    p.add_argument("--dir", default=None)
    args = p.parse_args(argv)
    base = os.path.abspath(args.dir or tempfile.mkdtemp(prefix="memprobe-"))
    dc = DevCenterProc(os.path.join(base, "devcenter"), store="counts")
    only = set(args.only or ("floor", "files", "zipapp"))
    summary = []
    try:
        if "floor" in only:
            floor = AgentProc(os.path.join(base, "floor"), command=[
                PY, "-c", FLOOR, dc.grpc, "elkeid.com", os.path.join(dc.certs, "ca.crt"),
                os.path.join(dc.certs, "client.crt"), os.path.join(dc.certs, "client.key"),
                "--"])
            try:
                wait_until(lambda: any(a.get("agent_id") == "memprobe-floor"
                                       for a in dc.agents()), 60, 0.2, "floor to connect")
                time.sleep(args.seconds)
                summary.append(("floor", report("floor", floor.pid, measure(floor.pid))))
            finally:
                floor.proc.kill()
                floor.proc.wait()
        files_env = {}
        if args.pycache:
            files_env = {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX":
                         os.path.abspath(args.pycache)}
        runs = [("files", "-m", files_env, (PY,))] if "files" in only else []
        if args.zipapp and "zipapp" in only:
            # A fresh cache: the first start extracts and compiles, the
            # second finds the bytecode the first wrote (-E: as the preamble).
            cache = {"ELKEID_AGENT_CACHE": os.path.join(base, "zipapp-cache")}
            os.makedirs(cache["ELKEID_AGENT_CACHE"], mode=0o700)
            zpy = (args.zipapp_python, "-sE")
            runs.append(("zipapp-first-start", os.path.abspath(args.zipapp), cache, zpy))
            runs.append(("zipapp", os.path.abspath(args.zipapp), cache, zpy))
        for label, target, env, python in runs:
            agent, out = run_inside(dc, base, label, target, env, python)
            try:
                time.sleep(args.seconds)
                # Measured before the dump: its thread is not part of it.
                measured = measure(agent.pid)
                info = inside_dump(out)
                summary.append((label, report(label, agent.pid, measured, info)))
            finally:
                agent.stop()
        if args.tracemalloc:
            env = dict(files_env, PYTHONTRACEMALLOC="1")
            agent, out = run_inside(dc, base, "tracemalloc", "-m", env)
            try:
                time.sleep(args.seconds)
                info = inside_dump(out, 120)
            finally:
                agent.stop()
            site = [d for d in sys.path if d.endswith("site-packages")]
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            print("\n== Python heap by package (tracemalloc, traced now/peak %d/%d kB)"
                  % tuple(v // 1024 for v in info["heap_traced"]))
            for name, size in heap_by_package(info["heap"], site + [root])[:40]:
                print("  %-50s %8.1f kB" % (name, size / 1024))
        print("\nsummary VmRSS: " + ", ".join("%s %.1f MB" % (n, kb / 1000) for n, kb in summary))
    finally:
        dc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
