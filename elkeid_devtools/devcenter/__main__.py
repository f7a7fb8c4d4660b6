"""``elkeid-devcenter`` / ``python -m elkeid_devtools.devcenter``: the CLI.

Owns argument parsing, logging setup, signal handling (SIGTERM/SIGINT stop,
SIGHUP reloads the certificate bundle: DevCenter.reload_certs) and the start line
``devcenter listening grpc=HOST:PORT http=HOST:PORT`` (printed on stdout and
flushed once both servers listen, so a parent using port 0 can find them).
"""

import argparse
import asyncio
import logging
import os
import signal
import sys

from .server import DevCenter
from .store import MODES, StoreError
from .summary import run_summary

# AgentCenter's own ports: 6751 for agents (gRPC), 6752 for the HTTP API.
DEFAULT_GRPC = "127.0.0.1:6751"
DEFAULT_HTTP = "127.0.0.1:6752"
DEFAULT_DIR = "devcenter-data"
DEFAULT_DB = os.path.join(DEFAULT_DIR, "devcenter.db")


def build_parser():
    p = argparse.ArgumentParser(
        prog="elkeid-devcenter",
        description="Development AgentCenter: gRPC (mTLS) for agents, HTTP command API, "
                    "records in SQLite. Listens on loopback only; port 0 picks a free port.")
    p.add_argument("--grpc", default=DEFAULT_GRPC, metavar="HOST:PORT",
                   help="gRPC listen address (default %(default)s)")
    p.add_argument("--http", default=DEFAULT_HTTP, metavar="HOST:PORT",
                   help="HTTP API listen address (default %(default)s)")
    p.add_argument("--certs", default=os.path.join(DEFAULT_DIR, "certs"), metavar="DIR",
                   help="certificate bundle; made when missing (default %(default)s)")
    p.add_argument("--db", default=DEFAULT_DB, metavar="FILE",
                   help="SQLite database; its directory must exist (default %(default)s, "
                        "made when missing)")
    p.add_argument("--uploads", default=None, metavar="DIR",
                   help="where uploaded files go (default: 'uploads' next to --db)")
    p.add_argument("--store", choices=MODES, default="full",
                   help="full: every record in SQLite; counts: only count records per "
                        "agent and data_type (benchmarks); seq: counts, plus the seq "
                        "numbers each agent's records carry (GET /seq, fault tests); "
                        "latency: counts, plus arrival minus each record's stamp field "
                        "(GET /conn/stat, the benchmark table)")
    p.add_argument("--read-rate", type=float, default=0, metavar="RECORDS_PER_SECOND",
                   help="read each Transfer stream at most this fast, to test an agent "
                        "against a slow server (default 0: no limit)")
    p.add_argument("--quiet", action="store_true", help="no live summary")
    p.add_argument("--interval", type=float, default=5.0, metavar="SECONDS",
                   help="seconds between summary lines (default %(default)s)")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    return p


async def _serve(args):
    dc = DevCenter(grpc_addr=args.grpc, http_addr=args.http, certs_dir=args.certs,
                   db_path=args.db, uploads_dir=args.uploads, store_mode=args.store,
                   read_rate=args.read_rate)
    await dc.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_certs, dc)
    print(dc.listening_line() + " certs=%s db=%s store=%s"
          % (dc.bundle.dir, dc.store.db_path, dc.store.mode), flush=True)
    summary = None
    if not args.quiet:
        summary = asyncio.ensure_future(run_summary(dc, max(args.interval, 0.5)))
    try:
        await stop.wait()
    finally:
        if summary is not None:
            summary.cancel()
        logging.getLogger("elkeid_devtools.devcenter").info("stopping")
        await dc.stop()
    return 0


def _reload_certs(dc):
    try:
        dc.reload_certs()
    except (OSError, ValueError) as e:
        logging.getLogger("elkeid_devtools.devcenter").error(
            "SIGHUP: certificates not reloaded, keeping those in use: %s", e)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.db == DEFAULT_DB:
        # Only the default data directory is made here (one level, in the
        # current directory); a --db elsewhere must name an existing one.
        try:
            os.makedirs(DEFAULT_DIR, mode=0o700, exist_ok=True)
        except OSError as e:
            print("elkeid-devcenter: cannot create %s: %s" % (DEFAULT_DIR, e.strerror or e),
                  file=sys.stderr)
            return 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_serve(args))
    except (ValueError, OSError, StoreError) as e:
        print("elkeid-devcenter: %s" % e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
