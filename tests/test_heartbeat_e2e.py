"""The first heartbeat of a real agent process: its cpu is the usage since
start, never more than the CPUs the heartbeat itself reports."""

import threading

from harness import wait_until


def spin(stop):
    while not stop.is_set():
        pass


def test_first_heartbeat_cpu_is_bounded_by_nproc_on_a_busy_start(devcenter, start_agent):
    stop = threading.Event()
    # A busy host while the agent starts: its first samples land late and
    # in uneven slices, which is when tick noise showed.
    spinner = threading.Thread(target=spin, args=(stop,), daemon=True)
    spinner.start()
    try:
        for n in range(3):
            start_agent("cpu-agent-%d" % n)
        firsts = [devcenter.wait_records(1000, agent_id="cpu-agent-%d" % n, timeout=60)[0]
                  for n in range(3)]
    finally:
        stop.set()
    for rec in firsts:
        f = rec["fields"]
        assert 0 <= float(f["cpu"]) <= int(f["nproc"]), f["cpu"]
    wait_until(lambda: not spinner.is_alive(), 10, what="spinner to stop")
