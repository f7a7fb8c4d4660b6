import asyncio
import socket
import urllib.error
import urllib.request

import pytest

from elkeid_agent.runtime.httpd import LoopbackHTTPServer
from elkeid_agent.metrics import Registry
from plugins_fixtures.harness import wait_until


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def raw(port, data, host="127.0.0.1"):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    resp = await reader.read()
    writer.close()
    return resp


def parse(resp):
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def fetch(url, data=None, method=None):
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def make_server(**kw):
    server = LoopbackHTTPServer(metrics=Registry(), name="test", **kw)
    server.route("GET", "/hello", lambda req: (200, "text/plain", "hi " + ",".join(
        req.query.get("name", []))))

    async def echo(req):
        await asyncio.sleep(0)
        return 201, "application/octet-stream", req.body

    server.route("POST", "/echo", echo)
    return server


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "localhost", "", "example.com"])
def test_refuses_non_loopback_bind(host):
    with pytest.raises(ValueError):
        LoopbackHTTPServer(host=host)


def test_accepts_loopback_literals():
    LoopbackHTTPServer(host="127.0.0.1")
    LoopbackHTTPServer(host="127.0.0.2")
    LoopbackHTTPServer(host="::1")
    with pytest.raises(ValueError):
        LoopbackHTTPServer(port=70000)


