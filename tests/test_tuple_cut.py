"""A cut that carries several tensors (float embeddings with gradients, a bool mask and int64
lengths forward only) trains under vanilla split learning exactly as the unmodified module in
one process; schemes that send one tensor per cut refuse it before launch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mpisplit.codec import HEADER_BYTES
from mpisplit.config import ConfigError, ModelConfig, load_config
from mpisplit.engine import prepare
from mpisplit.prepare import write_arrays
from mpisplit.resources import CutSize, Workload, model_costs, per_client
from tests.conftest import ROOT, run_mpi
from tests.reference import initial_model, merged_parts, train_reference
from tests.test_resources import traced_client_costs

MODEL = "tests.masked_model:masked_encoder"


@pytest.fixture(scope="module")
def padded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token sequences of 2 to 8 tokens (ids 1..11) padded with 0; the class is the sum of
    the tokens modulo 3."""
    rng = np.random.default_rng(0)

    def sequences(n: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = rng.integers(1, 12, (n, 8))
        tokens[np.arange(8) >= rng.integers(2, 9, (n, 1))] = 0
        return tokens.astype(np.float32), tokens.sum(1) % 3

    return write_arrays(
        tmp_path_factory.mktemp("padded") / "d",
        [sequences(192)],
        sequences(64),
        dataset="padded",
        num_classes=3,
    )


def _config(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "tuple.yaml"
    path.write_text(f"""\
scheme: {{name: vanilla, clients: 1}}
model: {{name: "{MODEL}", cuts: [block]}}
data: {{path: "{data}", batch_size: 16}}
train: {{optimizer: sgd, lr: 0.05, momentum: 0.9, max_steps: 6}}
run: {{dir: "{tmp_path / "run"}", progress: none}}
""")
    return path


@pytest.mark.parametrize("microbatches", [1, 2])
def test_vanilla_with_a_tuple_cut_equals_single_process(
    padded: Path, tmp_path: Path, microbatches: int
) -> None:
    """Gradients of both float tensors come back (both embeddings train); the mask and the
    lengths only go forward. Pipelined (M = 2) equals the whole batch: no batch coupling.
    SGD, not Adam: the attention's key bias has a zero gradient in exact arithmetic, and Adam
    would scale its rounding noise (which depends on the summation order) up to a step."""
    result = run_mpi(
        2, "train", str(_config(tmp_path, padded)), f"transport.microbatches={microbatches}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = ModelConfig(name=MODEL)
    expected = train_reference(
        padded, model, [(0, 6)], optimizer="sgd", lr=0.05, momentum=0.9, batch_size=16, seed=0
    )
    actual = merged_parts(tmp_path / "run", [0, 1])
    initial = initial_model(padded, model).state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=key)
        assert not torch.equal(initial[key], value), f"{key} did not train"
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert 0 <= summary["leakage_distance_correlation"] <= 1


@pytest.mark.parametrize("scheme", ["splitfed", "ushaped"])
def test_schemes_that_send_one_tensor_refuse_a_tuple_cut(
    padded: Path, tmp_path: Path, scheme: str
) -> None:
    config = load_config(
        _config(tmp_path, padded),
        [f"scheme.name={scheme}"] + (["model.cuts=[block, head]"] if scheme == "ushaped" else []),
    )
    with pytest.raises(
        ConfigError,
        match=rf"model\.cuts\[0\]: the cut before 'block' carries "
        rf"4 values \(ne, expand, embed, sum_1\); scheme {scheme} sends one "
        rf"tensor per cut",
    ):
        prepare(config, 2)


def test_cost_tables_count_every_tensor_of_a_tuple_cut(padded: Path, tmp_path: Path) -> None:
    """Per sample the client sends the mask (8 bools), both embeddings (2 x 8 x 16 float32)
    and the length (one int64), and gets the embeddings' gradients back; a traced vanilla
    run (one epoch, so no hand-over) moves what `resources` predicts, and the CLI prints the
    cut and no splitfed row (splitfed refuses such a cut)."""
    work = Workload(MODEL, "block", (8,), 3, 192, 1, 1, 16)
    costs = model_costs(work)
    assert costs.cut_shapes == ((8,), (8, 16), (8, 16), ())
    assert costs.activation == CutSize(per_sample=8 + 2 * 512 + 8, per_batch=0, messages=4)
    assert costs.gradient == CutSize(per_sample=2 * 512, per_batch=0, messages=2)
    result = run_mpi(
        2,
        "train",
        str(_config(tmp_path, padded)),
        "train.max_steps=0",
        "train.epochs=1",
        "train.eval_every=0",
        "run.trace=true",
        "run.count_flops=true",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trace = json.loads((tmp_path / "run/trace-rank1.json").read_text())["traceEvents"]
    sent, received, _ = traced_client_costs(trace)
    (split,) = [c for c in per_client(work, costs) if c.scheme == "split"]
    assert received == split.bytes_received
    assert sent == pytest.approx(split.bytes_sent, abs=HEADER_BYTES + 8)  # + the end marker
    printed = subprocess.run(
        [sys.executable, "-m", "mpisplit", "resources", "--model", MODEL, "--cut", "block"]
        + ["--input-shape", "8", "--classes", "3", "--samples", "192", "--clients", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert printed.returncode == 0, printed.stderr
    assert "cut activation 8 + 8x16 + 8x16 + 1 = 1040 B/sample" in printed.stdout
    assert [line.split()[0] for line in printed.stdout.splitlines()[2:]] == [
        "split",
        "fedavg",
        "syncsgd",
    ]
