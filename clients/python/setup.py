"""Builds llmproxy-client with its gRPC stubs: build_py generates llmproxy/v1/*_pb2*.py(i) from
the .proto (a copy in ./protos when packed as an sdist, else the repository's ../../protos)
into the build directory, with py.typed, so the wheel carries them. Everything else is in
pyproject.toml."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO = Path("llmproxy") / "v1" / "llmproxy.proto"


def proto_root() -> Path:
    for root in (HERE / "protos", HERE.parent.parent / "protos"):
        if (root / PROTO).exists():
            return root
    raise SystemExit(f"llmproxy-client: cannot find {PROTO} in ./protos or ../../protos")


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        from grpc_tools import protoc

        out = Path(self.build_lib)
        root = proto_root()
        args = ["protoc", f"-I{root}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", str(root / PROTO)]
        if protoc.main(args) != 0:
            raise SystemExit("llmproxy-client: protoc failed")
        for marker in ("llmproxy/__init__.py", "llmproxy/v1/__init__.py", "llmproxy/py.typed"):
            (out / marker).touch()


class SdistWithProtos(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        target = Path(base_dir) / "protos" / PROTO
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(proto_root() / PROTO, target)


setup(cmdclass={"build_py": BuildWithStubs, "sdist": SdistWithProtos})
