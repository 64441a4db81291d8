"""Cut-exchange transport benchmark: mpisplit vs raw mpi4py buffers vs pickle vs gloo.

Run on two ranks:  mpisplit launch -n 2 -- python tools/bench_transport.py [--json out.json]

Each method ping-pongs the same float32 tensor between the ranks (warm-up discarded, a barrier
before each timing, several repeats with the methods taking turns, the median kept). Rank 0
prints one table with the latency per one-way message, the bandwidth, and the ratios of
mpisplit against each baseline measured in the same run; ``--json`` writes the same numbers as data.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from mpi4py import MPI

from mpisplit.tracing import Tracer
from mpisplit.transport import Kind, Transport

SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def iterations_for(nbytes: int) -> int:
    return max(5, min(1000, (256 << 20) // max(nbytes, 1) // 4))


def time_pingpong(comm: MPI.Comm, exchange: Callable[[], None], iterations: int) -> float:
    """Seconds per one-way message (round trips / 2), after a warm-up."""
    for _ in range(max(2, iterations // 4)):
        exchange()
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        exchange()
    return (time.perf_counter() - start) / iterations / 2


def interleaved(
    comm: MPI.Comm, exchanges: dict[str, Callable[[], None]], iterations: int, repeats: int
) -> dict[str, list[float]]:
    """``time_pingpong`` samples per method, the methods taking turns in every repeat (a
    drift of the machine's speed touches them all alike), in the orders of a balanced Latin
    square: over a full cycle of repeats each method runs right after every other once (a
    method timed right after gloo or pickle ran up to 20 % slower at 1 MiB). Every rank
    computes the same orders, so the ping-pongs pair up."""
    names = list(exchanges)
    orders = balanced_orders(len(names))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for index in orders[repeat % len(orders)]:
            samples[names[index]].append(time_pingpong(comm, exchanges[names[index]], iterations))
    return samples


def balanced_orders(count: int) -> list[list[int]]:
    """Williams' balanced Latin square for ``count`` methods: within its rows every method
    follows every other equally often (the rows and their reverses when ``count`` is odd)."""
    offsets = [0] + [step for k in range(1, count // 2 + 1) for step in (k, count - k)][: count - 1]
    rows = [[(start + offset) % count for offset in offsets] for start in range(count)]
    return rows if count % 2 == 0 else rows + [row[::-1] for row in rows]


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over repeats of one method's time over another's in the same repeat: the
    machine's speed changes from second to second (memory bandwidth moves by 3x between
    phases), and a ratio of times taken moments apart cancels it where medians taken
    apart do not."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def methods(
    comm: MPI.Comm, tensor: torch.Tensor, transport: Transport
) -> dict[str, Callable[[], None]]:
    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()
    raw = tensor.numpy()
    reply = torch.empty_like(tensor)

    def mpisplit() -> None:
        if rank == 0:
            transport.send(tensor, peer, Kind.ACTIVATION)
            transport.recv(Kind.GRADIENT, peer, out=reply)
        else:
            received = transport.recv(Kind.ACTIVATION, peer, out=reply).tensor
            transport.send(received, peer, Kind.GRADIENT)

    def raw_mpi4py() -> None:
        if rank == 0:
            comm.Send(raw, peer, 1)
            comm.Recv(reply.numpy(), peer, 2)
        else:
            comm.Recv(reply.numpy(), peer, 1)
            comm.Send(reply.numpy(), peer, 2)

    def pickled() -> None:
        if rank == 0:
            comm.send(tensor, peer, 1)
            comm.recv(source=peer, tag=2)
        else:
            comm.send(comm.recv(source=peer, tag=1), peer, 2)

    def gloo() -> None:
        if rank == 0:
            dist.send(tensor, peer)
            dist.recv(reply, peer)
        else:
            dist.recv(reply, peer)
            dist.send(reply, peer)

    return {"mpisplit": mpisplit, "mpi4py_raw": raw_mpi4py, "mpi4py_pickle": pickled, "gloo": gloo}


def ping_pong_arguments(description: str) -> argparse.Namespace:
    """The options of the ping-pong benchmarks (this one and ``bench_gpu``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--repeats",
        type=int,
        default=8,
        help="timings per method; a multiple of the number of balanced "
        "orders (as many as methods, twice that if odd) runs whole "
        "cycles",
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(size) for size in text.split(",")],
        default=SIZES,
        help="message sizes in bytes, comma-separated (default: 4 KiB to 64 MiB)",
    )
    return parser.parse_args()


def main() -> None:
    args = ping_pong_arguments(__doc__.splitlines()[0])
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        raise SystemExit("bench_transport: run with exactly 2 ranks (mpiexec -n 2)")
    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000 if comm.rank == 0 else 0))
    os.environ["MASTER_PORT"] = str(comm.bcast(os.environ["MASTER_PORT"], root=0))
    dist.init_process_group("gloo", rank=comm.Get_rank(), world_size=2)
    transport = Transport(
        comm,
        roles=["a", "b"],
        timeout_s=120,
        tracer=Tracer(comm.Get_rank(), "bench", enabled=False),
    )
    results = []
    for nbytes in args.sizes:
        tensor = torch.rand(nbytes // 4)
        row: dict[str, float | int] = {"bytes": nbytes}
        samples = interleaved(
            comm, methods(comm, tensor, transport), iterations_for(nbytes), args.repeats
        )
        for name, times in samples.items():
            row[f"{name}_s"] = statistics.median(times)
            row[f"{name}_spread"] = (max(times) - min(times)) / statistics.median(times)
        ours, raw = samples["mpisplit"], samples["mpi4py_raw"]
        row["ratio_vs_raw_bandwidth"] = paired_ratio(raw, ours)
        row["ratio_vs_raw_latency"] = paired_ratio(ours, raw)
        row["speedup_vs_pickle"] = paired_ratio(samples["mpi4py_pickle"], ours)
        row["speedup_vs_gloo"] = paired_ratio(samples["gloo"], ours)
        results.append(row)
    transport.close()
    dist.destroy_process_group()
    if comm.Get_rank() == 0:
        _report(results, args.json)


def _report(results: list[dict], json_path: str | None) -> None:
    print(
        f"{'size':>8} {'mpisplit':>10} {'raw':>10} {'MB/s':>8} "
        f"{'vs raw':>7} {'time/raw':>8} {'vs pickle':>9} {'vs gloo':>8}"
    )
    for row in results:
        ours = row["mpisplit_s"]
        print(
            f"{size_label(row['bytes']):>8} {ours * 1e6:>8.1f}us "
            f"{row['mpi4py_raw_s'] * 1e6:>8.1f}us "
            f"{row['bytes'] / ours / 1e6:>8.0f} {row['ratio_vs_raw_bandwidth']:>6.2f}x "
            f"{row['ratio_vs_raw_latency']:>7.2f}x "
            f"{row['speedup_vs_pickle']:>8.2f}x {row['speedup_vs_gloo']:>7.2f}x"
        )
    print(
        "medians of per-repeat ratios; vs raw: raw time / mpisplit time (1.0 = as fast as "
        "raw mpi4py buffers); time/raw: the latency ratio; vs pickle, vs gloo: how many "
        "times faster mpisplit is"
    )
    if json_path:
        with open(json_path, "w") as out:
            json.dump({"benchmark": "transport", "results": results}, out, indent=2)


def size_label(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


if __name__ == "__main__":
    main()
