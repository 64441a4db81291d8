"""Peak memory of building one rank's part of a large user model vs the whole model.

Each build runs in a fresh process (peak RSS is per process) and is measured as that
process's peak RSS less its RSS just before the build (mpisplit and torch imported): the
whole model (``build_model``, what one process would hold) and each part alone
(``build_parts``, what a rank of a run builds). The model is a stack of square linear layers
cut in the middle (default 16 x 4096 x 4096 = 1.07 GB of float32).

    python tools/bench_model_memory.py [--width 4096] [--layers 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from torch import nn


def wide_mlp(*, width: int, layers: int) -> nn.Sequential:
    """The benchmark's model: ``layers`` linear layers of ``width`` x ``width``."""
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


def _measure(what: str, width: int, layers: int) -> dict[str, float]:
    from mpisplit.config import ModelConfig
    from mpisplit.models import build_model, build_parts
    from mpisplit.runlog import peak_resident_mb, resident_mb

    config = ModelConfig(
        name=f"{Path(__file__).resolve()}:wide_mlp",
        cuts=(str(layers // 2),),
        options={"width": width, "layers": layers},
    )
    before = resident_mb()
    if what == "whole":
        model = build_model(config, (width,), width)
    else:
        model = build_parts(config, (width,), width, [int(what[4:])])
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values() if not t.is_meta)
    return {
        "what": what,
        "held_mb": held / 2**20,
        "before_mb": before,
        "peak_rss_mb": peak_resident_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure, args.width, args.layers)))
        return
    rows = []
    for what in ("whole", "part0", "part1"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--measure",
                what,
                "--width",
                str(args.width),
                "--layers",
                str(args.layers),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        row = json.loads(out.stdout.splitlines()[-1])
        rows.append({**row, "grown_mb": row["peak_rss_mb"] - row["before_mb"]})
    model_mb = args.layers * (args.width + 1) * args.width * 4 / 2**20
    print(
        f"model: {args.layers} x Linear({args.width}, {args.width}) = {model_mb:.0f} MiB "
        f"float32, cut at layer {args.layers // 2}"
    )
    print(
        f"{'build':<8}{'tensors held MiB':>18}{'RSS before':>12}{'peak RSS':>10}{'grown':>8}"
        f"{'vs whole':>10}"
    )
    for row in rows:
        print(
            f"{row['what']:<8}{row['held_mb']:>18.0f}{row['before_mb']:>12.0f}"
            f"{row['peak_rss_mb']:>10.0f}{row['grown_mb']:>8.0f}"
            f"{row['grown_mb'] / rows[0]['grown_mb']:>10.2f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"model_mb": model_mb, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
