"""Defences against leakage through the cut layer, and the leakage measure.

A client may clip each sample's cut activation to a maximum L2 norm and add Gaussian noise
before it leaves (both differentiable, so training goes on through them), and may add the
NoPeek penalty: the distance correlation between its raw inputs and its cut activations,
which training then pushes down. The same distance correlation, measured on test data, is
the leakage figure in the run summary (0: independent, 1: one determines the other).
"""

from __future__ import annotations

import torch

from mpisplit.config import PrivacyConfig
from mpisplit.cut import CutValue, cut_features, map_floats
from mpisplit.seeds import Stream, derive


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (Székely et al.) of two batches, differentiable in both."""
    a = _double_centred(x.reshape(len(x), -1))
    b = _double_centred(z.reshape(len(z), -1))
    dcov_xz = (a * b).mean()
    dvar = (a * a).mean() * (b * b).mean()
    if dvar <= 0:
        return dcov_xz.new_zeros(())
    return torch.sqrt(torch.clamp(dcov_xz, min=0) / torch.sqrt(dvar))


def _double_centred(rows: torch.Tensor) -> torch.Tensor:
    distances = torch.cdist(rows, rows)
    return (
        distances
        - distances.mean(dim=0, keepdim=True)
        - distances.mean(dim=1, keepdim=True)
        + distances.mean()
    )


def protect(
    activation: torch.Tensor, cfg: PrivacyConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The cut activation as it may leave the client: norm-clipped, then noised."""
    if cfg.clip_norm > 0:
        norms = activation.reshape(len(activation), -1).norm(dim=1).clamp(min=1e-12)
        scale = (cfg.clip_norm / norms).clamp(max=1.0)
        activation = activation * scale.reshape(-1, *([1] * (activation.dim() - 1)))
    if cfg.noise_std > 0:
        noise = torch.randn(activation.shape, generator=generator, dtype=activation.dtype)
        activation = activation + cfg.noise_std * noise.to(activation.device)
    return activation


class EvaluationNoise:
    """The noise generator of evaluation passes, reseeded from (seed, sender, step) at each
    one: evaluations never advance the training noise, and a resumed run draws the same."""

    def __init__(self, seed: int, sender: int) -> None:
        self._seed, self._sender = seed, sender
        self._step: int | None = None
        self._generator = torch.Generator()

    def at(self, step: int) -> torch.Generator:
        if step != self._step:
            self._generator.manual_seed(derive(self._seed, Stream.EVAL_NOISE, self._sender, step))
            self._step = step
        return self._generator


def nopeek_penalty(
    inputs: torch.Tensor, activation: torch.Tensor, cfg: PrivacyConfig
) -> torch.Tensor | None:
    """The NoPeek term added to the client's loss, or None when disabled."""
    if cfg.nopeek_weight <= 0:
        return None
    return cfg.nopeek_weight * distance_correlation(inputs, activation)


class CutDefence:
    """Everything one sender's cut activation goes through before it leaves, whichever way
    it travels (point to point, or a party's slice of a collective): the configured
    defences (clipping, noise, NoPeek) and the leakage measure on test data.

    ``noise`` is the training noise generator (checkpoints keep it); evaluation noise is
    reseeded per evaluation (``EvaluationNoise``)."""

    LEAKAGE_SAMPLES = 1000
    """Test samples the leakage measure keeps, so memory does not grow with the test set."""

    def __init__(self, cfg: PrivacyConfig, sender: int) -> None:
        self.privacy, self._sender = cfg, sender
        self.noise = torch.Generator().manual_seed(derive(cfg.seed, Stream.NOISE, sender))
        self.eval_noise = EvaluationNoise(cfg.seed, sender)
        self.leakage: float | None = None
        self._sample: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._sampled = 0

    def defend(
        self, activation: CutValue, inputs: torch.Tensor
    ) -> tuple[CutValue, torch.Tensor | None]:
        """(what leaves in training, the NoPeek penalty to add to the sender's loss or
        None); both differentiable, so back-propagation runs through them. A cut of several
        tensors is defended in its float tensors; NoPeek reads them side by side."""
        return (
            map_floats(lambda t: protect(t, self.privacy, self.noise), activation),
            nopeek_penalty(inputs, cut_features(activation), self.privacy),
        )

    def defend_eval(
        self, activation: CutValue, inputs: torch.Tensor, step: int, *, final: bool
    ) -> CutValue:
        """What leaves in evaluation (defended like training traffic); in the final
        evaluation, keeps the first ``LEAKAGE_SAMPLES`` (input, sent) pairs for
        ``measure_leakage``."""
        noise = self.eval_noise.at(step)
        sent = map_floats(lambda t: protect(t, self.privacy, noise), activation)
        if final and self._sampled < self.LEAKAGE_SAMPLES:
            keep = self.LEAKAGE_SAMPLES - self._sampled
            self._sample.append((inputs[:keep].cpu(), cut_features(sent)[:keep].detach().cpu()))
            self._sampled += len(self._sample[-1][0])
        return sent

    def defend_handover(self, activation: torch.Tensor) -> torch.Tensor:
        """What leaves in a one-off hand-over of cut outputs (a spatio-temporal site's
        frozen layer): defended with the sender's own hand-over noise stream, which neither
        training nor evaluation noise draws from."""
        noise = torch.Generator().manual_seed(
            derive(self.privacy.seed, Stream.HANDOVER_NOISE, self._sender)
        )
        return protect(activation, self.privacy, noise)

    def measure_leakage(self) -> None:
        """Distance correlation between the kept test inputs and what left for them."""
        x = torch.cat([x for x, _ in self._sample]).double()
        z = torch.cat([z for _, z in self._sample]).double()
        self.leakage = float(distance_correlation(x, z))
        self._sample, self._sampled = [], 0
