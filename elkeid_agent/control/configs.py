"""A configs list from the server: the complete desired set of plugins, plus
the agent's own entry (``elkeid-agent``).

Elkeid resets the agent's state to running on every configs list; here a
list resets only what the previous list caused (``AgentState``'s
server-driven reasons): a local fault such as an unwritable log directory
stays reported until it clears. The plugin entries go to the plugin
supervisor's declarative sync (which clears the previous sync's load
failures itself), and an agent entry with another version is a self-update
offer for the updater (update/updater.py), which applies or refuses it.
"""

import logging

from .. import __version__

log = logging.getLogger(__name__)


class ConfigsHandler:
    def __init__(self, state, plugins, owner, updater=lambda: None):
        """``plugins``: the PluginSupervisor, or None when plugin support is
        unavailable; ``owner``: the runtime.tasks.TaskOwner that runs syncs;
        ``updater()``: the AgentUpdater (None until the agent has one)."""
        self.state = state
        self.plugins = plugins
        self.owner = owner
        self.updater = updater

    def __call__(self, decision):
        self.state.reset_server_driven()
        if decision.agent is not None and decision.agent.version != __version__:
            updater = self.updater()
            if updater is None:
                self.state.set_abnormal("update", "update to %s: the updater is not running"
                                        % decision.agent.version)
            else:
                updater.offer(decision.agent)
        if self.plugins is None:
            if decision.plugins:
                names = ", ".join(sorted(c.name for c in decision.plugins))
                self.state.set_abnormal("plugins", "plugin support unavailable: %s" % names)
            return
        self.owner.run_once("plugin sync", self._sync(decision.plugins))

    async def _sync(self, configs):
        for name, error in await self.plugins.sync(configs) or ():
            log.error("plugin %s: %s", name, error)
