"""The project's SAE trainer: its loss terms, its saved sae-lens SAEs, and its metrics."""

import itertools
import math
import os
import signal

import numpy as np
import pytest
import torch
from sae_lens import SAE
from safetensors.torch import load_file

from common.decorrelation import decorrelation_penalty
from common.preemption import WARNING
from common.sae_quality import evaluate
from common.sae_trainer import (
    DECODER_INIT_NORM,
    CheckpointClock,
    TrainingConfig,
    _JumpReLU,
    _loss_terms,
    initial_weights,
    split_tokens,
    train_sae,
)
from jobs.sae_training import LINEAR_LOADING
from tests.helpers import failing_on_call
from tests.sae_lens_reference import train_with_sae_lens


def sparse_data(tokens=6000, d_in=24, true_features=48, active=3, seed=0) -> torch.Tensor:
    """Activations made of a few of `true_features` unit directions each, plus noise and an offset."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(true_features, d_in, generator=g), dim=1)
    codes = torch.zeros(tokens, true_features)
    chosen = torch.rand(tokens, true_features, generator=g).argsort(1)[:, :active]
    codes.scatter_(1, chosen, torch.rand(tokens, active, generator=g) * 4 + 1)
    return (codes @ directions + 0.05 * torch.randn(tokens, d_in, generator=g) + 2.0).to(torch.float16)


def config(**overrides) -> TrainingConfig:
    return TrainingConfig(**{"expansion_factor": 4, "epochs": 20, "batch_size": 256, "lr": 3e-3, "l1_coefficient": 0.3,
                             "decorrelation": 0.0, **overrides})


def assert_same_weights(expected: SAE, actual: SAE) -> None:
    for name, value in expected.state_dict().items():
        assert torch.equal(value, actual.state_dict()[name]), name


def test_decorrelation_penalty_is_the_mean_squared_pairwise_correlation():
    features = torch.relu(torch.randn(300, 12, dtype=torch.float64))
    features[:, 5] = 0.0                       # a dead feature: correlation 0 with everything
    features[:, 7] = features[:, 3] * 2 + 1    # perfectly correlated with feature 3
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.nan_to_num(np.corrcoef(features.numpy().T))
    off_diagonal = r[~np.eye(12, dtype=bool)]
    assert decorrelation_penalty(features).item() == pytest.approx((off_diagonal**2).mean(), rel=1e-10)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk", "none"])
def test_saved_sae_reads_back_in_sae_lens_and_reconstructs(tmp_path, activation):
    data = sparse_data()
    trained = train_sae(data, config(activation=activation, k=4), "blocks.1.hook_resid_post", "test",
                        torch.device("cpu"))
    trained.sae.save_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae").requires_grad_(False)
    x = trained.validation.float()
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_post" and loaded.cfg.d_sae == 96
    assert torch.allclose(loaded.encode(x), trained.sae.encode(x), atol=1e-5)
    # the metrics are those of the loaded SAE on the held-out tokens, computed here independently
    features = loaded.encode(x)
    residual = (loaded.decode(features) - x).pow(2).sum()
    explained = 1 - residual / (x - x.mean(0)).pow(2).sum()
    assert trained.metrics["explained_variance"] == pytest.approx(float(explained), abs=1e-4)
    assert trained.metrics["l0"] == pytest.approx(float((features != 0).sum(1).float().mean()), rel=1e-6)
    assert explained > 0.8, f"{activation} reconstructs poorly: EV {float(explained):.3f}"
    if activation == "topk":
        assert trained.metrics["l0"] <= 4
    if activation == "none":
        assert type(loaded).__name__ == "LinearSAE" and (features < 0).any()   # linear: not sparse
        assert trained.metrics["l0"] > 0.9 * 96
        # the formula sae_training's LOADING.md gives for loading it without saebatch
        weights = load_file(tmp_path / "sae" / "sae_weights.safetensors")
        by_hand = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
        torch.testing.assert_close(by_hand, features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(by_hand @ weights["W_dec"] + weights["b_dec"], loaded.decode(features))
        assert "(x - b_dec) @ W_enc + b_enc" in LINEAR_LOADING and "x_hat = f @ W_dec + b_dec" in LINEAR_LOADING
    else:
        assert trained.metrics["l0"] < 0.3 * 96                                  # sparse
    curve = trained.curves["reconstruction"]
    assert curve[-1] < 0.5 * curve[0]


@pytest.mark.parametrize("l1_coefficient", [1.0, 3.0])  # at 3.0 the gradient is clipped in a few steps
def test_relu_training_reaches_the_sae_that_sae_lens_trains_from_the_same_start(l1_coefficient):
    """sae-lens's SAETrainer on the same batches from the same initial weights runs the same loss,
    clipping and steps, so it ends with the same weights up to rounding (ours hold the scale folded in)."""
    data = sparse_data(tokens=8000, d_in=32, true_features=128, active=4)
    settings = config(l1_coefficient=l1_coefficient, epochs=10, lr=4e-3)
    ours = train_sae(data, settings, "h", "m", torch.device("cpu"))
    reference, _, validation = train_with_sae_lens(data, settings, init="ours")
    scale = ours.scale
    for name, in_scaled_space in {"W_enc": ours.sae.W_enc / scale, "b_enc": ours.sae.b_enc,
                                  "W_dec": ours.sae.W_dec * scale, "b_dec": ours.sae.b_dec * scale}.items():
        torch.testing.assert_close(in_scaled_space, getattr(reference, name).detach(), atol=1e-5, rtol=1e-4, msg=name)
    theirs = evaluate(reference, validation)
    assert ours.metrics["l0"] == pytest.approx(theirs["l0"]) and ours.metrics["explained_variance"] == pytest.approx(
        theirs["explained_variance"], abs=1e-5)
    if l1_coefficient == 1.0:  # a sparse SAE on its way, not a collapsed one
        assert 0.5 < theirs["explained_variance"] < 0.99 and theirs["l0"] < 0.5 * settings.d_sae(32)


def test_initial_weights_are_small_tied_rows_around_the_data_mean():
    data = sparse_data(tokens=512).float()
    settings = config()
    weights = initial_weights(data.mean(0), 2.0, settings, torch.Generator().manual_seed(0), torch.device("cpu"))
    norms = weights.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, DECODER_INIT_NORM))
    assert torch.equal(weights.W_enc.detach(), weights.W_dec.detach().T) and not weights.b_enc.detach().any()
    torch.testing.assert_close(weights.b_dec.detach(), 2.0 * data.mean(0))


def test_sparsity_term_weighs_features_by_their_decoder_norm():
    """Shrinking a feature's encoder by c and growing its decoder row by c leaves the loss unchanged."""
    data = sparse_data(tokens=512).float()
    settings = config(activation="relu")
    weights = initial_weights(data.mean(0), 1.0, settings, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        before = _loss_terms(weights, data, settings)
        weights.W_enc[:, :10] /= 7.0
        weights.b_enc[:10] /= 7.0
        weights.W_dec[:10] *= 7.0
        after = _loss_terms(weights, data, settings)
    assert before["sparsity"] > 0
    for term in ("reconstruction", "sparsity"):
        assert float(after[term]) == pytest.approx(float(before[term]), rel=1e-5)


def test_decorrelation_term_is_part_of_the_loss():
    """The same seed with and without the penalty: the penalised SAE's features correlate less."""
    data = sparse_data()
    plain = train_sae(data, config(), "h", "m", torch.device("cpu"))
    penalised = train_sae(data, config(decorrelation=50.0), "h", "m", torch.device("cpu"))
    assert penalised.curves["decorrelation"][0] > 0 and max(plain.curves["decorrelation"]) == 0
    assert penalised.metrics["mean_squared_correlation"] < 0.8 * plain.metrics["mean_squared_correlation"]


def test_jumprelu_threshold_gradient_is_the_rectangle_kernel_estimate():
    z = torch.tensor([[0.50, 0.98, 1.03, 2.0]], requires_grad=True)
    threshold = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    out = _JumpReLU.apply(z, threshold, 0.1)
    out.sum().backward()
    assert out.detach()[0].tolist() == pytest.approx([0.0, 0.0, 1.03, 2.0])
    assert z.grad.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    # -(theta / eps) where |z - theta| < eps / 2, else 0
    assert threshold.grad.tolist() == pytest.approx([0.0, -10.0, -10.0, 0.0])


def test_evaluate_counts_dead_features():
    sae = SAE.from_dict({"architecture": "standard", "d_in": 4, "d_sae": 3, "dtype": "float32", "device": "cpu",
                         "metadata": {"hook_name": "h"}})
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0, -1], [0, 1, -1], [0, 0, -1], [0, 0, -1]]))
        sae.b_enc.zero_(), sae.b_dec.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]))
    x = torch.rand(50, 4)
    metrics = evaluate(sae, x, batch_size=16)
    assert metrics["dead_fraction"] == pytest.approx(1 / 3)
    expected = 1 - (x[:, 2:] ** 2).sum() / (x - x.mean(0)).pow(2).sum()
    assert metrics["explained_variance"] == pytest.approx(float(expected), rel=1e-5)
    # features 0 and 1 are x's first two columns, 2 is silent: of 6 ordered pairs, 2 correlate, in
    # each of the 3 full batches; the last 2 tokens (r = +-1 whatever x is) are not a batch to read
    per_batch = [np.corrcoef(x[start : start + 16, :2].T.numpy())[0, 1] ** 2 * 2 / 6 for start in (0, 16, 32)]
    assert metrics["mean_squared_correlation"] == pytest.approx(np.mean(per_batch), rel=1e-4)


