"""Wire compression: each codec round-trips within its error bound, and a real run with it
sends fewer bytes and still learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mpisplit.compression import make_compressor
from tests.conftest import run_mpi


@pytest.mark.parametrize(
    ("name", "tolerance"), [("none", 0.0), ("fp16", 1e-3), ("bf16", 1e-2), ("int8", 1e-2)]
)
def test_round_trip_error_is_bounded(name: str, tolerance: float) -> None:
    tensor = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    codec = make_compressor(name)
    parts = codec.encode(tensor)
    assert len(parts) == codec.parts
    decoded = codec.decode(parts)
    assert decoded.shape == tensor.shape and decoded.dtype == torch.float32
    relative = float((decoded - tensor).abs().max() / tensor.abs().max())
    assert relative <= tolerance


def test_topk_keeps_the_largest_entries() -> None:
    tensor = torch.tensor([[0.1, -5.0, 0.2], [3.0, 0.0, -0.3]])
    codec = make_compressor("topk", topk_ratio=0.34)
    decoded = codec.decode(codec.encode(tensor))
    assert torch.equal(decoded, torch.tensor([[0.0, -5.0, 0.0], [3.0, 0.0, 0.0]]))


def test_compressed_run_sends_fewer_bytes(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=1)
    sent = {}
    for name in ("none", "int8"):
        run_dir = tmp_path / name
        result = run_mpi(
            2,
            "train",
            "configs/vanilla-breast-cancer.yaml",
            "scheme.clients=1",
            f"data.path={data}",
            f"run.dir={run_dir}",
            "train.max_steps=30",
            "train.eval_every=0",
            "run.progress=none",
            "data.batch_size=64",
            f"transport.compression={name}",
        )
        assert result.returncode == 0, result.stderr[-2000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        sent[name] = summary["bytes_sent_per_rank"]
        assert summary["test_accuracy"] > 0.85
    assert sent["int8"][1] < 0.5 * sent["none"][1]  # the client's activations
    assert sent["int8"][0] < 0.5 * sent["none"][0]  # the server's gradients
