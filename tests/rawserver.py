"""A loopback TCP server that answers every connection with fixed bytes,
for peers that do not speak HTTP properly (garbage, a truncated body, a
pathological JSON document)."""

import socket
import threading

DEEP_JSON = b"[" * 100_000
REPLIES = {
    "garbage": b"\x00\xff\xfeSSH-2.0-not-http\r\n\r\n",
    "deep": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(DEEP_JSON), DEEP_JSON),
    # Promises 1000 bytes, sends a few, closes.
    "midbody": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"code\": 0, \"data\": [",
}


class RawServer:
    def __init__(self, reply):
        self.reply = REPLIES.get(reply, reply)
        self.hits = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1  # before answering: the client may move on at once
            with conn:
                try:
                    conn.settimeout(5)
                    conn.recv(65536)  # the request; its content does not matter
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self):
        self.sock.close()
