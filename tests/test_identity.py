"""Agent id derivation (docs/protocol.md section 7, Elkeid's agent/agent/id.go)."""

import os
import stat
import uuid

import pytest
from hypothesis import given, strategies as st

from elkeid_agent.host import identity
from elkeid_agent.errors import LocalFault

PRODUCT_UUID = "4c4c4544-0042-3510-8052-b3c04f4e3732"
MAC = "52:54:00:12:34:56"
INSTANCE = "i-0abc123def4567890"


def put(root, rel, data):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@pytest.fixture
def workdir(tmp_path):
    d = tmp_path / "workdir"
    d.mkdir()
    return d


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


def hardware_host(root, name="PowerEdge R740\n"):
    put(root, identity.INSTANCE_ID, INSTANCE + "\n")
    put(root, identity.PRODUCT_UUID, PRODUCT_UUID + "\n")
    put(root, identity.ETH0_ADDRESS, MAC + "\n")
    if name is not None:
        put(root, identity.PRODUCT_NAME, name)


def run(workdir, root, **kw):
    kw.setdefault("environ", {})
    return identity.agent_id(str(workdir), root=str(root), **kw)


# --- override and environment -------------------------------------------------

def test_override_wins_over_environment(workdir, root):
    hardware_host(root)
    got = run(workdir, root, override="from-cli", environ={"SPECIFIED_AGENT_ID": "from-env"})
    assert got == "from-cli"


def test_environment_used_verbatim(workdir, root):
    hardware_host(root)
    assert run(workdir, root, environ={"SPECIFIED_AGENT_ID": "My-Host 1"}) == "My-Host 1"


def test_empty_override_and_environment_are_unset(workdir, root):
    hardware_host(root)
    expected = identity.sha1_uuid((INSTANCE + PRODUCT_UUID + MAC).encode())
    assert run(workdir, root, override="", environ={"SPECIFIED_AGENT_ID": ""}) == expected


def test_specified_id_is_saved_too(workdir, root):
    run(workdir, root, environ={"SPECIFIED_AGENT_ID": "abc"})
    assert (workdir / "machine-id").read_bytes() == b"abc"


# --- the hardware source ----------------------------------------------------------

def test_hardware_source_is_sha1_of_trimmed_concatenation(workdir, root):
    hardware_host(root)
    got = run(workdir, root)
    assert got == str(uuid.uuid5(uuid.NAMESPACE_OID, INSTANCE + PRODUCT_UUID + MAC))
    assert uuid.UUID(got).version == 5


def test_hardware_source_with_only_some_files(workdir, root):
    put(root, identity.ETH0_ADDRESS, "  " + MAC + " \n")
    put(root, identity.PRODUCT_NAME, "KVM\n\n\n")
    assert run(workdir, root) == identity.sha1_uuid(MAC.encode())


def test_hardware_source_of_8_bytes_is_too_short(workdir, root):
    put(root, identity.ETH0_ADDRESS, "12345678\n")  # 8 bytes after trimming
    put(root, identity.PRODUCT_NAME, "Some Board\n")
    put(root, identity.MACHINE_ID, "0123456789abcdef0123456789abcdef\n")
    assert run(workdir, root) == "01234567-89ab-cdef-0123-456789abcdef"


def test_id_file_under_six_raw_bytes_is_ignored(workdir, root):
    # "abc\n" is 4 bytes: fromIDFile rejects it before trimming.
    put(root, identity.INSTANCE_ID, "abc\n")
    put(root, identity.ETH0_ADDRESS, MAC + "\n")
    put(root, identity.PRODUCT_NAME, "Board\n")
    assert run(workdir, root) == identity.sha1_uuid(MAC.encode())


@pytest.mark.parametrize("placeholder", [
    "03000200-0400-0500-0006-000700080009", "02000100-0300-0400-0005-000600070008"])
def test_placeholder_product_uuid_falls_back_to_machine_id(workdir, root, placeholder):
    hardware_host(root)
    put(root, identity.PRODUCT_UUID, placeholder + "\n")
    put(root, identity.MACHINE_ID, "00112233445566778899aabbccddeeff\n")
    assert run(workdir, root) == "00112233-4455-6677-8899-aabbccddeeff"


@pytest.mark.parametrize("name", [
    "unknown\n", "To be filled by O.E.M.\n", "OEM not specify\n", "t.b.d\n", "T.B.D\n",
    "  --   \n", "--\n", "\n\n\n\n\n\n"])
def test_placeholder_product_name_falls_back_to_machine_id(workdir, root, name):
    hardware_host(root, name=name)
    put(root, identity.MACHINE_ID, "00112233445566778899aabbccddeeff\n")
    assert run(workdir, root) == "00112233-4455-6677-8899-aabbccddeeff"


def test_placeholder_names_are_case_sensitive_except_tbd(workdir, root):
    hardware_host(root, name="UNKNOWN\n")
    assert run(workdir, root) == identity.sha1_uuid((INSTANCE + PRODUCT_UUID + MAC).encode())


def test_missing_product_name_falls_back_to_machine_id(workdir, root):
    # Go would leave the id empty here; docs/protocol.md section 7: fall through.
    hardware_host(root, name=None)
    put(root, identity.MACHINE_ID, "00112233445566778899aabbccddeeff\n")
    assert run(workdir, root) == "00112233-4455-6677-8899-aabbccddeeff"