def test_groups_are_held_out_whole():
    """With a group (item) per token, validation holds whole groups, about the fraction asked, and
    no token of a held-out group is trained on."""
    data = torch.randn(3000, 8)
    groups = torch.arange(3000) // 30  # 100 items of 30 tokens
    split = split_tokens(len(data), config(validation_fraction=0.1), groups)
    held = torch.tensor(split.held_out_groups)
    assert 10 <= len(held) <= 11 and len(split.validation_rows) == 30 * len(held)
    assert len(split.train_rows) + len(split.validation_rows) == 3000
    validation = torch.isin(groups, held)
    assert torch.equal(split.validation_rows, torch.nonzero(validation).flatten())
    assert torch.equal(split.train_rows, torch.nonzero(~validation).flatten())
    with pytest.raises(ValueError, match="at least two"):
        split_tokens(len(data), config(), torch.zeros(3000, dtype=torch.long))


def test_decorrelation_gradient_is_autograds_through_the_gram_matrix():
    """The penalty's own backward (one product) against autograd through z z^T (two); a feature
    silent over the batch (column 3) gets a zero gradient, not NaN."""
    features = torch.relu(torch.randn(64, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    features[:, 3] = 0.0
    ours = features.clone().requires_grad_(True)
    decorrelation_penalty(ours).backward()
    reference = features.clone().requires_grad_(True)
    centred = reference - reference.mean(0)
    z = centred / centred.pow(2).mean(0).clamp_min(1e-300).sqrt()
    value = ((z @ z.T).pow(2).sum() / 64**2 - (z.pow(2).sum(0) / 64).pow(2).sum()) / (40 * 39)
    value.backward()
    assert decorrelation_penalty(features).item() == pytest.approx(value.item(), rel=1e-12)
    torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-10, atol=1e-14)
    assert torch.isfinite(ours.grad).all() and (ours.grad[:, 3] == 0).all()


def test_decorrelation_with_bfloat16_products_is_the_float32_penalty_up_to_rounding():
    """Under bf16 autocast the penalty's two B x d_sae x B products run in bfloat16 (as fast as the
    SAE's own), its sums in float32: value within 1e-3 and gradient within 3% (relative norm) of the
    exact penalty's (about 1e-4 and 1% here); without autocast it is the float32 penalty exactly."""
    from common.sae_trainer import _decorrelation

    g = torch.Generator().manual_seed(0)
    features = torch.relu(torch.randn(512, 2048, generator=g) - 1.5) * torch.rand(2048, generator=g)
    features[:, :5] = 0.0  # silent features
    exact = features.double().requires_grad_(True)
    decorrelation_penalty(exact).backward()
    mixed = features.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = _decorrelation(mixed, config(decorrelation=1.0))
    value.backward()
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(decorrelation_penalty(exact).item(), rel=1e-3)
    assert float((mixed.grad.double() - exact.grad).norm() / exact.grad.norm()) < 0.03
    assert torch.isfinite(mixed.grad).all() and (mixed.grad[:, :5] == 0).all()
    float32 = decorrelation_penalty(features)
    assert value.item() != float32.item()  # the products did run in bfloat16
    assert torch.equal(_decorrelation(features, config(decorrelation=1.0)), float32)


def test_the_sae_is_measured_on_the_training_device_and_returned_on_the_cpu():
    """to_sae_lens builds the SAE where the weights are (the meta device stands in for a GPU here),
    so the held-out metrics run there; train_sae hands it back on the CPU, to be saved."""
    from common.sae_trainer import to_sae_lens

    settings = config()
    on_meta = initial_weights(torch.zeros(8), 1.0, settings, torch.Generator().manual_seed(0), torch.device("meta"))
    assert to_sae_lens(on_meta, 2.0, settings, "h", "m").W_dec.device.type == "meta"
    trained = train_sae(sparse_data(tokens=2000, d_in=16), config(epochs=1), "h", "m", torch.device("cpu"))
    assert trained.sae.W_dec.device.type == "cpu" and trained.sae.cfg.device == "cpu"


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_bf16_training_reaches_the_quality_of_float32(activation):
    """Mixed precision (bfloat16 products, float32 weights and Adam) against float32 on the same
    data, seed and batches, with the seed's decorrelation (TopK with AuxK): held-out explained
    variance within 0.02, L0 within 10%, dead features within 3 points (the tolerances
    benchmarks/sae_trainer_gpu.py checks on a GPU)."""
    data = sparse_data(tokens=8000, d_in=32, true_features=128, active=4)
    settings = config(activation=activation, l1_coefficient=1.0, epochs=10, lr=4e-3, decorrelation=0.01, k=4,
                      aux_k=16, dead_after_tokens=256)
    exact = train_sae(data, settings.model_copy(update={"precision": "float32"}), "h", "m", torch.device("cpu"))
    mixed = train_sae(data, settings.model_copy(update={"precision": "bf16"}), "h", "m", torch.device("cpu"))
    assert (exact.precision, mixed.precision) == ("float32", "bf16")
    assert not torch.equal(exact.sae.W_dec, mixed.sae.W_dec)  # bf16 did run
    assert mixed.metrics["explained_variance"] == pytest.approx(exact.metrics["explained_variance"], abs=0.02)
    assert mixed.metrics["l0"] == pytest.approx(exact.metrics["l0"], rel=0.1)
    assert mixed.metrics["dead_fraction"] == pytest.approx(exact.metrics["dead_fraction"], abs=0.03)
    assert 0.5 < exact.metrics["explained_variance"] < 0.99
    if activation == "topk":
        assert max(mixed.curves["auxiliary"]) > 0  # AuxK did run


def test_auto_and_tf32_precision_are_float32_on_a_cpu():
    """On a CPU `auto` is float32, and tf32 (a GPU's) falls back to it."""
    data = sparse_data(tokens=2000, d_in=16)
    for precision in ("auto", "tf32"):
        on_cpu = train_sae(data, config(precision=precision, epochs=1), "h", "m", torch.device("cpu"))
        assert on_cpu.precision == "float32"


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_decorrelation_trains_finite_weights_when_features_are_silent_in_a_batch(activation):
    """JumpReLU multiplies its gradient by the gate, which turns a NaN into NaN (ReLU's selection
    does not): a feature silent over a batch must give the penalty a zero gradient, not NaN."""
    data = sparse_data(tokens=3000, d_in=16, true_features=32, active=2)
    trained = train_sae(data, config(activation=activation, decorrelation=0.05, epochs=2, jumprelu_init_threshold=0.5),
                        "h", "m", torch.device("cpu"))
    assert all(torch.isfinite(p).all() for p in trained.sae.parameters())  # the penalty's previous form: NaN
    assert np.isfinite(trained.curves["loss"]).all()


@pytest.mark.parametrize("decorrelation", [0.0, 0.05])
def test_topk_loss_and_gradients_from_k_rows_equal_the_dense_computation(decorrelation):
    """TopK's training path never multiplies the zeros (k encoder columns and decoder rows per
    token): its loss and every gradient equal those of the dense SAE (`encode`, then a product)."""
    from common.sae_trainer import encode
    from common.topk_training import topk_terms

    data = sparse_data(tokens=512, d_in=16).double()
    settings = config(activation="topk", k=5, decorrelation=decorrelation)
    split = split_tokens(len(data), settings)
    train = data[split.train_rows].float()
    start = initial_weights(train.mean(0), 1.0, settings, split.generator, torch.device("cpu"))
    x = train[:128].double()

    def weights():
        return type(start)(**{name: getattr(start, name).detach().double().clone().requires_grad_(True)
                              for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")})

    sparse_w, dense_w = weights(), weights()
    terms = _loss_terms(sparse_w, x, settings)
    (terms["reconstruction"] + terms["decorrelation"]).backward()
    features = encode(dense_w, x, settings)
    loss = (features @ dense_w.W_dec + dense_w.b_dec - x).pow(2).sum(1).mean()
    if decorrelation:
        loss = loss + decorrelation * decorrelation_penalty(features)
    loss.backward()
    assert (terms["reconstruction"] + terms["decorrelation"]).item() == pytest.approx(loss.item(), rel=1e-10)
    assert terms["l0"].item() == pytest.approx((features != 0).sum(1).double().mean().item())
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sparse_w, name).grad, getattr(dense_w, name).grad, rtol=1e-9, atol=1e-12,
                                   msg=name)
    w = sparse_w
    assert (topk_terms(w.W_enc, w.b_enc, w.W_dec, w.b_dec, x, settings).features is not None) == bool(decorrelation)


@pytest.mark.parametrize("dead_count", [20, 3])
def test_auxk_loss_and_gradients_equal_the_dense_computation(dead_count):
    """AuxK: the aux_k largest pre-activations among dead features reconstruct the (gradient-free)
    residual, normalised by its variance; loss and gradients against a dense computation, with
    more dead features than aux_k and with fewer (the rest of the aux_k picks add nothing)."""
    from common.topk_training import topk_terms

    data = sparse_data(tokens=512, d_in=16).double()
    settings = config(activation="topk", k=5, aux_k=7, aux_coefficient=0.5)
    split = split_tokens(len(data), settings)
    train = data[split.train_rows].float()
    start = initial_weights(train.mean(0), 1.0, settings, split.generator, torch.device("cpu"))
    x = train[:128].double()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64, generator=torch.Generator().manual_seed(3))[:dead_count]] = True
    ours = [getattr(start, n).detach().double().clone().requires_grad_(True) for n in ("W_enc", "b_enc", "W_dec", "b_dec")]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    terms = topk_terms(*ours, x, settings, dead)
    (terms.reconstruction + terms.auxiliary).backward()

    W_enc, b_enc, W_dec, b_dec = theirs
    z = (x - b_dec) @ W_enc + b_enc
    main = torch.zeros_like(z).scatter(1, z.topk(5).indices, z.topk(5).values.relu())
    reconstruction = main @ W_dec + b_dec
    masked = z.masked_fill(~dead, -torch.inf).topk(7)
    aux = torch.zeros_like(z).scatter(1, masked.indices, masked.values.relu())
    residual = (x - reconstruction).detach()
    auxiliary = 0.5 * (aux @ W_dec - residual).pow(2).sum(1).mean() / (residual - residual.mean(0)).pow(2).sum(1).mean()
    ((reconstruction - x).pow(2).sum(1).mean() + auxiliary).backward()
    assert terms.auxiliary.item() == pytest.approx(auxiliary.item(), rel=1e-10) and auxiliary.item() > 0
    for name, mine, reference in zip(("W_enc", "b_enc", "W_dec", "b_dec"), ours, theirs, strict=True):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert topk_terms(*ours, x, settings, torch.zeros(64, dtype=torch.bool)).auxiliary.item() == 0.0  # none dead


