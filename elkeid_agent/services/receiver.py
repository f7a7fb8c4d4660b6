"""The agent's end of a service's heartbeat socket (``socket_path``).

One ``HeartbeatReceiver`` per service that has a socket: a unix stream
server the agent listens on and the service connects to, sending one JSON
heartbeat per line (or JSON-RPC 2.0 calls, answered when they have an id;
``services/heartbeat.py``). Everything that arrives is hostile until
parsed: reads are bounded, over-long lines are dropped by the
``LineSplitter`` and counted (``service_heartbeat_lines_dropped``), bad
messages are refused and counted with their reason
(``service_heartbeats_refused{service,reason}``), a connection that sends
nothing but garbage is closed after ``MAX_BAD_IN_A_ROW`` bad lines, and at
most ``MAX_CONNECTIONS`` connections are served per socket. None of it can
end the server or disturb another service's socket.
"""

import asyncio
import logging
import os
import stat

from . import heartbeat as hb

log = logging.getLogger("elkeid_agent.services")

READ_SIZE = 64 * 1024
MAX_CONNECTIONS = 8
MAX_BAD_IN_A_ROW = 100


class HeartbeatReceiver:
    def __init__(self, service_id, path, deliver, metrics):
        """``deliver(service_id, Heartbeat) -> (ok, error)`` is the supervisor's
        ``heartbeat``."""
        self.service_id = service_id
        self.path = path
        self.deliver = deliver
        self.metrics = metrics
        self._server = None
        self._conns = set()
        self.error = ""

    async def open(self):
        """Listen; False (with ``error`` set) when the socket cannot be made."""
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None:
                if not stat.S_ISSOCK(st.st_mode):
                    raise OSError("%s exists and is not a socket" % self.path)
                os.unlink(self.path)  # a stale socket of an earlier agent
            self._server = await asyncio.start_unix_server(self._serve, self.path,
                                                           limit=READ_SIZE)
            os.chmod(self.path, 0o660)
        except OSError as e:
            self.error = "cannot listen on %s: %s" % (self.path, e.strerror or e)
            return False
        self.error = ""
        return True

    async def close(self):
        if self._server is not None:
            self._server.close()
            for w in list(self._conns):
                w.close()
            await self._server.wait_closed()
            self._server = None
            try:
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
            except OSError:
                pass

    def _refused(self, reason):
        self.metrics.inc("service_heartbeats_refused", service=self.service_id, reason=reason)

    async def _serve(self, reader, writer):
        if len(self._conns) >= MAX_CONNECTIONS:
            self.metrics.inc("service_socket_refused", service=self.service_id)
            writer.close()
            return
        self._conns.add(writer)
        splitter = hb.LineSplitter()
        bad = 0
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                lines, dropped = splitter.feed(data)
                if dropped:
                    self.metrics.inc("service_heartbeat_lines_dropped", dropped,
                                     service=self.service_id)
                    bad += dropped
                for line in lines:
                    reply, ok = self._handle(line)
                    bad = 0 if ok else bad + 1
                    if reply:
                        writer.write(reply)
                if writer.transport.get_write_buffer_size() > 4 * READ_SIZE:
                    # A client that never reads its answers cannot make us buffer them.
                    self.metrics.inc("service_socket_closed", service=self.service_id,
                                     reason="unread_replies")
                    break
                await writer.drain()
                if bad >= MAX_BAD_IN_A_ROW:
                    self.metrics.inc("service_socket_closed", service=self.service_id,
                                     reason="garbage")
                    log.warning("service %s: closed its socket connection after %d bad "
                                "lines in a row", self.service_id, bad)
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()

    def _handle(self, line):
        try:
            beat = hb.parse(line)
        except hb.HeartbeatError as e:
            self._refused(e.reason)
            log.debug("service %s: bad heartbeat: %s", self.service_id, e)
            return b"", False
        ok, error = self.deliver(self.service_id, beat)
        return hb.rpc_reply(beat, None if ok else error), ok
