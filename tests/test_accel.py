"""The C hot path (accel/) against its pure-Python reference.

Differential properties (names contain "differential"): for arbitrary and
hostile input each C function gives byte-identical output to its pure twin,
or hands the call back (NotImplemented) so the pure one raises its own
error. They run against a build of this checkout's accel/ (compiled here),
or against the binary named by ELKEID_ACCEL_SO: the sanitizer test reruns
them that way inside a process with AddressSanitizer and UBSan loaded.
The fuzz test runs the same properties with many examples and a printed
seed (Hypothesis rather than atheris: atheris needs a clang-built libFuzzer
and no wheel of it exists for every CPython here; Hypothesis already runs
in every test process and shrinks failures to a readable case).

Also: ELKEID_ACCEL=0 forces the pure path, a broken or mismatching binary
falls back with one reason, and the binary uses only the stable ABI.
"""

import os
import random
import re
import shutil
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import accel_build
from debroot import unavailable
from elkeid_agent import native, wire
from elkeid_agent.buffer import spool
from elkeid_agent.errors import WireError
from elkeid_agent.plugins import ingest

ROOT = accel_build.ROOT
FUZZ_EXAMPLES = int(os.environ.get("ELKEID_FUZZ_EXAMPLES", "5000"))
FUZZ_SEED = int(os.environ.get("ELKEID_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")


def _pure(fn):
    return getattr(fn, "pure", fn)


PURE_PACKAGED = _pure(wire.packaged_data)
PURE_PACK = _pure(spool.pack_records)
PURE_UNPACK = _pure(spool.unpack_records)


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    path = os.environ.get("ELKEID_ACCEL_SO")
    if not path:
        path = accel_build.compile_accel(str(tmp_path_factory.mktemp("accel")))
    return accel_build.load(path)


# ---------------------------------------------------------------- inputs

def varint(v):
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


# Varints at and past every limit read_varint has: 10 bytes, 64 bits.
HOSTILE_VARINTS = [
    b"\xff" * 9 + b"\x01",          # 2**64 - 1: the largest legal value
    b"\x80" * 9 + b"\x02",          # 2**64: overflows
    b"\xff" * 9 + b"\x7f",          # overflows
    b"\x80" * 10 + b"\x00",         # 11 bytes
    b"\xff" * 10,                   # unterminated at 10
    b"\xff" * 3,                    # truncated
    b"\x80" * 9 + b"\x00",          # 10 bytes, value 0: legal
    b"\x80" * 8 + b"\x00",
]

any_varint = st.one_of(
    st.integers(0, (1 << 64) - 1).map(varint),
    st.integers(0, (1 << 80)).map(varint),
    st.sampled_from(HOSTILE_VARINTS),
    st.binary(min_size=1, max_size=12).map(lambda b: bytes(x | 0x80 for x in b)),
)
key = st.builds(lambda f, t: varint((f << 3) | t),
                st.one_of(st.integers(0, 5), st.integers(0, (1 << 61) - 1)), st.integers(0, 7))
field = st.one_of(
    st.builds(lambda k, v: k + v, key, any_varint),
    st.builds(lambda k, b: k + varint(len(b)) + b, key, st.binary(max_size=40)),
    st.builds(lambda k, n, b: k + varint(n) + b, key, st.integers(0, 1 << 64), st.binary(max_size=20)),
    st.builds(lambda k, b: k + b, key, st.binary(max_size=9)),
    any_varint,
    st.binary(max_size=12),
)
records = st.builds(lambda dt, ts, f: wire.encode_record(dt, ts, f),
                    st.integers(-(1 << 31), (1 << 31) - 1), st.integers(-(1 << 63), (1 << 63) - 1),
                    st.dictionaries(st.text(max_size=8), st.text(max_size=30), max_size=4))
body = st.one_of(records, st.lists(field, max_size=6).map(b"".join), st.binary(max_size=64),
                 st.builds(lambda r, n: r[:n], records, st.integers(0, 60)))


def frame_of(b, lie=None):
    return struct.pack("<I", len(b) if lie is None else lie) + b


frame = st.one_of(body.map(frame_of),
                  st.builds(frame_of, body, st.integers(0, (1 << 32) - 1)),
                  st.binary(max_size=6))
stream = st.lists(frame, max_size=10).map(b"".join)
max_frame = st.one_of(st.integers(0, 300), st.sampled_from([1 << 32, -1, 1 << 70, -(1 << 70)]))


def py_error(b):
    try:
        wire.decode_record(b, deep=False)
    except WireError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- properties

def check_record_error(c, b):
    assert c.record_error(b) == py_error(b)


def check_split(c, data, limit, validate):
    assert c.split_frames(data, limit, validate) == ingest.split_frames(data, limit, validate)


def decoder_run(data, cuts, limit, split):
    """What a FrameDecoder gives for ``data`` fed in pieces cut at ``cuts``."""
    saved = ingest._split_frames
    ingest._split_frames = split
    try:
        d = ingest.FrameDecoder(limit)
        out = []
        bounds = [0] + sorted(cuts) + [len(data)]
        for a, b in zip(bounds, bounds[1:]):
            bodies, err = d.feed(data[a:b])
            out.append((list(bodies), str(err) if err else None, d.buffered()))
        err = d.close()
        out.append(str(err) if err else None)
        return out
    finally:
        ingest._split_frames = saved


def check_decoder(c, data, cuts, limit):
    def fast(data, limit, validate):
        out = c.split_frames(data, limit, validate)
        return ingest.split_frames(data, limit, validate) if out is NotImplemented else out
    assert decoder_run(data, cuts, limit, fast) == decoder_run(data, cuts, limit, ingest.split_frames)


def outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except Exception as exc:
        return type(exc).__name__, str(exc)


def check_packaged(c, recs, header):
    out = c.packaged_data(recs, header)
    assert out == PURE_PACKAGED(recs, header)
    assert type(out) is bytes


def check_pack_unpack(c, recs):
    raw = c.pack_records(recs)
    assert raw == PURE_PACK(recs)
    assert c.unpack_records(raw, len(recs)) == PURE_UNPACK(raw, len(recs)) == list(recs)


def check_unpack_hostile(c, raw, count):
    out = c.unpack_records(raw, count)
    expected = outcome(PURE_UNPACK, raw, count)
    if out is NotImplemented:
        assert expected[0] != "ok", "C declined input the pure code accepts"
    else:
        assert ("ok", out) == expected


# ---------------------------------------------------------------- differential

@given(body)
@settings(max_examples=600, deadline=None)
def test_differential_record_validation(c, b):
    check_record_error(c, b)


def test_differential_record_validation_hostile_corner_cases(c):
    cases = [b"", b"\x00", b"\x07\x00", b"\x08", b"\x0a\x05abc", b"\x0b", b"\x0c", b"\x0e", b"\x0f",
             b"\x09" + b"\x00" * 7, b"\x0d\x00\x00\x00", b"\x12" + b"\xff" * 9 + b"\x01"]
    cases += [b"\x08" + v for v in HOSTILE_VARINTS] + [v for v in HOSTILE_VARINTS]
    cases += [b"\x0a" + v + b"xy" for v in HOSTILE_VARINTS]
    seen = set()
    for b in cases:
        check_record_error(c, b)
        seen.add(py_error(b))
    # the corpus reaches every error wire.py has
    assert {None, "truncated varint", "varint overflows 64 bits", "varint longer than 10 bytes",
            "field number 0", "length-delimited field runs past the end", "truncated fixed64",
            "truncated fixed32", "unsupported wire type 3", "unsupported wire type 4",
            "unsupported wire type 6", "unsupported wire type 7"} <= seen


@given(stream, max_frame, st.booleans())
@settings(max_examples=400, deadline=None)
def test_differential_split_frames(c, data, limit, validate):
    check_split(c, data, limit, validate)


@given(stream, st.lists(st.integers(0, 2000), max_size=6), st.integers(0, 300))
@settings(max_examples=300, deadline=None)
def test_differential_frame_decoder_whatever_the_chunking(c, data, cuts, limit):
    check_decoder(c, data, [x % (len(data) + 1) for x in cuts], limit)


@given(st.lists(body, max_size=20), st.binary(max_size=80))
@settings(max_examples=300, deadline=None)
def test_differential_packaged_data(c, recs, header):
    check_packaged(c, recs, header)
    check_packaged(c, tuple(recs), header)


def test_differential_packaged_data_varint_widths(c):
    for n in (0, 1, 127, 128, 16383, 16384, 2097151, 2097152):
        check_packaged(c, [b"x" * n, b""], b"\x12\x03abc")


def test_batches_the_sender_takes_stay_on_the_c_path(c):
    # The sender hands packaged_data a queue Batch (a list subclass) and the
    # spool packs Batches too: an exact-list check sent every real message
    # down the pure path.
    from elkeid_agent.buffer.queue import Batch
    batch = Batch([b"\x1a\x01x", b"\x1a\x00"])
    check_packaged(c, batch, b"\x12\x01h")
    assert c.pack_records(batch) == PURE_PACK(batch)


def test_differential_other_types_go_to_the_pure_code(c):
    assert c.packaged_data([bytearray(b"ab")], b"h") is NotImplemented
    assert c.packaged_data(iter([b"ab"]), b"h") is NotImplemented
    assert c.packaged_data([b"ab"], memoryview(b"h")) is NotImplemented
    assert c.pack_records([b"a", memoryview(b"b")]) is NotImplemented
    assert c.split_frames(bytearray(b"\x00\x00\x00\x00"), 10, True) is NotImplemented
    assert c.unpack_records(bytearray(4), 1) is NotImplemented
    assert c.unpack_records(b"", 1.0) is NotImplemented
    assert c.split_frames(b"", 10.0, True) is NotImplemented
    # and the dispatcher answers them with the pure result
    if native.ACTIVE:
        assert wire.packaged_data([bytearray(b"ab")], b"h") == b"\x0a\x02abh"
        assert spool.unpack_records(bytearray(b"\x01\x00\x00\x00z"), 1) == [bytearray(b"z")]


@given(st.lists(body, max_size=30))
@settings(max_examples=300, deadline=None)
def test_differential_spool_records_round_trip(c, recs):
    check_pack_unpack(c, recs)


@given(st.binary(max_size=60), st.one_of(st.integers(-2, 20), st.sampled_from([1 << 40, 1 << 70])))
@settings(max_examples=400, deadline=None)
def test_differential_unpack_records_hostile(c, raw, count):
    check_unpack_hostile(c, raw, count)


def test_differential_unpack_records_lengths_that_wrap(c):
    # lengths summing past 2**32 (and past 2**64 in no case: u32 * count)
    raw = struct.pack("<II", 0xFFFFFFFF, 2) + b"ab"
    check_unpack_hostile(c, raw, 2)
    check_unpack_hostile(c, struct.pack("<I", 1) + b"", 1)
    check_unpack_hostile(c, b"", 0)


@pytest.mark.slow
def test_differential_fuzz(c):
    """Every property with many examples; the seed is printed (rerun with
    ELKEID_FUZZ_SEED, size with ELKEID_FUZZ_EXAMPLES)."""
    print("fuzz seed %d, %d examples per property" % (FUZZ_SEED, FUZZ_EXAMPLES))
    fuzz = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))

    @seed(FUZZ_SEED)
    @fuzz
    @given(body, stream, max_frame, st.booleans())
    def split_and_validate(b, data, limit, validate):
        check_record_error(c, b)
        check_split(c, data, limit, validate)
        check_split(c, frame_of(b) * 3, limit, validate)

    @seed(FUZZ_SEED)
    @fuzz
    @given(stream, st.lists(st.integers(0, 2000), max_size=8), st.integers(0, 300))
    def decoder(data, cuts, limit):
        check_decoder(c, data, [x % (len(data) + 1) for x in cuts], limit)

    @seed(FUZZ_SEED)
    @fuzz
    @given(st.lists(body, max_size=20), st.binary(max_size=60), st.binary(max_size=60),
           st.integers(-1, 20))
    def batches(recs, header, raw, count):
        check_packaged(c, recs, header)
        check_pack_unpack(c, recs)
        check_unpack_hostile(c, raw, count)
        check_unpack_hostile(c, spool.pack_records(recs)[:len(raw)], len(recs))

    split_and_validate()
    decoder()
    batches()