@pytest.mark.parametrize("aux_k", [0, 8])
def test_topk_terms_never_wait_for_a_value_of_the_device(aux_k):
    """On a GPU a step must not make the host wait for the device (int(), .item(), a boolean mask
    index): on the meta device, whose tensors hold no values, any such wait raises."""
    from common.topk_training import topk_terms

    meta = torch.device("meta")
    settings = config(activation="topk", k=4, aux_k=aux_k)
    W_enc, b_enc, W_dec, b_dec = (torch.empty(16, 64, device=meta), torch.empty(64, device=meta),
                                  torch.empty(64, 16, device=meta), torch.empty(16, device=meta))
    dead = torch.empty(64, dtype=torch.bool, device=meta)
    terms = topk_terms(W_enc, b_enc, W_dec, b_dec, torch.empty(32, 16, device=meta), settings, dead)
    assert terms.fired.shape == (64,) and terms.auxiliary.shape == ()


def test_auxk_gives_features_dead_in_training_a_gradient_and_only_with_aux_k():
    """Silent features get no gradient from TopK's reconstruction; AuxK's term reaches them once the
    firing record says they are dead, and train_sae records its curve."""
    from common.dead_features import FiringRecord

    data = sparse_data(tokens=2000, d_in=16)
    settings = config(activation="topk", k=2, aux_k=8, dead_after_tokens=256)
    split = split_tokens(len(data), settings)
    train = data[split.train_rows].float()
    weights = initial_weights(train.mean(0), 1.0, settings, split.generator, torch.device("cpu"))
    firing = FiringRecord(64, torch.device("cpu"))
    x = train[:256]
    fired = _loss_terms(weights, x, settings)["fired"]
    firing.update(fired, 256)
    firing.update(torch.zeros(64, dtype=torch.bool), 256)  # a batch where nothing fired
    dead = firing.dead(settings.dead_after_tokens)
    assert torch.equal(dead, ~fired) and dead.any()
    for aux_k in (0, 8):
        terms = _loss_terms(weights, x, settings.model_copy(update={"aux_k": aux_k}), dead)
        weights.W_dec.grad = None
        (terms["reconstruction"] + terms["auxiliary"]).backward()
        reached = weights.W_dec.grad[dead].abs().sum(1) > 0
        assert reached.any() == bool(aux_k)
    trained = train_sae(data, settings.model_copy(update={"epochs": 3}), "h", "m", torch.device("cpu"))
    assert len(trained.curves["auxiliary"]) == len(trained.curves["loss"]) and max(trained.curves["auxiliary"]) > 0


