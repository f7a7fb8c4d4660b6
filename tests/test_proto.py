"""The checked-in generated code matches proto/grpc.proto, and the proto
matches Elkeid's wire contract."""

import os
import subprocess
import sys

import pytest

from elkeid_agent.pb import grpc_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generated_module_is_current(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I" + os.path.join(ROOT, "proto"),
                    "--python_out=" + str(tmp_path), os.path.join(ROOT, "proto", "grpc.proto")],
                   check=True)
    with open(os.path.join(ROOT, "elkeid_agent", "pb", "grpc_pb2.py"), "rb") as f:
        checked_in = f.read()
    assert (tmp_path / "grpc_pb2.py").read_bytes() == checked_in, \
        "elkeid_agent/pb/grpc_pb2.py is stale: run ./build.sh proto"


def fields(message):
    return {f.name: (f.number, f.type) for f in message.DESCRIPTOR.fields}


def test_wire_contract_with_elkeid():
    F = pb.PackagedData.DESCRIPTOR.fields_by_name
    assert pb.DESCRIPTOR.package == "grpc"
    assert [(n, F[n].number) for n in ("records", "agent_id", "intranet_ipv4", "extranet_ipv4",
                                       "intranet_ipv6", "extranet_ipv6", "hostname", "version",
                                       "product")] == [
        ("records", 1), ("agent_id", 2), ("intranet_ipv4", 3), ("extranet_ipv4", 4),
        ("intranet_ipv6", 5), ("extranet_ipv6", 6), ("hostname", 7), ("version", 8),
        ("product", 9)]
    assert {n: v[0] for n, v in fields(pb.EncodedRecord).items()} == {
        "data_type": 1, "timestamp": 2, "data": 3}
    assert {n: v[0] for n, v in fields(pb.Record).items()} == {
        "data_type": 1, "timestamp": 2, "data": 3}
    assert {n: v[0] for n, v in fields(pb.Command).items()} == {"task": 2, "configs": 3}
    assert {n: v[0] for n, v in fields(pb.Task).items()} == {
        "data_type": 1, "object_name": 2, "data": 3, "token": 4}
    assert {n: v[0] for n, v in fields(pb.Config).items()} == {
        "name": 1, "type": 2, "version": 3, "sha256": 4, "signature": 5, "download_urls": 6,
        "detail": 7}
    assert {n: v[0] for n, v in fields(pb.FileUploadRequest).items()} == {"token": 1, "data": 2}
    services = {s.name: [m.name for m in s.methods] for s in pb.DESCRIPTOR.services_by_name.values()}
    assert services == {"Transfer": ["Transfer"], "FileExt": ["Upload"]}
