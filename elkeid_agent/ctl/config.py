"""specified_env as elkeidctl sees it: strict reading and set/unset.

The agent skips a bad line and keeps running (a fleet must not go dark over
a typo); elkeidctl is run by a person or an install script, so it refuses
to act on a file it cannot fully understand and says exactly what is wrong.
The parsing and the file format are the agent's (``elkeid_agent.settings``),
so both always agree on what the file means.
"""

from .. import settings
from ..errors import ConfigError
from .layout import (EXIT_NOT_CONFIGURED, EXIT_PRIVILEGE, EXIT_USAGE, SERVICE_TYPES_HELP,
    SPECIFIED_ENV, CtlError)

# elkeidctl set/unset flag -> (key written, older spellings removed with it).
# The Go elkeidctl wrote lower-case viper keys ("specified_id", and before
# that "id"/"idc"/"region"); the agent reads SPECIFIED_AGENT_ID for the id
# (agent/agent/id.go), so that is what we write, and we drop the old
# spellings so one value cannot shadow another.
KEYS = {
    "service_type": ("service_type", ("SERVICE_TYPE",)),
    "id": ("SPECIFIED_AGENT_ID", ("specified_agent_id", "specified_id", "id")),
    "idc": ("specified_idc", ("SPECIFIED_IDC", "idc")),
    "region": ("specified_region", ("SPECIFIED_REGION", "region")),
    # Beyond the Go elkeidctl (its server address is compiled in): where the
    # agent connects, so a package install can be pointed at AgentCenter.
    "server": ("ELKEID_SERVER", ()),
    "service_discovery": ("ELKEID_SERVICE_DISCOVERY", ()),
    "public_server": ("ELKEID_PUBLIC_SERVER", ()),
}

# Validation: the agent's own parsers, so elkeidctl never writes a value
# the agent would reject at start-up.
_VALIDATE = {
    "service_type": settings._SCALARS["service_type"][1],
    "id": settings._SCALARS["agent_id"][1],
    "idc": settings._SCALARS["idc"][1],
    "region": settings._SCALARS["region"][1],
    "server": lambda v: settings.check_hostport(v, "--server"),
    "service_discovery": lambda v: settings.check_hostport(v, "--service_discovery"),
    "public_server": lambda v: settings.check_hostport(v, "--public_server"),
}


def read(fx, required=True, path=SPECIFIED_ENV):
    """The values of specified_env (``path``). Raises CtlError (exit 6) when the file
    is missing (if ``required``), unreadable, or has lines that do not parse."""
    try:
        data = fx.read_bytes(path)
    except PermissionError:
        raise CtlError("cannot read %s: permission denied (run elkeidctl as root)"
                       % path, EXIT_PRIVILEGE) from None
    except OSError as e:
        raise CtlError("cannot read %s: %s" % (path, e.strerror or e),
                       EXIT_NOT_CONFIGURED) from None
    if data is None:
        if required:
            raise CtlError(
                "%s does not exist: this host is not set up. Run "
                "'elkeidctl set --service_type=%s' (the package's post-install does this)."
                % (path, SERVICE_TYPES_HELP), EXIT_NOT_CONFIGURED)
        return {}
    values, problems = settings.parse_env_file(data.decode("utf-8", "replace"))
    if problems:
        lines = "; ".join("line %d: %s" % p for p in problems)
        raise CtlError("%s is corrupt (%s). Fix or remove those lines, then run "
                       "elkeidctl again." % (path, lines), EXIT_NOT_CONFIGURED)
    return values


def service_type(values, path=SPECIFIED_ENV):
    """The configured service type; CtlError (exit 6) if absent or unknown."""
    st = values.get("service_type") or values.get("SERVICE_TYPE")
    if not st:
        raise CtlError("service_type is not set in %s. Run 'elkeidctl set --service_type=%s'."
                       % (path, SERVICE_TYPES_HELP), EXIT_NOT_CONFIGURED)
    if st not in settings.SERVICE_TYPES:
        raise CtlError("%s has service_type=%r; it must be %s. Run "
                       "'elkeidctl set --service_type=%s'."
                       % (path, st, " or ".join(settings.SERVICE_TYPES),
                          SERVICE_TYPES_HELP), EXIT_NOT_CONFIGURED)
    return st


def validate(flag, value):
    """The value for ``elkeidctl set --FLAG=VALUE``; CtlError (exit 2) if bad."""
    if value == "":
        raise CtlError("--%s needs a value (use 'elkeidctl unset --%s' to remove it)"
                       % (flag, flag), EXIT_USAGE)
    try:
        _VALIDATE[flag](value)
    except ConfigError as e:
        raise CtlError("--%s: %s" % (flag, e), EXIT_USAGE) from None
    return value


def changes_for_set(pairs):
    """{key: value or None} for [(flag, value)]; older spellings removed."""
    out = {}
    for flag, value in pairs:
        key, old = KEYS[flag]
        for k in old:
            out[k] = None
        out[key] = validate(flag, value)
    return out


def changes_for_unset(flags):
    out = {}
    for flag in flags:
        key, old = KEYS[flag]
        for k in (key,) + old:
            out[k] = None
    return out


def write(fx, changes, path=SPECIFIED_ENV):
    """Apply ``changes`` to specified_env (``path``), atomically, mode 0600. A file
    with lines that do not parse is refused (read() raises) rather than
    silently rewritten without them."""
    values = read(fx, required=False, path=path)
    try:
        new = settings.updated_env_file(values, changes)
    except ConfigError as e:
        raise CtlError(str(e), EXIT_USAGE) from None
    fx.makedirs(path.rsplit("/", 1)[0], 0o700)
    fx.write_file(path, settings.format_env_file(new).encode("utf-8"), 0o600)
