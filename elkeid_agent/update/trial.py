"""The new version's side of a trial, and the reports of finished updates.

A version the guard is trying out finds its row in the journal (state
``switching`` or ``trial``, ``to_version`` its own) and marks it healthy
once it is connected and a heartbeat it queued after connecting has gone
onto the stream: ``healthy_at``, its pid and start time (the guard then
watches that process until the trial ends). Any agent reports the updates
that ended while it could not (a rollback is reported by the restored
version, a success by the new one): a DataType 5100 record and the agent
state (abnormal ``update`` unless it succeeded).
"""

import asyncio
import logging
import os
import time

from .. import __version__, wire
from ..osfx import proc_start_ticks
from ..runtime.logs import DATA_TYPE_TASK_RESULT
from .journal import JournalError
from .offer import AGENT

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0

_WORDS = {"succeeded": "succeeded", "failed": "failed (nothing changed)",
          "refused": "refused (nothing changed)", "rolled_back": "failed and was rolled back",
          "rollback_failed": "failed and its rollback failed",
          "interrupted": "was interrupted (nothing changed)"}


def summary(row):
    if row.context.get("manual"):
        # elkeidctl rollback: an operator's step, not an update; its reason says so.
        return "%s %s -> %s: %s" % (row.component, row.from_version, row.to_version,
                                    row.reason or row.state)
    text = "update of %s %s -> %s %s" % (row.component, row.from_version, row.to_version,
                                         _WORDS.get(row.state, row.state))
    return text + (": %s" % row.reason if row.reason and row.state != "succeeded" else "")


def record(row, now=None):
    """The 5100 record of a finished update (docs/update.md)."""
    when = int(time.time() if now is None else now)
    fields = {"token": str(row.context.get("token", "")),
              "status": "succeeded" if row.state == "succeeded" else "failed",
              "msg": summary(row), "kind": "update", "result": row.state,
              "component": row.component, "old_version": row.from_version,
              "new_version": row.to_version, "reason": row.reason or "",
              "rolled_back": "true" if row.state == "rolled_back" else "false",
              "update_id": str(row.id)}
    return wire.encode_record(DATA_TYPE_TASK_RESULT, when, fields)


def report(journal, row, emit, state):
    """Send one finished row's record, set the state, mark it reported."""
    emit(record(row))
    text = summary(row)
    if row.state == "succeeded":
        state.clear("update")
        log.info("%s", text, extra={"console": True})
    else:
        state.set_abnormal("update", text)
        log.error("%s", text)
    journal.mark_reported(row.id)


class TrialReporter:
    """One task of the agent: health marks for a trial of this version,
    then reports until no update is in flight."""

    def __init__(self, journal, transport, queue, beat, state, emit, component=AGENT):
        self.journal = journal
        self.transport = transport
        self.queue = queue
        self.beat = beat
        self.state = state
        self.emit = emit
        self.component = component

    def report_finished(self):
        for row in self.journal.unreported():
            report(self.journal, row, self.emit, self.state)

    def my_trial(self):
        for row in self.journal.in_flight(self.component):
            if row.to_version == __version__ and row.state in ("switching", "trial") \
                    and not row.healthy_at:
                return row
        return None

    async def run(self):
        try:
            self.report_finished()
            row = self.my_trial()
            if row is not None:
                log.info("update %d: this version (%s) is on trial; reporting health once "
                         "connected", row.id, __version__, extra={"console": True})
                await self._until_heartbeat_sent()
                self.journal.set(row.id, healthy_at=time.time(), new_pid=os.getpid(),
                                 new_start=proc_start_ticks(os.getpid()) or 0)
                log.info("update %d: connected and heartbeat sent; trial continues until its "
                         "deadline", row.id)
            while self.journal.in_flight(self.component):
                await asyncio.sleep(POLL_SECONDS)
                self.report_finished()
            self.report_finished()
        except JournalError as e:
            log.error("update journal: %s", e)
            self.state.set_abnormal("update", "update journal: %s" % e)

    async def _until_heartbeat_sent(self):
        while True:
            await self.transport.wait_connected()
            sent = self.transport.stats.tx_messages
            self.beat()
            while self.transport.connected:
                if self.queue.own_pending() == 0 and self.transport.stats.tx_messages > sent:
                    return
                await asyncio.sleep(0.1)