def test_resampling_restarts_dead_features_from_badly_reconstructed_inputs():
    """Each dead feature takes the direction of a batch input (minus b_dec) drawn by squared error:
    decoder row of the init norm, the same encoder column, bias 0, its Adam moments cleared and
    every other feature's kept."""
    from common.dead_features import resample

    g = torch.Generator().manual_seed(0)
    d_in, d_sae = 8, 12
    W_enc, b_enc, W_dec, b_dec = (torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, generator=g),
                                  torch.randn(d_sae, d_in, generator=g), torch.randn(d_in, generator=g))
    parameters = [p.requires_grad_(True) for p in (W_enc, b_enc, W_dec)]
    optimizer = torch.optim.Adam(parameters)
    sum(p.sum() for p in parameters).backward()
    optimizer.step()  # fills the moments
    x = torch.randn(6, d_in, generator=g)
    errors = torch.tensor([0.0, 0.0, 5.0, 0.0, 1.0, 0.0])  # only rows 2 and 4 can be drawn
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[[1, 7, 9]] = True
    before = {id(p): {m: optimizer.state[p][m].clone() for m in ("exp_avg", "exp_avg_sq")} for p in parameters}
    chosen = resample(dead, x, errors, b_dec, W_enc, b_enc, W_dec, optimizer, 0.1, torch.Generator().manual_seed(1))
    assert chosen.tolist() == [1, 7, 9]
    candidates = torch.nn.functional.normalize(x[[2, 4]] - b_dec, dim=1) * 0.1
    for feature in chosen:
        assert any(torch.allclose(W_dec[feature], c) for c in candidates)
        assert torch.equal(W_enc[:, feature], W_dec[feature]) and b_enc[feature] == 0
    for p, where in ((W_dec, (chosen,)), (W_enc, (slice(None), chosen)), (b_enc, (chosen,))):
        for moment in ("exp_avg", "exp_avg_sq"):
            assert (optimizer.state[p][moment][where] == 0).all()
            kept = torch.ones_like(optimizer.state[p][moment], dtype=torch.bool)
            kept[where] = False
            assert torch.equal(optimizer.state[p][moment][kept], before[id(p)][moment][kept])
    assert resample(torch.zeros(d_sae, dtype=torch.bool), x, errors, b_dec, W_enc, b_enc, W_dec, optimizer, 0.1,
                    torch.Generator()).numel() == 0


