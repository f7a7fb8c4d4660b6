import os
import socket

import pytest

from elkeid_agent.runtime import sdnotify


@pytest.fixture
def receiver(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_unset_socket_is_a_no_op():
    assert sdnotify.notify("READY=1", environ={}) is False
    assert sdnotify.ready(environ={"NOTIFY_SOCKET": ""}) is False


def test_path_socket_receives_messages(receiver):
    path, sock = receiver
    env = {"NOTIFY_SOCKET": path}
    assert sdnotify.ready("connected to\nserver", environ=env) is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=connected to server"
    assert sdnotify.watchdog(environ=env) is True
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.stopping(environ=env) is True
    assert sock.recv(4096) == b"STOPPING=1"
    assert sdnotify.status("idle", environ=env) is True
    assert sock.recv(4096) == b"STATUS=idle"


def test_abstract_socket():
    name = "elkeid-agent-test-%d" % os.getpid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_uses_the_process_environment(receiver, monkeypatch):
    path, sock = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.notify("STATUS=from env") is True
    assert sock.recv(4096) == b"STATUS=from env"


@pytest.mark.parametrize("value", ["relative/path", "vsock:2:1234", "/nonexistent/dir/sock",
                                   "/bad\0path"])
def test_unusable_sockets_return_false(value):
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": value}) is False


def test_empty_message_is_not_sent(receiver):
    path, _ = receiver
    assert sdnotify.notify("", environ={"NOTIFY_SOCKET": path}) is False


def test_watchdog_interval():
    pid = str(os.getpid())
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": pid}) == 1.5
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "1500000",
                                       "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    for bad in ("0", "-5", "abc", ""):
        assert sdnotify.watchdog_interval({"WATCHDOG_USEC": bad}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}) is None
