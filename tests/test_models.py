"""Cutting models: segments built on their own equal the same layers of the whole model."""

from __future__ import annotations

import pytest
import torch

from mpisplit.config import ConfigError, ModelConfig
from mpisplit.models import ZOO, build_layers, cut_indices, layer_plan, segment_bounds

SHAPES = {
    "mlp": ((30,), 2),
    "cnn": ((1, 8, 8), 10),
    "resnet": ((3, 16, 16), 10),
    "vgg": ((3, 32, 32), 10),
    "resnet50": ((3, 32, 32), 100),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_segments_compose_to_the_whole_model(name: str) -> None:
    shape, classes = SHAPES[name]
    plan = layer_plan(ModelConfig(name=name), shape, classes)
    cuts = [len(plan) // 3, 2 * len(plan) // 3]
    whole = build_layers(plan, 0, len(plan), seed=7).eval()
    parts = [build_layers(plan, a, b, seed=7).eval() for a, b in segment_bounds(len(plan), cuts)]
    x = torch.randn(4, *shape)
    composed = x
    for part in parts:
        composed = part(composed)
    torch.testing.assert_close(composed, whole(x), rtol=0, atol=0)
    whole_state = whole.state_dict()
    for part in parts:
        for key, value in part.state_dict().items():
            assert torch.equal(value, whole_state[key])


def test_cut_by_name_and_index() -> None:
    plan = layer_plan(ModelConfig(), (30,), 2)
    names = [n for n, _ in plan]
    assert cut_indices(plan, ["fc2"]) == [names.index("fc2")]
    assert cut_indices(plan, [1, "fc2"]) == [1, names.index("fc2")]
    with pytest.raises(ConfigError, match="increasing layer order"):
        cut_indices(plan, ["fc2", 1])
    with pytest.raises(ConfigError, match="leaves a segment empty"):
        cut_indices(plan, [len(plan)])


def test_unknown_model_and_option() -> None:
    with pytest.raises(ConfigError, match="unknown model 'transformer'"):
        layer_plan(ModelConfig(name="transformer"), (30,), 2)
    with pytest.raises(ConfigError, match=r"model\.options\.width: not an option of mlp"):
        layer_plan(ModelConfig(options={"width": 3}), (30,), 2)
