"""Locate the PMPI interposition library and read the reports it writes.

The library (``libmpisplit_pmpi.so``, built by ``tools/pmpi/build.sh`` from
``tools/pmpi/mpisplit_pmpi.c``) records per-call and per-peer MPI traffic of every
rank when it is LD_PRELOADed into an MPI program, and at ``MPI_Finalize`` writes
``pmpi-rank<R>.json`` into ``$MPISPLIT_PMPI_DIR``. See ``tools/pmpi/README.md`` for
the JSON format.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

LIBRARY_NAME = "libmpisplit_pmpi.so"
ENV_LIB = "MPISPLIT_PMPI_LIB"
ENV_DIR = "MPISPLIT_PMPI_DIR"

_CHECKOUT = Path(__file__).resolve().parent.parent
_REPORT_RE = re.compile(r"^pmpi-rank(\d+)\.json$")


def library_path() -> Path | None:
    """Path of the built library, or None when it is not built.

    Looks at ``$MPISPLIT_PMPI_LIB`` (a file, or a directory holding the library),
    then this environment's build (``build_dir()``, where ``tools/pmpi/build.sh`` puts
    it), then ``<sys.prefix>/lib`` (where ``cmake --install build --prefix $VIRTUAL_ENV``
    puts it).
    """
    env = os.environ.get(ENV_LIB)
    if env:
        p = Path(env).expanduser()
        if p.is_dir():
            p = p / LIBRARY_NAME
        return p.resolve() if p.is_file() else None
    for cand in (
        build_dir() / LIBRARY_NAME,
        Path(sys.prefix) / "lib" / LIBRARY_NAME,
        Path(sys.prefix) / "lib64" / LIBRARY_NAME,
    ):
        if cand.is_file():
            return cand.resolve()
    return None


def build_dir() -> Path:
    """The library's build directory for this interpreter: inside its virtual environment,
    so that environments with different MPIs keep their own builds; the checkout's
    ``build/`` for an interpreter outside one (as ``tools/pmpi/build.sh`` decides)."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "build" / "pmpi"
    return _CHECKOUT / "build"


def preload_env(out_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for an ``mpiexec`` whose ranks should be recorded into ``out_dir``.

    Prepends the library to ``LD_PRELOAD`` and sets ``MPISPLIT_PMPI_DIR``. Raises
    FileNotFoundError when the library is not built (run ``tools/pmpi/build.sh``).
    """
    lib = library_path()
    if lib is None:
        raise FileNotFoundError(
            f"{LIBRARY_NAME} not found: run tools/pmpi/build.sh or set {ENV_LIB}"
        )
    env = dict(os.environ if base is None else base)
    pre = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{lib}:{pre}" if pre else str(lib)
    env[ENV_DIR] = str(Path(out_dir).resolve())
    return env


def read_reports(run_dir: Path) -> list[dict[str, Any]]:
    """All ``pmpi-rank<R>.json`` reports in ``run_dir``, sorted by rank ([] if none)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _REPORT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    reports = []
    for _, p in sorted(found):
        with p.open() as f:
            reports.append(json.load(f))
    return reports


def merged_calls(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``report["calls"]`` with each large-count ``MPI_X_c`` folded into ``MPI_X``.

    mpi4py 4 on an MPI-4 library calls the ``_c`` variants, plain C programs the
    classic ones; this gives one name per operation either way.
    """
    out: dict[str, dict[str, float]] = {}
    for name, st in report.get("calls", {}).items():
        base = name[:-2] if name.endswith("_c") else name
        acc = out.setdefault(base, {"count": 0, "bytes": 0, "time_s": 0.0})
        for k in acc:
            acc[k] += st.get(k, 0)
    return out
