"""``mpisplit export RUN_DIR --out FILE``: the parts every rank saved, merged into the state
dict of the user's whole module (for parties that agree to assemble the model, and for tests).

Parts keep the user's parameter names, so the merge is a union of ``model-rank<R>.pt``. A key
two ranks hold (parallel clients' own lower layers) must be equal in both, or the ranks to take
are chosen with ``--ranks``. The result is checked by loading it with ``strict=True`` into the
model the run's ``config.yaml`` builds (on the meta device: no weights are allocated).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from mpisplit.config import ConfigError, load_config
from mpisplit.data import read_meta
from mpisplit.models import build_model

_PART = re.compile(r"model-rank(\d+)\.pt")


def merge_parts(run_dir: Path, ranks: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """The union of the saved parts of ``ranks`` (default: every rank that saved one)."""
    saved = {
        int(m[1]): path
        for path in Path(run_dir).glob("model-rank*.pt")
        if (m := _PART.fullmatch(path.name))
    }
    if not saved:
        raise ConfigError(
            f"{run_dir}: no model-rank<R>.pt (was the run made with "
            f"run.save_model: true, and has it finished?)"
        )
    missing = sorted(set(ranks or ()) - set(saved))
    if missing:
        raise ConfigError(
            f"--ranks: {run_dir} has no part of rank(s) {missing} (parts: {sorted(saved)})"
        )
    merged: dict[str, torch.Tensor] = {}
    owner: dict[str, int] = {}
    for rank in sorted(saved) if ranks is None else ranks:
        for key, value in torch.load(saved[rank], weights_only=True).items():
            if key in merged and not torch.equal(merged[key], value):
                raise ConfigError(
                    f"{key}: model-rank{owner[key]}.pt and model-rank{rank}.pt hold different "
                    f"values (each client trained its own); choose one with --ranks"
                )
            merged.setdefault(key, value)
            owner.setdefault(key, rank)
    return merged


def check_loads(run_dir: Path, state: dict[str, torch.Tensor]) -> None:
    """Loads ``state`` with ``strict=True`` into the run's model, built on the meta device."""
    config = load_config(Path(run_dir) / "config.yaml")
    meta = read_meta(Path(config.data.path))
    model = build_model(config.model, meta["feature_shape"], meta["num_classes"], device="meta")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ConfigError(
            f"{run_dir}: the merged parts do not load into {config.model.name}: {err}"
        ) from None


def export(
    run_dir: Path, out: Path, ranks: Sequence[int] | None = None, *, check: bool = True
) -> Path:
    state = merge_parts(run_dir, ranks)
    if check:
        check_loads(run_dir, state)
    torch.save(state, out)
    return out
