"""Building models: ``model.name`` is a factory (the zoo's or the user's), called with
``model.options`` under ``torch.manual_seed(model.seed)``.

``model.name`` is a zoo name (``mlp``, ``cnn``, ``resnet``, ``vgg``, ``resnet50``), an import
path ``package.module:function`` or ``path/to/file.py:function`` (relative to the config
file), or a Python callable given to ``mpisplit.train``. The factory returns an ``nn.Module``;
``input_shape`` and ``num_classes`` of the dataset are passed when its signature names them
and ``model.options`` does not. ``mpisplit.split`` cuts the module into parts.

A zoo model is an ``nn.Sequential`` described by a *layer plan*: an ordered list of
``(name, factory)`` pairs, each layer initialised under its own seed (model seed, layer
index), so the layers of one part are also buildable alone (the vertical, multitask and
spatio-temporal schemes build per-party and per-task variants of them).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from math import prod

import torch
from torch import nn

from mpisplit.config import ConfigError, ModelConfig
from mpisplit.materialize import build_kept
from mpisplit.split import split_model

LayerPlan = list[tuple[str, Callable[[], nn.Module]]]


def mlp(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (64, 32),
    dropout: float = 0.0,
) -> LayerPlan:
    """Fully connected network for tabular (EHR-like) records."""
    plan: LayerPlan = []
    width = prod(input_shape)
    if len(input_shape) > 1:
        plan.append(("flatten", nn.Flatten))
    for i, size in enumerate(hidden, start=1):
        plan.append((f"fc{i}", _factory(nn.Linear, width, size)))
        plan.append((f"relu{i}", nn.ReLU))
        if dropout > 0:
            plan.append((f"dropout{i}", _factory(nn.Dropout, dropout)))
        width = size
    plan.append(("head", _factory(nn.Linear, width, num_classes)))
    return plan


def cnn(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (16, 32),
    hidden: int = 64,
) -> LayerPlan:
    """Small convolutional network for images (e.g. 8×8 digits)."""
    in_channels, height, width = input_shape
    plan: LayerPlan = []
    for i, out_channels in enumerate(channels, start=1):
        plan.append((f"conv{i}", _factory(nn.Conv2d, in_channels, out_channels, 3, padding=1)))
        plan.append((f"relu{i}", nn.ReLU))
        in_channels = out_channels
    plan.append(("pool", _factory(nn.AdaptiveAvgPool2d, (max(height // 2, 1), max(width // 2, 1)))))
    plan.append(("flatten", nn.Flatten))
    features = in_channels * max(height // 2, 1) * max(width // 2, 1)
    plan.append(("fc", _factory(nn.Linear, features, hidden)))
    plan.append(("relu_fc", nn.ReLU))
    plan.append(("head", _factory(nn.Linear, hidden, num_classes)))
    return plan


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity, or a strided 1×1 projection where the block changes shape."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ResidualBlock(nn.Module):
    """Two 3×3 convolutions with an identity (or 1×1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    widths: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 1,
) -> LayerPlan:
    """ResNet-style network for benchmarks; every residual block is a cuttable layer."""
    in_channels = input_shape[0]
    plan: LayerPlan = [
        ("stem", _factory(nn.Conv2d, in_channels, widths[0], 3, padding=1, bias=False)),
        ("stem_bn", _factory(nn.BatchNorm2d, widths[0])),
        ("stem_relu", nn.ReLU),
    ]
    channels = widths[0]
    for stage, width in enumerate(widths, start=1):
        for block in range(1, blocks_per_stage + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            plan.append((f"block{stage}_{block}", _factory(ResidualBlock, channels, width, stride)))
            channels = width
    plan.append(("pool", _factory(nn.AdaptiveAvgPool2d, 1)))
    plan.append(("flatten", nn.Flatten))
    plan.append(("head", _factory(nn.Linear, channels, num_classes)))
    return plan


VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg_block(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    """3×3 conv + BatchNorm + ReLU per width, then a 2×2 max pool (halves the image)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        in_channels = width
    return nn.Sequential(*layers, nn.MaxPool2d(2))


def vgg(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    blocks: Sequence[Sequence[int]] = VGG16,
) -> LayerPlan:
    """VGG-style network for 32×32 images (VGG-16 by default, CIFAR variant: one linear head
    on the 1×1×512 output); the pooled blocks are layers ``block1..block5``, and a cut may
    also name a module inside one (``block1.3``: the client holds the first convolution, its
    BatchNorm and ReLU)."""
    in_channels, height, width = input_shape
    plan: LayerPlan = []
    for i, widths in enumerate(blocks, start=1):
        plan.append((f"block{i}", _factory(vgg_block, in_channels, tuple(widths))))
        in_channels, height, width = widths[-1], height // 2, width // 2
    plan.append(("flatten", nn.Flatten))
    plan.append(("head", _factory(nn.Linear, in_channels * height * width, num_classes)))
    return plan


class Bottleneck(nn.Module):
    """ResNet-50 block: 1×1 reduce, 3×3 (carries the stride), 1×1 expand ×4, shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet50(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    stages: Sequence[int] = (3, 4, 6, 3),
) -> LayerPlan:
    """Bottleneck ResNet-50 for 32×32 images (CIFAR stem: one 3×3 conv, no max pool);
    every bottleneck block is a cuttable layer ``block<stage>_<n>``."""
    plan: LayerPlan = [
        ("stem", _factory(nn.Conv2d, input_shape[0], 64, 3, padding=1, bias=False)),
        ("stem_bn", _factory(nn.BatchNorm2d, 64)),
        ("stem_relu", nn.ReLU),
    ]
    channels = 64
    for stage, blocks in enumerate(stages, start=1):
        width = 64 * 2 ** (stage - 1)
        for block in range(1, blocks + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            plan.append((f"block{stage}_{block}", _factory(Bottleneck, channels, width, stride)))
            channels = width * Bottleneck.expansion
    plan.append(("pool", _factory(nn.AdaptiveAvgPool2d, 1)))
    plan.append(("flatten", nn.Flatten))
    plan.append(("head", _factory(nn.Linear, channels, num_classes)))
    return plan


ZOO: dict[str, Callable[..., LayerPlan]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet": resnet,
    "vgg": vgg,
    "resnet50": resnet50,
}
"""The zoo's layer plans; ``model_factory(name)`` turns one into an ordinary factory."""

_PYTHON_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register_factory(factory: Callable[..., nn.Module]) -> str:
    """Makes a Python callable usable as ``model.name`` (``mpisplit.train(factory=...)``);
    returns the name it goes by (every rank of a script registers the same callables in the
    same order, so they agree). Two callables of one qualified name (closures, lambdas) get
    ``#2``, ``#3``... rather than replacing each other."""
    base = f"python:{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', '?')}"
    name, count = base, 1
    while _PYTHON_FACTORIES.get(name, factory) is not factory:
        count += 1
        name = f"{base}#{count}"
    _PYTHON_FACTORIES[name] = factory
    return name


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The factory ``model.name`` names (see the module docstring)."""
    if name in ZOO:
        return _zoo_factory(ZOO[name])
    if name in _PYTHON_FACTORIES:
        return _PYTHON_FACTORIES[name]
    target, colon, attr = name.rpartition(":")
    if not colon or not target or not attr:
        raise ConfigError(
            f"model.name: unknown model '{name}' (zoo: {', '.join(ZOO)}; or a "
            f"factory as package.module:function or path/to/file.py:function)"
        )
    try:
        module = _import_file(target) if target.endswith(".py") else importlib.import_module(target)
    except Exception as err:  # the user's module may raise anything while importing
        raise ConfigError(
            f"model.name: cannot import {target}: {type(err).__name__}: {err}"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model.name: {target} has no function '{attr}'")
    return factory


def _import_file(path: str) -> object:
    """Imports a factory's file once per process, under a name derived from its path."""
    module_name = "mpisplit_user_" + "".join(c if c.isalnum() else "_" for c in path)
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no Python file at {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _zoo_factory(builder: Callable[..., LayerPlan]) -> Callable[..., nn.Module]:
    """A zoo model's factory: its plan's layers, each seeded by (``torch.initial_seed()``,
    layer index); it takes the plan builder's keyword arguments."""

    @functools.wraps(builder)
    def factory(**kwargs: object) -> nn.Sequential:
        plan = builder(**kwargs)
        return build_layers(plan, 0, len(plan), torch.initial_seed())

    return factory


def factory_kwargs(
    cfg: ModelConfig,
    factory: Callable[..., nn.Module],
    input_shape: Sequence[int],
    num_classes: int,
) -> dict[str, object]:
    """``model.options`` plus the dataset's shape and classes where the factory takes them;
    an option the factory does not accept is a config error."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return dict(cfg.options)
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = set(params) - {"input_shape", "num_classes"}
    for key in cfg.options:
        if key not in accepted and not open_ended:
            raise ConfigError(
                f"model.options.{key}: not an option of {cfg.name} "
                f"(options: {', '.join(sorted(accepted)) or 'none'})"
            )
    kwargs: dict[str, object] = {}
    if "input_shape" in params:
        kwargs["input_shape"] = tuple(input_shape)
    if "num_classes" in params:
        kwargs["num_classes"] = num_classes
    return {**kwargs, **cfg.options}


def build_model(
    cfg: ModelConfig,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    device: torch.device | str | None = None,
) -> nn.Module:
    """``factory(**options)`` under ``torch.manual_seed(model.seed)``: the one way a model is
    made (on ``device``; ``"meta"`` builds the structure without any weights)."""
    build = _builder(cfg, input_shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return build()


def build_parts(
    cfg: ModelConfig, input_shape: Sequence[int], num_classes: int, keep: Iterable[int]
) -> nn.Module:
    """The model of ``build_model`` with only the tensors of parts ``keep`` (of the split at
    ``model.cuts``) materialised on the CPU, bit for bit as in the whole model; the rest
    stays on the meta device (see ``mpisplit.materialize``)."""
    keep = sorted(keep)

    def kept(model: nn.Module) -> list[nn.Module]:
        parts = split_model(model, cfg.cuts)
        return [parts[i] for i in keep]

    return build_kept(_builder(cfg, input_shape, num_classes), cfg.seed, kept)


def _builder(
    cfg: ModelConfig, input_shape: Sequence[int], num_classes: int
) -> Callable[[], nn.Module]:
    """``factory(**kwargs)`` with its errors as config errors."""
    factory = model_factory(cfg.name)
    kwargs = factory_kwargs(cfg, factory, input_shape, num_classes)

    def build() -> nn.Module:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's "zero-element tensors" warning
                model = factory(**kwargs)
        except (TypeError, ValueError, RuntimeError) as err:  # e.g. a negative width
            raise ConfigError(f"model.options: {cfg.name} rejected them: {err}") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"model.name: {cfg.name} returned {type(model).__name__}, not a torch.nn.Module"
            )
        empty = [name for name, p in model.named_parameters() if p.numel() == 0]
        if empty:  # a zero width would train silently to the majority class
            raise ConfigError(
                f"model.options: {cfg.name} has a layer with no units "
                f"({empty[0]}); every width must be >= 1"
            )
        return model

    return build


def _factory(
    cls: Callable[..., nn.Module], *args: object, **kwargs: object
) -> Callable[[], nn.Module]:
    return lambda: cls(*args, **kwargs)


def layer_plan(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> LayerPlan:
    """The zoo plan for ``cfg``; unknown models and options are config errors."""
    builder = ZOO.get(cfg.name)
    if builder is None:
        model_factory(cfg.name)  # says what is wrong with the name, if anything
        raise ConfigError(
            f"model.name: this scheme builds per-party or per-task variants of "
            f"a zoo model's layers ({', '.join(ZOO)}), not of '{cfg.name}'"
        )
    accepted = set(inspect.signature(builder).parameters) - {"input_shape", "num_classes"}
    for key in cfg.options:
        if key not in accepted:
            raise ConfigError(
                f"model.options.{key}: not an option of {cfg.name} "
                f"(options: {', '.join(sorted(accepted))})"
            )
    try:
        plan = builder(input_shape=tuple(input_shape), num_classes=num_classes, **cfg.options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.options: {cfg.name} rejected them: {err}") from None
    _check_plan(plan, cfg.name, input_shape)
    return plan


def _check_plan(plan: LayerPlan, name: str, input_shape: Sequence[int]) -> None:
    """Builds every layer on the meta device (no memory, no compute), so that a negative or
    zero width or a wrongly typed option is a config error before any training, not a torch
    error mid-run or a zero-width layer that silently trains to the majority class."""
    for layer_name, factory in plan:
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's "zero-element tensors" warning
                layer = factory()
        except (RuntimeError, TypeError, ValueError) as err:
            raise ConfigError(
                f"model.options: layer {layer_name} of {name} cannot be built "
                f"for inputs of shape {list(input_shape)}: {err}"
            ) from None
        empty = [p for p in layer.parameters() if p.numel() == 0]
        if empty:
            raise ConfigError(
                f"model.options: layer {layer_name} of {name} has no units "
                f"(weight shape {list(empty[0].shape)}); every width must be "
                f">= 1"
            )


def cut_indices(plan: LayerPlan, cuts: Sequence[str | int], key: str = "model.cuts") -> list[int]:
    """Resolves cut names or indices to strictly increasing layer indices in 1..len(plan)-1."""
    names = [name for name, _ in plan]
    indices = []
    for i, cut in enumerate(cuts):
        if isinstance(cut, str):
            if cut not in names:
                raise ConfigError(
                    f"{key}[{i}]: '{cut}' is not a layer of this model (layers: {', '.join(names)})"
                )
            index = names.index(cut)
        else:
            index = cut
        if not 1 <= index < len(plan):
            raise ConfigError(
                f"{key}[{i}]: cut {cut!r} leaves a segment empty; use a layer after "
                f"'{names[0]}' (indices 1..{len(plan) - 1})"
            )
        if indices and index <= indices[-1]:
            raise ConfigError(f"{key}[{i}]: cuts must be in increasing layer order")
        indices.append(index)
    return indices


def segment_bounds(plan_length: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """Half-open layer ranges of the segments between cuts."""
    edges = [0, *cuts, plan_length]
    return list(zip(edges[:-1], edges[1:], strict=True))


def build_layers(plan: LayerPlan, start: int, stop: int, seed: int) -> nn.Sequential:
    """Instantiates layers ``start..stop-1`` of ``plan``, each under its own seed."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for index in range(start, stop):
        name, factory = plan[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + index)
            layers[name] = factory()
    return nn.Sequential(layers)
