"""Fetching plugins: local reuse, downloads from 127.0.0.1, verification
before anything is written where it could run, hostile archives, swap."""

import gzip
import io
import os
import socket
import stat
import tarfile
import threading
import time

import pytest

from elkeid_agent.plugins import fetch
from elkeid_agent.plugins.fetch import Cancelled, FetchError
from elkeid_agent.plugins.policy import Policy
from elkeid_agent.plugins.syncplan import PluginSpec
from plugins_fixtures.harness import FileServer, bad_status_line, sha256, truncated_chunks

EXE = b"#!/bin/sh\necho plugin\n"


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "plugin")


def spec(name="p", urls=(), sha="", sig="", type_=""):
    return PluginSpec(name=name, version="1", type=type_, sha256=sha, signature=sig,
                      urls=tuple(urls))


def listing(root):
    out = []
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return sorted(out)


def prepare_commit(root, s, policy=None):
    staged = fetch.prepare(root, s, policy or Policy())
    if staged is not None:
        fetch.commit(root, staged)
    return staged


def tar_gz(members, compresslevel=6):
    """members: list of (TarInfo-ish dict, data bytes or None)."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tf:
            for info, data in members:
                ti = tarfile.TarInfo(info["name"])
                ti.type = info.get("type", tarfile.REGTYPE)
                ti.mode = info.get("mode", 0o644)
                ti.linkname = info.get("linkname", "")
                if data is not None:
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
                else:
                    tf.addfile(ti)
    return raw.getvalue()


def reg(name, data, mode=0o644):
    return ({"name": name, "mode": mode}, data)


# ------------------------------------------------------------------ local / exe

def test_local_file_with_matching_signature_is_reused(root, server):
    os.makedirs(os.path.join(root, "p"))
    with open(os.path.join(root, "p", "p"), "wb") as f:
        f.write(EXE)
    url = server.add("/p", b"other bytes")
    assert fetch.prepare(root, spec(urls=[url], sha=sha256(b"other bytes"),
                                    sig=sha256(EXE)), Policy()) is None
    assert server.hits == []


def test_local_file_falls_back_to_sha256_when_signature_is_empty(root):
    os.makedirs(os.path.join(root, "p"))
    with open(os.path.join(root, "p", "p"), "wb") as f:
        f.write(EXE)
    assert fetch.prepare(root, spec(sha=sha256(EXE).upper()), Policy()) is None


def test_local_symlink_is_not_trusted(root, server, tmp_path):
    real = tmp_path / "elsewhere"
    real.write_bytes(EXE)
    os.makedirs(os.path.join(root, "p"))
    os.symlink(str(real), os.path.join(root, "p", "p"))
    url = server.add("/p", EXE)
    staged = fetch.prepare(root, spec(urls=[url], sha=sha256(EXE)), Policy())
    assert staged is not None and server.hits == ["/p"]
    fetch.discard(staged)


def test_download_executable(root, server):
    url = server.add("/p", EXE)
    staged = prepare_commit(root, spec(urls=[url], sha=sha256(EXE)))
    path = os.path.join(root, "p", "p")
    assert staged.kind == "exe" and staged.source == url
    with open(path, "rb") as f:
        assert f.read() == EXE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(root, "p")).st_mode) == 0o700
    assert listing(root) == ["p", "p/p"]  # no staging leftovers


def test_sha256_mismatch_writes_nothing_that_could_run(root, server):
    url = server.add("/p", EXE)
    with pytest.raises(FetchError, match="sha256 mismatch: got %s" % sha256(EXE)):
        fetch.prepare(root, spec(urls=[url], sha="0" * 64), Policy())
    assert listing(root) == []


def test_every_url_failing_is_reported_in_order(root, server):
    server.add("/500", b"oops", status=500)
    server.add("/redir", b"", status=302, headers={"Location": "file:///etc/passwd"})
    server.add("/redir-ftp", b"", status=301, headers={"Location": "ftp://127.0.0.1/p"})
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = "http://127.0.0.1:%d/x" % closed.getsockname()[1]
    closed.close()
    urls = [server.url("/missing"), server.url("/500"), dead, "ftp://127.0.0.1/p",
            "file:///etc/passwd", server.url("/redir"), server.url("/redir-ftp"), "not a url"]
    with pytest.raises(FetchError) as info:
        fetch.prepare(root, spec(urls=urls, sha=sha256(EXE)), Policy())
    msg = str(info.value)
    assert msg.startswith("every download URL failed")
    for part in ("/missing: HTTP 404", "/500: HTTP 500", "/x: cannot connect",
                 "unsupported URL scheme 'ftp'", "unsupported URL scheme 'file'",
                 "/redir: HTTP 302", "unsupported URL scheme ''"):
        assert part in msg
    assert msg.index("/missing") < msg.index("/500") < msg.index("/x:")
    assert "'file:///etc/passwd' is not allowed" in msg or "'file' URL refused" in msg
    assert listing(root) == []


def test_first_good_url_wins_after_failures(root, server):
    good = server.add("/good", EXE)
    also = server.add("/also", EXE)
    staged = fetch.prepare(root, spec(urls=[server.url("/nope"), good, also], sha=sha256(EXE)),
                           Policy())
    assert staged.source == good and server.hits == ["/nope", "/good"]
    fetch.discard(staged)


def test_redirect_to_http_is_followed(root, server):
    server.add("/real", EXE)
    url = server.add("/redir", b"", status=302, headers={"Location": server.url("/real")})
    staged = fetch.prepare(root, spec(urls=[url], sha=sha256(EXE)), Policy())
    assert staged is not None
    fetch.discard(staged)


def test_content_length_over_the_cap_is_refused_before_reading(root, server):
    url = server.add("/big", b"x" * 2000)
    with pytest.raises(FetchError, match="Content-Length 2000 exceeds the 1000 byte limit"):
        fetch.prepare(root, spec(urls=[url], sha=sha256(b"x" * 2000)),
                      Policy(download_max_bytes=1000))


def test_body_over_the_cap_without_length_is_refused(root, server):
    def stream(handler):
        handler.send_response(200)
        handler.end_headers()
        for _ in range(100):
            handler.wfile.write(b"y" * 1000)
        handler.close_connection = True

    url = server.add("/stream", stream)
    with pytest.raises(FetchError, match="body exceeds the 50000 byte limit"):
        fetch.prepare(root, spec(urls=[url], sha="0" * 64), Policy(download_max_bytes=50000))
    assert listing(root) == []


def test_overall_download_deadline(root, server):
    def trickle(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "100")
        handler.end_headers()
        try:
            for _ in range(100):
                handler.wfile.write(b"z")
                handler.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    url = server.add("/slow", trickle)
    with pytest.raises(FetchError, match="longer than allowed|timed out|deadline"):
        fetch.prepare(root, spec(urls=[url], sha="0" * 64), Policy(download_timeout=0.5))
    assert listing(root) == []


def test_malformed_sha256_and_missing_urls(root, server):
    url = server.add("/p", EXE)
    with pytest.raises(FetchError, match="not 64 hex digits"):
        fetch.prepare(root, spec(urls=[url], sha="abc"), Policy())
    with pytest.raises(FetchError, match="no download URL"):
        fetch.prepare(root, spec(sha=sha256(EXE)), Policy())
    assert server.hits == []


def test_cancel_stops_a_download(root, server):
    event = threading.Event()
    event.set()
    url = server.add("/p", EXE)
    with pytest.raises(Cancelled):
        fetch.prepare(root, spec(urls=[url], sha=sha256(EXE)), Policy(), cancel=event)
    assert listing(root) == []


# ------------------------------------------------------------------ archives

def test_archive_is_extracted_and_swapped_keeping_old_state(root, server):
    os.makedirs(os.path.join(root, "p", "log"))
    with open(os.path.join(root, "p", "log", "p.log"), "w") as f:
        f.write("old log")
    with open(os.path.join(root, "p", "config.yaml"), "w") as f:
        f.write("old config")
    archive = tar_gz([reg("./p", EXE, 0o755), ({"name": "lib", "type": tarfile.DIRTYPE}, None),
                      reg("lib/helper.so", b"\x7fELF", 0o4755), reg("config.yaml", b"new")])
    url = server.add("/p.tgz", archive)
    staged = prepare_commit(root, spec(urls=[url], sha=sha256(archive), sig=sha256(EXE),
                                       type_="tar.gz"))
    assert staged.kind == "dir"
    assert listing(root) == ["p", "p/config.yaml", "p/lib", "p/lib/helper.so", "p/log",
                             "p/log/p.log", "p/p"]
    mode = lambda *p: stat.S_IMODE(os.stat(os.path.join(root, *p)).st_mode)  # noqa: E731
    assert mode("p", "p") == 0o700
    assert mode("p") == 0o700 and mode("p", "lib") == 0o700
    assert mode("p", "lib", "helper.so") == 0o700  # setuid bit dropped
    assert mode("p", "config.yaml") == 0o600
    with open(os.path.join(root, "p", "config.yaml")) as f:
        assert f.read() == "new"                    # the archive wins
    with open(os.path.join(root, "p", "log", "p.log")) as f:
        assert f.read() == "old log"                # state is carried over
    # Next time the local executable matches the signature: no download.
    assert fetch.prepare(root, spec(urls=[url], sha=sha256(archive), sig=sha256(EXE),
                                    type_="tar.gz"), Policy()) is None


def test_archive_swap_without_renameat2(root, server, monkeypatch):
    monkeypatch.setattr(fetch, "_RENAMEAT2", None)
    os.makedirs(os.path.join(root, "p"))
    with open(os.path.join(root, "p", "keep"), "w") as f:
        f.write("k")
    archive = tar_gz([reg("p", EXE)])
    url = server.add("/p.tgz", archive)
    prepare_commit(root, spec(urls=[url], sha=sha256(archive), type_="tar.gz"))
    assert listing(root) == ["p", "p/keep", "p/p"]


HOSTILE = {
    "traversal": ([reg("p", EXE), reg("../evil", b"x")], "escapes the plugin directory"),
    "nested traversal": ([reg("p", EXE), reg("a/../../evil", b"x")], "escapes"),
    "absolute path": ([reg("p", EXE), reg("/tmp/evil-plugin-file", b"x")], "absolute path"),
    "symlink": ([reg("p", EXE), ({"name": "link", "type": tarfile.SYMTYPE,
                                  "linkname": "/etc/passwd"}, None)], "is a link"),
    "hardlink": ([reg("p", EXE), ({"name": "hard", "type": tarfile.LNKTYPE,
                                   "linkname": "p"}, None)], "is a link"),
    "char device": ([reg("p", EXE), ({"name": "null", "type": tarfile.CHRTYPE}, None)],
                    "device or fifo"),
    "block device": ([reg("p", EXE), ({"name": "sda", "type": tarfile.BLKTYPE}, None)],
                     "device or fifo"),
    "fifo": ([reg("p", EXE), ({"name": "fifo", "type": tarfile.FIFOTYPE}, None)],
             "device or fifo"),
    "duplicate member": ([reg("p", EXE), reg("p", EXE)], "appears twice"),
    "file then dir": ([reg("p", EXE), reg("d", b"x"), reg("d/f", b"y")],
                      "both a file and a directory"),
    "no executable": ([reg("other", EXE)], "does not contain the executable 'p'"),
    "executable is a directory": ([({"name": "p", "type": tarfile.DIRTYPE}, None)],
                                  "is not a regular file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_leave_nothing(case, root, server, tmp_path):
    members, why = HOSTILE[case]
    archive = tar_gz(members)
    url = server.add("/p.tgz", archive)
    with pytest.raises(FetchError, match=why):
        fetch.prepare(root, spec(urls=[url], sha=sha256(archive), type_="tar.gz"), Policy())
    assert listing(root) == []
    assert not os.path.exists("/tmp/evil-plugin-file")
    assert not os.path.exists(os.path.join(os.path.dirname(root), "evil"))


def test_garbage_and_truncated_archives(root, server):
    for body, why in ((b"not gzip at all", "not a tar.gz archive|corrupt archive"),
                      (tar_gz([reg("p", os.urandom(20000))])[:10000], "corrupt archive|truncated")):
        url = server.add("/p.tgz", body)
        with pytest.raises(FetchError, match=why):
            fetch.prepare(root, spec(urls=[url], sha=sha256(body), type_="tar.gz"), Policy())
        assert listing(root) == []


def test_too_many_members(root, server):
    archive = tar_gz([reg("p", EXE)] + [reg("f%d" % i, b"") for i in range(20)])
    url = server.add("/p.tgz", archive)
    with pytest.raises(FetchError, match="more than 10 members"):
        fetch.prepare(root, spec(urls=[url], sha=sha256(archive), type_="tar.gz"),
                      Policy(extract_max_members=10))
    assert listing(root) == []


def test_many_small_files_over_the_unpacked_size_cap(root, server):
    archive = tar_gz([reg("p", EXE)] + [reg("f%d" % i, b"0" * 4000) for i in range(10)])
    url = server.add("/p.tgz", archive)
    with pytest.raises(FetchError, match="unpacks to more than 20000 bytes"):
        fetch.prepare(root, spec(urls=[url], sha=sha256(archive), type_="tar.gz"),
                      Policy(extract_max_bytes=20000))
    assert listing(root) == []


class _Zeros(io.RawIOBase):
    def __init__(self, n):
        self.n = n

    def readable(self):
        return True

    def readinto(self, b):
        k = min(len(b), self.n)
        b[:k] = bytes(k)
        self.n -= k
        return k


def test_600_mb_of_zeros_is_refused_with_default_limits(root, server):
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w") as tf:
            tf.addfile(tarfile.TarInfo("p"), io.BytesIO(b""))
            info = tarfile.TarInfo("zeros")
            info.size = 600 * 1024 * 1024
            tf.addfile(info, io.BufferedReader(_Zeros(info.size), 1 << 20))
    archive = raw.getvalue()
    assert len(archive) < 5 * 1024 * 1024  # a small download...
    url = server.add("/zeros.tgz", archive)
    with pytest.raises(FetchError, match="unpacks to more than 536870912 bytes"):
        fetch.prepare(root, spec(urls=[url], sha=sha256(archive), type_="tar.gz"), Policy())
    assert listing(root) == []                   # ...that never hit the disk unpacked


def test_clean_stale_removes_only_staging_leftovers(root):
    os.makedirs(os.path.join(root, ".p.fetch-0011aabb", "tree"))
    os.makedirs(os.path.join(root, "p"))
    open(os.path.join(root, ".p.pgid"), "w").close()
    assert fetch.clean_stale(root) == [".p.fetch-0011aabb"]
    assert sorted(os.listdir(root)) == [".p.pgid", "p"]


def test_bad_http_answers_are_one_url_failing_and_the_next_is_tried(root, server):
    """BadStatusLine at open and IncompleteRead while reading are
    http.client.HTTPException, not OSError: each is that URL's failure."""
    bad = [server.add("/status", bad_status_line), server.add("/chunks", truncated_chunks)]
    good = server.add("/good", EXE)
    staged = fetch.prepare(root, spec(urls=bad + [good], sha=sha256(EXE)), Policy())
    assert staged.source == good and server.hits == ["/status", "/chunks", "/good"]
    fetch.discard(staged)
    with pytest.raises(FetchError) as info:
        fetch.prepare(root, spec(urls=bad, sha=sha256(EXE)), Policy())
    msg = str(info.value)
    assert "/status: bad HTTP answer: BadStatusLine" in msg
    assert "/chunks: read failed: IncompleteRead" in msg
    assert listing(root) == []
