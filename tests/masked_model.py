"""A user's model whose cut carries several tensors: token and position embeddings (float:
they get gradients back), a padding mask (bool) and the sequence lengths (int64), all handed
to one block. Imported by the ranks as ``tests.masked_model:masked_encoder``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MaskedBlock(nn.Module):
    """Self-attention over the unpadded tokens, then a mean over them."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ff = nn.Linear(dim, dim)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        h = tokens + positions
        attended, _ = self.attn(h, h, h, key_padding_mask=~mask, need_weights=False)
        h = h + torch.relu(self.ff(attended))
        return (h * mask.unsqueeze(-1)).sum(1) / lengths.unsqueeze(-1)


class MaskedEncoder(nn.Module):
    def __init__(self, length: int, classes: int, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(length, dim)
        self.block = MaskedBlock(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.long()
        mask = tokens != 0
        positions = self.pos(torch.arange(x.shape[1], device=x.device)).expand(x.shape[0], -1, -1)
        return self.head(self.block(self.embed(tokens), positions, mask, mask.sum(1)))


def masked_encoder(
    input_shape: Sequence[int], num_classes: int, vocab: int = 12, dim: int = 16
) -> MaskedEncoder:
    return MaskedEncoder(input_shape[0], num_classes, vocab, dim)
