"""Training an SAE on stored activations, with an optional decorrelation penalty, saved in sae-lens's format.

The SAE: f = act((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec, with act one of
relu, jumprelu (f = z * [z > theta], theta learned through the straight-through estimator of
Rajamanoharan et al. 2024 with a rectangle kernel of width `jumprelu_bandwidth`), topk (the k
largest pre-activations, then ReLU) or none (f = z: a linear autoencoder, not sparse; the seed's
"ReLU disabled" variant, reported as such).

The activations are streamed from storage a shuffle buffer at a time (common/activation_stream.py),
and the layers of one model can share one pass over them (`train_saes`).

Activations are scaled by one constant so that their mean squared norm is d_in (the L1
coefficient then means the same on every model); the constant is folded into the saved weights,
so the saved SAE takes raw activations. The loss of a batch of B scaled activations is

    L = mean_b ||x_b - x_hat_b||^2                          reconstruction
      + l1_coefficient * mean_b sum_i |f_bi| ||W_dec_i||    sparsity (not for topk, whose k sets it)
      + decorrelation * mean_{i != j} r_ij^2                decorrelation

The sparsity term weighs each feature by its decoder row's norm (as sae-lens's standard SAE and
Anthropic's April 2024 update do), so shrinking f while growing W_dec_i buys nothing and the
decoder norms stay free. r_ij is the Pearson correlation of features i and j over the batch's
tokens (0 for a feature constant over the batch), computed from the batch's B x B Gram matrix
(common/decorrelation.py), never the d_sae x d_sae one.

`precision` sets the matmuls': bf16 runs the loss under autocast (bfloat16 products, float32
weights, gradients and Adam state; the decorrelation term's two B x d_sae x B products in bfloat16,
its means and sums in float32), tf32 lets a GPU's tensor cores take float32 products, float32 is
exact. `auto` is bf16 on a GPU (Ampere or later) and float32 elsewhere; the held-out metrics are
always measured in float32, on the training device.

Initialisation and steps follow sae-lens: decoder rows of norm 0.1 in random directions, W_enc =
W_dec^T, b_enc = 0, Adam, and the gradient's norm clipped to 1. From unit-norm rows instead, the
first reconstructions are many times the data, and the huge first gradients fill Adam's second
moment, which then shrinks every later step for hundreds of steps:
on benchmarks/sae_trainer_throughput.py's data (60,000 tokens, 2 epochs) such a start gave an SAE
that never left the data mean (explained variance 0.01), and clipping alone rescued it (0.52).
tests/common/test_sae_trainer.py checks that sae-lens's own trainer, run on the same batches from the
same weights, reaches the same SAE.
Two departures from sae-lens: b_dec starts at the data mean (from sae-lens's b_dec = 0 the same
benchmark ended with 46% dead features), and topk picks the k largest pre-activations as they are
(sae-lens's TopK by default ranks them scaled by the decoder norms; tried here by keeping the rows
at unit norm, that ranking left 18% and 11% of the features dead on the demo's organism layers
against 6% and 1%, at about the same explained variance). TopK trains from its k features per
token, with AuxK if `aux_k` is set (common/topk_training.py); dead features can also be restarted
every `resample_every` steps (common/dead_features.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from sae_lens import SAE
from tqdm import tqdm

import common.linear_sae  # noqa: F401 (registers "linear": to_sae_lens builds it)
from common.activation_stream import (
    Batches,
    DataOrder,
    Source,
    read_rows,
    training_moments,
)
from common.dead_features import FiringRecord, resample
from common.decorrelation import decorrelation_penalty
from common.lazy import no_grad
from common.preemption import HeldWarning
from common.sae_quality import evaluate
from common.sae_settings import Activation, Precision, TrainingConfig
from common.topk_training import topk_terms

log = logging.getLogger(__name__)
DECODER_INIT_NORM = 0.1
CURVES = ("step", "reconstruction", "sparsity", "decorrelation", "auxiliary", "loss", "l0")
WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
MAX_GRAD_NORM = 1.0
SAE_LENS_ARCHITECTURE = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk", "none": "linear"}


class _JumpReLU(torch.autograd.Function):
    """z * [z > theta]; d/dtheta through the rectangle-kernel pseudo-derivative -(theta/eps) K((z-theta)/eps)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, threshold = ctx.saved_tensors
        near = ((z - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_threshold = (grad * -(threshold / ctx.bandwidth) * near).sum(0)
        return grad * (z > threshold), grad_threshold, None


@dataclass
class Weights:
    """The parameters in the scaled space, trained in place."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor

    def parameters(self, activation: Activation) -> list[torch.Tensor]:
        chosen = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        return chosen + [self.threshold] if activation == "jumprelu" else chosen


def encode(w: Weights, x: torch.Tensor, config: TrainingConfig) -> torch.Tensor:
    z = (x - w.b_dec) @ w.W_enc + w.b_enc
    if config.activation == "relu":
        return torch.relu(z)
    if config.activation == "jumprelu":
        return _JumpReLU.apply(z, w.threshold, config.jumprelu_bandwidth)
    if config.activation == "topk":
        values, indices = torch.topk(z, config.k, dim=-1)
        return torch.zeros_like(z).scatter(-1, indices, values.relu())
    return z


@dataclass
class TrainedSae:
    sae: SAE                                   # sae-lens SAE on raw activations (scale folded in)
    curves: dict[str, list[float]]             # step, the loss and its terms (auxiliary: AuxK), l0
    metrics: dict[str, float]                  # on the held-out tokens, see `evaluate`
    tokens_per_second: float                   # per SAE (n layers in a pass: n x its tokens); nan: no step run here
    scale: float                               # the activations' scaling constant
    validation: torch.Tensor = field(repr=False)  # the held-out raw activations
    precision: Precision = "float32"           # the matmuls' precision it was trained at
    held_out_groups: list[int] = field(default_factory=list)  # with `groups`: the groups never trained on


@dataclass
class LayerToTrain:
    """One SAE of a pass: its activations, the hook it reads, and where its checkpoint goes."""

    activations: Source          # (tokens, d_in): an HDF5 dataset streamed a buffer at a time, or a tensor
    hook_name: str
    checkpoint: Path | None = None


def train_sae(activations: Source, config: TrainingConfig, hook_name: str, model_name: str,
              device: torch.device, desc: str = "SAE", groups: torch.Tensor | None = None,
              checkpoint: Path | None = None) -> TrainedSae:
    """Train on `activations` (tokens, d_in), any dtype; the held-out tokens are chosen by the seed,
    whole groups at a time when `groups` (a group id per token: its item or document) is given.

    With `checkpoint`, the training state is saved there (`CheckpointClock` says when, and at once
    when the batch system warns that it will stop the task: common/preemption.py), and a run
    that finds one resumes from it, ending with the weights an uninterrupted run ends with (the
    caller removes it once the SAE is stored)."""
    return train_saes([LayerToTrain(activations, hook_name, checkpoint)], config, model_name, device, desc, groups)[0]


def train_saes(layers: list[LayerToTrain], config: TrainingConfig, model_name: str, device: torch.device,
               desc: str = "SAE", groups: torch.Tensor | None = None, save_at_end: bool = False) -> list[TrainedSae]:
    """Train one SAE per layer in one pass over their activations, which share tokens (the layers
    of one model): one split, one batch order, each buffer of rows read once. Each SAE starts from
    the weights it would draw alone, so it ends as if trained alone.

    `save_at_end`: save the final state to the checkpoints too, for a caller with long work left
    before the SAEs are stored (the CE loss): a warning during it then resumes without training."""
    split = split_tokens(len(layers[0].activations), config, groups)
    order = DataOrder(split.train_rows, config.batch_size, config.epochs, config.shuffle_buffer_tokens)
    drawn_from = split.generator.get_state()
    states, scales = [], []
    for layer in layers:
        split.generator.set_state(drawn_from)  # every SAE draws its start as if trained alone
        state, scale = _start(layer, split, order, config, device, _label(desc, layer, layers))
        states.append(state)
        scales.append(scale)
    precision = resolved_precision(config.precision, device)
    first_step = min(state.step for state in states)
    batches = Batches([layer.activations for layer in layers], order, split.generator, first_step, device, scales)
    checkpoints = CheckpointClock(config.checkpoint_every, 60 * config.checkpoint_minutes)
    started = time.perf_counter()
    # the evaluation after the loop is a safe point too: a warning there saves the final state
    with HeldWarning(lambda: _save_all(states, config)) as warning:
        with tqdm(total=order.steps, initial=first_step, desc=desc, unit="step") as progress, \
                tf32_products(precision == "tf32"):
            for step, xs in batches:
                saving = checkpoints.due(step + 1)
                for state, x in zip(states, xs, strict=True):
                    if step < state.step:
                        continue  # done before this SAE's checkpoint
                    state.train_step(x, config, precision)
                    if saving:
                        state.save()
                if saving:
                    checkpoints.saved()
                shown = states[0].curves
                progress.set_postfix(loss=f"{shown['loss'][-1]:.3g}", l0=f"{shown['l0'][-1]:.1f}", refresh=False)
                progress.update()
                warning.at_safe_point()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        steps_run = order.steps - first_step  # none when resumed from the last step's state: no speed measured
        seconds = time.perf_counter() - started
        if save_at_end and steps_run:
            _save_all(states, config)
        tokens_per_second = steps_run * config.batch_size * len(layers) / seconds if steps_run else math.nan
        trained = []
        for layer, state, scale in zip(layers, states, scales, strict=True):
            if config.resample_every:
                log.info("%s: %d dead features restarted over %d steps", _label(desc, layer, layers), state.restarted,
                         state.total_steps)
            sae = to_sae_lens(state.weights, scale, config, layer.hook_name, model_name)  # on the training device
            validation = read_rows(layer.activations, split.validation_rows)
            metrics = evaluate(sae, validation, config.batch_size)
            trained.append(TrainedSae(sae.to("cpu"), state.curves, metrics, tokens_per_second, scale, validation,
                                      precision, split.held_out_groups))
            warning.at_safe_point()  # saving soon after the warning: the kill follows it (90 s under submitit)
    return trained


def _save_all(states: list[TrainingState], config: TrainingConfig) -> None:
    if config.checkpoint_every:  # 0: no checkpoints, not even at the batch system's warning
        for state in states:
            state.save()


@dataclass
class CheckpointClock:
    """When training state is saved: at a multiple of `every` steps once `seconds` have passed
    since the last save (or the start). On a GPU, 500 steps of a 32k SAE on d_in 4096 take some
    ten seconds, and its checkpoint (weights and Adam state, 3 GB) seconds to write."""

    every: int
    seconds: float
    clock: Callable[[], float] = time.monotonic
    last: float = field(init=False)

    def __post_init__(self) -> None:
        self.last = self.clock()

    def due(self, steps_done: int) -> bool:
        """Whether to save once `steps_done` steps are done."""
        return bool(self.every) and steps_done % self.every == 0 and self.clock() - self.last >= self.seconds

    def saved(self) -> None:
        """Count the next interval from now."""
        self.last = self.clock()


def _start(layer: LayerToTrain, split: Split, order: DataOrder, config: TrainingConfig, device: torch.device,
           label: str) -> tuple[TrainingState, float]:
    """A layer's training state, resumed from its checkpoint if one of this training is there, and
    its activations' scaling constant."""
    mean, mean_square = training_moments(layer.activations, split.train_rows)
    scale = math.sqrt(len(mean) / mean_square)
    state = TrainingState.start(initial_weights(mean, scale, config, split.generator, device), config, order.steps,
                                device)
    state.checkpoint = layer.checkpoint
    # when checkpoints are written does not change the weights: a checkpoint outlives a change of it
    trained_by = config.model_dump(mode="json", exclude={"checkpoint_every", "checkpoint_minutes"})
    trained_by["precision"] = resolved_precision(config.precision, device)  # "auto" is another on another device
    state.fingerprint = json.dumps([trained_by, len(split.train_rows), len(mean), scale, layer.hook_name])
    if state.resume():
        log.info("%s: resuming from step %d of %d (%s)", label, state.step, order.steps, layer.checkpoint)
    return state, scale


def _label(desc: str, layer: LayerToTrain, layers: list[LayerToTrain]) -> str:
    return desc if len(layers) == 1 else f"{desc} {layer.hook_name}"


@dataclass
class TrainingState:
    """What a training run carries from step to step, and what a checkpoint holds."""

    weights: Weights
    optimizer: torch.optim.Adam
    schedule: torch.optim.lr_scheduler.LambdaLR
    firing: FiringRecord
    restarts: torch.Generator        # resampling's own stream: the batch order stays the seed's
    total_steps: int
    curves: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in CURVES})
    restarted: int = 0
    step: int = 0                    # steps done
    checkpoint: Path | None = None   # where the state is saved (None: nowhere)
    saved_step: int = -1             # the step its checkpoint holds (none is written twice)
    fingerprint: str = ""            # the training's settings and data, which a checkpoint must match

    @classmethod
    def start(cls, weights: Weights, config: TrainingConfig, total_steps: int, device: torch.device) -> TrainingState:
        optimizer = torch.optim.Adam(weights.parameters(config.activation), lr=config.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, total_steps))
        return cls(weights, optimizer, schedule, FiringRecord(weights.W_dec.shape[0], device),
                   torch.Generator().manual_seed(config.seed + 1), total_steps)

    def train_step(self, x: torch.Tensor, config: TrainingConfig, precision: Precision) -> None:
        """One step on the scaled batch `x`."""
        w, parameters = self.weights, self.weights.parameters(config.activation)
        dead = self.firing.dead(config.dead_after_tokens) if config.aux_k else None
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):  # the forward only
            terms = _loss_terms(w, x, config, dead)
        self.firing.update(terms.pop("fired"), len(x))
        loss = terms["reconstruction"] + terms["sparsity"] + terms["decorrelation"] + terms["auxiliary"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        self.optimizer.step()
        self.schedule.step()
        if config.activation == "jumprelu":
            with torch.no_grad():
                w.threshold.clamp_(min=0)
        if config.resample_every and (self.step + 1) % config.resample_every == 0:
            self.restarted += _restart_dead(w, x, config, self.optimizer, self.firing, self.restarts)
        if self.step % config.log_every == 0 or self.step == self.total_steps - 1:
            logged: dict[str, int | torch.Tensor] = {"step": self.step, "loss": loss, **terms}
            for name, value in logged.items():
                self.curves[name].append(float(value.detach()) if torch.is_tensor(value) else float(value))
        self.step += 1

    def save(self) -> None:
        """Write the state to its checkpoint, if it has one, at once (a temporary file, then a rename)."""
        path = self.checkpoint
        if path is None or self.saved_step == self.step:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.partial")
        torch.save({"fingerprint": self.fingerprint, "step": self.step, "restarted": self.restarted,
                    "curves": self.curves,
                    "weights": {name: getattr(self.weights, name).detach().cpu() for name in WEIGHT_NAMES},
                    "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                    "last_fired": self.firing.last_fired.cpu(), "seen": self.firing.seen,
                    "restarts": self.restarts.get_state()}, temporary)
        os.replace(temporary, path)
        self.saved_step = self.step

    def resume(self) -> bool:
        """Continue from its checkpoint; False when there is none or another training wrote it."""
        path = self.checkpoint
        if path is None or not path.exists():
            return False
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved["fingerprint"] != self.fingerprint:
            log.warning("%s was written by another training (its settings or data differ): starting over", path)
            return False
        with torch.no_grad():
            for name in WEIGHT_NAMES:
                getattr(self.weights, name).copy_(saved["weights"][name])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        self.firing.last_fired = saved["last_fired"].to(self.firing.last_fired.device)
        self.firing.seen = saved["seen"]
        self.restarts.set_state(saved["restarts"])
        self.step, self.restarted, self.curves = saved["step"], saved["restarted"], saved["curves"]
        self.saved_step = self.step
        return True


def resolved_precision(precision: Precision, device: torch.device) -> Precision:
    """`auto` made concrete: bf16 on a GPU with bf16 tensor cores (Ampere, compute capability 8, and
    later; an older one emulates bf16, slower than float32), float32 elsewhere; tf32 exists on GPUs only."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 else "float32"
    if precision == "tf32" and device.type != "cuda":
        log.warning("precision tf32 is a GPU's: training in float32 on %s", device)
        return "float32"
    return precision


@contextmanager
def tf32_products(enabled: bool) -> Iterator[None]:
    """A GPU's float32 products inside run on its tensor cores (TF32), forward and backward."""
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled or allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


@dataclass
class Split:
    """The seed's choice of tokens: held out for the metrics, or trained on (positions in the source)."""

    held_out: torch.Tensor       # bool per token
    generator: torch.Generator   # draws next the initial weights, then the batch order
    held_out_groups: list[int] = field(default_factory=list)

    @cached_property
    def train_rows(self) -> torch.Tensor:
        return torch.nonzero(~self.held_out).flatten()

    @cached_property
    def validation_rows(self) -> torch.Tensor:
        return torch.nonzero(self.held_out).flatten()


def split_tokens(tokens: int, config: TrainingConfig, groups: torch.Tensor | None = None) -> Split:
    """Held-out and training tokens of `tokens` drawn by the seed's generator, which the caller then
    hands to `initial_weights` and the batch order (common/activation_stream.py), in that order:
    the same seed, the same SAE.

    With `groups`, whole groups are held out (in the seed's order, until they hold
    `validation_fraction` of the tokens): tokens of one item are alike, so a token split would
    measure the SAE on items it was trained on."""
    generator = torch.Generator().manual_seed(config.seed)
    held_out = torch.zeros(tokens, dtype=torch.bool)
    if groups is None:
        order = torch.randperm(tokens, generator=generator)
        held_out[order[: max(1, int(tokens * config.validation_fraction))]] = True
        split = Split(held_out, generator)
    else:
        names, counts = torch.unique(groups, return_counts=True)
        if len(names) < 2:
            raise ValueError(f"{len(names)} group(s) of tokens: holding whole groups out needs at least two")
        order = torch.randperm(len(names), generator=generator)
        enough = int(torch.searchsorted(counts[order].cumsum(0), tokens * config.validation_fraction)) + 1
        held = names[order[:min(enough, len(names) - 1)]]
        split = Split(torch.isin(groups, held), generator, sorted(held.tolist()))
    training = tokens - int(split.held_out.sum())
    if training < config.batch_size:
        raise ValueError(f"{training} training tokens, fewer than one batch of {config.batch_size}")
    return split


def initial_weights(mean: torch.Tensor, scale: float, config: TrainingConfig, generator: torch.Generator,
                    device: torch.device) -> Weights:
    """Random decoder rows of norm DECODER_INIT_NORM, encoder = decoder transposed, b_dec = the
    training data's `mean` row (all in the space scaled by `scale`)."""
    d_in = len(mean)
    d_sae = config.d_sae(d_in)
    W_dec = torch.randn(d_sae, d_in, generator=generator)
    W_dec *= DECODER_INIT_NORM / W_dec.norm(dim=1, keepdim=True)
    weights = Weights(W_enc=W_dec.T.clone(), b_enc=torch.zeros(d_sae), W_dec=W_dec,
                      b_dec=(mean * scale).float(),
                      threshold=torch.full((d_sae,), config.jumprelu_init_threshold))
    for name in WEIGHT_NAMES:
        setattr(weights, name, getattr(weights, name).to(device).requires_grad_(True))
    return weights


def _loss_terms(w: Weights, x: torch.Tensor, config: TrainingConfig,
                dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The loss's terms on the scaled batch `x`, with L0 and which features fired; `dead` marks the
    features that AuxK (topk with aux_k) asks to reconstruct the residual."""
    if config.activation == "topk":
        topk = topk_terms(w.W_enc, w.b_enc, w.W_dec, w.b_dec, x, config, dead)
        decorrelation = _decorrelation(topk.features, config) if topk.features is not None else x.new_zeros(())
        return {"reconstruction": topk.reconstruction, "sparsity": x.new_zeros(()), "decorrelation": decorrelation,
                "auxiliary": topk.auxiliary, "l0": topk.l0, "fired": topk.fired}
    features = encode(w, x, config)
    reconstruction = (features @ w.W_dec + w.b_dec - x).pow(2).sum(1).mean()
    l1 = config.l1_coefficient
    sparsity = l1 * (features.abs() * w.W_dec.norm(dim=1)).sum(1).mean() if l1 else x.new_zeros(())
    decorrelation = _decorrelation(features, config) if config.decorrelation else x.new_zeros(())
    return {"reconstruction": reconstruction, "sparsity": sparsity, "decorrelation": decorrelation,
            "auxiliary": x.new_zeros(()), "l0": (features != 0).sum(1).float().mean().detach(),
            "fired": (features != 0).any(0)}


def _restart_dead(w: Weights, x: torch.Tensor, config: TrainingConfig, optimizer: torch.optim.Optimizer,
                  firing: FiringRecord, generator: torch.Generator) -> int:
    """Resample the features dead now from the batch `x` (common/dead_features.py); they count as
    just fired, so that they get `dead_after_tokens` to show what they became."""
    with torch.no_grad():
        errors = (encode(w, x, config) @ w.W_dec + w.b_dec - x).pow(2).sum(1)
    threshold = (w.threshold, config.jumprelu_init_threshold) if config.activation == "jumprelu" else None
    chosen = resample(firing.dead(config.dead_after_tokens), x, errors, w.b_dec, w.W_enc, w.b_enc, w.W_dec, optimizer,
                      DECODER_INIT_NORM, generator, threshold)
    firing.last_fired[chosen] = firing.seen
    return len(chosen)


def _decorrelation(features: torch.Tensor, config: TrainingConfig) -> torch.Tensor:
    """The weighted penalty in float32, a sum of B^2 squares; under autocast its two B x d_sae x B
    products (its cost) run in autocast's dtype, as the SAE's own do."""
    device = features.device.type
    products = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    with torch.autocast(device, enabled=False):
        float32_features = features.to(torch.promote_types(features.dtype, torch.float32))
        return config.decorrelation * decorrelation_penalty(float32_features, products)


def _lr_factor(step: int, total: int) -> float:
    """The learning rate's factor: linear warm-up over 1% of the steps, linear decay to 0 over the last 20%."""
    warmup, decay_from = max(1, total // 100), int(total * 0.8)
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_from:
        return max(0.0, (total - step) / max(1, total - decay_from))
    return 1.0


@no_grad
def to_sae_lens(w: Weights, scale: float, config: TrainingConfig, hook_name: str, model_name: str) -> SAE:
    """The sae-lens SAE of these weights on raw activations: x -> scale * x folded into W_enc,
    and the decoder's output divided by scale. It is on the weights' device, so that the held-out
    metrics are computed there (the caller moves it to the CPU)."""
    architecture = SAE_LENS_ARCHITECTURE[config.activation]
    d_in = w.W_enc.shape[0]
    cfg = {"architecture": architecture, "d_in": d_in, "d_sae": config.d_sae(d_in), "dtype": "float32",
           "device": str(w.W_enc.device), "apply_b_dec_to_input": True,
           "metadata": {"hook_name": hook_name, "model_name": model_name}}
    if architecture == "topk":
        cfg["k"] = config.k
    sae = SAE.from_dict(cfg)
    state = {"W_enc": w.W_enc * scale, "b_enc": w.b_enc, "W_dec": w.W_dec / scale, "b_dec": w.b_dec / scale}
    if architecture == "jumprelu":
        state["threshold"] = w.threshold
    sae.load_state_dict({name: value.detach().float() for name, value in state.items()})
    sae.eval()
    return sae
