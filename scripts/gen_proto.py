"""Regenerate the Python gRPC code for proto/dpgan/v1/dpgan.proto.

Usage (from anywhere):  python scripts/gen_proto.py

Output goes to agent/transport/_generated/ and is committed. tests/test_proto_in_sync.py calls
`generate_into` on a temporary directory and compares the result with the committed files, so the
generated code can never silently drift from the .proto.
"""

from __future__ import annotations

import argparse
import importlib.resources
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILES = ("dpgan/v1/dpgan.proto",)
GENERATED_ROOT = REPO_ROOT / "agent" / "transport" / "_generated"

# protoc emits `from dpgan.v1 import dpgan_pb2 as ...` in the *_grpc.py file, which only works if
# the output root is on sys.path. We ship the code as a subpackage, so rewrite it to a relative import.
_ABSOLUTE_PB2_IMPORT = re.compile(r"^from dpgan\.v1 import (\w+_pb2) as (\w+)$", re.MULTILINE)

_PACKAGE_DOCSTRINGS = {
    Path("__init__.py"): '"""Code generated from proto/ by scripts/gen_proto.py. DO NOT EDIT."""\n',
    Path("dpgan/__init__.py"): '"""Generated package for proto package dpgan. DO NOT EDIT."""\n',
    Path("dpgan/v1/__init__.py"): '"""Generated package for proto package dpgan.v1. DO NOT EDIT."""\n',
}


def generate_into(output_root: Path) -> list[Path]:
    """Run protoc for every file in PROTO_FILES into `output_root`; return the files written (relative)."""
    from grpc_tools import protoc  # Imported lazily: grpcio-tools is a dev-only dependency.

    output_root.mkdir(parents=True, exist_ok=True)
    well_known_types = importlib.resources.files("grpc_tools") / "_proto"
    arguments = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known_types}",
        f"--python_out={output_root}",
        f"--pyi_out={output_root}",
        f"--grpc_python_out={output_root}",
        *PROTO_FILES,
    ]
    exit_code = protoc.main(arguments)
    if exit_code != 0:
        raise RuntimeError(f"protoc failed with exit code {exit_code} for {', '.join(PROTO_FILES)}")

    for grpc_module in output_root.rglob("*_pb2_grpc.py"):
        source = grpc_module.read_text(encoding="utf-8")
        rewritten, replacements = _ABSOLUTE_PB2_IMPORT.subn(r"from . import \1 as \2", source)
        if replacements == 0:
            raise RuntimeError(
                f"{grpc_module}: expected a 'from dpgan.v1 import ..._pb2' line to rewrite; "
                "protoc output format changed, update scripts/gen_proto.py"
            )
        grpc_module.write_text(rewritten, encoding="utf-8")

    for relative_path, docstring in _PACKAGE_DOCSTRINGS.items():
        (output_root / relative_path).write_text(docstring, encoding="utf-8")

    return sorted(
        path.relative_to(output_root)
        for path in output_root.rglob("*")
        if path.is_file() and path.suffix in {".py", ".pyi"}
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=GENERATED_ROOT,
        help=f"generated package root (default: {GENERATED_ROOT.relative_to(REPO_ROOT)})",
    )
    arguments = parser.parse_args(argv)

    # Generate into a scratch directory first so a protoc failure never leaves a half-written package.
    with tempfile.TemporaryDirectory() as scratch:
        written = generate_into(Path(scratch))
        if arguments.output.exists():
            shutil.rmtree(arguments.output)
        shutil.copytree(scratch, arguments.output)
    for relative_path in written:
        print(arguments.output / relative_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
