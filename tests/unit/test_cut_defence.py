"""The one home of cut defences (``privacy.CutDefence``), which the point-to-point cut
(``CutSender``) and vertical's collective cut both use: no process, no MPI."""

from __future__ import annotations

import torch

from mpisplit.config import PrivacyConfig
from mpisplit.privacy import CutDefence


def test_no_defence_sends_the_activation_itself() -> None:
    activation = torch.randn(8, 4)
    sent, penalty = CutDefence(PrivacyConfig(), sender=0).defend(activation, activation)
    assert sent is activation and penalty is None


def test_noise_is_the_senders_own_and_reproducible() -> None:
    cfg = PrivacyConfig(noise_std=0.5, clip_norm=1.0, nopeek_weight=0.1, seed=3)
    inputs, activation = torch.randn(8, 6), torch.randn(8, 4)
    first, penalty = CutDefence(cfg, sender=1).defend(activation, inputs)
    again, _ = CutDefence(cfg, sender=1).defend(activation, inputs)
    other, _ = CutDefence(cfg, sender=2).defend(activation, inputs)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    assert penalty is not None and penalty.item() > 0


def test_evaluation_noise_leaves_the_training_noise_alone() -> None:
    cfg = PrivacyConfig(noise_std=0.5)
    activation = torch.randn(8, 4)
    defence, untouched = CutDefence(cfg, sender=0), CutDefence(cfg, sender=0)
    defence.defend_eval(activation, activation, step=5, final=False)
    torch.testing.assert_close(
        defence.defend(activation, activation)[0],
        untouched.defend(activation, activation)[0],
        rtol=0,
        atol=0,
    )


def test_leakage_sample_is_capped_and_measured_on_what_left() -> None:
    defence = CutDefence(PrivacyConfig(), sender=0)
    for _ in range(3):
        inputs = torch.randn(400, 5)
        defence.defend_eval(inputs * 2, inputs, step=1, final=True)
    assert sum(len(x) for x, _ in defence._sample) == CutDefence.LEAKAGE_SAMPLES
    defence.measure_leakage()
    assert abs(defence.leakage - 1.0) < 1e-9  # a scaled copy: one determines the other
    noisy = CutDefence(PrivacyConfig(noise_std=5.0), sender=0)
    inputs = torch.randn(500, 5)
    noisy.defend_eval(inputs, inputs, step=1, final=True)
    noisy.defend_eval(inputs, inputs, step=1, final=False)  # not the final pass: not kept
    assert sum(len(x) for x, _ in noisy._sample) == 500
    noisy.measure_leakage()
    assert noisy.leakage < 0.9


def test_handover_noise_is_its_own_stream() -> None:
    """A spatio-temporal site's one-off hand-over draws neither training nor evaluation
    noise, and draws the same each time (a re-run hands over the same outputs)."""
    cfg = PrivacyConfig(noise_std=0.5, seed=1)
    activation = torch.zeros(6, 3)
    defence = CutDefence(cfg, sender=2)
    first = defence.defend_handover(activation)
    torch.testing.assert_close(first, defence.defend_handover(activation), rtol=0, atol=0)
    assert not torch.equal(first, CutDefence(cfg, sender=2).defend(activation, activation)[0])
    assert not torch.equal(first, defence.defend_eval(activation, activation, 0, final=False))
