"""Build hook: compile protos/inserve/v1/*.proto into gRPC stubs at build and install time."""

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTOS = ROOT / "protos"


class BuildPyWithStubs(build_py):
    """Generate the stubs next to the .proto files (editable) or into the build tree."""

    def run(self) -> None:
        super().run()
        import grpc_tools
        from grpc_tools import protoc

        out = PROTOS if self.editable_mode else Path(self.build_lib)
        sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
        well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        args = [
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *sources,
        ]
        if protoc.main(["protoc", *args]) != 0:
            raise SystemExit("protoc failed on " + " ".join(sources))


setup(cmdclass={"build_py": BuildPyWithStubs})
