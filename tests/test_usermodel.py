"""User models: factories by import path, cuts by module name, the split's errors, and split
training of the examples' residual CNN (BatchNorm) and tiny LM (tied embedding) against the
unmodified module trained in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpisplit.config import ConfigError, ModelConfig, load_config
from mpisplit.data import ShardReader, read_meta
from mpisplit.engine import prepare
from mpisplit.models import build_model, build_parts, model_factory
from mpisplit.prepare import write_arrays
from mpisplit.schedules import taper_bounds
from mpisplit.schemes.spatiotemporal import detached_order
from mpisplit.split import check_cut_values, check_shared, split_model
from tests.conftest import ROOT, run_mpi
from tests.reference import client_batches, initial_model, merged_parts, train_reference

CNN = str(ROOT / "examples/residual_cnn/model.py") + ":residual_cnn"
LM = str(ROOT / "examples/transformer/model.py") + ":tiny_lm"


def _parts_compose(model: torch.nn.Module, cuts: list[str], x: torch.Tensor) -> None:
    parts = split_model(model, cuts)
    y = x
    for part in parts:
        y = part(y)
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)
    names = [key for part in parts for key in part.state_dict()]
    assert sorted(set(names)) == sorted(model.state_dict())


def test_parts_compose_and_keep_the_users_names() -> None:
    cnn = build_model(ModelConfig(name=CNN), (1, 8, 8), 10).eval()
    _parts_compose(cnn, ["layer1.1", "fc"], torch.randn(3, 1, 8, 8))
    lm = build_model(ModelConfig(name=LM, options={"layers": 3}), (16,), 128).eval()
    _parts_compose(lm, ["blocks.1", "blocks.2"], torch.randint(0, 128, (3, 16)).float())


def test_fresh_model_is_the_factory_under_the_seed() -> None:
    sys.path.insert(0, str(ROOT / "examples/transformer"))
    try:
        from model import tiny_lm
    finally:
        sys.path.pop(0)
    torch.manual_seed(5)
    expected = tiny_lm(input_shape=(16,), num_classes=128).state_dict()
    actual = build_model(ModelConfig(name=LM, seed=5), (16,), 128).state_dict()
    assert all(torch.equal(actual[k], v) for k, v in expected.items())


UNCOPYABLE_NET = """
import threading
from torch import nn


def net(*, input_shape, num_classes):
    model = nn.Sequential(nn.Linear(input_shape[0], 8), nn.ReLU(), nn.Linear(8, num_classes))
    model.lock = threading.Lock()  # what deepcopy refuses
    return model