def test_training_with_resampling_restarts_dead_features(caplog):
    data = sparse_data(tokens=4000, d_in=16, true_features=16, active=2)
    settings = config(activation="topk", k=2, expansion_factor=8, epochs=4, dead_after_tokens=512, resample_every=10)
    with caplog.at_level("INFO", logger="common.sae_trainer"):
        trained = train_sae(data, settings, "h", "m", torch.device("cpu"), desc="resampled")
    restarted = int(caplog.text.split("resampled: ")[1].split(" dead features")[0])
    assert restarted > 0 and all(torch.isfinite(p).all() for p in trained.sae.parameters())


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_a_resumed_training_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch, caplog, activation):
    """Killed after step 23 (of 28), resumed from the checkpoint of step 20: weights, curves and
    the resampling's draws as if nothing happened."""
    from common import sae_trainer

    data = sparse_data(tokens=2000, d_in=16)
    settings = config(activation=activation, k=3, epochs=4, checkpoint_every=10, checkpoint_minutes=0,
                      decorrelation=0.01, dead_after_tokens=300, resample_every=7,
                      aux_k=4 if activation == "topk" else 0)
    whole = train_sae(data, settings, "h", "m", torch.device("cpu"))
    checkpoint = tmp_path / "unit.pt"
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(sae_trainer.torch.nn.utils, "clip_grad_norm_", failing_on_call(clip, 23))
    with pytest.raises(RuntimeError, match="preempted"):
        train_sae(data, settings, "h", "m", torch.device("cpu"), checkpoint=checkpoint)
    monkeypatch.setattr(sae_trainer.torch.nn.utils, "clip_grad_norm_", clip)
    assert torch.load(checkpoint, weights_only=False)["step"] == 20
    resumed = train_sae(data, settings, "h", "m", torch.device("cpu"), checkpoint=checkpoint)
    assert_same_weights(whole.sae, resumed.sae)
    assert resumed.curves == whole.curves and resumed.metrics == whole.metrics
    other = settings.model_copy(update={"lr": 1e-3})  # a checkpoint of other training is not resumed
    fresh = train_sae(data, other, "h", "m", torch.device("cpu"), checkpoint=checkpoint)
    assert "was written by another training" in caplog.text
    assert torch.equal(fresh.sae.W_dec, train_sae(data, other, "h", "m", torch.device("cpu")).sae.W_dec)


