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
EXIT_REEXEC = -1  # run_agent's answer when a one-file update wants the new file run


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, "%s: error: %s\n" % (self.prog, message))


def _run_parser():
    from .settings import Settings
    d = Settings()
    p = _Parser(prog="elkeid-agent", description="Elkeid host agent (Python).")
    p.add_argument("--version", action="version", version="%s %s" % (PRODUCT, __version__))
    sub = p.add_subparsers(dest="command", metavar="{run,ctl}")
    run = sub.add_parser(
        "run", help="run the agent in the foreground",
        description="Run the agent in the foreground. Every flag overrides its environment "
                    "variable, which overrides <workdir>/specified_env.")
    run.add_argument("--workdir", metavar="DIR",
                     help="working directory, $ELKEID_WORKDIR (default: %s)" % d.workdir)
    run.add_argument("--server", metavar="HOST:PORT",
                     help="private AgentCenter endpoint, $ELKEID_SERVER (default: none)")
    run.add_argument("--service-discovery", metavar="HOST:PORT",
                     help="service discovery endpoint, $ELKEID_SERVICE_DISCOVERY "
                          "(default: none)")
    run.add_argument("--public-server", metavar="HOST:PORT",
                     help="public AgentCenter endpoint, $ELKEID_PUBLIC_SERVER (default: none)")
    for flag, what, default in (("--ca", "CA certificate the server's must chain to", d.ca),
                                ("--cert", "client certificate", d.cert),
                                ("--key", "client private key (unencrypted PEM)", d.key)):
        run.add_argument(flag, metavar="FILE",
                         help="%s, relative to the current directory; $ELKEID_%s (relative "
                              "to the workdir) (default: <workdir>/%s)"
                              % (what, flag[2:].upper(), default))
    run.add_argument("--server-name", metavar="NAME",
                     help="name the server certificate must carry, $ELKEID_SERVER_NAME "
                          "(default: %s)" % d.server_name)
    run.add_argument("--agent-id", metavar="ID",
                     help="agent id, $SPECIFIED_AGENT_ID (default: derived from the host, "
                          "saved in <workdir>/machine-id)")
    run.add_argument("--heartbeat-interval", metavar="SECONDS",
                     help="seconds between heartbeats, $ELKEID_HEARTBEAT_INTERVAL "
                          "(default: %g)" % d.heartbeat_interval)
    run.add_argument("--compression", metavar="none|gzip|auto",
                     help="message compression, $ELKEID_COMPRESSION; auto: gzip only on the "
                          "public endpoint (default: %s)" % d.compression)
    run.add_argument("--dial-timeout", metavar="SECONDS",
                     help="give up one connection attempt after this long, "
                          "$ELKEID_DIAL_TIMEOUT (default: %g)" % d.dial_timeout)
    run.add_argument("--tls-check-seconds", metavar="SECONDS",
                     help="re-read the TLS files this often (and on SIGHUP) to pick up a "
                          "rotated set, $ELKEID_TLS_CHECK_SECONDS (default: %g)"
                          % d.tls_check_seconds)
    run.add_argument("--cert-expiry-warn-days", metavar="DAYS",
                     help="warn when the client certificate or the CA expires within this "
                          "many days, $ELKEID_CERT_EXPIRY_WARN_DAYS (default: %g)"
                          % d.cert_expiry_warn_days)
    run.add_argument("--status-addr", metavar="127.0.0.1:PORT",
                     help="serve GET /health, /metrics, /services and POST /heartbeat there, "
                          "$ELKEID_STATUS_ADDR, loopback only (default: off)")
    run.add_argument("--spool-dir", metavar="DIR",
                     help="disk spool for records the memory queue cannot hold, "
                          "$ELKEID_SPOOL_DIR; relative to the current directory "
                          "(default: <workdir>/spool)")
    run.add_argument("--spool-max-mb", metavar="MB",
                     help="disk spool quota, $ELKEID_SPOOL_MAX_MB; never more than half the "
                          "filesystem's free space; 0 turns the spool off (default: %d)"
                          % d.spool_max_mb)
    run.add_argument("--services", metavar="FILE", dest="services_file",
                     help="local services file, $ELKEID_SERVICES; relative to the current "
                          "directory (default: <workdir>/services.yaml, no services if absent)")
    sub.add_parser("ctl", help="service control (same as elkeidctl)", add_help=False)
    return p


def _cwd_paths(cli):
    """A TLS or services path typed on the command line means what the
    shell means: relative to the current directory (the workdir resolves the
    environment's and specified_env's, as the Go agent does)."""
    for name in ("ca", "cert", "key", "services_file", "spool_dir"):
        if cli.get(name):
            cli[name] = os.path.abspath(cli[name])
    return cli


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.path.basename(sys.argv[0] or "").startswith("elkeidctl"):
        return ctl_main(argv)
    if argv[:1] == ["ctl"]:
        return ctl_main(argv[1:])
    if argv[:1] == ["update-guard"]:
        # Started by the agent from its backup copy (update/guard.py); not
        # for people, so not in the help.
        from .update.guard import main as guard_main
        return guard_main(argv[1:])
    args = _run_parser().parse_args(argv)
    if args.command != "run":
        _run_parser().print_help(sys.stderr)
        return EXIT_USAGE
    cli = _cwd_paths({k: v for k, v in vars(args).items() if k != "command"})
    # The agent never forks to keep running (plugins start with posix_spawn),
    # so gRPC's fork handlers can only hurt: their child side aborts when a
    # stream is busy, and recent grpcio enables them by default. Read once,
    # when grpc is imported; a user's explicit setting wins.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    # gRPC's C core writes its own lines to stderr (handshake failures,
    # address resolution), which would drown the agent's curated ones; the
    # agent says why a dial failed itself (transport/diagnose.py). Also read
    # at import; a user who sets GRPC_VERBOSITY gets what they asked for.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from . import settings
    from .app import run_agent
    try:
        s = settings.load(cli)
    except AgentError as e:
        print("elkeid-agent: %s" % e, file=sys.stderr)
        return EXIT_USAGE
    code = run_agent(s)
    if code == EXIT_REEXEC:
        return _reexec()
    return code


def _reexec():
    """Become the new version after a one-file update (same pid, so the
    guard watching it, and whoever started us, keep their handle)."""
    archive = os.path.abspath(sys.argv[0])
    argv = [sys.executable, "-sE", archive] + sys.argv[1:]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, argv)
    except OSError as e:
        print("elkeid-agent: re-executing %s failed: %s" % (archive, e), file=sys.stderr)
        return EXIT_FAILURE


def ctl_main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    from .ctl import main as ctl
    return ctl(argv)


if __name__ == "__main__":
    sys.exit(main())
