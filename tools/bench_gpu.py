"""GPU cut-exchange benchmark: device buffers vs pinned staging vs synchronous host copies.

Run on two ranks of a machine with a GPU (they may share it):

    mpisplit launch -n 2 -- python tools/bench_gpu.py [--json out.json]

Each method ping-pongs the same float32 device tensor (timed like ``bench_transport``):
``staged`` is mpisplit with pinned, overlapped host staging (``MPISPLIT_CUDA_AWARE=0``),
``device`` is mpisplit handing device buffers to a CUDA-aware MPI (only where the MPI is
one), and ``host_copy`` is the baseline a user would write: a synchronous copy to pageable
host memory, raw ``mpi4py`` buffers, and a copy back. Rank 0 prints the ratios.
A GPU training step vs centralized on the same GPU is ``bench_training.py gpu``.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable

import torch
from bench_transport import (
    interleaved,
    iterations_for,
    paired_ratio,
    ping_pong_arguments,
    size_label,
)
from mpi4py import MPI

from mpisplit.tracing import Tracer
from mpisplit.transport import Kind, Transport, cuda_aware_mpi


def _transport(comm: MPI.Comm, device: torch.device, cuda_aware: bool) -> Transport:
    previous = os.environ.get("MPISPLIT_CUDA_AWARE")
    os.environ["MPISPLIT_CUDA_AWARE"] = "1" if cuda_aware else "0"
    try:
        return Transport(
            comm,
            roles=["a", "b"],
            timeout_s=120,
            device=device,
            tracer=Tracer(comm.Get_rank(), "bench", enabled=False),
        )
    finally:
        if previous is None:
            del os.environ["MPISPLIT_CUDA_AWARE"]
        else:
            os.environ["MPISPLIT_CUDA_AWARE"] = previous


def methods(
    comm: MPI.Comm, tensor: torch.Tensor, transports: dict[str, Transport]
) -> dict[str, Callable[[], None]]:
    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()

    def through(transport: Transport) -> Callable[[], None]:
        def exchange() -> None:
            if rank == 0:
                transport.send(tensor, peer, Kind.ACTIVATION)
                transport.recv(Kind.GRADIENT, peer).tensor.to(tensor.device)
            else:
                received = transport.recv(Kind.ACTIVATION, peer).tensor.to(tensor.device)
                transport.send(received, peer, Kind.GRADIENT)
            torch.cuda.synchronize()

        return exchange

    host = torch.empty(tensor.shape, dtype=tensor.dtype)

    def host_copy() -> None:
        if rank == 0:
            comm.Send(tensor.cpu().numpy(), peer, 1)
            comm.Recv(host.numpy(), peer, 2)
            tensor.copy_(host)
        else:
            comm.Recv(host.numpy(), peer, 1)
            received = host.to(tensor.device)
            comm.Send(received.cpu().numpy(), peer, 2)
        torch.cuda.synchronize()

    return {
        **{name: through(transport) for name, transport in transports.items()},
        "host_copy": host_copy,
    }


def main() -> None:
    args = ping_pong_arguments(__doc__.splitlines()[0])
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2 or not torch.cuda.is_available():
        raise SystemExit("bench_gpu: run with exactly 2 ranks on a machine with a GPU")
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    device = torch.device("cuda", node.Get_rank() % torch.cuda.device_count())
    torch.cuda.set_device(device)
    node.Free()
    device_aware = cuda_aware_mpi()
    transports = {"staged": _transport(comm, device, False)}
    if device_aware:
        transports["device"] = _transport(comm, device, True)
    results = []
    for nbytes in args.sizes:
        tensor = torch.rand(nbytes // 4, device=device)
        row: dict[str, float | int | str] = {"bytes": nbytes}
        samples = interleaved(
            comm, methods(comm, tensor, transports), iterations_for(nbytes), args.repeats
        )
        for name, times in samples.items():
            row[f"{name}_s"] = statistics.median(times)
        row["speedup_staged_vs_host_copy"] = paired_ratio(samples["host_copy"], samples["staged"])
        if "device" in samples:
            row["speedup_device_vs_staged"] = paired_ratio(samples["staged"], samples["device"])
        results.append(row)
    for transport in transports.values():
        transport.close()
    if comm.Get_rank() == 0:
        _report(results, args.json, torch.cuda.get_device_name(device), device_aware)


def _report(results: list[dict], json_path: str | None, gpu: str, device_aware: bool) -> None:
    print(f"GPU: {gpu}; CUDA-aware MPI: {'yes' if device_aware else 'no'}")
    print(
        f"{'size':>8} {'staged':>10} {'host_copy':>10} {'device':>10} "
        f"{'staged vs host_copy':>20} {'device vs staged':>17}"
    )
    for row in results:
        device = ""
        if "speedup_device_vs_staged" in row:
            device = f"{row['speedup_device_vs_staged']:>16.2f}x"
        print(
            f"{size_label(row['bytes']):>8} {row['staged_s'] * 1e6:>8.1f}us "
            f"{row['host_copy_s'] * 1e6:>8.1f}us "
            f"{row.get('device_s', float('nan')) * 1e6:>8.1f}us "
            f"{row['speedup_staged_vs_host_copy']:>19.2f}x {device}"
        )
    if json_path:
        with open(json_path, "w") as out:
            json.dump(
                {
                    "benchmark": "gpu transport",
                    "gpu": gpu,
                    "cuda_aware": device_aware,
                    "results": results,
                },
                out,
                indent=2,
            )


if __name__ == "__main__":
    main()
