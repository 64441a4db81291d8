"""An independent single-process PyTorch run: the oracle the split schemes must equal.

It shares only the data reader and the model factory (``factory(**options)`` under
``torch.manual_seed(model.seed)``, the unmodified module) with the engine; the training loop,
optimizer and loss are written here from plain PyTorch.
"""

from __future__ import annotations

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
    if optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=lr)
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
