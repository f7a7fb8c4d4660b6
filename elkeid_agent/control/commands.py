"""Where a server Command enters: decoding and routing (docs/protocol.md sections 2-3).

``decide`` is pure: raw Command bytes in, one decision out. A Command holds
either a task or a configs list, never both acted on: with a task present the
configs are ignored, exactly as the Go agent does. A Command without a task is
a configs list, even an empty one (the desired state "no plugins").

``Dispatcher`` is the thin shell the transport calls for each message; it
never raises, so a bad server message cannot take the stream down. Every
refusal is logged, counted, and, where the server gave a token, answered with
a 5100 record.
"""

import logging
from collections import namedtuple

from google.protobuf.message import DecodeError

from .. import PRODUCT
from ..pb import grpc_pb2

log = logging.getLogger(__name__)

UPLOAD, SET_METADATA, SHUTDOWN = 1050, 1051, 1060
SERVICE_UPDATE = 1070  # this agent's own: a local service's binary (update/services.py)
AGENT_TASKS = (UPLOAD, SET_METADATA, SHUTDOWN, SERVICE_UPDATE)

Configs = namedtuple("Configs", "agent plugins")  # agent: Config or None
AgentTask = namedtuple("AgentTask", "task")
PluginTask = namedtuple("PluginTask", "task")
Invalid = namedtuple("Invalid", "token reason")


def decide(raw, product=PRODUCT):
    try:
        cmd = grpc_pb2.Command.FromString(raw)
    except (DecodeError, ValueError) as e:
        return Invalid("", "malformed Command (%d bytes): %s" % (len(raw), e))
    if cmd.HasField("task"):
        task = cmd.task
        if task.object_name == product:
            if task.data_type in AGENT_TASKS:
                return AgentTask(task)
            return Invalid(task.token, "unknown agent task data_type %d" % task.data_type)
        if not task.object_name:
            return Invalid(task.token, "task has no object_name")
        return PluginTask(task)
    agent = None
    plugins = {}
    for config in cmd.configs:
        # A later entry with the same name replaces an earlier one, as the Go
        # agent's map does.
        if config.name == product:
            agent = config
        else:
            plugins[config.name] = config
    return Configs(agent, list(plugins.values()))


class Dispatcher:
    def __init__(self, metrics, report_failure, on_configs, on_agent_task, on_plugin_task):
        self.metrics = metrics
        self.report_failure = report_failure
        self.on_configs = on_configs
        self.on_agent_task = on_agent_task
        self.on_plugin_task = on_plugin_task
        metrics.describe("commands_received", "Command messages from the server, by kind")
        metrics.describe("commands_rejected", "Command messages refused, by reason")

    def __call__(self, raw):
        decision = decide(raw)
        kind = type(decision).__name__
        self.metrics.inc("commands_received", kind=kind)
        try:
            if isinstance(decision, Invalid):
                self.reject(decision.token, decision.reason, "invalid")
            elif isinstance(decision, Configs):
                self.on_configs(decision)
            elif isinstance(decision, AgentTask):
                self.on_agent_task(decision.task)
            else:
                self.on_plugin_task(decision.task)
        except Exception as e:  # a handler bug must not kill the stream
            token = getattr(getattr(decision, "task", None), "token", "")
            log.exception("handling %s failed", kind)
            self.reject(token, "internal error handling %s: %s" % (kind, e), "handler_error")

    def reject(self, token, reason, label):
        self.metrics.inc("commands_rejected", reason=label)
        log.error("command refused: %s", reason, extra={"fields": {"token": token}})
        if token:
            self.report_failure(token, reason)
