"""A segment: the layers one rank owns, with their optimizer and learning-rate schedule.

It is the unit that is trained, handed over between clients, averaged and checkpointed, so
its whole state (weights, optimizer moments, schedule position) lives in one state dict.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mpisplit.config import TrainConfig


@dataclass
class Segment:
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    @classmethod
    def create(
        cls, module: nn.Module, train: TrainConfig, total_steps: int, params: Any = None
    ) -> Segment:
        """``total_steps`` is the length of the schedule (cosine decays to zero over it);
        ``params`` (default: the module's) are what the optimizer updates, less a weight tied
        to a part this rank already optimises."""
        optimizer = make_optimizer(module.parameters() if params is None else params, train)
        return cls(module, optimizer, make_scheduler(optimizer, train, total_steps))

    def step(self) -> None:
        """Applies the accumulated gradients and advances the schedule."""
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def state_bytes(self) -> torch.Tensor:
        """The whole state serialised into one uint8 tensor (for hand-over, not per step)."""
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)

    def load_state_bytes(self, data: torch.Tensor) -> None:
        state = torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)
        self.load_state_dict(state)


def make_optimizer(params: Any, train: TrainConfig) -> torch.optim.Optimizer:
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if train.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if train.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, train.step_size, train.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