"""


def test_a_model_that_cannot_be_copied_is_built_again(dataset, tmp_path: Path) -> None:
    """A rank asks for the same parts many times (hosted clients, SplitFed v1's server
    copies) and copies a kept model from the third request; a user's model that deepcopy
    refuses is built again each time instead, every one the factory under the seed."""
    (tmp_path / "net.py").write_text(UNCOPYABLE_NET)
    cfg = load_config(
        "configs/vanilla-breast-cancer.yaml",
        [
            f"data.path={dataset('breast_cancer', clients=3)}",
            f"model.name={tmp_path / 'net.py'}:net",
            "model.cuts=[1]",
            "model.options={}",
        ],
    )
    run = prepare(cfg, 4)
    models = [run.fresh_model({0, 1}) for _ in range(4)]
    assert len({id(m) for m in models}) == 4
    first = models[0].state_dict()
    for model in models[1:]:
        assert all(torch.equal(value, first[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize(
    ("name", "cuts", "shape", "classes"),
    [
        (CNN, ("layer1.1", "fc"), (1, 8, 8), 10),
        (LM, ("blocks.0", "norm"), (16,), 128),
        ("resnet", ("block2_1", "head"), (3, 16, 16), 10),
    ],
)
def test_a_rank_materialises_its_parts_bit_for_bit(name, cuts, shape, classes) -> None:
    config = ModelConfig(name=name, cuts=cuts, seed=4)
    whole = build_model(config, shape, classes).state_dict()
    for keep in ([0], [0, 2], [1]):  # [0]: the draws after part 0's are skipped
        parts = split_model(build_parts(config, shape, classes, keep), cuts)
        kept = {id(p) for index in keep for p in parts[index].parameters()}  # tied: both ends
        for index, part in enumerate(parts):
            for key, value in part.named_parameters():
                if index in keep:
                    assert torch.equal(value, whole[key]), key
                else:
                    assert value.is_meta or id(value) in kept, key
            for key, value in part.named_buffers():
                assert value.is_meta or torch.equal(value, whole[key]), key


def test_zoo_vgg_keeps_only_the_first_convolution_on_the_client() -> None:
    vgg = build_model(ModelConfig(name="vgg"), (3, 32, 32), 10, device="meta")
    client, _ = split_model(vgg, ["block1.1"])
    assert list(client.state_dict()) == ["block1.0.weight"]
    client, _ = split_model(vgg, ["block1.3"])  # the first convolution, its BatchNorm, ReLU
    assert {key.rsplit(".", 1)[0] for key in client.state_dict()} == {"block1.0", "block1.1"}
    resnet50 = build_model(ModelConfig(name="resnet50"), (3, 32, 32), 100, device="meta")
    client, _ = split_model(resnet50, ["block1_1"])
    assert {key.split(".")[0] for key in client.state_dict()} == {"stem", "stem_bn"}


def test_zoo_vgg_trains_cut_after_its_first_convolution(dataset, tmp_path: Path) -> None:
    """A zoo model cut inside a top-level block (``block1.3``) trains like the whole model."""
    data = dataset("synthetic", clients=1, shape=(3, 32, 32), classes=4, samples=80)
    options = "{blocks: [[8, 8], [16]]}"
    _train(
        2,
        "configs/vanilla-cifar-many-clients.yaml",
        data,
        tmp_path,
        "scheme.clients=1",
        "scheme.clients_per_rank=1",
        "model.cuts=[block1.3]",
        f"model.options={options}",
        "train.max_steps=3",
        "data.batch_size=16",
    )
    model = ModelConfig(name="vgg", cuts=("block1.3",), options={"blocks": [[8, 8], [16]]})
    expected = train_reference(
        data, model, [(0, 3)], optimizer="sgd", lr=0.01, batch_size=16, seed=0, momentum=0.9
    )
    client = torch.load(tmp_path / "model-rank1.pt", weights_only=True)
    assert {key.rsplit(".", 1)[0] for key in client} >= {"block1.0", "block1.1"}
    assert not any(key.startswith("block1.3") for key in client)
    _assert_equal(merged_parts(tmp_path, [0, 1]), expected, initial_model(data, model).state_dict())


def test_errors_name_the_crossing_value_and_the_modules() -> None:
    cnn = build_model(ModelConfig(name=CNN), (1, 8, 8), 10, device="meta")
    with pytest.raises(
        ConfigError,
        match=r"model\.cuts\[0\]: the cut before 'layer1\.0\.conv2' "
        r"is crossed by 'stem' \(from 'stem', used by 'layer1\.0\.skip'\): a skip ",
    ):
        split_model(cnn, ["layer1.0.conv2"])
    with pytest.raises(ConfigError, match=r"model\.cuts\[0\]: 'layer9' is not a layer"):
        split_model(cnn, ["layer9"])
    with pytest.raises(ConfigError, match="increasing layer order"):
        split_model(cnn, ["layer2", "layer1"])
    lm = build_model(ModelConfig(name=LM), (16,), 128, device="meta")
    with pytest.raises(
        ConfigError,
        match=r"'lm_head\.weight' \(part 1\) and 'embed\.weight' "
        r"\(part 0\) are one shared tensor",
    ):
        check_shared(split_model(lm, ["blocks.1"]))
    check_shared(split_model(lm, ["blocks.0", "norm"]), colocated=[(0, 2)])


class Masked(torch.nn.Module):
    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden.masked_fill(mask, 0.0)


class TwoInputs(torch.nn.Module):
    """A block that takes the hidden states and a boolean mask: the cut before it carries
    both."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 4)
        self.block = Masked()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.embed(x), x > 0)


