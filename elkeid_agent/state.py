"""Agent state: ``running`` or ``abnormal`` with the reasons why.

The heartbeat reports ``state`` and ``state_detail`` (a JSON array of the
reasons, PROTOCOL.md section 4). Reasons are keyed so the component that
raised one can clear it when the condition ends (e.g. a plugin that recovered),
and a configs list from the server resets everything to running, as Elkeid
does.
"""

import json
import time

RUNNING = "running"
ABNORMAL = "abnormal"


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

    def reset(self):
        """Back to running (a configs list arrived)."""
        self._reasons.clear()

    @property
    def state(self):
        return ABNORMAL if self._reasons else RUNNING

    def reasons(self):
        return [text for _since, text in sorted(self._reasons.values())]

    def heartbeat_fields(self):
        return self.state, json.dumps(self.reasons(), ensure_ascii=False)
