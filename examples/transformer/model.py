"""A small decoder-only language model in plain PyTorch (random init, no downloads).

It reads a window of token ids (stored as float features) and returns the logits of the next
token. ``tie=True`` shares the input embedding with the LM head, as GPT-2 does; the U-shaped
split keeps both on the client, together with the loss. ``lora=R`` freezes every weight and
trains rank-R adapters on the attention's projections instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, each with a residual connection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(dim, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.norm2(x))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``lora_b @ lora_a`` (LoRA);
    ``lora_b`` starts at zero, so training starts from the base model."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T


class TinyLM(nn.Module):
    def __init__(self, vocab: int, context: int, dim: int, layers: int, heads: int,
                 tie: bool, lora: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight
        if lora:  # only the adapters of the attention's projections train
            self.requires_grad_(False)
            for block in self.blocks:
                block.qkv, block.proj = LoRALinear(block.qkv, lora), LoRALinear(block.proj, lora)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.long()
        x = self.embed(tokens) + self.position.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x)[:, -1])


def tiny_lm(*, input_shape: Sequence[int], num_classes: int, dim: int = 64, layers: int = 2,
            heads: int = 4, tie: bool = True, lora: int = 0) -> TinyLM:
    """``input_shape`` is (context,), ``num_classes`` the vocabulary size; ``lora`` > 0
    freezes the model and trains rank-``lora`` adapters on the attention's projections."""
    return TinyLM(num_classes, input_shape[0], dim, layers, heads, tie, lora)