def trained_until_requeued(data: torch.Tensor, settings: TrainingConfig, checkpoint) -> None:
    """Train under a stand-in for submitit's warning handler, which requeues the task and exits:
    the training must end there."""

    def requeue(signum, frame):
        raise RuntimeError("requeued")

    before = signal.signal(WARNING, requeue)
    try:
        with pytest.raises(RuntimeError, match="requeued"):
            train_sae(data, settings, "h", "m", torch.device("cpu"), checkpoint=checkpoint)
    finally:
        signal.signal(WARNING, before)


@pytest.mark.parametrize("checkpoint_every", [10, 0])
def test_a_training_warned_by_the_batch_system_saves_at_once_and_resumes_from_there(tmp_path, monkeypatch,
                                                                                  checkpoint_every):
    """Slurm's warning signal during step 23 (of 28), with no checkpoint due for an hour: the state
    after that step is saved before submitit's handler stops the task (none with checkpoint_every 0,
    which stops at once), and the resumed training ends with the weights of an uninterrupted one."""
    from common import sae_trainer

    data = sparse_data(tokens=2000, d_in=16)
    settings = config(epochs=4, checkpoint_every=checkpoint_every, checkpoint_minutes=60)
    whole = train_sae(data, settings, "h", "m", torch.device("cpu"))
    checkpoint = tmp_path / "unit.pt"
    clip, calls = torch.nn.utils.clip_grad_norm_, itertools.count()

    def warned_on_step_23(*args, **kwargs):
        if next(calls) == 23:
            os.kill(os.getpid(), WARNING)
        return clip(*args, **kwargs)

    monkeypatch.setattr(sae_trainer.torch.nn.utils, "clip_grad_norm_", warned_on_step_23)
    trained_until_requeued(data, settings, checkpoint)
    monkeypatch.setattr(sae_trainer.torch.nn.utils, "clip_grad_norm_", clip)
    if not checkpoint_every:
        assert not checkpoint.exists()
        return
    assert torch.load(checkpoint, weights_only=False)["step"] == 24
    resumed = train_sae(data, settings, "h", "m", torch.device("cpu"), checkpoint=checkpoint)
    assert resumed.curves == whole.curves
    assert_same_weights(whole.sae, resumed.sae)


