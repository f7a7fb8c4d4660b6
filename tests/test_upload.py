"""Task 1050 against the in-process development AgentCenter's FileExt: a file
at the size limit finishes, one byte more is refused with a 5100, and a
connection lost mid-upload is reported, not silently forgotten."""

import asyncio
import hashlib
import json
import os
import threading

import pytest

from elkeid_agent import wire
from elkeid_agent.buffer.queue import RecordQueue
from elkeid_agent.control.agent_tasks import AgentTasks
from elkeid_agent.metrics import Registry
from elkeid_agent.pb import grpc_pb2 as pb
from elkeid_agent.runtime.executors import Executors
from elkeid_agent.transport import upload
from elkeid_agent.transport.stream import Transport
from elkeid_agent.transport.upload import UploadPlan, Uploader
from elkeid_devtools.devcenter.server import DevCenter
from elkeid_devtools.launchers import wait_for
from test_transport_inprocess import settings_for


@pytest.mark.parametrize("buf_size", [1, 4096, 500 * 1024, 500 * 1024 + 1, 4 << 20, 1 << 30])
def test_every_admitted_file_fits_the_deadline_at_production_pacing(buf_size):
    plan = UploadPlan(buf_size)
    assert plan.chunk == min(buf_size, 500 * 1024)
    chunks = -(-plan.limit // plan.chunk)       # ceil: chunks of the largest admitted file
    assert (chunks - 1) * plan.interval < plan.timeout
    assert plan.interval == 1.0                 # Elkeid's pacing: one chunk a second


def task(token, path, buf_size):
    return pb.Task(data_type=1050, object_name="elkeid-agent", token=token,
                   data=json.dumps({"path": str(path), "buf_size": buf_size}))


def run_with_agent(tmp_path, body, max_chunk=1000, interval=0.005):
    async def main():
        dc = DevCenter(certs_dir=str(tmp_path / "certs"), db_path=str(tmp_path / "dc.db"),
                       http_addr=None)
        await dc.start()
        metrics = Registry()
        executors = Executors(metrics)
        s = settings_for(dc, tmp_path)
        header = wire.encode_header("up-agent", [], [], [], [], "h", "v", "elkeid-agent")
        queue = RecordQueue(1 << 20, metrics)
        t = Transport(s, queue, lambda: header, lambda raw: None, metrics)
        t.start()
        queue.put(wire.encode_record(1000, 0, {}))  # the devcenter names a stream by its data
        failures = []
        tasks = AgentTasks(s, t, metrics, lambda token, msg: failures.append((token, msg)),
                           lambda reason: None, executors,
                           uploader=Uploader(t, executors, max_chunk=max_chunk,
                                             interval=interval))
        try:
            await t.wait_connected(30)
            await dc.wait_for_agent("up-agent", timeout=30)
            return await body(dc, tasks, failures, metrics)
        finally:
            await t.stop(1)
            executors.close()
            await dc.stop()
    return asyncio.run(main())


def test_file_at_the_limit_for_a_buf_size_over_the_chunk_completes_and_over_it_is_refused(
        tmp_path):
    # buf_size 20 times the largest chunk, as a server asking for 10 MiB
    # chunks gets from Elkeid's 500 KiB cap.
    at_limit = os.urandom(600 * 1000)
    ok, big = tmp_path / "ok.bin", tmp_path / "big.bin"
    ok.write_bytes(at_limit)
    # Elkeid's rule admits buf_size * 600 bytes, which cannot be sent in
    # 600 chunks; one byte over our limit is refused at once instead.
    big.write_bytes(at_limit + b"x")

    async def body(dc, tasks, failures, metrics):
        tasks.handle(task("t-ok", ok, 20_000))
        rows = await wait_for(lambda: [u for u in dc.store.uploads(token="t-ok")
                                       if u["status"] == "success"] or failures, 60,
                              "the upload to finish")
        # The server stores the file before the agent has read its answer:
        # one upload at a time, so wait for the agent's side to end too.
        await wait_for(lambda: metrics.get("uploads_completed") or failures, 30,
                       "the agent to finish the upload")
        tasks.handle(task("t-big", big, 20_000))
        await wait_for(lambda: any(t == "t-big" for t, _ in failures), 30, "the refusal")
        return rows, failures

    rows, failures = run_with_agent(tmp_path, body)
    assert [t for t, _ in failures] == ["t-big"], failures
    assert rows[0]["size"] == len(at_limit)
    assert rows[0]["sha256"] == hashlib.sha256(at_limit).hexdigest()
    assert failures[0][1] == "size limit exceeded: (600001/600000)"


def test_empty_file_and_exact_multiple_of_the_chunk_arrive_whole(tmp_path):
    empty, exact = tmp_path / "empty", tmp_path / "exact"
    empty.write_bytes(b"")
    data = os.urandom(5000)
    exact.write_bytes(data)

    async def body(dc, tasks, failures, metrics):
        tasks.handle(task("t-empty", empty, 1000))
        await wait_for(lambda: dc.store.uploads(token="t-empty") or failures, 30, "empty")
        await wait_for(lambda: metrics.get("uploads_completed") or failures, 30,
                       "the agent to finish the first upload")
        tasks.handle(task("t-exact", exact, 1000))
        return await wait_for(lambda: dc.store.uploads(token="t-exact") or failures, 30,
                              "exact")

    rows = run_with_agent(tmp_path, body)
    assert rows[0]["status"] == "success" and rows[0]["size"] == 5000
    assert rows[0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_connection_lost_mid_upload_is_reported(tmp_path):
    path = tmp_path / "slow.bin"
    path.write_bytes(b"s" * 400_000)

    async def body(dc, tasks, failures, metrics):
        tasks.handle(task("t-lost", path, 1000))
        await wait_for(lambda: any(n.endswith(".part") for n in os.listdir(dc.store.uploads_dir))
                       if os.path.isdir(dc.store.uploads_dir) else False, 30, "upload start")
        await dc.disconnect("up-agent")
        await wait_for(lambda: failures, 60, "the failure report")
        return failures

    failures = run_with_agent(tmp_path, body, interval=0.05)
    assert failures[0][0] == "t-lost"
    assert "upload of %s failed" % path in failures[0][1]


def test_upload_reads_run_in_the_upload_executor(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"r" * 3000)
    seen = []
    real = upload.open_regular

    def spy(*args):
        seen.append(threading.current_thread().name)
        return real(*args)

    async def body(dc, tasks, failures, metrics):
        upload.open_regular = spy
        try:
            tasks.handle(task("t-exec", path, 1000))
            return await wait_for(lambda: dc.store.uploads(token="t-exec") or failures, 30,
                                  "upload")
        finally:
            upload.open_regular = real

    rows = run_with_agent(tmp_path, body)
    assert rows[0]["status"] == "success"
    assert seen and seen[0].startswith("elkeid-upload")
