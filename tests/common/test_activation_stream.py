"""Streaming training activations: the batch order, what is read when, and that a streamed
trainer ends as an in-memory one, a resumed one and one trained layer by layer do."""

import h5py
import numpy as np
import pytest
import torch

from common import activation_stream
from common.activation_stream import Batches, DataOrder, read_rows, training_moments
from common.sae_trainer import LayerToTrain, TrainingConfig, train_sae, train_saes
from tests.common.test_sae_trainer import sparse_data
from tests.helpers import failing_on_call

CPU = torch.device("cpu")


class CountedReads:
    """A source that records the length of every slice read from it."""

    def __init__(self, data: torch.Tensor):
        self.data, self.reads = data, []
        self.shape = data.shape

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, span: slice) -> torch.Tensor:
        self.reads.append(span.stop - span.start)
        return self.data[span]


def held_out_every_seventh(tokens: int) -> torch.Tensor:
    return torch.tensor([row for row in range(tokens) if row % 7])


def test_every_epoch_trains_each_row_once_within_buffers_of_whole_batches():
    rows = held_out_every_seventh(1000)  # 857 training rows: 13 batches of 64, 25 rows dropped per epoch
    order = DataOrder(rows, batch_size=64, epochs=3, buffer_tokens=200)  # 3 blocks of 64 rows per buffer
    buffers = list(order.buffers(torch.Generator().manual_seed(0)))
    assert order.steps == 39 and sum(len(b.batches) for b in buffers) == 39
    assert [b.first_step for b in buffers] == list(np.cumsum([0] + [len(b.batches) for b in buffers[:-1]]))
    per_epoch = len(buffers) // 3
    for epoch in range(3):
        trained = torch.cat([b.rows[b.batches].flatten() for b in buffers[epoch * per_epoch : (epoch + 1) * per_epoch]])
        assert len(trained) == 13 * 64 and len(set(trained.tolist())) == len(trained)
        assert set(trained.tolist()) <= set(rows.tolist())
    for buffer in buffers:
        assert len(buffer.rows) <= 192 and torch.equal(buffer.rows, buffer.rows.sort().values)
    first, second = (torch.cat([b.rows[b.batches].flatten() for b in buffers[e * per_epoch : (e + 1) * per_epoch]])
                     for e in (0, 1))
    assert not torch.equal(first, second)  # each epoch draws its own order


def test_a_buffer_holding_every_row_draws_the_in_memory_permutation():
    rows = held_out_every_seventh(1000)
    order = DataOrder(rows, batch_size=64, epochs=2, buffer_tokens=1000)
    buffers = list(order.buffers(torch.Generator().manual_seed(3)))
    reference = torch.Generator().manual_seed(3)
    for buffer in buffers:
        expected = torch.randperm(len(rows), generator=reference)[: 13 * 64].view(13, 64)
        assert torch.equal(buffer.rows, rows) and torch.equal(buffer.batches, expected)


def test_rows_are_read_in_bounded_contiguous_slices(tmp_path, monkeypatch):
    monkeypatch.setattr(activation_stream, "READ_SPAN", 50)
    data = torch.randn(400, 6)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("x", data=data.numpy(), chunks=(32, 6))
    rows = torch.tensor([0, 1, 5, 49, 50, 51, 130, 131, 399])
    counted = CountedReads(data)
    assert torch.equal(read_rows(counted, rows), data[rows]) and max(counted.reads) <= 50
    with h5py.File(tmp_path / "a.h5") as f:
        assert torch.equal(read_rows(f["x"], rows), data[rows])
    mean, mean_square = training_moments(f_data := data.double(), rows)
    torch.testing.assert_close(mean, f_data[rows].mean(0))
    assert mean_square == pytest.approx(float(f_data[rows].pow(2).sum(1).mean()), rel=1e-12)


def test_batches_read_each_buffer_once_and_never_the_whole_source():
    data = sparse_data(tokens=4000, d_in=8)
    counted = CountedReads(data)
    order = DataOrder(torch.arange(4000), batch_size=100, epochs=2, buffer_tokens=500)
    batches = list(Batches([counted], order, torch.Generator().manual_seed(0), 0, CPU, [2.0]))
    assert [step for step, _ in batches] == list(range(80))
    assert sum(counted.reads) == 2 * 4000 and max(counted.reads) <= 500
    again = Batches([data], order, torch.Generator().manual_seed(0), 0, CPU, [2.0])
    for (_, [got]), (_, [expected]) in zip(batches, again, strict=True):
        assert torch.equal(got, expected)