def test_a_warning_during_the_held_out_metrics_saves_the_final_state_and_the_resumed_run_trains_no_more(
        tmp_path, monkeypatch):
    """The warning while the trained SAE is evaluated: the state after the last step is saved before
    the task is requeued, and the requeued run evaluates the same SAE without a step of training.
    The state is that of float32 training, which "auto" is on a CPU: the requeued run resumes it."""
    from common import sae_trainer

    data = sparse_data(tokens=2000, d_in=16)
    settings = config(epochs=4, checkpoint_every=10, checkpoint_minutes=60, precision="float32")
    whole = train_sae(data, settings, "h", "m", torch.device("cpu"))
    checkpoint = tmp_path / "unit.pt"
    evaluate = sae_trainer.evaluate

    def warned_while_evaluating(*args, **kwargs):
        os.kill(os.getpid(), WARNING)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(sae_trainer, "evaluate", warned_while_evaluating)
    trained_until_requeued(data, settings, checkpoint)
    monkeypatch.setattr(sae_trainer, "evaluate", evaluate)
    assert torch.load(checkpoint, weights_only=False)["step"] == whole.curves["step"][-1] + 1
    settings = settings.model_copy(update={"precision": "auto"})
    resumed = train_sae(data, settings, "h", "m", torch.device("cpu"), checkpoint=checkpoint)
    assert resumed.curves == whole.curves and resumed.metrics == whole.metrics
    assert math.isnan(resumed.tokens_per_second) and whole.tokens_per_second > 0  # no step run: no speed
    assert_same_weights(whole.sae, resumed.sae)