# ---------------------------------------------------------------- the binary

def _undefined_symbols(path):
    r = subprocess.run(["nm", "-D", "--undefined-only", path], stdout=subprocess.PIPE, check=True)
    return [line.split()[-1] for line in r.stdout.decode().splitlines() if line.split()]


def _libpython(version):
    lib = "/root/.pyenv/versions"
    if os.path.isdir(lib):
        for name in sorted(os.listdir(lib)):
            if name.startswith(version + "."):
                path = os.path.join(lib, name, "lib", "libpython%s.so.1.0" % version)
                if os.path.exists(path):
                    return path
    return None


def check_stable_abi(path):
    """Only symbols every libpython 3.9-3.13 exports (the limited API the
    header macro allowed at compile time) and libc's."""
    if shutil.which("nm") is None:
        unavailable("nm (binutils) is not installed")
    undefined = _undefined_symbols(path)
    python = {s for s in undefined if s.startswith(("Py", "_Py"))}
    other = {s.split("@")[0] for s in undefined} - python
    assert other <= {"memcpy", "__cxa_finalize", "__gmon_start__", "_ITM_deregisterTMCloneTable",
                     "_ITM_registerTMCloneTable", "__stack_chk_fail", "memset"}, other
    for version in PYTHONS:
        lib = _libpython(version)
        if lib is None:
            continue
        r = subprocess.run(["nm", "-D", "--defined-only", lib], stdout=subprocess.PIPE, check=True)
        exported = {line.split()[-1] for line in r.stdout.decode().splitlines() if line.split()}
        assert python <= exported, (version, python - exported)
    return python