def test_a_cut_carrying_two_values_passes_both_or_is_refused() -> None:
    """The part after the cut takes the tuple the part before returns."""
    model = TwoInputs()
    parts = split_model(model, ["block"])
    x = torch.randn(3, 4)
    torch.testing.assert_close(parts[1](parts[0](x)), model(x), rtol=0, atol=0)
    check_cut_values(parts, ["block"], "vanilla", True)
    with pytest.raises(
        ConfigError,
        match=r"model\.cuts\[0\]: the cut before 'block' carries 2 "
        r"values \(embed, gt\); scheme multihop sends one tensor per cut",
    ):
        check_cut_values(parts, ["block"], "multihop", False)


def test_factory_names(tmp_path: Path) -> None:
    assert model_factory("mpisplit.models:mlp").__name__ == "mlp"
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets/mine.py").write_text(
        "from torch import nn\ndef net(width=4):\n    return nn.Sequential(nn.Linear(3, width))\n"
    )
    (tmp_path / "run.yaml").write_text("model: {name: nets/mine.py:net, cuts: [0]}\n")
    config = load_config(tmp_path / "run.yaml")
    assert config.model.name == f"{tmp_path / 'nets/mine.py'}:net"
    assert isinstance(build_model(config.model, (3,), 2)[0], torch.nn.Linear)
    with pytest.raises(ConfigError, match=r"model\.options\.depth: not an option of"):
        build_model(ModelConfig(name=config.model.name, options={"depth": 2}), (3,), 2)
    with pytest.raises(ConfigError, match=r"model\.name: cannot import nosuch\.module"):
        model_factory("nosuch.module:net")
    with pytest.raises(ConfigError, match=r"model\.name: unknown model 'transformer'"):
        model_factory("transformer")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The transformer example's corpus, written by its script (one client)."""
    out = tmp_path_factory.mktemp("tokens") / "pydoc-1c"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/transformer/corpus.py"),
            "--out",
            str(out),
            "--windows",
            "512",
            "--test-windows",
            "64",
            "--context",
            "16",
        ],
        check=True,
        timeout=120,
    )
    return out