def test_batches_resumed_at_a_step_read_only_what_is_left():
    data = sparse_data(tokens=4000, d_in=8)
    order = DataOrder(torch.arange(4000), batch_size=100, epochs=2, buffer_tokens=500)
    whole = list(Batches([data], order, torch.Generator().manual_seed(0), 0, CPU, [1.0]))
    counted = CountedReads(data)
    resumed = list(Batches([counted], order, torch.Generator().manual_seed(0), 57, CPU, [1.0]))
    assert [step for step, _ in resumed] == list(range(57, 80))
    assert sum(counted.reads) == 5 * 500  # the buffer holding step 57 (steps 55-59) and the four after it
    for (_, [got]), (_, [expected]) in zip(resumed, whole[57:], strict=True):
        assert torch.equal(got, expected)


def settings(**overrides) -> TrainingConfig:
    return TrainingConfig(**{"expansion_factor": 2, "epochs": 3, "batch_size": 128, "lr": 3e-3, "activation": "topk",
                             "k": 3, "decorrelation": 0.01, "shuffle_buffer_tokens": 512, "checkpoint_every": 10,
                             "checkpoint_minutes": 0, **overrides})


def assert_same_sae(a, b):
    for name, value in a.sae.state_dict().items():
        assert torch.equal(value, b.sae.state_dict()[name]), name
    assert a.curves == b.curves and a.metrics == b.metrics


def test_a_streamed_hdf5_source_trains_the_sae_of_the_same_tensor_in_memory(tmp_path):
    data = sparse_data(tokens=3000, d_in=12)
    groups = torch.arange(3000) // 25
    with h5py.File(tmp_path / "acts.h5", "w") as f:
        f.create_dataset("L1", data=data.numpy(), chunks=(256, 12))
    with h5py.File(tmp_path / "acts.h5") as f:
        streamed = train_sae(f["L1"], settings(), "h", "m", CPU, groups=groups)
    assert_same_sae(streamed, train_sae(data, settings(), "h", "m", CPU, groups=groups))
    whole = train_sae(data, settings(shuffle_buffer_tokens=10**6), "h", "m", CPU, groups=groups)
    assert abs(whole.metrics["explained_variance"] - streamed.metrics["explained_variance"]) < 0.1


def test_a_resumed_streamed_training_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """Stopped in the middle of the second epoch (step 35 of 3 x 21, buffers of 4 steps), resumed
    from the checkpoint of step 30: the same weights, curves and metrics."""
    from common import sae_trainer

    data = sparse_data(tokens=3000, d_in=12)
    with h5py.File(tmp_path / "acts.h5", "w") as f:
        f.create_dataset("L1", data=data.numpy())
    checkpoint = tmp_path / "unit.pt"
    with h5py.File(tmp_path / "acts.h5") as f:
        whole = train_sae(f["L1"], settings(), "h", "m", CPU)
        clip = torch.nn.utils.clip_grad_norm_
        monkeypatch.setattr(sae_trainer.torch.nn.utils, "clip_grad_norm_", failing_on_call(clip, 35))
        with pytest.raises(RuntimeError, match="preempted"):
            train_sae(f["L1"], settings(), "h", "m", CPU, checkpoint=checkpoint)
        monkeypatch.setattr(sae_trainer.torch.nn.utils, "clip_grad_norm_", clip)
        assert torch.load(checkpoint, weights_only=False)["step"] == 30
        resumed = train_sae(f["L1"], settings(), "h", "m", CPU, checkpoint=checkpoint)
    assert_same_sae(resumed, whole)


def test_one_pass_over_several_layers_trains_the_saes_of_layer_by_layer_training():
    layers = [sparse_data(tokens=3000, d_in=12, seed=seed) for seed in (1, 2, 3)]
    groups = torch.arange(3000) // 25
    together = train_saes([LayerToTrain(x, f"blocks.{i}.hook_resid_post") for i, x in enumerate(layers)], settings(),
                          "m", CPU, groups=groups)
    for i, (x, trained) in enumerate(zip(layers, together, strict=True)):
        assert_same_sae(trained, train_sae(x, settings(), f"blocks.{i}.hook_resid_post", "m", CPU, groups=groups))