def test_binary_uses_only_the_stable_abi(tmp_path):
    path = accel_build.compile_accel(str(tmp_path), ["-O2"])
    python = check_stable_abi(path)
    assert "PyModule_Create2" in python


def test_the_agent_picks_the_c_path_when_built_and_pure_with_accel_0(tmp_path):
    pkg = _copy_package(tmp_path)
    shutil.copy(accel_build.compile_accel(str(tmp_path)), os.path.join(pkg, "_accel.abi3.so"))
    on = _native_state(tmp_path, {})
    assert on == ["True", "C", "C twin", "C extension _accel.abi3.so"], on
    off = _native_state(tmp_path, {"ELKEID_ACCEL": "0"})
    assert off == ["False", "pure Python", "pure function", "ELKEID_ACCEL=0"], off


@pytest.mark.parametrize("binary,reason", [
    (b"\x7fELF not really a shared object", "C extension not available"),
    (b"INTERFACE = 99\n", "has interface 99, this version needs 1"),
    (b"raise RuntimeError('half-built')\n", "C extension failed to load (RuntimeError: half-built)"),
])
def test_a_broken_or_mismatching_binary_falls_back_in_one_line(tmp_path, binary, reason):
    pkg = _copy_package(tmp_path)
    name = "_accel.abi3.so" if binary.startswith(b"\x7fELF") else "_accel.py"
    with open(os.path.join(pkg, name), "wb") as f:
        f.write(binary)
    state = _native_state(tmp_path, {})
    assert state[:3] == ["False", "pure Python", "pure function"], state
    assert reason in state[3], state


