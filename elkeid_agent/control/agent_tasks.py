"""Tasks addressed to the agent itself (docs/protocol.md section 3).

1050 uploads a file over /grpc.FileExt/Upload (transport/upload.py owns the
limits and pacing), 1051 sets idc/region (persisted in specified_env the
way ``elkeidctl set`` writes it, then applied), 1060 shuts the agent down,
1070 updates a local service's binary (update/services.py owns it).
Task data is untrusted JSON: every malformed field is refused with a 5100
record naming the problem. Blocking file work runs in the executors
(``upload`` for reads, ``files`` for the fsync of specified_env), never on
the loop.
"""

import asyncio
import json
import logging

from .. import settings as settings_mod
from .commands import SERVICE_UPDATE, SET_METADATA, SHUTDOWN, UPLOAD
from ..errors import AgentError, ServerFault
from ..transport.upload import Uploader

log = logging.getLogger(__name__)


def parse_json_object(data, token):
    try:
        doc = json.loads(data or "")
    except ValueError as e:
        raise ServerFault("task data is not JSON: %s" % e, token) from None
    if not isinstance(doc, dict):
        raise ServerFault("task data is not a JSON object", token)
    return doc


def parse_upload(data, token):
    doc = parse_json_object(data, token)
    path, buf_size = doc.get("path"), doc.get("buf_size")
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ServerFault("upload: 'path' must be a non-empty string", token)
    if not isinstance(buf_size, int) or isinstance(buf_size, bool) or buf_size <= 0:
        raise ServerFault("upload: 'buf_size' must be a positive integer", token)
    return path, buf_size


class AgentTasks:
    def __init__(self, settings, transport, metrics, report_failure, request_shutdown,
                 executors, owner=None, uploader=None, write_env=None,
                 service_updates=lambda: None):
        """``service_updates()``: the update.services.ServiceUpdater, or
        None while the agent has none."""
        self.settings = settings
        self.transport = transport
        self.metrics = metrics
        self.report_failure = report_failure
        self.request_shutdown = request_shutdown
        self.executors = executors
        self.owner = owner
        self.uploader = uploader or Uploader(transport, executors)
        # A seam for tests: the blocking specified_env writer.
        self.write_env = write_env or settings_mod.write_env_file
        self.service_updates = service_updates
        self.upload_task = None
        self._metadata = None  # the 1051 being persisted, if any

    def _run(self, name, coro):
        if self.owner is not None:
            return self.owner.run_once(name, coro)
        return asyncio.ensure_future(coro)

    def handle(self, task):
        token = task.token
        try:
            if task.data_type == UPLOAD:
                self.start_upload(task.data, token)
            elif task.data_type == SET_METADATA:
                self.start_set_metadata(task.data, token)
            elif task.data_type == SHUTDOWN:
                log.info("shutdown requested by the server")
                self.request_shutdown("server task 1060")
            elif task.data_type == SERVICE_UPDATE:
                self.start_service_update(task.data, token)
        except AgentError as e:
            self.fail(token, str(e), "agent_task")

    def fail(self, token, msg, label):
        self.metrics.inc("agent_task_failures", kind=label)
        log.error("agent task failed: %s", msg, extra={"fields": {"token": token}})
        if token:
            self.report_failure(token, msg)

    # ------------------------------------------------------------ 1050

    def start_upload(self, data, token):
        path, buf_size = parse_upload(data, token)
        if self.upload_task is not None and not self.upload_task.done():
            raise ServerFault("last upload task hasn't completed", token)
        self.upload_task = self._run("upload", self._upload(path, buf_size, token))

    async def _upload(self, path, buf_size, token):
        try:
            sent = await self.uploader.upload(path, buf_size, token)
        except asyncio.CancelledError:
            raise
        except ServerFault as e:
            self.fail(token, str(e), "upload")
        except Exception as e:  # Saturated, OSError from a read: the task failed
            self.fail(token, "upload of %s failed: %s" % (path, e), "upload")
        else:
            self.metrics.inc("uploads_completed")
            log.info("uploaded %s (%d bytes)", path, sent)

    # ------------------------------------------------------------ 1070

    def start_service_update(self, data, token):
        updater = self.service_updates()
        if updater is None:
            raise ServerFault("service update: the updater is not running", token)
        updater.offer(data, token)

    # ------------------------------------------------------------ 1051

    def start_set_metadata(self, data, token):
        changes = self.parse_metadata(data, token)
        # One at a time, in arrival order: a later 1051 must not be
        # overwritten on disk by an earlier one still being written.
        previous = self._metadata
        self._metadata = self._run("set metadata", self._set_metadata(previous, changes, token))

    def parse_metadata(self, data, token):
        doc = parse_json_object(data, token)
        changes = {}
        idc, region = doc.get("idc"), doc.get("region")
        if idc is not None:
            if not isinstance(idc, str) or "\n" in idc or len(idc) > 256:
                raise ServerFault("set metadata: bad idc %r" % (idc,), token)
            changes["specified_idc"] = idc
        if region is not None:
            if not isinstance(region, str) or region not in self.settings.configured_regions():
                raise ServerFault("can't find region: %s" % (region,), token)
            changes["specified_region"] = region
        if not changes:
            raise ServerFault("set metadata: neither idc nor region given", token)
        return changes

    async def _set_metadata(self, previous, changes, token):
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        try:
            await self.executors.run("files", self.write_env, self.settings.workdir, changes)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # OSError, AgentError, Saturated
            self.fail(token, "cannot persist metadata: %s" % e, "agent_task")
            return
        self.apply_metadata(changes)

    def apply_metadata(self, changes):
        if "specified_idc" in changes:
            self.settings.idc = changes["specified_idc"]
        if "specified_region" in changes and changes["specified_region"] != self.settings.region:
            self.settings.region = changes["specified_region"]
            log.info("region changed to %s; reconnecting", self.settings.region)
            self.transport.reconnect()
