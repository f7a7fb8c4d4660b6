"""Agent state: ``running`` or ``abnormal`` with the reasons why.

The heartbeat reports ``state`` and ``state_detail`` (a JSON array of the
reasons, docs/protocol.md section 4). Reasons are keyed so the component
that raised one can clear it when the condition ends (e.g. a plugin that
recovered).

Two kinds of reason. Server-driven ones are about the desired state the
server sent (a refused self-update, plugins this build cannot run): Elkeid
resets the state on every configs list, and ``reset_server_driven`` does
that for these alone. Everything else is a local condition of this host or
agent (an unwritable workdir or log, the identity, a crashed task, TLS
files, a plugin process that will not die): the server cannot clear it by
sending a list, so it stays until the component that raised it sees it end.
Unknown keys count as local - forgetting a fault is worse than repeating it.
"""

import json
import time

RUNNING = "running"
ABNORMAL = "abnormal"

# Keys (exact) whose condition the server's configs list decides.
SERVER_DRIVEN = frozenset({"update", "plugins"})


def server_driven(key):
    return key in SERVER_DRIVEN


class AgentState:
    def __init__(self, clock=time.time):
        self._reasons = {}  # key -> (since, text)
        self._clock = clock

    def set_abnormal(self, key, text):
        if key not in self._reasons or self._reasons[key][1] != text:
            self._reasons[key] = (self._clock(), text)

    def clear(self, key):
        self._reasons.pop(key, None)

    def clear_prefix(self, prefix):
        for key in [k for k in self._reasons if k.startswith(prefix)]:
            del self._reasons[key]

    def reset_server_driven(self):
        """A configs list arrived: forget what the previous one caused.
        Local conditions stay until they clear."""
        for key in [k for k in self._reasons if server_driven(k)]:
            del self._reasons[key]

    def keys(self):
        return sorted(self._reasons)

    @property
    def state(self):
        return ABNORMAL if self._reasons else RUNNING

    def reasons(self):
        return [text for _since, text in sorted(self._reasons.values())]

    def heartbeat_fields(self):
        return self.state, json.dumps(self.reasons(), ensure_ascii=False)
