"""``mpisplit resources``: per-client computation and communication of four ways to train
one model on data spread over many clients, computed from the model and the arguments.

Computation is counted on the real model parts (the zoo's layer plan cut where a run would
cut it) with ``torch.utils.flop_counter.FlopCounterMode``, forward + backward, on meta
tensors (shapes only: ResNet-50 costs no arithmetic). It counts matrix products and
convolutions (2 FLOPs per multiply-add); normalisation, activations and the optimizer are
not counted. Per client: n = samples / clients samples per epoch, b = ceil(n / batch) batches,
E epochs, H = ``HEADER_BYTES`` per message (the transport's header, so real runs compare).

* **split** (vanilla, round-robin): per batch the client sends the cut activation and the
  labels (int64) and receives the cut gradient, one message each; per epoch it receives
  the client part's weights from the previous client and hands them to the next (steady
  state: one hand-over in and one out per epoch; weights and buffers only — mpisplit also
  hands over optimizer state, one more copy of the weights with momentum, two with Adam).
  The client computes its part only.
* **splitfed**: the same cut traffic; per round (an epoch) the client uploads its part to
  the averaging server and downloads the average. The client computes its part only.
* **fedavg**: per round (an epoch of local training) the client downloads the whole model
  and uploads its update, and computes the whole model.
* **syncsgd** (large-batch synchronous SGD): every batch, a ring allreduce of the gradient
  (P = parameter bytes) over the clients; each rank sends and receives 2(K-1)/K·P ≈ 2·P per
  step, counted as 2·P each way (an ``MPI_Allreduce``: no mpisplit header). The client
  computes the whole model.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mpisplit.config import ModelConfig
from mpisplit.models import build_layers, cut_indices, layer_plan
from mpisplit.transport import HEADER_BYTES

LABEL_BYTES = 8
SCHEMES = ("split", "splitfed", "fedavg", "syncsgd")


@dataclass(frozen=True)
class Workload:
    model: str
    cut: str
    input_shape: tuple[int, ...]
    classes: int
    samples: int
    clients: int
    epochs: int
    batch_size: int

    @property
    def samples_per_client(self) -> float:
        return self.samples / self.clients

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.samples_per_client / self.batch_size)


@dataclass(frozen=True)
class ModelCosts:
    """Per-sample FLOPs and the sizes that set the traffic, from the model alone."""

    client_flops_per_sample: float
    model_flops_per_sample: float
    cut_bytes_per_sample: int
    cut_shape: tuple[int, ...]
    client_state_bytes: int
    model_state_bytes: int
    model_param_bytes: int
    params: int
    client_params: int


@dataclass(frozen=True)
class ClientCost:
    scheme: str
    flops: float
    bytes_sent: float
    bytes_received: float
    detail: dict[str, float]

    @property
    def bytes(self) -> float:
        return self.bytes_sent + self.bytes_received


def model_parts(work: Workload) -> tuple[nn.Sequential, nn.Sequential]:
    """(client part, whole model), built on the meta device (no memory, no init cost)."""
    plan = layer_plan(ModelConfig(name=work.model, cuts=(work.cut,)), work.input_shape,
                      work.classes)
    (cut,) = cut_indices(plan, [work.cut], key="--cut")
    with torch.device("meta"):
        return build_layers(plan, 0, cut, 0), build_layers(plan, 0, len(plan), 0)


def train_flops(module: nn.Module, input_shape: Sequence[int], batch: int) -> float:
    """FLOPs of one forward + backward of ``module`` on a batch (input needs no gradient,
    as for the first layer of a client); the output is back-propagated with ones. The input
    lives where the parameters do (meta tensors for the estimates)."""
    x = torch.empty(batch, *input_shape, device=next(module.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        out = module(x)
        out.backward(torch.ones_like(out))
    return float(counter.get_total_flops())


def state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def model_costs(work: Workload) -> ModelCosts:
    client, whole = model_parts(work)
    batch = work.batch_size
    cut = client(torch.empty(1, *work.input_shape, device="meta"))
    return ModelCosts(
        client_flops_per_sample=train_flops(client, work.input_shape, batch) / batch,
        model_flops_per_sample=train_flops(whole, work.input_shape, batch) / batch,
        cut_bytes_per_sample=cut.numel() * cut.element_size(),
        cut_shape=tuple(cut.shape[1:]),
        client_state_bytes=state_bytes(client),
        model_state_bytes=state_bytes(whole),
        model_param_bytes=param_bytes(whole),
        params=sum(p.numel() for p in whole.parameters()),
        client_params=sum(p.numel() for p in client.parameters()),
    )


def cut_traffic(work: Workload, costs: ModelCosts) -> dict[str, float]:
    """Bytes of the cut exchange per client over the run: one message per batch each."""
    n, b, epochs = work.samples_per_client, work.batches_per_epoch, work.epochs
    return {
        "activations": epochs * (n * costs.cut_bytes_per_sample + b * HEADER_BYTES),
        "labels": epochs * (n * LABEL_BYTES + b * HEADER_BYTES),
        "gradients": epochs * (n * costs.cut_bytes_per_sample + b * HEADER_BYTES),
    }


def per_client(work: Workload, costs: ModelCosts) -> list[ClientCost]:
    """Each scheme's per-client FLOPs and bytes (formulas in the module docstring)."""
    samples = work.samples_per_client * work.epochs
    client_flops = costs.client_flops_per_sample * samples
    model_flops = costs.model_flops_per_sample * samples
    cut = cut_traffic(work, costs)
    part = work.epochs * (costs.client_state_bytes + HEADER_BYTES)
    whole = work.epochs * (costs.model_state_bytes + HEADER_BYTES)
    allreduce = work.epochs * work.batches_per_epoch * 2 * costs.model_param_bytes
    up = cut["activations"] + cut["labels"]
    return [
        ClientCost("split", client_flops, up + part, cut["gradients"] + part,
                   {**cut, "handover_in": part, "handover_out": part}),
        ClientCost("splitfed", client_flops, up + part, cut["gradients"] + part,
                   {**cut, "upload": part, "download": part}),
        ClientCost("fedavg", model_flops, whole, whole, {"upload": whole, "download": whole}),
        ClientCost("syncsgd", model_flops, allreduce, allreduce,
                   {"allreduce_sent": allreduce, "allreduce_received": allreduce}),
    ]


