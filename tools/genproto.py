"""Regenerate the Python code for protos/riskd/v1/*.proto into riskd/service/gen/.

Run: ``python tools/genproto.py``. The generated files are committed; this
rewrites their imports so they live under ``riskd.service.gen``.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import sys

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "riskd" / "service" / "gen"


def main() -> int:
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    bindir = pathlib.Path(sys.executable).parent  # mypy-protobuf's plugins sit beside python
    plugins = [
        f"--plugin=protoc-gen-{n}={bindir / ('protoc-gen-' + n)}" for n in ("mypy", "mypy_grpc")
    ]
    args = [
        "protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{include}",
        *plugins,
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *protos,
    ]
    rc = protoc.main(args)
    if rc != 0:
        return int(rc)
    for d in [OUT, *[p for p in OUT.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    for f in list(OUT.rglob("*.py")) + list(OUT.rglob("*.pyi")):
        text = f.read_text()
        text = re.sub(
            r"^(from|import) riskd\.v1", r"\1 riskd.service.gen.riskd.v1", text, flags=re.M
        )
        f.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
