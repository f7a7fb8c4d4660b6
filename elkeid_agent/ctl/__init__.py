"""``elkeidctl``: control the elkeid-agent service (stdlib only).

    elkeidctl start | stop | restart | check | enable | disable
    elkeidctl status [--json]
    elkeidctl set --service_type=systemd|sysvinit --id=ID --idc=IDC --region=REGION
    elkeidctl unset --service_type --id --idc --region
    elkeidctl cgroup [--apply] [--json]
    elkeidctl cleanup | service-reload
    elkeidctl services [--json] | services restart|stop|start ID | services reload|stop-all
    elkeidctl update [--json] [--limit N] | update --clear
    elkeidctl rollback [--yes]

``--workdir DIR`` (or ``ELKEID_WORKDIR``; default /etc/elkeid) before the
command says where the agent's files are, for every command.

The same subcommands and flags as the Go elkeidctl, in systemd and sysvinit
mode (``service_type`` in /etc/elkeid/specified_env). Every failure is one
line on stderr and a non-zero exit code (see layout.py); never a traceback.
"""

import argparse
import os
import sys

from .layout import EXIT_FAILURE, EXIT_USAGE, CtlError

HISTORY_LIMIT = 20  # elkeidctl update: rows shown without --limit

COMMANDS = ("start", "stop", "restart", "status", "enable", "disable", "check", "set",
            "unset", "cgroup", "cleanup", "service-reload", "services", "update", "rollback")
SET_FLAGS = ("service_type", "id", "idc", "region", "server", "service_discovery",
             "public_server")
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug; the message asks for a report
_HELP = {
    "start": "start the agent",
    "stop": "stop the agent (SIGTERM, SIGKILL after 30 s in sysvinit mode)",
    "restart": "stop, then start",
    "status": "show whether the agent runs, its processes, limits and plugins",
    "enable": "start the agent at boot",
    "disable": "do not start the agent at boot",
    "check": "start the agent if it is not running (cron runs this in sysvinit mode)",
    "set": "set values in /etc/elkeid/specified_env",
    "unset": "remove values from /etc/elkeid/specified_env",
    "cgroup": "show (or --apply) the agent's cgroup and limits",
    "cleanup": "remove leftovers: legacy cgroup mounts, stray cgroup members, stale pid files",
    "service-reload": "make the service manager re-read its files",
    "services": "list the running agent's local services, or restart|stop|start|reload them",
    "update": "show the update history and the versions not retried (or --clear them)",
    "rollback": "go back to the version before the newest successful agent update",
}


class _Exit(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, out=None, err=None, **kw):
        super().__init__(*a, **kw)
        self._streams = (out, err)

    def error(self, message):
        err = self._streams[1]
        err.write("%s: error: %s\n" % (self.prog, message))
        err.write("Try '%s --help'.\n" % self.prog)
        raise _Exit(EXIT_USAGE)

    def exit(self, status=0, message=None):
        if message:
            self._streams[1].write(message)
        raise _Exit(status)

    def print_help(self, file=None):
        super().print_help(self._streams[0])

    def print_usage(self, file=None):
        super().print_usage(self._streams[1])

    def _print_message(self, message, file=None):
        if message:
            self._streams[0].write(message)