def estimate(work: Workload) -> dict[str, Any]:
    costs = model_costs(work)
    return {
        "workload": asdict(work),
        "model": asdict(costs),
        "per_client": {c.scheme: {"flops": c.flops, "bytes": c.bytes, "bytes_sent": c.bytes_sent,
                                  "bytes_received": c.bytes_received, "detail": c.detail}
                       for c in per_client(work, costs)},
    }


def render(result: dict[str, Any]) -> str:
    work, model = result["workload"], result["model"]
    lines = [
        f"{work['model']} cut at {work['cut']}: {model['params'] / 1e6:.2f} M parameters, "
        f"client part {model['client_params'] / 1e6:.3f} M, cut activation "
        f"{'x'.join(map(str, model['cut_shape']))} = {model['cut_bytes_per_sample']} B/sample; "
        f"{work['clients']} clients x {work['samples'] / work['clients']:g} samples, "
        f"{work['epochs']} epoch(s), batch {work['batch_size']}",
        f"  {'scheme':<10}{'FLOPs/client':>14}{'bytes/client':>14}{'sent':>12}{'received':>12}",
    ]
    for scheme, cost in result["per_client"].items():
        lines.append(f"  {scheme:<10}{cost['flops']:>14.3e}{cost['bytes']:>14.3e}"
                     f"{cost['bytes_sent']:>12.3e}{cost['bytes_received']:>12.3e}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    results = []
    for clients in args.clients:
        work = Workload(args.model, args.cut, args.input_shape, args.classes, args.samples,
                        clients, args.epochs, args.batch_size)
        results.append(estimate(work))
        print(render(results[-1]))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0