def _copy_package(tmp_path):
    dest = os.path.join(str(tmp_path), "elkeid_agent")
    shutil.copytree(os.path.join(ROOT, "elkeid_agent"), dest,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "_accel.py"))
    return dest


def _native_state(tmp_path, env):
    """[ACTIVE, path, dispatcher, REASON] of a fresh interpreter importing
    the package copy in tmp_path."""
    code = ("from elkeid_agent import native, wire\n"
            "assert wire.packaged_data([b'ab'], b'h') == b'\\n\\x02abh'\n"
            "print(native.ACTIVE)\n"
            "print('C' if native.ACTIVE else 'pure Python')\n"
            "print('C twin' if hasattr(wire.packaged_data, 'pure') else 'pure function')\n"
            "print(native.REASON)\n")
    full = {k: v for k, v in os.environ.items() if k != "ELKEID_ACCEL"}
    full.update(env, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=full,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 0 and not r.stderr, r.stderr.decode()
    return r.stdout.decode().splitlines()


# ---------------------------------------------------------------- sanitizers

@pytest.mark.slow
def test_sanitizers_find_nothing_in_the_properties(tmp_path):
    """accel/ built with -fsanitize=address,undefined runs every
    differential property in a process with libasan preloaded."""
    if shutil.which("gcc") is None:
        unavailable("gcc is not installed (needed for the sanitizer build)")
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], stdout=subprocess.PIPE,
                             check=True).stdout.decode().strip()
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        unavailable("gcc has no libasan.so (install libasan for the sanitizer build)")
    path = accel_build.compile_accel(str(tmp_path), accel_build.SANITIZE)
    env = dict(os.environ, ELKEID_ACCEL_SO=path, LD_PRELOAD=libasan, PYTHONMALLOC="malloc",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=99",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=98",
               ELKEID_FUZZ_EXAMPLES=os.environ.get("ELKEID_SANITIZER_EXAMPLES", "1500"))
    env.pop("ELKEID_ACCEL", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                        "-k", "differential", "-s", os.path.abspath(__file__)],
                       cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=600)
    out = r.stdout.decode("utf-8", "replace")
    print(out[-3000:])
    assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out, out[-6000:]
    assert r.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 10 and "skipped" not in out, out[-2000:]



# ---------------------------------------------------------------- setup.py

@pytest.mark.parametrize("compiler", ["gcc", "/bin/false"])
def test_setup_py_builds_accel_or_says_in_one_line_why_not(tmp_path, compiler):
    if compiler == "gcc" and shutil.which("gcc") is None:
        unavailable("gcc is not installed (needed to build accel/)")
    src = tmp_path / "src"
    (src / "accel").mkdir(parents=True)
    (src / "elkeid_agent").mkdir()
    shutil.copy(os.path.join(ROOT, "setup.py"), str(src))
    shutil.copy(accel_build.SOURCE, str(src / "accel"))
    (src / "elkeid_agent" / "__init__.py").write_text("")
    env = dict(os.environ, CC=compiler)
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", "out"],
                       cwd=str(src), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=300)
    built = os.path.exists(str(src / "out" / "elkeid_agent" / "_accel.abi3.so"))
    notes = [line for line in r.stderr.decode().splitlines() if "accel/ not built" in line]
    assert r.returncode == 0, r.stderr.decode()
    if compiler == "gcc":
        assert built and notes == [], r.stderr.decode()
    else:
        assert not built and len(notes) == 1, r.stderr.decode()
        assert notes[0].startswith("elkeid-agent: accel/ not built (")
        assert notes[0].endswith("); the pure-Python path will be used")
