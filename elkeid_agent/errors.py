"""The agent's small exception hierarchy.

Faults are classified by who is to blame, because that decides the reaction:
a LocalFault is this host's problem (bad settings, unwritable workdir) and is
logged and marks the agent abnormal; a PluginFault is one plugin's problem and
costs that plugin a restart; a ServerFault is a bad message from AgentCenter
and is answered with a 5100 record when the server gave a token. Lower layers
raise WireError/ValueError; component boundaries translate them into these.
"""


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class LocalFault(AgentError):
    """Something on this host is wrong: settings, files, permissions."""


class ConfigError(LocalFault):
    """A setting (CLI flag, environment, specified_env) has a bad value."""


class PluginFault(AgentError):
    """A plugin broke its protocol or its limits."""


class ServerFault(AgentError):
    """The server sent something we cannot act on."""

    def __init__(self, message, token=""):
        super().__init__(message)
        self.token = token


class WireError(AgentError, ValueError):
    """Bytes that do not parse as the protobuf message they claim to be."""
