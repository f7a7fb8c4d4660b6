"""A local service for the supervisor's tests, misbehaving on request.

    svc.py [--socket PATH --id ID [--interval S] [--rpc] [--pid self|init|child]]
           [--exit-after S [--exit-code N]] [--ignore-term] [--daemonize]
           [--flood] [--hog-mb N] [--pidfile FILE]

Heartbeats (one JSON line per ``--interval`` on ``--socket``; ``--pid init``
reports pid 1, ``--pid child`` sends them from a child process);
``--exit-after`` ends with ``--exit-code``; ``--ignore-term`` ignores
SIGTERM; ``--daemonize`` double-forks (new session) and the first process
exits 0; ``--flood`` sends over-long lines and garbage instead of
heartbeats; ``--hog-mb`` holds that much memory. ``--pidfile`` gets the pid
of the process that does the work.
"""

import argparse
import datetime
import json
import os
import signal
import socket
import sys
import time


def heartbeat_line(args, pid):
    body = {"agent_id": args.id, "pid": pid, "status": "running", "cpu": 0.5,
            "memory": 1024, "timestamp": datetime.datetime.now(
                datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if args.rpc:
        body = {"jsonrpc": "2.0", "method": "heartbeat", "params": body, "id": 1}
    return (json.dumps(body) + "\n").encode()


def connect(path):
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            return s
        except OSError:
            s.close()
            time.sleep(0.1)


def beat_forever(args):
    sock = None
    pid = {"self": os.getpid(), "init": 1}.get(args.pid, os.getpid())
    while True:
        if sock is None:
            sock = connect(args.socket)
        try:
            sock.sendall(heartbeat_line(args, pid))
            if args.rpc:
                sock.recv(4096)
        except OSError:
            sock.close()
            sock = None
        time.sleep(args.interval)


def flood_forever(args):
    sock = None
    big = b"x" * (1 << 20)
    while True:
        if sock is None:
            sock = connect(args.socket)
        try:
            for _ in range(3):
                sock.sendall(big)
            sock.sendall(b"\n" + b"{not json}\n" * 200 + b"\xff\xfe\n")
        except OSError:
            sock.close()
            sock = None
            time.sleep(0.05)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--socket")
    p.add_argument("--id", default="svc")
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--rpc", action="store_true")
    p.add_argument("--pid", default="self", choices=("self", "init", "child"))
    p.add_argument("--exit-after", type=float)
    p.add_argument("--exit-code", type=int, default=0)
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--daemonize", action="store_true")
    p.add_argument("--flood", action="store_true")
    p.add_argument("--hog-mb", type=int, default=0)
    p.add_argument("--pidfile")
    args = p.parse_args()
    if args.daemonize:
        if os.fork():
            os._exit(0)
        os.setsid()
        if os.fork():
            os._exit(0)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if args.pidfile:
        with open(args.pidfile + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(args.pidfile + ".tmp", args.pidfile)
    hog = bytearray(args.hog_mb << 20)
    for i in range(0, len(hog), 4096):
        hog[i] = 1
    print("svc %d started" % os.getpid(), flush=True)
    if args.exit_after is not None:
        time.sleep(args.exit_after)
        print("svc exiting with %d" % args.exit_code, file=sys.stderr, flush=True)
        sys.exit(args.exit_code)
    if args.flood and args.socket:
        flood_forever(args)
    if args.socket:
        if args.pid == "child":
            if os.fork() == 0:
                beat_forever(args)
            while True:
                time.sleep(3600)
        beat_forever(args)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
