"""The committed generated stubs must match the .proto files."""

import re
import shutil
from pathlib import Path

import pytest

from protos import codegen


def test_committed_stubs_are_fresh():
    assert codegen.stale_files() == []


def test_editing_a_proto_without_regenerating_is_detected(tmp_path, monkeypatch):
    proto_dir = tmp_path / "protos"
    shutil.copytree(codegen.PROTO_DIR, proto_dir, ignore=shutil.ignore_patterns("__pycache__"))
    edited = proto_dir / "common.proto"
    edited.write_text(
        edited.read_text().replace(
            "bool ignore_eos = 7;", "bool ignore_eos = 7;\n  bool extra = 8;"
        )
    )
    monkeypatch.setattr(codegen, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(codegen, "PROTO_DIR", proto_dir)
    assert codegen.stale_files() == ["common_pb2.py", "common_pb2.pyi"]


def test_a_tools_patch_release_alone_does_not_make_stubs_stale(tmp_path, monkeypatch):
    # grpcio-tools 1.85.4 stamps GRPC_GENERATED_VERSION = '1.85.4' where 1.85.1 stamped
    # '1.85.1': the stubs define the same services, so they are not stale.
    proto_dir = tmp_path / "protos"
    shutil.copytree(codegen.PROTO_DIR, proto_dir, ignore=shutil.ignore_patterns("__pycache__"))
    grpc_stub = proto_dir / "common_pb2_grpc.py"
    text = grpc_stub.read_text()
    stamped = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = '9.99.9'", text)
    assert stamped != text
    grpc_stub.write_text(stamped)
    message_stub = proto_dir / "common_pb2.py"
    text = message_stub.read_text()
    restamped = re.sub(r"Version: [\d.]+", "Version: 9.99.9", text)
    restamped = re.sub(r"(Domain\.PUBLIC,\s*)\d+,\s*\d+,\s*\d+,", r"\g<1>9, 99, 9,", restamped)
    assert restamped.count("9, 99, 9,") == 1 and "Version: 9.99.9" in restamped
    message_stub.write_text(restamped)
    monkeypatch.setattr(codegen, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(codegen, "PROTO_DIR", proto_dir)
    assert codegen.stale_files() == []
    # ...but a stub whose content differs beyond the stamps still is.
    grpc_stub.write_text(stamped + "\nEXTRA = 1\n")
    assert codegen.stale_files() == ["common_pb2_grpc.py"]


def test_every_rpc_and_field_is_documented():
    for proto in sorted(codegen.PROTO_DIR.glob("*.proto")):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_rpc = stripped.startswith("rpc ")
            is_field = (
                stripped.endswith(";")
                and "=" in stripped
                and not stripped.startswith(("syntax", "package", "option", "import"))
            )
            if is_rpc or is_field:
                prev = lines[i - 1].strip()
                assert prev.startswith("///"), (
                    f"{proto.name}:{i + 1} lacks a /// comment: {stripped}"
                )


@pytest.mark.parametrize(
    "module", ["common_pb2", "gateway_pb2_grpc", "scheduler_pb2_grpc", "worker_pb2_grpc"]
)
def test_stubs_import_as_protos_package(module):
    __import__(f"protos.{module}")
    assert Path(codegen.PROTO_DIR / f"{module}.py").exists()
