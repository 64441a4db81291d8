"""Defences and the leakage measure, checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpisplit.config import ConfigError, PrivacyConfig, config_from_dict
from mpisplit.privacy import distance_correlation, nopeek_penalty, protect


def _dcor_numpy(x: np.ndarray, z: np.ndarray) -> float:
    """Textbook distance correlation with explicit loops over the double centring."""

    def centred(m: np.ndarray) -> np.ndarray:
        d = np.sqrt(((m[:, None, :] - m[None, :, :]) ** 2).sum(-1))
        return d - d.mean(0) - d.mean(1)[:, None] + d.mean()

    a, b = centred(x), centred(z)
    return float(np.sqrt((a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean())))


def test_distance_correlation_matches_textbook() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    z = np.tanh(x @ rng.normal(size=(5, 3))) + 0.1 * rng.normal(size=(40, 3))
    ours = float(distance_correlation(torch.tensor(x), torch.tensor(z)))
    assert ours == pytest.approx(_dcor_numpy(x, z), rel=1e-9)
    assert float(distance_correlation(torch.tensor(x), torch.tensor(x))) == pytest.approx(1.0)
    independent = rng.normal(size=(400, 3))
    assert (
        float(
            distance_correlation(torch.tensor(rng.normal(size=(400, 5))), torch.tensor(independent))
        )
        < 0.2
    )


def test_clip_then_noise() -> None:
    h = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    clipped = protect(h, PrivacyConfig(clip_norm=1.0))
    torch.testing.assert_close(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    noisy = protect(
        torch.zeros(2000, 4), PrivacyConfig(noise_std=0.5), torch.Generator().manual_seed(1)
    )
    assert float(noisy.std()) == pytest.approx(0.5, rel=0.05)
    assert protect(h, PrivacyConfig()) is h


def test_nopeek_penalty_has_gradient() -> None:
    x = torch.randn(16, 6)
    layer = torch.nn.Linear(6, 3)
    penalty = nopeek_penalty(x, layer(x), PrivacyConfig(nopeek_weight=0.5))
    penalty.backward()
    assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) > 0
    assert nopeek_penalty(x, layer(x), PrivacyConfig()) is None


def test_privacy_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.noise_std: must be >= 0"):
        config_from_dict({"privacy": {"noise_std": -1}})


def test_defences_lower_the_measured_leakage(dataset, tmp_path) -> None:
    """End to end: noise on the cut output lowers the leakage figure in the summary."""
    import json

    from tests.conftest import run_mpi

    data = dataset("breast_cancer", clients=2)
    leakage = {}
    for name, extra in {"plain": [], "noisy": ["privacy.noise_std=3.0"]}.items():
        run_dir = tmp_path / name
        result = run_mpi(
            3,
            "train",
            "configs/vanilla-breast-cancer.yaml",
            "scheme.clients=2",
            f"data.path={data}",
            f"run.dir={run_dir}",
            "train.max_steps=20",
            "run.progress=none",
            *extra,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        leakage[name] = json.loads((run_dir / "summary.json").read_text())[
            "leakage_distance_correlation"
        ]
    assert 0 < leakage["noisy"] < leakage["plain"] - 0.2 < 1