def _train(ranks: int, config: str, data: Path, run_dir: Path, *overrides: str) -> dict:
    result = run_mpi(
        ranks,
        "train",
        config,
        f"data.path={data}",
        f"run.dir={run_dir}",
        "run.progress=none",
        *overrides,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def _assert_equal(actual: dict, expected: dict, initial: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=key)
    assert any(not torch.equal(initial[k], v) for k, v in expected.items() if v.is_floating_point())


def test_residual_cnn_vanilla_sequential(dataset, tmp_path: Path) -> None:
    data = dataset("digits", clients=2)
    _train(
        3,
        "examples/residual_cnn/vanilla.yaml",
        data,
        tmp_path,
        "scheme.turn_steps=3",
        "train.max_steps=6",
        "data.batch_size=16",
    )
    model = ModelConfig(name=CNN, options={"width": 8})
    turns = [(client, 3) for _ in range(2) for client in range(2)]
    expected = train_reference(
        data, model, turns, optimizer="adam", lr=0.003, batch_size=16, seed=0
    )
    _assert_equal(merged_parts(tmp_path, [0, 2]), expected, initial_model(data, model).state_dict())


def test_residual_cnn_multihop(dataset, tmp_path: Path) -> None:
    data = dataset("digits", clients=1)
    _train(
        3,
        "examples/residual_cnn/vanilla.yaml",
        data,
        tmp_path,
        "scheme.name=multihop",
        "scheme.clients=1",
        "model.cuts=[layer1.1, layer2]",
        "train.max_steps=8",
        "data.batch_size=16",
    )
    model = ModelConfig(name=CNN, options={"width": 8})
    expected = train_reference(
        data, model, [(0, 8)], optimizer="adam", lr=0.003, batch_size=16, seed=0
    )
    _assert_equal(
        merged_parts(tmp_path, [0, 1, 2]), expected, initial_model(data, model).state_dict()
    )


WIDE_MLP = f"""
scheme: {{name: vanilla, clients: 1}}
model:
  name: {ROOT / "tools/bench_model_memory.py"}:wide_mlp
  cuts: ["8"]
  options: {{width: 2048, layers: 16}}
data: {{batch_size: 32}}
train: {{max_steps: 2}}
"""


def test_a_rank_holds_its_part_of_the_memory_not_the_whole_models(dataset, tmp_path: Path) -> None:
    """16 x Linear(2048, 2048) (256 MiB) cut in the middle: each rank's resident memory grows
    by about half of what one process holding the whole model grows by (measured in the same
    test by a centralized run), when it builds its part and over the run (gradients too)."""
    data = dataset("synthetic", clients=1, shape=(2048,), classes=2, samples=96)
    config = tmp_path / "wide.yaml"
    config.write_text(WIDE_MLP)
    split = _train(2, str(config), data, tmp_path / "split")["rss_mb_per_rank"]
    whole = _train(1, str(config), data, tmp_path / "whole", "scheme.name=centralized")
    (alone,) = whole["rss_mb_per_rank"]
    params_mb = 16 * (2048 * 2048 + 2048) * 4 / 2**20
    built = alone["model_built_peak"] - alone["before_model"]
    assert 0.95 * params_mb < built < 1.2 * params_mb, alone
    for rank in split:
        assert rank["model_built_peak"] - rank["before_model"] < 0.65 * built, (split, alone)
        ran = alone["run_peak"] - alone["before_model"]
        assert rank["run_peak"] - rank["before_model"] < 0.65 * ran, (split, alone)


def test_residual_cnn_ushaped_pipelined(dataset, tmp_path: Path) -> None:
    """M = 4 with BatchNorm: each microbatch is normalised by its own statistics (as in
    GPipe), so the reference accumulates over the same four row ranges."""
    data = dataset("digits", clients=1)
    _train(
        2,
        "examples/residual_cnn/ushaped.yaml",
        data,
        tmp_path,
        "train.max_steps=6",
        "data.batch_size=24",
    )
    model = ModelConfig(name=CNN, options={"width": 8})
    expected = train_reference(
        data,
        model,
        [(0, 6)],
        optimizer="adam",
        lr=0.003,
        batch_size=24,
        seed=0,
        split_at=taper_bounds(24, 4),
    )
    _assert_equal(merged_parts(tmp_path, [0, 1]), expected, initial_model(data, model).state_dict())


LM_SGD = ("train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9")
"""The language model's equality tests train with SGD, not the examples' AdamW: the key part
of each attention bias has a zero gradient in exact arithmetic (softmax ignores a shift
shared by every key), so its computed gradient is rounding noise that Adam scales up to
steps of lr of either sign; two correct runs that sum in another order (split or whole,
microbatches or not, another CPU's kernels) then differ there by up to lr x steps."""
LM_SGD_REFERENCE = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 16, "seed": 0}


def test_transformer_vanilla(tokens: Path, tmp_path: Path) -> None:
    _train(
        2,
        "examples/transformer/vanilla.yaml",
        tokens,
        tmp_path,
        "train.max_steps=6",
        "data.batch_size=16",
        *LM_SGD,
    )
    model = ModelConfig(name=LM, options={"dim": 64, "layers": 2, "heads": 4, "tie": False})
    expected = train_reference(tokens, model, [(0, 6)], **LM_SGD_REFERENCE)
    _assert_equal(
        merged_parts(tmp_path, [0, 1]), expected, initial_model(tokens, model).state_dict()
    )


def test_transformer_lora_ushaped_trains_only_the_adapters(tokens: Path, tmp_path: Path) -> None:
    """Frozen weights with LoRA adapters in the server's blocks; the client's embeddings and
    head are frozen too. Against the unmodified module trained in one process."""
    _train(
        2,
        "examples/transformer/ushaped.yaml",
        tokens,
        tmp_path,
        "model.options={dim: 64, layers: 2, heads: 4, tie: true, lora: 4}",
        "train.max_steps=6",
        "data.batch_size=16",
        "train.optimizer=sgd",
        "train.lr=0.05",
        "train.momentum=0.9",
    )
    model = ModelConfig(
        name=LM, options={"dim": 64, "layers": 2, "heads": 4, "tie": True, "lora": 4}
    )
    expected = train_reference(
        tokens, model, [(0, 6)], optimizer="sgd", lr=0.05, momentum=0.9, batch_size=16, seed=0
    )
    initial = initial_model(tokens, model).state_dict()
    _assert_equal(merged_parts(tmp_path, [0, 1]), expected, initial)
    changed = [key for key, value in expected.items() if not torch.equal(initial[key], value)]
    assert changed and all(".lora_" in key for key in changed), changed