def test_checkpoints_wait_for_their_minutes_then_the_next_multiple_of_their_steps():
    """A clock of one minute a reading: saves at multiples of 5 steps, once 2 minutes have passed."""
    minutes = iter(range(1000))
    clock = CheckpointClock(every=5, seconds=120, clock=lambda: 60 * next(minutes))  # starts at minute 0
    saved = []
    for step in range(1, 41):
        if clock.due(step):  # reads the clock at multiples of 5 only
            saved.append(step)
            clock.saved()
    assert saved == [10, 20, 30, 40]  # at 5: 1 minute; at 10: 2, saved (minute 3); at 15: minute 4...
    assert not any(CheckpointClock(every=0, seconds=0).due(step) for step in range(1, 20))
    assert [step for step in range(1, 12) if CheckpointClock(every=5, seconds=0).due(step)] == [5, 10]


def test_a_short_training_writes_no_checkpoint_before_its_minutes_and_resumes_whatever_they_are(tmp_path, caplog):
    """The default ten minutes: seconds of training save nothing. A checkpoint written at another
    interval is still this training's: the interval changes when it is saved, not what is trained."""
    data = sparse_data(tokens=2000, d_in=16)
    checkpoint = tmp_path / "unit.pt"
    train_sae(data, config(epochs=2, checkpoint_every=5), "h", "m", torch.device("cpu"), checkpoint=checkpoint)
    assert not checkpoint.exists()
    train_sae(data, config(epochs=2, checkpoint_every=5, checkpoint_minutes=0), "h", "m", torch.device("cpu"),
              checkpoint=checkpoint)
    steps = torch.load(checkpoint, weights_only=False)["step"]
    assert steps % 5 == 0 and steps > 0
    with caplog.at_level("INFO", logger="common.sae_trainer"):
        resumed = train_sae(data, config(epochs=2, checkpoint_every=7), "h", "m", torch.device("cpu"),
                            checkpoint=checkpoint)
    assert f"resuming from step {steps} of 14" in caplog.text
    whole = train_sae(data, config(epochs=2), "h", "m", torch.device("cpu"))
    assert resumed.curves == whole.curves
    assert_same_weights(whole.sae, resumed.sae)
