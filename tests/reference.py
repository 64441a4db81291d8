"""An independent single-process PyTorch run: the oracle the split schemes must equal.

It shares only the data reader and the model factory (``factory(**options)`` under
``torch.manual_seed(model.seed)``, the unmodified module) with the engine; the training loop,
optimizer and loss are written here from plain PyTorch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from mpisplit.config import ModelConfig
from mpisplit.data import ShardReader, read_meta
from mpisplit.models import build_model
from mpisplit.seeds import Stream, derive


def train_reference(
    data: Path,
    model: ModelConfig,
    turns: Sequence[tuple[int, int]],
    *,
    optimizer: str,
    lr: float,
    batch_size: int,
    seed: int,
    momentum: float = 0.0,
    split_at: Sequence[int] = (),
) -> dict[str, torch.Tensor]:
    """Trains the whole model on ``turns`` = [(client, batches), ...] in that order; with
    ``split_at``, each batch's gradient is accumulated over the rows split there (the
    microbatches of a pipelined run: BatchNorm normalises each one by its own statistics)."""
    net = initial_model(data, model)
    opt = _optimizer(net.parameters(), optimizer, lr, momentum)
    streams = {}
    for client, count in turns:
        if client not in streams:
            reader = ShardReader(
                data / f"client-{client}.h5",
                batch_size=batch_size,
                seed=derive(seed, Stream.DATA, client),
                prefetch=0,
            )
            streams[client] = _endless(reader)
        for _ in range(count):
            batch = next(streams[client])
            opt.zero_grad()
            for x, y in zip(
                batch.features.tensor_split(list(split_at)),
                batch.labels.tensor_split(list(split_at)),
                strict=True,
            ):
                loss = torch.nn.functional.cross_entropy(net(x), y)
                (loss * len(y) / len(batch.labels)).backward()
            opt.step()
    return net.state_dict()


def train_parallel_reference(
    data: Path,
    model: ModelConfig,
    own: Sequence[str],
    turns: Sequence[tuple[int, int]],
    *,
    clients: int,
    optimizer: str,
    lr: float,
    batch_size: int,
    seed: int,
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Parallel split learning served in the order of ``turns``: every client trains its own
    copy of the top-level layers named in ``own`` (vanilla: those below the cut; U-shaped:
    the head and the tail), all share the others. Returns the shared layers' state and each
    client's own."""
    net = initial_model(data, model)
    shared = torch.nn.ModuleDict(
        {name: module for name, module in net.named_children() if name not in own}
    )
    mine = [
        torch.nn.ModuleDict(
            {name: copy.deepcopy(module) for name, module in net.named_children() if name in own}
        )
        for _ in range(clients)
    ]
    opts = [_optimizer(layers.parameters(), optimizer, lr, 0.0) for layers in mine]
    shared_opt = _optimizer(shared.parameters(), optimizer, lr, 0.0)
    streams = [client_batches(data, k, batch_size=batch_size, seed=seed)[0] for k in range(clients)]
    order = [name for name, _ in net.named_children()]
    for client, count in turns:
        for _ in range(count):
            batch = next(streams[client])
            x = batch.features
            for name in order:
                x = (mine[client] if name in own else shared)[name](x)
            torch.nn.functional.cross_entropy(x, batch.labels).backward()
            for opt in (opts[client], shared_opt):
                opt.step()
                opt.zero_grad()
    return shared.state_dict(), [layers.state_dict() for layers in mine]


def _optimizer(params, optimizer: str, lr: float, momentum: float) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return torch.optim.Adam(params, lr=lr)


def _endless(reader: ShardReader):
    epoch = 0
    while True:
        yield from reader.epoch(epoch)
        epoch += 1


def merged_parts(run_dir: Path, ranks: Sequence[int]) -> dict[str, torch.Tensor]:
    """The union of the parts the given ranks saved (each rank saved only its own)."""
    merged: dict[str, torch.Tensor] = {}
    for rank in ranks:
        part = torch.load(run_dir / f"model-rank{rank}.pt", weights_only=True)
        assert not set(part) & set(merged), "two ranks hold the same layer"
        merged.update(part)
    return merged


def client_batches(data: Path, client: int, *, batch_size: int, seed: int):
    """Client ``client``'s training batches, epoch after epoch, as the engine reads them."""
    reader = ShardReader(
        data / f"client-{client}.h5",
        batch_size=batch_size,
        seed=derive(seed, Stream.DATA, client),
        prefetch=0,
    )
    return _endless(reader), reader.num_samples


def initial_model(data: Path, model: ModelConfig) -> torch.nn.Module:
    meta = read_meta(data)
    return build_model(model, meta["feature_shape"], meta["num_classes"])
