"""The proto contract for other languages: every file names its package for each language, and
Go code generates from the protos when a Go toolchain is installed (skipped otherwise)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FileDescriptor

from apikeys.v1 import api_key_pb2, key_manager_pb2, key_verifier_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "protos" / "apikeys" / "v1").glob("*.proto"))
FILES: list[FileDescriptor] = [
    api_key_pb2.DESCRIPTOR,
    key_manager_pb2.DESCRIPTOR,
    key_verifier_pb2.DESCRIPTOR,
]
GO_PACKAGE = "apikeys/gen/go/apikeys/v1;apikeysv1"


def test_every_proto_file_is_covered() -> None:
    """A new proto file must be added here (and given the language options)."""
    assert [p.name for p in PROTOS] == sorted(f.name.rsplit("/", 1)[1] for f in FILES)


@pytest.mark.parametrize("file", FILES, ids=lambda f: f.name)
def test_language_options(file: FileDescriptor) -> None:
    """One package per language for all files: generated code of the files lands together."""
    options = file.GetOptions()
    assert options.go_package == GO_PACKAGE
    assert options.java_package == "com.apikeys.v1"
    assert options.java_multiple_files
    stem = file.name.rsplit("/", 1)[1].removesuffix(".proto")
    assert options.java_outer_classname == "".join(p.title() for p in stem.split("_")) + "Proto"
    assert options.csharp_namespace == "Apikeys.V1"


def test_go_code_generates(tmp_path: Path) -> None:
    """protoc-gen-go accepts the protos (go_package included) and emits parseable Go."""
    missing = [tool for tool in ("go", "protoc-gen-go") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"Go toolchain not installed ({', '.join(missing)} not on PATH)")
    import grpc_tools

    includes = Path(grpc_tools.__file__).parent / "_proto"
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{includes}",
        f"--go_out={tmp_path}",
        "--go_opt=paths=source_relative",
        *map(str, PROTOS),
    ]
    if shutil.which("protoc-gen-go-grpc") is not None:
        command += [f"--go-grpc_out={tmp_path}", "--go-grpc_opt=paths=source_relative"]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
    generated = sorted(tmp_path.rglob("*.go"))
    assert {p.name for p in generated} >= {f"{p.stem}.pb.go" for p in PROTOS}
    for path in generated:
        assert "\npackage apikeysv1\n" in path.read_text()
    gofmt = Path(shutil.which("go") or "go").with_name("gofmt")
    if gofmt.exists():  # syntax check without fetching Go modules
        result = subprocess.run(
            [str(gofmt), "-l", "-e", *map(str, generated)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
