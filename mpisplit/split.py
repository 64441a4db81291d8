"""Cutting a user's ``nn.Module`` into parts at module boundaries named as in ``print(model)``.

A cut ``"layer2"`` ends a part just before the first thing module ``layer2`` computes, like
``SplitPoint.BEGINNING`` in ``torch.distributed.pipelining``. The split uses torch.fx: only the
modules that *contain* a cut are traced (so their forward must be traceable); every other
module is a leaf that runs its own eager ``forward``. That is why this is a module-boundary
split and not ``torch.export``/``pipelining.pipeline``, which lower everything to aten ops:

* a part computes with the user's own modules, so training a split model matches the
  unmodified module to rounding (same kernels, BatchNorm running statistics updated in place
  by the module that owns them, dropout drawing from the same generator in the same order);
* no example input is needed and the model may live on the meta device while it is cut;
* data-dependent Python control flow inside blocks keeps working (only the containers around
  the cuts are traced);
* each part is a ``GraphModule`` holding the user's submodules under their qualified names, so
  its ``state_dict`` keys are the user's and merged parts load with ``strict=True``.

A cut is legal when every value that crosses it is an input of the module the cut starts at
(the hidden states and an attention mask handed to ``blocks.2``, say). A skip connection
around the cut, or a parameter shared by parts on different ranks, is a ``ConfigError`` that
names the value and the modules.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

from torch import fx, nn

from mpisplit.config import ConfigError


def cut_names(model: nn.Module, cuts: Sequence[str | int], key: str = "model.cuts") -> list[str]:
    """Qualified module names of ``cuts``; an integer is a position among the top-level
    children (the zoo's layer indices)."""
    children = [name for name, _ in model.named_children()]
    modules = dict(model.named_modules())
    names = []
    for i, cut in enumerate(cuts):
        if isinstance(cut, int):
            if not 1 <= cut < len(children):
                raise ConfigError(
                    f"{key}[{i}]: cut {cut!r} leaves a segment empty; use a layer after "
                    f"'{children[0] if children else ''}' (indices 1..{len(children) - 1})"
                )
            cut = children[cut]
        if not cut or cut not in modules:
            raise ConfigError(
                f"{key}[{i}]: '{cut}' is not a layer of this model (a module name as print(model) "
                f"shows it; top-level layers: {', '.join(children)})"
            )
        names.append(cut)
    return names


def split_model(
    model: nn.Module, cuts: Sequence[str | int], *, key: str = "model.cuts"
) -> list[fx.GraphModule]:
    """The ``len(cuts) + 1`` parts of ``model``; they share its submodules (no copies)."""
    names = cut_names(model, cuts, key)
    graph = _trace(model, names, key)
    nodes = [n for n in graph.nodes if n.op != "get_attr"]
    starts = _starts(nodes, names, key)
    part_of = {}
    edges = [0, *starts, len(nodes)]
    for part, (begin, end) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        part_of.update({node: part for node in nodes[begin:end]})
    crossing = [
        _crossing(nodes, start, name, part_of, i, key)
        for i, (start, name) in enumerate(zip(starts, names, strict=True))
    ]
    parts = []
    for part, (begin, end) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        inputs = crossing[part - 1] if part else [n for n in nodes if n.op == "placeholder"]
        outputs = crossing[part] if part < len(crossing) else None
        parts.append(_part_module(model, nodes[begin:end], inputs, outputs, part))
    return parts


def _trace(model: nn.Module, names: list[str], key: str) -> fx.Graph:
    """Traces only the ancestors of the cut modules; everything else stays a leaf call."""
    containers = {name.rsplit(".", i)[0] for name in names for i in range(1, name.count(".") + 1)}

    class Tracer(fx.Tracer):
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return qualified_name not in containers

    try:
        return Tracer().trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError ...
        outer = ", ".join(sorted(containers | {"(the model)"}))
        raise ConfigError(
            f"{key}: cannot trace the modules that contain the cuts ({outer}): {err}; their "
            f"forward must not branch on tensor values (cut at an outer module instead)"
        ) from None


def _inside(node: fx.Node, name: str) -> bool:
    if node.op == "call_module" and (node.target == name or node.target.startswith(name + ".")):
        return True
    return name in node.meta.get("nn_module_stack", {})


def _starts(nodes: list[fx.Node], names: list[str], key: str) -> list[int]:
    first = next(k for k, n in enumerate(nodes) if n.op != "placeholder")
    starts: list[int] = []
    for i, name in enumerate(names):
        start = next((k for k, n in enumerate(nodes) if _inside(n, name)), None)
        if start is None:
            raise ConfigError(f"{key}[{i}]: '{name}' is never called by the model's forward")
        if start <= first:
            raise ConfigError(
                f"{key}[{i}]: cut {name!r} leaves a segment empty (nothing runs "
                f"before it); cut at a later module"
            )
        if starts and start <= starts[-1]:
            raise ConfigError(
                f"{key}[{i}]: cuts must be in increasing layer order "
                f"('{name}' runs before '{names[i - 1]}')"
            )
        starts.append(start)
    return starts


def _crossing(
    nodes: list[fx.Node], start: int, name: str, part_of: dict, index: int, key: str
) -> list[fx.Node]:
    """The values defined before ``start`` and used from there on; each must feed ``name``."""
    values = []
    for node in nodes[:start]:
        later = [user for user in node.users if user in part_of and part_of[user] > index]
        if not later:
            continue
        if not any(_inside(user, name) for user in later):
            users = sorted({_module_of(user) for user in later})
            raise ConfigError(
                f"{key}[{index}]: the cut before '{name}' is crossed by '{node.name}' (from "
                f"{_module_of(node)}, used by {', '.join(users)}): a skip connection around "
                f"the cut; cut where every value that crosses is an input of the module"
            )
        values.append(node)
    return values


def _module_of(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"the model input '{node.target}'"
    if node.op == "call_module":
        return f"'{node.target}'"
    stack = list(node.meta.get("nn_module_stack", {}))
    return f"'{stack[-1]}'" if stack else "the model's own forward"


def _part_module(
    model: nn.Module,
    nodes: list[fx.Node],
    inputs: list[fx.Node],
    outputs: list[fx.Node] | None,
    part: int,
) -> fx.GraphModule:
    """The graph of one part. A part after a cut takes one argument, what the part before
    returns: the one crossing value, or the tuple of them (unpacked here), so parts chain as
    ``part(previous(x))`` and the cut exchange moves one value, a tensor or a tuple."""
    graph = fx.Graph()
    if part and len(inputs) > 1:
        cut = graph.placeholder("cut")
        env = {
            value: graph.create_node("call_function", operator.getitem, (cut, i), name=value.name)
            for i, value in enumerate(inputs)
        }
    else:
        env = {value: graph.placeholder(value.name) for value in inputs}

    def lookup(value: fx.Node) -> fx.Node:
        if value not in env:  # a parameter or buffer read outside a leaf module
            env[value] = graph.node_copy(value, lookup)
        return env[value]

    result = None
    for node in nodes:
        if node.op == "output":
            result = fx.node.map_arg(node.args[0], lookup)
        elif node.op != "placeholder":
            env[node] = graph.node_copy(node, lookup)
    if outputs is not None:
        result = lookup(outputs[0]) if len(outputs) == 1 else tuple(map(lookup, outputs))
    graph.output(result)
    return fx.GraphModule(model, graph, class_name=f"Part{part}")


def cut_values(parts: Sequence[fx.GraphModule]) -> list[list[str]]:
    """The names of the values each cut carries, one list per cut (in the order of the
    tuple that crosses when there are several)."""
    carried = []
    for part in parts[1:]:
        placeholder = next(n for n in part.graph.nodes if n.op == "placeholder")
        unpacked = sorted(
            (user.args[1], user.name)
            for user in placeholder.users
            if user.target is operator.getitem
        )
        carried.append([name for _, name in unpacked] or [placeholder.name])
    return carried


def check_cut_values(
    parts: Sequence[fx.GraphModule],
    cuts: Sequence[str | int],
    scheme: str,
    carries_tuples: bool,
    key: str = "model.cuts",
) -> None:
    """A scheme whose cut exchange moves one tensor refuses a cut that carries several."""
    if carries_tuples:
        return
    for index, values in enumerate(cut_values(parts)):
        if len(values) != 1:
            raise ConfigError(
                f"{key}[{index}]: the cut before {cuts[index]!r} carries {len(values)} values "
                f"({', '.join(values)}); scheme {scheme} sends one tensor per cut (vanilla "
                f"carries several): cut where one value crosses"
            )


def check_shared(
    parts: Sequence[nn.Module], colocated: Iterable[Sequence[int]] = (), key: str = "model.cuts"
) -> None:
    """A parameter or buffer held by two parts on different ranks would diverge: refuse it.

    ``colocated`` lists groups of part indices held by one rank (the U-shaped client's head and
    tail), which may share parameters (tied embeddings)."""
    together = {i: {i} for i in range(len(parts))}
    for group in colocated:
        for i in group:
            together[i] = set(group)
    seen: dict[int, tuple[int, str]] = {}
    for index, part in enumerate(parts):
        tensors = [
            *part.named_parameters(remove_duplicate=False),
            *part.named_buffers(remove_duplicate=False),
        ]
        for name, tensor in tensors:
            other = seen.setdefault(id(tensor), (index, name))
            if other[0] not in together[index]:
                raise ConfigError(
                    f"{key}: '{name}' (part {index}) and '{other[1]}' (part {other[0]}) are one "
                    f"shared tensor (tied weights) on different ranks; keep the modules that "
                    f"share it on one side of the cuts"
                )


def join_parts(parts: Sequence[nn.Module]) -> fx.GraphModule:
    """One module holding every submodule and weight of ``parts`` (of ``split_model``) under
    the user's qualified names: the parts one rank keeps (the U-shaped client's head and
    tail), saved as one state dict even when two cuts fall inside one container (``blocks.1``
    and ``blocks.5``)."""
    owned: dict[str, object] = {}
    for part in parts:
        for node in part.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                owned.setdefault(node.target, operator.attrgetter(node.target)(part))
    graph = fx.Graph()
    for target in owned:
        graph.get_attr(target)
    graph.output(None)
    return fx.GraphModule(owned, graph, class_name="Joined")
