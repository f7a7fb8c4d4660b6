"""Tasks addressed to the agent itself (PROTOCOL.md section 3).

1050 uploads a file over /grpc.FileExt/Upload, 1051 sets idc/region (persisted
in specified_env the way ``elkeidctl set`` writes it, then applied), 1060
shuts the agent down. Task data is untrusted JSON: every malformed field is
refused with a 5100 record naming the problem.
"""

import asyncio
import json
import logging
import os
import stat

from .. import settings as settings_mod
from .commands import SET_METADATA, SHUTDOWN, UPLOAD
from ..errors import AgentError, ServerFault

log = logging.getLogger(__name__)

UPLOAD_TIMEOUT = 600.0          # Go agent: 10 minutes per upload
UPLOAD_MAX_CHUNK = 500 * 1024   # chunks of min(buf_size, 500 KiB)
UPLOAD_CHUNKS_LIMIT = 600       # refuse files larger than buf_size * 600


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
                 chunk_interval=1.0):
        self.settings = settings
        self.transport = transport
        self.metrics = metrics
        self.report_failure = report_failure
        self.request_shutdown = request_shutdown
        self.chunk_interval = chunk_interval
        self.upload_task = None

    def handle(self, task):
        token = task.token
        try:
            if task.data_type == UPLOAD:
                self.start_upload(task.data, token)
            elif task.data_type == SET_METADATA:
                self.set_metadata(task.data, token)
            elif task.data_type == SHUTDOWN:
                log.info("shutdown requested by the server")
                self.request_shutdown("server task 1060")
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
        self.upload_task = asyncio.ensure_future(self._upload(path, buf_size, token))

    async def _upload(self, path, buf_size, token):
        loop = asyncio.get_running_loop()
        try:
            f = await loop.run_in_executor(None, _open_regular, path, buf_size * UPLOAD_CHUNKS_LIMIT)
        except ServerFault as e:
            self.fail(token, str(e), "upload")
            return
        chunk = min(buf_size, UPLOAD_MAX_CHUNK)
        sent = [0]

        async def chunks():
            first = True
            while True:
                if not first:
                    await asyncio.sleep(self.chunk_interval)
                first = False
                data = await loop.run_in_executor(None, f.read, chunk)
                sent[0] += len(data)
                yield data
                if len(data) < chunk:
                    return

        try:
            status = await self.transport.upload(token, chunks(), UPLOAD_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            self.fail(token, "upload of %s timed out after %d s" % (path, UPLOAD_TIMEOUT), "upload")
        except ServerFault as e:
            self.fail(token, str(e), "upload")
        except Exception as e:
            self.fail(token, "upload of %s failed: %s" % (path, e), "upload")
        else:
            if status != 0:
                self.fail(token, "server refused the upload of %s" % path, "upload")
            else:
                self.metrics.inc("uploads_completed")
                log.info("uploaded %s (%d bytes)", path, sent[0])
        finally:
            f.close()

    # ------------------------------------------------------------ 1051

    def set_metadata(self, data, token):
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
        try:
            settings_mod.write_env_file(self.settings.workdir, changes)
        except (OSError, AgentError) as e:
            raise ServerFault("cannot persist metadata: %s" % e, token) from None
        if "specified_idc" in changes:
            self.settings.idc = changes["specified_idc"]
        if "specified_region" in changes and changes["specified_region"] != self.settings.region:
            self.settings.region = changes["specified_region"]
            log.info("region changed to %s; reconnecting", self.settings.region)
            self.transport.reconnect()


def _open_regular(path, limit):
    # O_NONBLOCK: opening a FIFO named by the server must not hang a worker
    # thread; it is refused below as not a regular file anyway.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise ServerFault("cannot open %s: %s" % (path, e.strerror)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ServerFault("%s is not a regular file" % path)
        if st.st_size > limit:
            raise ServerFault("size limit exceeded: (%d/%d)" % (st.st_size, limit))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")
