import asyncio
import gc
import os
import socket
import stat
import threading
import urllib.error
import urllib.request

import pytest

from elkeid_agent.runtime import debug
from elkeid_agent.metrics import Registry


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def _parked_in_thread(event):
    event.wait(30)


async def _inner_wait(event):
    await event.wait()


async def _outer_wait(event):
    await _inner_wait(event)


def test_stack_dump_shows_threads_and_task_await_chains():
    release = threading.Event()
    thread = threading.Thread(target=_parked_in_thread, args=(release,), name="worker-park")
    thread.start()

    async def main():
        event = asyncio.Event()
        task = asyncio.ensure_future(_outer_wait(event))
        task.set_name("sleeper")
        await asyncio.sleep(0)
        try:
            return debug.stack_dump()
        finally:
            event.set()
            await task

    try:
        text = run(main())
    finally:
        release.set()
        thread.join()
    assert "Thread worker-park" in text
    assert "_parked_in_thread" in text
    assert "Thread MainThread" in text and "current" in text
    assert "Task sleeper (_outer_wait):" in text
    # The whole chain, not just the outermost frame.
    sleeper = text[text.index("Task sleeper"):]
    assert sleeper.index("_outer_wait") < sleeper.index("_inner_wait")
    assert "awaiting <Future" in sleeper
    assert "asyncio tasks" in text


def test_stack_dump_without_a_loop_lists_threads_only():
    text = debug.stack_dump()
    assert "Thread MainThread" in text
    assert "asyncio tasks" not in text


def test_stack_dump_caps_the_task_list():
    async def main():
        event = asyncio.Event()
        tasks = [asyncio.ensure_future(event.wait()) for _ in range(5)]
        await asyncio.sleep(0)
        text = debug.stack_dump(max_tasks=2)
        event.set()
        await asyncio.gather(*tasks)
        return text

    text = run(main())
    total = int(text.split("# ", 2)[2].split(" asyncio tasks")[0])
    assert total >= 6  # five waiters and main()
    assert text.count("\nTask ") == 2
    assert "... %d more tasks not shown" % (total - 2) in text


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, None, exc.read().decode()


def test_toggle_starts_serves_and_stops(tmp_path):
    addr_file = str(tmp_path / "tmp" / "debug.addr")
    metrics = Registry()
    metrics.inc("records_sent", 7)
    endpoint = debug.DebugEndpoint(metrics, addr_file)
    endpoint.add_page("/debug/settings", lambda req: (200, "application/json", '{"a": 1}'))
    with pytest.raises(ValueError):
        endpoint.add_page("/elsewhere", lambda req: (200, "text/plain", ""))

    async def main():
        loop = asyncio.get_running_loop()
        address = await endpoint.toggle()
        assert address == endpoint.address and endpoint.running
        with open(addr_file) as f:
            assert f.read() == address + "\n"
        assert stat.S_IMODE(os.stat(addr_file).st_mode) == 0o600
        base = "http://%s" % address
        stacks = await loop.run_in_executor(None, _get, base + "/debug/stacks")
        prom = await loop.run_in_executor(None, _get, base + "/debug/metrics")
        index = await loop.run_in_executor(None, _get, base + "/debug/")
        settings = await loop.run_in_executor(None, _get, base + "/debug/settings")
        assert await endpoint.toggle() is None
        assert not endpoint.running
        assert not os.path.exists(addr_file)
        host, port = address.rsplit(":", 1)
        with pytest.raises(OSError):
            await asyncio.open_connection(host, int(port))
        return stacks, prom, index, settings

    stacks, prom, index, settings = run(main())
    assert stacks[0] == 200 and "Thread MainThread" in stacks[2] and "Task " in stacks[2]
    assert prom[0] == 200 and prom[1].startswith("text/plain; version=0.0.4")
    assert "elkeid_agent_records_sent 7" in prom[2]
    assert index[2].split() == ["/debug/metrics", "/debug/settings", "/debug/stacks"]
    assert settings[:2] == (200, "application/json")
    assert metrics.get("http_requests", server="debug", code="200") == 4


def test_bind_failure_is_counted_and_leaves_it_stopped(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    metrics = Registry()
    endpoint = debug.DebugEndpoint(metrics, str(tmp_path / "debug.addr"), port=port)
    try:
        assert run(endpoint.toggle()) is None
    finally:
        taken.close()
    assert not endpoint.running
    assert not (tmp_path / "debug.addr").exists()
    assert metrics.get("debug_endpoint_errors", reason="bind") == 1


def test_unwritable_address_file_stops_the_server(tmp_path):
    (tmp_path / "notadir").write_text("")
    metrics = Registry()
    endpoint = debug.DebugEndpoint(metrics, str(tmp_path / "notadir" / "debug.addr"))
    assert run(endpoint.toggle()) is None
    assert not endpoint.running
    assert metrics.get("debug_endpoint_errors", reason="addr_file") == 1


def test_concurrent_toggles_are_serialized(tmp_path):
    addr_file = tmp_path / "debug.addr"
    endpoint = debug.DebugEndpoint(Registry(), str(addr_file))

    async def main():
        first, second = await asyncio.gather(endpoint.toggle(), endpoint.toggle())
        third = await endpoint.toggle()
        running = endpoint.running
        await endpoint.close()
        return first, second, third, running

    first, second, third, running = run(main())
    assert first and first.startswith("127.0.0.1:")
    assert second is None
    assert third and running
    assert not endpoint.running and not addr_file.exists()


def test_release_memory_collects_and_trims():
    class Node:
        pass

    gc.disable()
    try:
        for _ in range(20):
            a, b = Node(), Node()
            a.other, b.other = b, a
        del a, b
        result = debug.release_memory()
    finally:
        gc.enable()
    assert result["gc_collected"] >= 40
    if os.path.exists("/proc/self/statm"):
        assert result["rss_before"] > 0 and result["rss_after"] > 0
    import platform
    if platform.libc_ver()[0] == "glibc":
        assert result["malloc_trim"] in (True, False)


def test_release_memory_without_malloc_trim(monkeypatch):
    monkeypatch.setattr(debug, "_malloc_trim", [])

    def missing():
        raise AttributeError("malloc_trim")

    monkeypatch.setattr(debug, "_load_malloc_trim", missing)
    assert debug.release_memory()["malloc_trim"] is None

    def broken(pad):
        raise OSError("boom")

    monkeypatch.setattr(debug, "_malloc_trim", [broken])
    assert debug.release_memory()["malloc_trim"] is None
