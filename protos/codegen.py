"""Regenerate the committed gRPC stubs from protos/*.proto.

    python -m protos.codegen            # rewrite protos/*_pb2*.py(i)
    python -m protos.codegen --check    # exit 1 if the committed stubs are stale

Stubs are generated from the repository root so that imports read `from protos import
common_pb2`, which makes the generated modules importable as `protos.*`.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "protos"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

# The generators stamp their own versions into the stubs: grpcio-tools' GRPC_GENERATED_VERSION,
# protoc's "Protobuf Python Version" comment and its runtime-version check. A patch
# release of the tools changes only those stamps, so staleness is judged with them masked:
# what must match is what the .proto files define.
_VERSION_STAMPS = (
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M), "GRPC_GENERATED_VERSION = <version>"),
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: <version>"),
    (
        re.compile(r"(ValidateProtobufRuntimeVersion\(\s*[\w.]+,)\s*\d+,\s*\d+,\s*\d+,\s*'[^']*',"),
        r"\1 <version>,",
    ),
)


def without_version_stamps(text: str) -> str:
    for pattern, replacement in _VERSION_STAMPS:
        text = pattern.sub(replacement, text)
    return text


def _same_stub(fresh: Path, committed: Path) -> bool:
    return without_version_stamps(fresh.read_text()) == without_version_stamps(
        committed.read_text()
    )


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Generate stubs for every .proto into out_root/protos/; returns the files written."""
    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p.relative_to(REPO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see the messages above")
    return [out_root / "protos" / f"{p.stem}{s}" for p in proto_files() for s in SUFFIXES]


def stale_files() -> list[str]:
    """Names of committed stubs that differ from freshly generated ones (or are missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for fresh in generate(Path(tmp)):
            committed = PROTO_DIR / fresh.name
            if not committed.exists() or not _same_stub(fresh, committed):
                stale.append(fresh.name)
        generated = {f"{p.stem}{s}" for p in proto_files() for s in SUFFIXES}
        orphans = [p.name for p in PROTO_DIR.glob("*_pb2*.py*") if p.name not in generated]
        return sorted(stale + orphans)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated stubs: " + ", ".join(stale) + "; run: python -m protos.codegen")
            return 1
        print("protos: generated stubs are up to date")
        return 0
    for path in generate(REPO_ROOT):
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
