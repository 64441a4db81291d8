"""``mpisplit resources``: per-client computation and communication of four ways to train
one model on data spread over many clients, computed from the model and the arguments.

Computation is counted on the real model parts (the model ``model.name`` builds, zoo or the
user's factory with its options, cut where a run would cut it) with
``torch.utils.flop_counter.FlopCounterMode``, forward + backward, on meta tensors (shapes
only: ResNet-50 costs no arithmetic). It counts matrix products and convolutions (2 FLOPs per
multiply-add); normalisation, activations and the optimizer are
not counted. A run with ``run.count_flops: true`` records the same count per trace span.

Communication is what mpisplit's schemes move while training (evaluation passes are not
counted), counted the way a trace counts it, so a traced run can be compared with it:

* a point-to-point message costs its payload plus H = ``HEADER_BYTES`` (the transport's
  header), as in the bytes matrix of ``mpisplit prof report``;
* a collective costs the bytes a rank contributes and the bytes it gets back (its own
  buffers, no header): an averaging Allreduce is one copy of the averaged parameters (and
  floating-point buffers, BatchNorm statistics, unless ``average_buffers`` is off) sent and
  one received per member, whatever the MPI library's algorithm puts on the wire.

Per client: n = samples / clients samples per epoch, b = ceil(n / batch) batches per
epoch, E epochs, s = b·E steps, K clients; an averaging point every ``average_every`` steps
(default: once per epoch) and a last one after the end, a = ceil(s / average_every)
averages.

* **split** (vanilla, sequential: one client trains a turn of one epoch, then hands its
  part to the next): per batch the client sends the cut activation and the labels (int64)
  and receives the cut gradient, one message each. A cut that carries several tensors
  (hidden states and a mask, say) sends one message per tensor, every dtype included, and
  gets one back per float tensor (the others travel forward only). The K·E turns need
  K·E − 1 hand-overs, and at the end the last client hands the final part to the K − 1
  others, each the client segment serialised as the engine sends it (weights, optimizer
  state and schedule, ``Segment.state_bytes``): (K·E + K − 2)/K in and out per client on
  average. The client computes its part only.
* **splitfed**: the same cut traffic; a averages of the client part's parameters with an
  Allreduce among the clients (no averaging server). The client computes its part only.
  SplitFed sends one tensor per cut, so a cut that carries several has no splitfed row.
* **fedavg**: a averages of the whole model's parameters (Allreduce), plus one Allreduce of
  the sample count (8 bytes) for the weights. The client computes the whole model.
* **syncsgd** (large-batch synchronous SGD): every step one Allreduce of the gradients with
  the batch size appended (parameter bytes + one element). The client computes the whole
  model.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mpisplit.codec import HEADER_BYTES
from mpisplit.config import ConfigError, ModelConfig, TrainConfig, load_config
from mpisplit.cut import differentiable, tensors
from mpisplit.models import build_model
from mpisplit.segment import Segment
from mpisplit.split import split_model

LABEL_BYTES = 8
SAMPLE_COUNT_BYTES = 8


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
    average_every: int = 0
    """Steps between SplitFed/FedAvg averages (``scheme.fedavg_every``); 0 = one epoch."""
    optimizer: str = "sgd"
    """The optimizer whose state a split-learning hand-over carries (``train.optimizer``)."""
    momentum: float = 0.0
    """SGD momentum (``train.momentum``): a momentum buffer is handed over too."""
    options: dict[str, Any] = field(default_factory=dict)
    """The model factory's keyword arguments (``model.options``)."""
    average_buffers: bool = True
    """Averages carry the floating-point buffers too (``scheme.average_buffers``)."""

    @property
    def samples_per_client(self) -> float:
        return self.samples / self.clients

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.samples_per_client / self.batch_size)

    @property
    def steps(self) -> int:
        return self.batches_per_epoch * self.epochs

    @property
    def averages(self) -> int:
        return math.ceil(self.steps / (self.average_every or self.batches_per_epoch))


@dataclass(frozen=True)
class CutSize:
    """Bytes of the tensors that cross the cut in one direction: per sample, plus what does
    not grow with the batch (a tensor without a batch axis), in ``messages`` messages."""

    per_sample: int
    per_batch: int
    messages: int

    @classmethod
    def of(cls, one: Sequence[torch.Tensor], two: Sequence[torch.Tensor]) -> CutSize:
        """From the same tensors at batch sizes 1 and 2."""
        small = sum(t.numel() * t.element_size() for t in one)
        per_sample = sum(t.numel() * t.element_size() for t in two) - small
        return cls(per_sample, small - per_sample, len(one))

    def bytes(self, samples: float, batches: int) -> float:
        """Payloads and headers of ``batches`` batches holding ``samples`` samples in all."""
        return samples * self.per_sample + batches * (self.per_batch + self.messages * HEADER_BYTES)


