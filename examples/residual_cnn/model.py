"""Your own model: a small residual CNN with BatchNorm, written as plain PyTorch.

Nothing here knows about mpisplit. The config names the factory (``model.py:residual_cnn``)
and cuts it by module names as ``print(residual_cnn(input_shape=(1, 8, 8), num_classes=10))``
shows them: ``layer1.1`` is the second block of ``layer1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Block(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a skip connection (1x1 projection when the
    shape changes)."""

    def __init__(self, channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.skip = nn.Identity() if stride == 1 and channels == out_channels else nn.Sequential(
            nn.Conv2d(channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


class ResidualCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(Block(width, width), Block(width, width))
        self.layer2 = nn.Sequential(Block(width, 2 * width, stride=2))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


def residual_cnn(*, input_shape: Sequence[int], num_classes: int, width: int = 8) -> ResidualCNN:
    """The factory mpisplit calls: ``input_shape`` and ``num_classes`` come from the dataset,
    ``width`` from ``model.options``."""
    return ResidualCNN(input_shape[0], num_classes, width)