def test_non_utf8_source_bytes(workdir, root):
    put(root, identity.INSTANCE_ID, b"\xff\xfe\x00inst-id\n")
    put(root, identity.PRODUCT_NAME, "Board\n")
    assert run(workdir, root) == identity.sha1_uuid(b"\xff\xfe\x00inst-id")


# --- /etc/machine-id ---------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "00112233445566778899AABBCCDDEEFF",
    "00112233-4455-6677-8899-aabbccddeeff",
    "URN:uuid:00112233-4455-6677-8899-aabbccddeeff",
    "{00112233-4455-6677-8899-aabbccddeeff}",
    "x00112233-4455-6677-8899-aabbccddeeffx",  # Go does not check the braces
])
def test_machine_id_forms(workdir, root, text):
    put(root, identity.MACHINE_ID, "\t" + text + "\n")
    assert run(workdir, root) == "00112233-4455-6677-8899-aabbccddeeff"


def test_machine_id_of_right_length_but_bad_format_is_hashed(workdir, root):
    text = "this-is-not-hex-but-32-chars-long"[:32]
    put(root, identity.MACHINE_ID, text + "\n")
    assert run(workdir, root) == identity.sha1_uuid(text.encode())


def test_machine_id_of_wrong_length_uses_saved_id(workdir, root):
    put(root, identity.MACHINE_ID, "too short for a uuid\n")
    (workdir / "machine-id").write_text("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
    assert run(workdir, root) == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


def test_machine_id_with_bad_urn_prefix_uses_saved_id(workdir, root):
    put(root, identity.MACHINE_ID, "urx:uuid:00112233-4455-6677-8899-aabbccddeeff\n")
    (workdir / "machine-id").write_text("AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE\n")
    assert run(workdir, root) == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


def test_empty_machine_id_falls_to_random_then_sticks(workdir, root):
    put(root, identity.MACHINE_ID, "")
    first = run(workdir, root)
    assert uuid.UUID(first).version == 4
    assert run(workdir, root) == first


def test_unreadable_and_garbage_everywhere_gives_random(workdir, root):
    (root / "etc" / "machine-id").mkdir(parents=True)  # a directory, not a file
    (workdir / "machine-id").write_bytes(b"\x00\xff" * 30)
    got = run(workdir, root)
    assert uuid.UUID(got).version == 4


# --- saving -------------------------------------------------------------------------

def test_saved_file_mode_and_content(workdir, root):
    hardware_host(root)
    (workdir / "machine-id").write_text("old")
    os.chmod(workdir / "machine-id", 0o644)
    got = run(workdir, root)
    path = workdir / "machine-id"
    assert path.read_bytes() == got.encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in workdir.iterdir()] == ["machine-id"]


def test_persist_false_writes_nothing(workdir, root):
    hardware_host(root)
    run(workdir, root, persist=False)
    assert list(workdir.iterdir()) == []


def test_unwritable_workdir_raises_local_fault(tmp_path, root):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(LocalFault, match="cannot save the agent id"):
        run(missing, root, override="x")


def test_workdir_that_is_a_file_raises_local_fault(tmp_path, root):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(LocalFault):
        run(f, root)


def test_default_environ_is_os_environ(workdir, root, monkeypatch):
    monkeypatch.setenv("SPECIFIED_AGENT_ID", "env-id")
    assert identity.agent_id(str(workdir), root=str(root)) == "env-id"


def test_live_host_derivation_is_a_stable_uuid(tmp_path):
    first = identity.derive(str(tmp_path))
    uuid.UUID(first)
    identity.save(str(tmp_path), first)
    assert identity.derive(str(tmp_path)) == first


# --- helpers ------------------------------------------------------------------------

def test_go_trim_space_unicode_set():
    assert identity.go_trim_space(" \t\u00a0x y\u0085\u3000\n".encode()) == b"x y"
    # U+001C is white space to Python's str.isspace, not to Go.
    assert identity.go_trim_space(b"\x1cx\x1c") == b"\x1cx\x1c"
    assert identity.go_trim_space(b"\xc2") == b"\xc2"
    assert identity.go_trim_space(b"   ") == b""


def test_sha1_uuid_matches_uuid5():
    for name in ("", "a", INSTANCE + PRODUCT_UUID + MAC):
        assert identity.sha1_uuid(name.encode()) == str(uuid.uuid5(uuid.NAMESPACE_OID, name))


@given(st.binary(max_size=60))
def test_parse_go_uuid_never_raises(data):
    parsed, err = identity.parse_go_uuid(data)
    assert (parsed is None) != (err is None)


@given(st.uuids())
def test_parse_go_uuid_accepts_every_form(u):
    forms = [u.hex, u.hex.upper(), str(u), "urn:uuid:" + str(u), "{%s}" % u]
    for form in forms:
        assert identity.parse_go_uuid(form.encode()) == (u, None)


def test_parse_go_uuid_errors():
    assert identity.parse_go_uuid(b"")[1] == identity.ERR_LENGTH
    assert identity.parse_go_uuid(b"g" * 32)[1] == identity.ERR_FORMAT
    assert identity.parse_go_uuid(b"0" * 36)[1] == identity.ERR_FORMAT
    assert identity.parse_go_uuid(b"urn:uuix:" + b"0" * 36)[1] == identity.ERR_URN