@dataclass(frozen=True)
class ModelCosts:
    """Per-sample FLOPs and the sizes that set the traffic, from the model alone."""

    client_flops_per_sample: float
    model_flops_per_sample: float
    cut_bytes_per_sample: int
    """Every tensor the cut carries, float or not (what the client sends per sample)."""
    cut_shapes: tuple[tuple[int, ...], ...]
    """Per-sample shape of each tensor the cut carries (one for a one-tensor cut)."""
    activation: CutSize
    gradient: CutSize
    """The float tensors' gradients that come back."""
    handover_bytes: int
    model_param_bytes: int
    client_averaged_bytes: int
    model_averaged_bytes: int
    """What an average carries: the parameters, and the floating-point buffers (BatchNorm
    statistics) unless the workload keeps them local."""
    param_element_bytes: int
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


def model_parts(work: Workload) -> tuple[nn.Module, nn.Module]:
    """(client part, whole model), built on the meta device (no memory, no init cost)."""
    config = ModelConfig(name=work.model, cuts=(work.cut,), options=dict(work.options))
    whole = build_model(config, work.input_shape, work.classes, device="meta")
    return split_model(whole, [work.cut], key="--cut")[0], whole


def cut_tensors(client: nn.Module, input_shape: Sequence[int], batch: int) -> list[torch.Tensor]:
    """The tensors the client part sends for a batch (meta tensors: shapes and dtypes)."""
    return list(tensors(client(torch.empty(batch, *input_shape, device="meta"))))


def handover_bytes(work: Workload) -> int:
    """Payload of one hand-over: the client segment serialised by the engine's own code,
    after a step so that the optimizer state exists (only the client part gets memory; its
    values do not change the size)."""
    client, _ = model_parts(work)
    client.to_empty(device="cpu")
    train = TrainConfig(optimizer=work.optimizer, momentum=work.momentum)
    segment = Segment.create(client, train, work.steps)
    for param in segment.module.parameters():
        param.grad = torch.zeros_like(param)
    segment.step()
    return segment.state_bytes().numel()


