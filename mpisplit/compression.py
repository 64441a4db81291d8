"""Wire compression of cut tensors: pluggable encode/decode pairs.

A compressor turns one float tensor into the tensors that travel (``encode``) and back
(``decode``); the cut exchange sends the parts as consecutive messages of the same kind, so
the receiver reads exactly ``parts`` messages. Lossy compressors trade accuracy for bytes;
README records both for each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Compressor:
    """The identity: one part, the tensor itself."""

    parts: int = 1

    def encode(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]

    def decode(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0]


@dataclass(frozen=True)
class Cast(Compressor):
    """Half-precision on the wire (fp16 or bf16), float32 again on arrival."""

    dtype: torch.dtype = torch.float16

    def encode(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor.to(self.dtype)]

    def decode(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0].to(torch.float32)


@dataclass(frozen=True)
class Int8(Compressor):
    """Symmetric int8 quantisation with one float32 scale per tensor."""

    parts: int = 2

    def encode(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        scale = tensor.detach().abs().max().clamp(min=1e-12) / 127
        quantised = torch.round(tensor / scale).clamp(-127, 127).to(torch.int8)
        return [quantised, scale.to(torch.float32).reshape(1)]

    def decode(self, parts: list[torch.Tensor]) -> torch.Tensor:
        quantised, scale = parts
        return quantised.to(torch.float32) * scale.to(quantised.device)


@dataclass(frozen=True)
class TopK(Compressor):
    """Top-k sparsification: the largest-magnitude ``ratio`` of the entries and their
    positions; the rest arrive as zeros."""

    parts: int = 3
    ratio: float = 0.1

    def encode(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        flat = tensor.detach().reshape(-1)
        k = max(1, int(self.ratio * flat.numel()))
        index = flat.abs().topk(k).indices
        shape = torch.tensor(tensor.shape, dtype=torch.int64)
        return [flat[index].to(torch.float32), index.to(torch.int32), shape]

    def decode(self, parts: list[torch.Tensor]) -> torch.Tensor:
        values, index, shape = parts
        dense = torch.zeros(int(shape.prod()), dtype=values.dtype, device=values.device)
        dense[index.to(torch.int64).to(values.device)] = values
        return dense.reshape(shape.tolist())


def make_compressor(name: str, topk_ratio: float = 0.1) -> Compressor:
    """The compressor a config names (``transport.compression``)."""
    if name == "fp16":
        return Cast(dtype=torch.float16)
    if name == "bf16":
        return Cast(dtype=torch.bfloat16)
    if name == "int8":
        return Int8()
    if name == "topk":
        return TopK(ratio=topk_ratio)
    return Compressor()