def test_transformer_multihop(tokens: Path, tmp_path: Path) -> None:
    """Client (embeddings) → relay (blocks.0) → server (blocks.1, norm, LM head)."""
    _train(
        3,
        "examples/transformer/vanilla.yaml",
        tokens,
        tmp_path,
        "scheme.name=multihop",
        "model.cuts=[blocks.0, blocks.1]",
        "train.max_steps=6",
        "data.batch_size=16",
        *LM_SGD,
    )
    model = ModelConfig(name=LM, options={"dim": 64, "layers": 2, "heads": 4, "tie": False})
    expected = train_reference(tokens, model, [(0, 6)], **LM_SGD_REFERENCE)
    _assert_equal(
        merged_parts(tmp_path, [0, 1, 2]), expected, initial_model(tokens, model).state_dict()
    )


def test_transformer_ushaped_pipelined_equals_whole_batch_and_exports(
    tokens: Path, tmp_path: Path
) -> None:
    """Tied embedding and LM head on the client, four microbatches, against whole batches of
    the unmodified module; the export loads into it with strict=True."""
    run_dir = tmp_path / "run"
    _train(
        2,
        "examples/transformer/ushaped.yaml",
        tokens,
        run_dir,
        "train.max_steps=6",
        "data.batch_size=16",
        *LM_SGD,
    )
    model = ModelConfig(name=LM, options={"dim": 64, "layers": 2, "heads": 4, "tie": True})
    expected = train_reference(tokens, model, [(0, 6)], **LM_SGD_REFERENCE)
    _assert_equal(
        merged_parts(run_dir, [0, 1]), expected, initial_model(tokens, model).state_dict()
    )
    out = tmp_path / "lm.pt"
    result = subprocess.run(
        [sys.executable, "-m", "mpisplit", "export", str(run_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    net = initial_model(tokens, model)
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert net.lm_head.weight is net.embed.weight
    torch.testing.assert_close(net.embed.weight, expected["embed.weight"], rtol=0, atol=1e-5)


def test_ushaped_with_both_cuts_in_one_container_saves_every_weight(
    tokens: Path, tmp_path: Path
) -> None:
    """Both cuts inside the ModuleList ``blocks``: the client's head (``blocks.0``) and tail
    (``blocks.2``) are saved together under the user's names, and the export loads with
    strict=True into the unmodified module trained in one process."""
    run_dir = tmp_path / "run"
    _train(
        2,
        "examples/transformer/ushaped.yaml",
        tokens,
        run_dir,
        "model.options={dim: 64, layers: 3, heads: 4, tie: true}",
        "model.cuts=[blocks.1, blocks.2]",
        "train.max_steps=4",
        "data.batch_size=16",
        "train.optimizer=sgd",
        "train.lr=0.05",
    )
    model = ModelConfig(name=LM, options={"dim": 64, "layers": 3, "heads": 4, "tie": True})
    expected = train_reference(
        tokens, model, [(0, 4)], optimizer="sgd", lr=0.05, batch_size=16, seed=0
    )
    out = tmp_path / "lm.pt"
    result = subprocess.run(
        [sys.executable, "-m", "mpisplit", "export", str(run_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    net = initial_model(tokens, model)
    initial = {key: value.clone() for key, value in net.state_dict().items()}
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    _assert_equal(net.state_dict(), expected, initial)
    assert net.lm_head.weight is net.embed.weight


RESIDUAL_NET = """
import math

from torch import nn


class ResidualNet(nn.Module):
    \"\"\"Flatten, an input layer and its activation, then a residual block and the head.\"\"\"

    def __init__(self, inputs, classes, hidden):
        super().__init__()
        self.embed = nn.Linear(inputs, hidden)
        self.act = nn.Tanh()
        self.body = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = self.act(self.embed(x.flatten(1)))
        return self.head(h + self.body(h))


def net(*, input_shape, num_classes, hidden=16):
    return ResidualNet(math.prod(input_shape), num_classes, hidden)


def fixed_head(*, input_shape, hidden=16):
    return ResidualNet(math.prod(input_shape), 10, hidden)
"""


@pytest.fixture
def residual_net(tmp_path: Path) -> ModelConfig:
    """A user factory (not an nn.Sequential, a skip connection inside the upper part), cut
    where the site part is one weighted layer and its activation."""
    (tmp_path / "net.py").write_text(RESIDUAL_NET)
    return ModelConfig(name=f"{tmp_path / 'net.py'}:net", cuts=("body",))


def _user_model(model: ModelConfig) -> tuple[str, ...]:
    return (f"model.name={model.name}", "model.cuts=[body]", "model.options={}")


def test_multitask_with_a_user_factory(dataset, residual_net: ModelConfig, tmp_path: Path) -> None:
    """Each task server's part comes from the factory called with its task's num_classes;
    against one process summing the tasks' losses over the unmodified module's parts."""
    data, steps = dataset("digits", clients=1), 8
    run_dir = tmp_path / "run"
    _train(
        3,
        "configs/multitask-digits.yaml",
        data,
        run_dir,
        *_user_model(residual_net),
        "scheme.clients=1",
        f"train.max_steps={steps}",
        "train.lr=0.003",
    )
    lower = split_model(initial_model(data, residual_net), ["body"])[0]
    shape = read_meta(data)["feature_shape"]
    uppers = [
        split_model(build_model(residual_net, shape, classes), ["body"])[1] for classes in (10, 2)
    ]
    initial = {
        key: value.clone()
        for part in (lower, uppers[1])
        for key, value in part.state_dict().items()
    }
    opt = torch.optim.Adam([p for net in (lower, *uppers) for p in net.parameters()], lr=0.003)
    batches, _ = client_batches(data, 0, batch_size=32, seed=0)
    for _ in range(steps):
        batch = next(batches)
        opt.zero_grad()
        cut = lower(batch.features)
        loss = torch.nn.functional.cross_entropy(
            uppers[0](cut), batch.labels
        ) + torch.nn.functional.cross_entropy(uppers[1](cut), batch.labels % 2)
        loss.backward()
        opt.step()
    for rank, part in ((2, lower), (0, uppers[0]), (1, uppers[1])):
        saved = torch.load(run_dir / f"model-rank{rank}.pt", weights_only=True)
        _assert_equal(saved, part.state_dict(), initial)
    assert saved["head.weight"].shape[0] == 2
    (tmp_path / "fixed.yaml").write_text(
        "scheme: {name: multitask, clients: 1, tasks: "
        "[class, parity]}\nmodel: {name: net.py:fixed_head, "
        f"cuts: [body]}}\ndata: {{path: {data}}}\n"
    )
    with pytest.raises(
        ConfigError,
        match=r"model\.name: multitask sizes each task's head "
        r"by calling the factory with that task's num_classes; .*fixed_head "
        r"takes no num_classes",
    ):
        prepare(load_config(tmp_path / "fixed.yaml"), 3)


def test_spatiotemporal_with_a_user_factory(
    dataset, residual_net: ModelConfig, tmp_path: Path
) -> None:
    """One site: the joint phase equals whole-model SGD on its batches, the detached phase
    the server part's SGD on the frozen site part's outputs, in one process; a cut that
    leaves more than one weighted layer at the site is refused before training."""
    data, detached = dataset("breast_cancer", clients=1), 2
    run_dir = tmp_path / "run"
    _train(
        2,
        "configs/spatiotemporal-breast-cancer.yaml",
        data,
        run_dir,
        *_user_model(residual_net),
        "scheme.clients=1",
        "scheme.joint_epochs=1",
        f"scheme.detached_epochs={detached}",
        "train.momentum=0",
        "train.lr=0.05",
    )
    net = initial_model(data, residual_net)
    initial = {key: value.clone() for key, value in net.state_dict().items()}
    site, server = split_model(net, ["body"])
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    batches, samples = client_batches(data, 0, batch_size=16, seed=0)
    for _ in range(-(-samples // 16)):
        batch = next(batches)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(batch.features), batch.labels).backward()
        opt.step()
    with ShardReader(data / "client-0.h5", batch_size=16, shuffle=False, prefetch=0) as reader:
        rows = list(reader.epoch(0))
    with torch.no_grad():
        cached = torch.cat([site(batch.features) for batch in rows])
    labels = torch.cat([batch.labels for batch in rows])
    for epoch in range(detached):
        for index in detached_order(len(labels), 16, 0, epoch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(server(cached[index]), labels[index]).backward()
            opt.step()
    saved = {
        **torch.load(run_dir / "model-rank1.pt", weights_only=True),
        **torch.load(run_dir / "model-rank0.pt", weights_only=True),
    }
    _assert_equal(saved, net.state_dict(), initial)
    cfg = load_config(
        "configs/spatiotemporal-breast-cancer.yaml",
        [*_user_model(residual_net), "model.cuts=[head]", f"data.path={data}", "scheme.clients=1"],
    )
    with pytest.raises(
        ConfigError,
        match=r"one weighted layer plus its activation, but the "
        r"part before the cut is \['flatten', 'embed', 'act', 'body', 'add'\]",
    ):
        prepare(cfg, 2)


def test_write_arrays_roundtrip(tmp_path: Path) -> None:

    features = torch.arange(12, dtype=torch.float32).reshape(6, 2).numpy()
    labels = torch.tensor([0, 1, 2, 0, 1, 2]).numpy()
    out = write_arrays(
        tmp_path / "d",
        [(features[:4], labels[:4])],
        (features[4:], labels[4:]),
        dataset="toy",
        num_classes=3,
    )
    assert read_meta(out)["train_samples"] == [4]
    batch = next(
        iter(ShardReader(out / "client-0.h5", batch_size=4, shuffle=False, prefetch=0).epoch(0))
    )
    assert batch.features.tolist() == features[:4].tolist()


def _readme_commands(heading: str) -> list[str]:
    """The first bash block after ``heading`` in README.md, one command a line."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index(heading) :].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_your_model_commands_run_as_written(tmp_path: Path) -> None:
    """Runs the README's 'Your model' commands in a fresh directory (the examples linked)."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    for line in _readme_commands("### Your model"):
        words = line.split()
        if words[0] == "mpiexec":
            ranks, args = int(words[2]), words[4:]
            assert words[3] == "mpisplit"
            result = run_mpi(ranks, *args, cwd=tmp_path, timeout=300)
        else:
            command = {"mpisplit": [sys.executable, "-m", "mpisplit"], "python": [sys.executable]}[
                words[0]
            ] + words[1:]
            result = subprocess.run(
                command, cwd=tmp_path, capture_output=True, text=True, timeout=300
            )
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
    assert (tmp_path / "tiny-lm.pt").exists()


API_SCRIPT = """
import json, signal, sys
import mpisplit
from mpisplit.config import ConfigError
sys.path.insert(0, sys.argv[3])
from model import residual_cnn

config = {"scheme": {"name": "vanilla", "clients": 1},
          "model": {"cuts": ["layer2"], "options": {"width": 4}},
          "data": {"path": sys.argv[1], "batch_size": 16}}
summary = mpisplit.train(config, factory=residual_cnn, run={"dir": sys.argv[2],
                         "progress": "none"}, **{"train.max_steps": 3})
signals = (signal.SIGUSR1, signal.SIGTERM)
default_signals = all(signal.getsignal(s) is signal.SIG_DFL for s in signals)
raised = None
try:
    mpisplit.train(config, factory=residual_cnn, **{"model.cuts": ["layer1.0.conv2"]})
except ConfigError as err:
    raised = str(err).split(":")[0]
from mpi4py import MPI  # rank 0 prints every rank's outcome: the ranks' output may interleave
steps = None if summary is None else summary["steps_per_rank"]
outcomes = MPI.COMM_WORLD.gather([raised, steps, default_signals])
if MPI.COMM_WORLD.Get_rank() == 0:
    print(json.dumps(outcomes))
"""


def test_python_api_returns_the_summary_on_rank_0_and_raises(dataset, tmp_path: Path) -> None:
    from tests.conftest import mpiexec

    data = dataset("digits", clients=1)
    script = tmp_path / "script.py"
    script.write_text(API_SCRIPT)
    result = subprocess.run(
        [
            mpiexec(),
            "-n",
            "2",
            sys.executable,
            str(script),
            str(data),
            str(tmp_path / "run"),
            str(ROOT / "examples/residual_cnn"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcomes == [["model.cuts[0]", [3, 3], True], ["model.cuts[0]", None, True]], (
        result.stdout
    )