def train_flops(module: nn.Module, input_shape: Sequence[int], batch: int) -> float:
    """FLOPs of one forward + backward of ``module`` on a batch (input needs no gradient,
    as for the first layer of a client); the output is back-propagated with ones. The input
    lives where the parameters do (meta tensors for the estimates)."""
    x = torch.empty(batch, *input_shape, device=next(module.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        floats = [t for t in tensors(module(x)) if differentiable(t) and t.requires_grad]
        torch.autograd.backward(floats, [torch.ones_like(t) for t in floats])
    return float(counter.get_total_flops())


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def averaged_bytes(module: nn.Module, buffers: bool) -> int:
    """The bytes a federated average of ``module`` carries (``buffers``: with its
    floating-point buffers, as ``scheme.average_buffers`` has it)."""
    floats = [b for b in module.buffers() if b.is_floating_point()] if buffers else []
    return param_bytes(module) + sum(b.numel() * b.element_size() for b in floats)


def model_costs(work: Workload) -> ModelCosts:
    client, whole = model_parts(work)
    batch = work.batch_size
    one, two = (cut_tensors(client, work.input_shape, size) for size in (1, 2))
    activation = CutSize.of(one, two)
    gradient = CutSize.of(*([t for t in ts if differentiable(t)] for ts in (one, two)))
    return ModelCosts(
        client_flops_per_sample=train_flops(client, work.input_shape, batch) / batch,
        model_flops_per_sample=train_flops(whole, work.input_shape, batch) / batch,
        cut_bytes_per_sample=activation.per_sample,
        cut_shapes=tuple(tuple(t.shape[1:]) for t in one),
        activation=activation,
        gradient=gradient,
        handover_bytes=handover_bytes(work),
        model_param_bytes=param_bytes(whole),
        client_averaged_bytes=averaged_bytes(client, work.average_buffers),
        model_averaged_bytes=averaged_bytes(whole, work.average_buffers),
        param_element_bytes=next(whole.parameters()).element_size(),
        params=sum(p.numel() for p in whole.parameters()),
        client_params=sum(p.numel() for p in client.parameters()),
    )


def cut_traffic(work: Workload, costs: ModelCosts) -> dict[str, float]:
    """Bytes of the cut exchange per client over the run: one message per batch each."""
    n, b, epochs = work.samples_per_client, work.batches_per_epoch, work.epochs
    return {
        "activations": epochs * costs.activation.bytes(n, b),
        "labels": epochs * (n * LABEL_BYTES + b * HEADER_BYTES),
        "gradients": epochs * costs.gradient.bytes(n, b),
    }


def per_client(work: Workload, costs: ModelCosts) -> list[ClientCost]:
    """Each scheme's per-client FLOPs and bytes (formulas in the module docstring)."""
    samples = work.samples_per_client * work.epochs
    client_flops = costs.client_flops_per_sample * samples
    model_flops = costs.model_flops_per_sample * samples
    cut = cut_traffic(work, costs)
    up = cut["activations"] + cut["labels"]
    handovers = (work.clients * work.epochs + work.clients - 2) / work.clients
    handover = handovers * (costs.handover_bytes + HEADER_BYTES)
    client_average = work.averages * costs.client_averaged_bytes
    model_average = work.averages * costs.model_averaged_bytes
    gradients = work.steps * (costs.model_param_bytes + costs.param_element_bytes)
    costs_of = [
        ClientCost(
            "split",
            client_flops,
            up + handover,
            cut["gradients"] + handover,
            {**cut, "handover_in": handover, "handover_out": handover},
        ),
        ClientCost(
            "splitfed",
            client_flops,
            up + client_average,
            cut["gradients"] + client_average,
            {**cut, "average_sent": client_average, "average_received": client_average},
        ),
        ClientCost(
            "fedavg",
            model_flops,
            model_average + SAMPLE_COUNT_BYTES,
            model_average + SAMPLE_COUNT_BYTES,
            {
                "average_sent": model_average,
                "average_received": model_average,
                "sample_count": SAMPLE_COUNT_BYTES,
            },
        ),
        ClientCost(
            "syncsgd",
            model_flops,
            gradients,
            gradients,
            {"allreduce_sent": gradients, "allreduce_received": gradients},
        ),
    ]
    several = costs.activation.messages > 1  # splitfed sends one tensor per cut
    return [cost for cost in costs_of if not (several and cost.scheme == "splitfed")]


def estimate(work: Workload) -> dict[str, Any]:
    costs = model_costs(work)
    return {
        "workload": asdict(work),
        "model": asdict(costs),
        "per_client": {
            c.scheme: {
                "flops": c.flops,
                "bytes": c.bytes,
                "bytes_sent": c.bytes_sent,
                "bytes_received": c.bytes_received,
                "detail": c.detail,
            }
            for c in per_client(work, costs)
        },
    }


def render(result: dict[str, Any]) -> str:
    work, model = result["workload"], result["model"]
    lines = [
        f"{work['model']} cut at {work['cut']}: {model['params'] / 1e6:.2f} M parameters, "
        f"client part {model['client_params'] / 1e6:.3f} M, cut activation "
        f"{' + '.join('x'.join(map(str, shape)) or '1' for shape in model['cut_shapes'])} = "
        f"{model['cut_bytes_per_sample']} B/sample; "
        f"{work['clients']} clients x {work['samples'] / work['clients']:g} samples, "
        f"{work['epochs']} epoch(s), batch {work['batch_size']}",
        f"  {'scheme':<10}{'FLOPs/client':>14}{'bytes/client':>14}{'sent':>12}{'received':>12}",
    ]
    for scheme, cost in result["per_client"].items():
        lines.append(
            f"  {scheme:<10}{cost['flops']:>14.3e}{cost['bytes']:>14.3e}"
            f"{cost['bytes_sent']:>12.3e}{cost['bytes_received']:>12.3e}"
        )
    return "\n".join(lines)


def model_arguments(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    """(model.name, the cut, model.options) from ``--config`` or ``--model/--cut/--options``
    (these override the file's)."""
    name, cut, options = args.model, args.cut, args.options
    if args.config is not None:
        model = load_config(args.config).model
        name = name or model.name
        cut = cut or (str(model.cuts[0]) if len(model.cuts) == 1 else None)
        options = {**model.options, **(options or {})}
        if cut is None:
            raise ConfigError(
                f"--cut: {args.config} has {len(model.cuts)} cuts; name the one "
                f"between client and server"
            )
    if not name or not cut:
        raise ConfigError("--model and --cut (or --config FILE) are required")
    return name, cut, options or {}


def main(args: argparse.Namespace) -> int:
    results = []
    name, cut, options = model_arguments(args)
    for clients in args.clients:
        work = Workload(
            name,
            cut,
            args.input_shape,
            args.classes,
            args.samples,
            clients,
            args.epochs,
            args.batch_size,
            args.average_every,
            args.optimizer,
            args.momentum,
            options,
        )
        results.append(estimate(work))
        print(render(results[-1]))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0