def test_sync_async_and_head_over_real_sockets():
    async def main():
        server = make_server()
        port = await server.start()
        assert port > 0 and server.url("/x") == "http://127.0.0.1:%d/x" % port
        loop = asyncio.get_running_loop()
        try:
            status, headers, body = await loop.run_in_executor(
                None, fetch, server.url("/hello?name=a&name=b"))
            assert (status, body) == (200, b"hi a,b")
            assert headers["Connection"] == "close"
            status, _, body = await loop.run_in_executor(
                None, fetch, server.url("/echo"), b"\x00payload")
            assert (status, body) == (201, b"\x00payload")
            resp = await raw(port, b"HEAD /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, headers, body = parse(resp)
            assert status == 200 and headers["content-length"] == "3" and body == b""
        finally:
            await server.stop()
        return server

    server = run(main())
    assert server.metrics.get("http_requests", server="test", code="200") == 2
    assert server.metrics.get("http_requests", server="test", code="201") == 1


def test_not_found_and_method_not_allowed():
    async def main():
        server = make_server()
        port = await server.start()
        try:
            nf = parse(await raw(port, b"GET /nope HTTP/1.1\r\n\r\n"))
            na = parse(await raw(port, b"DELETE /hello HTTP/1.1\r\n\r\n"))
        finally:
            await server.stop()
        return nf, na

    nf, na = run(main())
    assert nf[0] == 404 and b"/nope" in nf[2]
    assert na[0] == 405 and na[1]["allow"] == "GET, HEAD"


@pytest.mark.parametrize("request_bytes,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /hello HTTP/2.0\r\n\r\n", 400),
    (b"GET http://evil/hello HTTP/1.1\r\n\r\n", 400),
    (b"G\x00T /hello HTTP/1.1\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\r\nX: a\r\n  folded\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\r\nBad Name: v\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    (b"POST /echo HTTP/1.1\r\nContent-Length: 70000\r\n\r\n", 413),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    (b"GET /hello HTTP/1.1\r\nHost: attacker.example:80\r\n\r\n", 421),
    (b"GET /hello HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"GET /hello HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", 200),
    (b"GET /hello HTTP/1.0\r\nHost: localhost:8080\r\n\r\n", 200),
    (b"GET /hel%6co HTTP/1.1\r\n\r\n", 200),
])
def test_hostile_requests(request_bytes, status):
    async def main():
        server = make_server()
        port = await server.start()
        try:
            first = parse(await raw(port, request_bytes))
            # Whatever came before, the server still answers.
            after = parse(await raw(port, b"GET /hello HTTP/1.1\r\n\r\n"))
        finally:
            await server.stop()
        return first, after, server

    first, after, server = run(main())
    assert first[0] == status
    assert after[0] == 200
    assert server.metrics.get("http_requests", server="test", code=str(status)) >= 1


async def _half_close_write(port, data):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    resp = await reader.read()
    writer.close()
    return resp


def test_client_closing_early_gets_nothing_and_hurts_nothing():
    async def main():
        server = make_server()
        port = await server.start()
        try:
            assert await _half_close_write(port, b"") == b""
            resp = await _half_close_write(port, b"GET /hello HTTP/1.1\r\n")  # head cut short
            assert parse(resp)[0] == 400
            resp = await _half_close_write(
                port, b"POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            assert resp == b""
            return parse(await raw(port, b"GET /hello HTTP/1.1\r\n\r\n"))[0]
        finally:
            await server.stop()

    assert run(main()) == 200


def test_early_error_reply_lingers_for_the_rest_of_the_request():
    # The server answers 413 before reading the body. It must then keep
    # reading (bounded) instead of closing at once: a close with unread
    # input sends a reset, and the client still sending its body would get
    # a broken pipe instead of reading the reply (lingering close, RFC 9112).
    async def main():
        server = make_server()
        port = await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /echo HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
            await writer.drain()
            reply = await reader.read()  # the server half-closed after replying
            for _ in range(10):
                writer.write(b"x" * 10000)
                await writer.drain()
            writer.close()
            return parse(reply)[0]
        finally:
            await server.stop()

    assert run(main()) == 413


def test_handler_failures_are_500_and_counted():
    async def main():
        server = make_server()

        def broken(req):
            raise RuntimeError("bug")

        async def bad_result(req):
            return "not a tuple"

        server.route("GET", "/broken", broken)
        server.route("GET", "/bad", bad_result)
        server.route("GET", "/badstatus", lambda req: (99, "text/plain", b""))
        server.route("GET", "/badbody", lambda req: (200, "text/plain", 12))
        port = await server.start()
        try:
            codes = [parse(await raw(port, b"GET %s HTTP/1.1\r\n\r\n" % p))[0]
                     for p in (b"/broken", b"/bad", b"/badstatus", b"/badbody", b"/hello")]
        finally:
            await server.stop()
        return codes, server

    codes, server = run(main())
    assert codes == [500, 500, 500, 500, 200]
    assert server.metrics.get("http_handler_errors", server="test") == 4


def test_slow_client_gets_408():
    async def main():
        server = make_server(timeout=0.2)
        port = await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /hello HTTP/1.1\r\n")  # and then nothing
            await writer.drain()
            resp = await reader.read()
            writer.close()
        finally:
            await server.stop()
        return parse(resp)[0]

    assert run(main()) == 408


def test_connection_cap_and_stop_with_idle_connections():
    async def main():
        server = make_server(max_connections=1)
        port = await server.start()
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        await wait_until(lambda: server._conns, 60, "the idle connection to be accepted")
        assert len(server._conns) == 1
        try:
            refused = await raw(port, b"GET /hello HTTP/1.1\r\n\r\n")
        except ConnectionResetError:
            refused = b""
        assert refused == b""
        assert server.metrics.get("http_rejected_connections", server="test") == 1
        await server.stop()
        assert not server.running
        assert await idle_r.read() == b""  # stop() closed the idle connection
        idle_w.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    run(main())


def test_start_twice_and_restart():
    async def main():
        server = make_server()
        await server.start()
        with pytest.raises(RuntimeError):
            await server.start()
        await server.stop()
        await server.stop()  # idempotent
        port = await server.start()
        status = parse(await raw(port, b"GET /hello HTTP/1.1\r\n\r\n"))[0]
        await server.stop()
        return status

    assert run(main()) == 200


def _has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_ipv6_loopback():
    async def main():
        server = make_server(host="::1")
        port = await server.start()
        assert server.url("/hello") == "http://[::1]:%d/hello" % port
        try:
            return parse(await raw(port, b"GET /hello HTTP/1.1\r\nHost: [::1]\r\n\r\n", host="::1"))
        finally:
            await server.stop()

    assert run(main())[0] == 200
