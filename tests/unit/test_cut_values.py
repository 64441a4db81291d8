"""Cut values without processes: which tensors get defences, gradients and the leakage
measure when a cut carries several."""

from __future__ import annotations

import pytest
import torch

from mpisplit.cut import cut_features, map_floats, tensors


def test_defences_touch_only_the_float_tensors() -> None:
    hidden, mask, lengths = torch.ones(3, 2, 4), torch.ones(3, 2, dtype=torch.bool), torch.arange(3)
    doubled = map_floats(lambda t: t * 2, (hidden, mask, lengths))
    assert torch.equal(doubled[0], hidden * 2)
    assert doubled[1] is mask and doubled[2] is lengths
    assert torch.equal(map_floats(lambda t: t + 1, hidden), hidden + 1)


def test_features_put_the_float_tensors_side_by_side_per_sample() -> None:
    hidden, positions = torch.randn(3, 2, 4), torch.randn(3, 5)
    mask = torch.ones(3, 2, dtype=torch.bool)
    rows = cut_features((hidden, mask, positions))
    assert rows.shape == (3, 13)
    assert torch.equal(rows, torch.cat([hidden.reshape(3, -1), positions], dim=1))
    assert torch.equal(cut_features(hidden), hidden.reshape(3, -1))
    assert cut_features(mask).dtype is torch.float32  # nothing float crossed: the values


def test_a_cut_carries_tensors_only() -> None:
    assert tensors(torch.zeros(1))[0].shape == (1,)
    with pytest.raises(TypeError, match="a cut carries tensors only, got int"):
        tensors((torch.zeros(1), 3))
