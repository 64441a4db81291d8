"""Cost of the vertical parties' private set intersection against the plain id exchange.

Run:  mpiexec -n 2 python tools/bench_psi.py [--sizes 10000 100000 1000000] [--json out.json]

Every rank holds ``size`` ids, half of them shared by all ranks. For each size the plain
exchange (one raw ``Allgatherv`` of every id list and an intersection: what vertical did
before) and ``mpisplit.psi.private_intersection`` (rank 0 compares and holds ids too) run
in turn after a barrier, ``--repeats`` times; rank 0 prints the median seconds of each and
the median of the per-repeat ratios PSI / plain, and checks both give the same ids.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import numpy as np
from mpi4py import MPI

from mpisplit.data import intersect_ids
from mpisplit.psi import private_intersection


def plain_intersection(comm: MPI.Comm, mine: np.ndarray) -> np.ndarray:
    """The baseline: every rank gets every rank's raw ids (one Allgather, one Allgatherv)."""
    sizes = np.zeros(comm.Get_size(), np.int64)
    comm.Allgather(np.array([len(mine)], np.int64), sizes)
    everyone = np.empty(int(sizes.sum()), np.int64)
    comm.Allgatherv(mine, [everyone, sizes])
    return intersect_ids(np.split(everyone, np.cumsum(sizes)[:-1]))


def timed(comm: MPI.Comm, run) -> tuple[float, np.ndarray]:
    comm.Barrier()
    start = time.perf_counter()
    result = run()
    comm.Barrier()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, results = comm.Get_rank(), []
    for size in args.sizes:
        rng = np.random.default_rng(rank)
        shared = np.arange(size // 2, dtype=np.int64)
        mine = rng.permutation(
            np.concatenate(
                [
                    shared,
                    rng.choice(
                        np.arange(size, 100 * size, dtype=np.int64),
                        size - len(shared),
                        replace=False,
                    ),
                ]
            )
        )
        plain, private, ratios = [], [], []
        for _ in range(args.repeats):
            t_plain, expected = timed(comm, partial(plain_intersection, comm, mine))
            t_psi, (common, _, _) = timed(comm, partial(private_intersection, comm, mine))
            assert np.array_equal(common, expected), "PSI and plain intersections differ"
            plain.append(t_plain)
            private.append(t_psi)
            ratios.append(t_psi / t_plain)
        results.append(
            {
                "ids_per_rank": size,
                "ranks": comm.Get_size(),
                "common": len(expected),
                "plain_s": statistics.median(plain),
                "psi_s": statistics.median(private),
                "ratio": statistics.median(ratios),
            }
        )
        if rank == 0:
            row = results[-1]
            print(
                f"{size:>9} ids/rank  plain {row['plain_s'] * 1e3:9.2f} ms  "
                f"psi {row['psi_s']:8.2f} s  psi/plain {row['ratio']:9.0f}x",
                flush=True,
            )
    if rank == 0 and args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
