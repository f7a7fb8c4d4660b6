"""Command line entry points: ``elkeid-agent``, ``elkeidctl`` and the zipapp.

``elkeid-agent run`` starts the agent; ``elkeid-agent ctl ...`` (or the same
file invoked as ``elkeidctl``) is the service control tool. Argument errors
exit with status 2 and one line on stderr, never a traceback.
"""

import argparse
import os
import sys

from . import PRODUCT, __version__
from .errors import AgentError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, "%s: error: %s\n" % (self.prog, message))


def _run_parser():
    p = _Parser(prog="elkeid-agent", description="Elkeid host agent (Python).")
    p.add_argument("--version", action="version", version="%s %s" % (PRODUCT, __version__))
    sub = p.add_subparsers(dest="command", metavar="{run,ctl}")
    run = sub.add_parser("run", help="run the agent in the foreground")
    run.add_argument("--workdir", help="working directory (default /etc/elkeid)")
    run.add_argument("--server", metavar="HOST:PORT", help="private AgentCenter endpoint")
    run.add_argument("--service-discovery", metavar="HOST:PORT", help="service discovery endpoint")
    run.add_argument("--public-server", metavar="HOST:PORT", help="public AgentCenter endpoint")
    run.add_argument("--ca", metavar="FILE")
    run.add_argument("--cert", metavar="FILE")
    run.add_argument("--key", metavar="FILE")
    run.add_argument("--server-name", metavar="NAME", help="name the server certificate must carry")
    run.add_argument("--agent-id", metavar="ID", help="overrides SPECIFIED_AGENT_ID")
    run.add_argument("--heartbeat-interval", metavar="SECONDS")
    run.add_argument("--compression", metavar="none|gzip|auto")
    run.add_argument("--services", metavar="FILE", dest="services_file",
                     help="local services file (default WORKDIR/services.yaml)")
    sub.add_parser("ctl", help="service control (same as elkeidctl)", add_help=False)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.path.basename(sys.argv[0] or "").startswith("elkeidctl"):
        return ctl_main(argv)
    if argv[:1] == ["ctl"]:
        return ctl_main(argv[1:])
    args = _run_parser().parse_args(argv)
    if args.command != "run":
        _run_parser().print_help(sys.stderr)
        return EXIT_USAGE
    cli = {k: v for k, v in vars(args).items() if k != "command"}
    # The agent never forks to keep running (plugins start with posix_spawn),
    # so gRPC's fork handlers can only hurt: their child side aborts when a
    # stream is busy, and recent grpcio enables them by default. Read once,
    # when grpc is imported; a user's explicit setting wins.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    from . import settings
    from .app import run_agent
    try:
        s = settings.load(cli)
    except AgentError as e:
        print("elkeid-agent: %s" % e, file=sys.stderr)
        return EXIT_USAGE
    return run_agent(s)


def ctl_main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    from .ctl import main as ctl
    return ctl(argv)


if __name__ == "__main__":
    sys.exit(main())
