"""The step driver's pure parts and the pure pieces the scheme roles share: step budgets,
when evaluation is due, turns' evaluation, microbatches and their loss weights, tallies,
averaged tensors, the server's upper segments, the splitfed server order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpisplit.config import TrainConfig
from mpisplit.data import Batch
from mpisplit.driver import EvalSchedule, step_budget
from mpisplit.protocol import Flag, Kind
from mpisplit.schemes.averaging import averaged_tensors
from mpisplit.schemes.evaluation import EvalTally
from mpisplit.schemes.microbatches import microbatch_share, microbatches
from mpisplit.schemes.serving import Upper
from mpisplit.schemes.splitfed import server_order
from mpisplit.schemes.turns import ClientTurns, evaluating_clients, round_robin_turns
from mpisplit.segment import Segment
from mpisplit.transport import Message


def test_step_budget_is_epochs_cut_to_max_steps() -> None:
    assert step_budget(7, TrainConfig(epochs=3)) == 21
    assert step_budget(7, TrainConfig(epochs=3, max_steps=10)) == 10
    assert step_budget(7, TrainConfig(epochs=1, max_steps=10)) == 7


def test_evaluation_is_due_every_n_steps_but_not_at_the_final_one() -> None:
    schedule = EvalSchedule.of(TrainConfig(eval_every=3), final=9)
    assert [s for s in range(1, 13) if schedule.due(s)] == [3, 6, 12]
    assert not any(EvalSchedule(every=0).due(s) for s in range(1, 10))
    assert not any(EvalSchedule(3, None, evaluator=False).due(s) for s in range(1, 10))


def test_a_client_turns_evaluation() -> None:
    train = TrainConfig(eval_every=2)
    turns = round_robin_turns([3, 3], [2, 2])  # (0, 2) (1, 2) (0, 1) (1, 1)
    last, other = ClientTurns(turns, 1, 6, 6), ClientTurns(turns, 0, 6, 6)
    assert last.evaluation(train) == EvalSchedule(2, 6, True)
    assert other.evaluation(train) == EvalSchedule(2, None, True)  # never reaches step 6
    sampled_out = ClientTurns([(2, 4)], 2, 4, 4, evaluator=False)
    assert not any(sampled_out.evaluation(train).due(s) for s in range(1, 5))


def test_evaluating_clients_are_all_or_a_fixed_sample() -> None:
    assert evaluating_clients(TrainConfig(), 4) == [0, 1, 2, 3]
    sample = evaluating_clients(TrainConfig(eval_clients=2, seed=5), 6)
    assert len(sample) == 2 and sample == sorted(sample)
    assert sample == evaluating_clients(TrainConfig(eval_clients=2, seed=5), 6)


@pytest.mark.parametrize(
    ("rows", "count", "sizes"), [(8, 1, [8]), (8, 2, [4, 4]), (8, 3, [2, 4, 2]), (2, 4, [1, 1])]
)
def test_microbatches_split_and_flag(rows: int, count: int, sizes: list[int]) -> None:
    batch = Batch(torch.arange(rows * 2.0).view(rows, 2), torch.arange(rows), torch.arange(rows))
    parts = microbatches(batch, count)
    assert [len(p.labels) for p in parts] == sizes
    assert [p.flags for p in parts] == [Flag.MORE] * (len(sizes) - 1) + [Flag.NONE]
    assert torch.equal(torch.cat([p.labels for p in parts]), batch.labels)


def test_eval_tally_is_a_mean_over_samples() -> None:
    tally = EvalTally()
    tally.add(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
    tally.add(torch.tensor([[5.0, 0.0]]), torch.tensor([0]))
    result = tally.result(step=4, client=1, task=2)
    assert (result.step, result.client, result.task, result.count) == (4, 1, 2, 3)
    assert result.accuracy == pytest.approx(2 / 3)
    assert EvalTally().result(0, 0).count == 0  # an empty pass does not divide by zero


def test_splitfed_server_order() -> None:
    assert server_order([3, 2], every=2, how="fixed", seed=0) == [0, 1, 0, 1, 0]
    drawn = server_order([3, 2], every=2, how="random", seed=0)
    assert sorted(drawn[:4]) == [0, 0, 1, 1] and drawn[4:] == [0]


def test_microbatch_share_weights_to_the_whole_batch_mean() -> None:
    labels = torch.arange(3)
    message = Message(torch.empty(0), 1, Kind.ACTIVATION, 0, Flag.MORE, 12, 0)
    assert microbatch_share(labels, message) == 0.25
    assert microbatch_share(labels, message._replace(aux=0)) == 1.0  # not split


def test_averaged_tensors_keep_integer_buffers_local() -> None:
    module = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    params = list(module.parameters())
    assert averaged_tensors(module, buffers=False) == params
    with_buffers = averaged_tensors(module, buffers=True)
    assert len(with_buffers) == len(params) + 2  # running mean and var, not the batch count
    assert all(t.is_floating_point() for t in with_buffers)


def test_upper_serves_one_segment_or_a_copy_per_client() -> None:
    def segment() -> Segment:
        return Segment.create(nn.Linear(2, 2), TrainConfig(), total_steps=4)

    shared = segment()
    upper = Upper.shared(shared)
    assert upper.segment_for(3) is shared and upper.segment_for(7) is shared
    assert list(upper.owned) == [shared] and upper.after_step is None
    copies = {1: segment(), 2: segment()}
    per_client = Upper.per_client(copies, after_step=copies.pop)
    assert per_client.segment_for(2) is copies[2] and list(per_client.owned) == []