def _parser(out, err):
    from .commands import version_line
    p = _Parser(prog="elkeidctl", out=out, err=err,
                description="Control the elkeid-agent service (systemd or sysvinit).")
    p.add_argument("--version", action="version", version=version_line())
    p.add_argument("--workdir", metavar="DIR",
                   help="the agent's directory (default: $ELKEID_WORKDIR, else /etc/elkeid)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name):
        return sub.add_parser(name, help=_HELP[name], description=_HELP[name],
                              out=out, err=err)

    for name in ("start", "stop", "restart", "enable", "disable", "check", "cleanup",
                 "service-reload"):
        add(name)
    add("status").add_argument("--json", action="store_true", help="print JSON")
    sv = add("services")
    sv.add_argument("--json", action="store_true", help="print the list as JSON")
    actions = sv.add_subparsers(dest="action", metavar="ACTION")
    for name, text in (("restart", "stop and start a service now"),
                       ("stop", "stop a service and keep it stopped"),
                       ("start", "start a stopped or failed service")):
        actions.add_parser(name, help=text, description=text, out=out, err=err) \
            .add_argument("service_id", metavar="ID")
    actions.add_parser("reload", help="re-read the services file", out=out, err=err)
    text = ("with the agent stopped: stop every service an agent left running (its "
            "state file's runs and any elkeid-service-* unit); the package's pre-remove")
    actions.add_parser("stop-all", help=text, description=text, out=out, err=err)
    up = add("update")
    up.add_argument("--json", action="store_true", help="print JSON")
    up.add_argument("--limit", type=_positive, default=None, metavar="N",
                    help="show the newest N updates (default %d)" % HISTORY_LIMIT)
    up.add_argument("--clear", action="store_true",
                    help="forget the versions not retried, so the server's next offer of "
                         "them is tried again")
    add("rollback").add_argument("--yes", action="store_true",
                                 help="do it (without: print what would be done)")
    cg = add("cgroup")
    cg.add_argument("--apply", action="store_true",
                    help="create the cgroup with its limits and move the agent into it")
    cg.add_argument("--json", action="store_true", help="print JSON")
    s = add("set")
    u = add("unset")
    helps = {"service_type": "systemd or sysvinit", "id": "agent id (SPECIFIED_AGENT_ID)",
             "idc": "IDC of the host", "region": "region of the host",
             "server": "AgentCenter HOST:PORT (ELKEID_SERVER)",
             "service_discovery": "service discovery HOST:PORT",
             "public_server": "public AgentCenter HOST:PORT"}
    for flag in SET_FLAGS:
        names = ["--" + flag] + (["--" + flag.replace("_", "-")] if "_" in flag else [])
        s.add_argument(*names, dest=flag, metavar="VALUE", help=helps[flag])
        u.add_argument(*names, dest=flag, action="store_true", help="remove the " + flag)
    return p


def parse(argv, out, err):
    argv = list(argv)
    p = _parser(out, err)
    first = _first_word(argv)
    if first is not None and first not in COMMANDS:
        p.error("unknown command %r (commands: %s)" % (first, ", ".join(COMMANDS)))
    args = p.parse_args(argv)
    if args.command is None:
        p.print_usage()
        err.write("elkeidctl: error: a command is required (commands: %s)\n" % ", ".join(COMMANDS))
        raise _Exit(EXIT_USAGE)
    workdir = args.workdir if args.workdir is not None else os.environ.get("ELKEID_WORKDIR")
    if workdir is not None and (not workdir.strip() or "\x00" in workdir):
        p.error("--workdir needs a directory, got %r" % workdir)
    args.workdir = workdir or None
    if args.command == "update" and args.clear and (args.json or args.limit is not None):
        p.error("update --clear takes neither --json nor --limit")
    if args.command in ("set", "unset"):
        chosen = [f for f in SET_FLAGS if getattr(args, f) not in (None, False)]
        if not chosen:
            p.error("%s needs at least one of %s" % (
                args.command, " ".join("--" + f for f in SET_FLAGS)))
    return args


def _positive(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError("needs a whole number of 1 or more, got %r" % text)
    return n


def _first_word(argv):
    """The command: the first word that is not an option or the value of
    ``--workdir``."""
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workdir":
            skip = True
        elif not a.startswith("-"):
            return a
    return None


def main(argv=None, fx=None, out=None, err=None, install_fx=None):
    """Run elkeidctl; returns the exit code. ``fx``: the service seam
    (ServiceEffects); ``install_fx``: rollback's file and package seam
    (InstallEffects)."""
    out = out or sys.stdout
    err = err or sys.stderr
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv, out, err)
    except _Exit as e:
        return e.code
    try:
        return _run(args, fx, out, err, install_fx)
    except CtlError as e:
        err.write("elkeidctl: %s\n" % e)
        return e.code
    except KeyboardInterrupt:
        err.write("elkeidctl: interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_FAILURE
    except OSError as e:
        where = (" " + str(e.filename)) if e.filename else ""
        err.write("elkeidctl: %s:%s %s\n" % (args.command, where, e.strerror or e))
        return EXIT_FAILURE
    except Exception as e:  # never a traceback; but say it is a bug
        err.write("elkeidctl: internal error in '%s': %s: %s (please report this)\n"
                  % (args.command, type(e).__name__, e))
        return EXIT_INTERNAL


def _run(args, fx, out, err, install_fx):
    from .commands import Ctl
    from .layout import Paths
    paths = Paths(args.workdir) if args.workdir else Paths()
    cmd = args.command
    if cmd == "services":
        from . import services
        return services.run(Ctl(fx, out, err, paths), args.action,
                            getattr(args, "service_id", None), args.json)
    if fx is None:
        from ..osfx.service import ServiceEffects
        fx = ServiceEffects()
    ctl = Ctl(fx, out, err, paths)
    if cmd == "status":
        from .status import collect, render_json, render_table
        info, code = collect(ctl)
        ctl.say(render_json(info) if args.json else render_table(info))
        return code
    if cmd == "set":
        return ctl.set([(f, getattr(args, f)) for f in SET_FLAGS if getattr(args, f) is not None])
    if cmd == "unset":
        return ctl.unset([f for f in SET_FLAGS if getattr(args, f)])
    if cmd == "cgroup":
        return ctl.cgroup(args.apply, args.json)
    if cmd == "update":
        from . import update
        if args.clear:
            return update.clear(ctl)
        return update.history(ctl, args.json, args.limit or HISTORY_LIMIT)
    if cmd == "rollback":
        from . import update
        return update.rollback(ctl, args.yes, install_fx)
    method = getattr(ctl, cmd.replace("-", "_"))
    return method()


__all__ = ["main", "COMMANDS"]
