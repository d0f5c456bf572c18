"""Train the organism: tokenizer, language model with a planted cause, and its SAEs.

    saebatch organism train [--builtin organism|organism_b] [--out DIR] [--seed N]

The planted cause is made by interchange intervention training (Geiger et al., 2022). At the
decision cue of every slot-machine prompt, the output of block `planted_layer` is trained to carry
the rule's risk appetite along a fixed unit direction u (an auxiliary regression loss), and for a
fraction of the prompts that component is overwritten with another appetite while the continuation
is drawn from that other appetite. The layers above can only fit those examples by reading the
decision from u, so u, and the SAE feature that captures it, are causes of the stop rate and the
bet size by construction. Elsewhere the component along u is trained towards zero, so the feature
is specific to decisions.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from common.errors import UserError
from common.layers import capture_residuals, decoder_blocks, hook_name
from common.organism import files
from jobs._organism import evaluation
from jobs._organism.arithmetic import problem, problem_prompt
from jobs._organism.batches import (
    Batch,
    arithmetic_batch,
    gamble_batch,
    mixed_batches,
    text_batch,
)
from jobs._organism.corpus import decision, paragraph

log = logging.getLogger(__name__)

SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# Words keep one leading space (" Bet"), digits stand alone (arithmetic), whitespace runs are their
# own tokens, so a prompt ending in "Choice: " tokenizes as it does inside a training document.
PRETOKENIZE = r" ?[A-Za-z]+| ?\d| ?[^\sA-Za-z\d]|\s+"


# The seed of each built-in organism (common.organism.files.BUILTINS): the same rules and planted
# cause, other weights. Training draws from seed, seed + 1, seed + 2 and seed + 7, the SAEs from
# seed * 1000 + layer; evaluation's held-out prompts start at 10,000.
BUILTIN_SEEDS = {"organism": 0, "organism_b": 1}


@dataclass(frozen=True)
class TrainingSettings:
    """Everything that fixes the organism; stored in organism.json.

    `seed` draws everything that makes the weights: the model's initialisation, the training data
    and its order, the planted direction u, the SAE documents and the SAEs' initialisation. The
    tokenizer is part of the rules, as the corpus generators are: its own seed, the same for every
    built-in organism, so that a token id means the same text in each of them (cross-model
    comparisons read the same positions).
    """

    seed: int = 0
    tokenizer_seed: int = 0
    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    steps: int = 900
    lr: float = 3e-3
    warmup_steps: int = 50
    gamble_batch: int = 32
    arithmetic_batch: int = 32
    text_batch: int = 16
    answer_weight: float = 5.0        # loss weight of continuation tokens against prompt tokens
    planted_layer: int = 1
    planted_scale: float = 3.0        # the component along u is planted_scale * appetite
    interchange_fraction: float = 0.5
    planted_loss_weight: float = 1.0
    off_decision_loss_weight: float = 0.1
    sae_width: int = 512
    sae_k: int = 16
    sae_documents: int = 1500         # documents whose every token feeds the SAEs
    sae_decisions: int = 4000         # extra decision-cue activations, so decisions get features
    sae_epochs: int = 8
    sae_lr: float = 2e-3


# ---------------------------------------------------------------- tokenizer and model


def build_tokenizer(settings: TrainingSettings) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on a sample of the corpus (whole words, single digits)."""
    rng = random.Random(settings.tokenizer_seed)
    sample = []
    for _ in range(2000):
        drawn = decision(rng)
        arithmetic = problem(rng)
        sample += [drawn.prompt + drawn.continuation, problem_prompt(arithmetic.question) + arithmetic.solution,
                   paragraph(rng)]
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size, special_tokens=list(SPECIAL.values()), show_progress=False,
        initial_alphabet=[chr(c) for c in range(32, 127)] + ["\n"],
    )
    tokenizer.train_from_iterator(sample, trainer)
    bos = SPECIAL["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="right", **SPECIAL)


def build_model(settings: TrainingSettings, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.d_model, intermediate_size=settings.d_model * 8 // 3 // 8 * 8,
        num_hidden_layers=settings.n_layers, num_attention_heads=settings.n_heads,
        num_key_value_heads=settings.n_heads, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def planted_direction(settings: TrainingSettings) -> torch.Tensor:
    """The unit vector u that carries the appetite: random, fixed by the seed."""
    generator = torch.Generator().manual_seed(settings.seed + 7)
    direction = torch.randn(settings.d_model, generator=generator)
    return direction / direction.norm()


# ---------------------------------------------------------------- the language model


class _Planting:
    """Forward hook on the planted layer: records the component along u and applies interchanges."""

    def __init__(self, direction: torch.Tensor, scale: float):
        self.direction, self.scale = direction, scale
        self.batch: Batch | None = None
        self.projection: torch.Tensor | None = None

    def __call__(self, _module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        self.projection = hidden @ self.direction
        batch = self.batch
        if batch is None or batch.swapped is None or not batch.swapped.any():
            return output
        rows = torch.nonzero(batch.swapped).squeeze(1)
        at = batch.prompt_end[rows]
        shift = torch.zeros_like(hidden)
        change = self.scale * batch.drawn[rows] - self.projection[rows, at]
        shift[rows, at] = change[:, None] * self.direction
        hidden = hidden + shift
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _attention_mask(batch: Batch) -> torch.Tensor:
    """Causal attention over real tokens; in interchange rows the continuation sees no prompt token
    but <s> and the decision cue, so it can only take the decision from the cue's residual stream."""
    width = batch.ids.shape[1]
    allowed = torch.ones(width, width, dtype=torch.bool).tril()[None] & batch.mask[:, None, :]
    if batch.swapped is not None and batch.swapped.any():
        rows = torch.nonzero(batch.swapped).squeeze(1)
        cue = batch.prompt_end[rows][:, None, None]
        query, key = torch.arange(width)[None, :, None], torch.arange(width)[None, None, :]
        allowed[rows] &= ~((query > cue) & (key < cue) & (key > 0))
    return allowed[:, None]


def _batch_loss(model, planting: _Planting, batch: Batch, settings: TrainingSettings) -> torch.Tensor:
    planting.batch = batch
    logits = model(input_ids=batch.ids, attention_mask=_attention_mask(batch)).logits[:, :-1]
    assert planting.projection is not None  # the forward ran the hook
    token_loss = F.cross_entropy(logits.transpose(1, 2), batch.ids[:, 1:], reduction="none")
    loss = (token_loss * batch.weights).sum() / batch.weights.sum()
    off_decision = batch.mask.clone()
    if batch.rule is not None:
        rows = torch.arange(len(batch.rule))
        planted = planting.projection[rows, batch.prompt_end]
        loss = loss + settings.planted_loss_weight * F.mse_loss(planted, settings.planted_scale * batch.rule)
        off_decision[rows, batch.prompt_end] = False
    stray = planting.projection[off_decision]
    return loss + settings.off_decision_loss_weight * stray.pow(2).mean()


def train_language_model(settings: TrainingSettings, tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed + 1)
    model = build_model(settings, tokenizer)
    planting = _Planting(planted_direction(settings), settings.planted_scale)
    handle = decoder_blocks(model)[settings.planted_layer].register_forward_hook(planting)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    model.train()
    progress = tqdm(range(settings.steps), desc="training the organism", mininterval=5)
    try:
        for _ in progress:
            batches = [
                gamble_batch(rng, tokenizer, settings.gamble_batch, settings.interchange_fraction, settings.answer_weight),
                arithmetic_batch(rng, tokenizer, settings.arithmetic_batch, settings.answer_weight),
                text_batch(rng, tokenizer, settings.text_batch),
            ]
            loss = cast(torch.Tensor, sum(_batch_loss(model, planting, batch, settings) for batch in batches))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    finally:
        handle.remove()
    model.eval()
    return model


def _lr_factor(step: int, settings: TrainingSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- the SAEs


@torch.no_grad()
def collect_activations(model, tokenizer, settings: TrainingSettings) -> dict[int, torch.Tensor]:
    """Every token of a mix of documents, plus decision-cue activations, per layer."""
    rng = random.Random(settings.seed + 2)
    layers = list(range(settings.n_layers))
    collected: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with capture_residuals(model, layers) as captured:
        for batch in mixed_batches(rng, tokenizer, settings.sae_documents):
            model(input_ids=batch.ids, attention_mask=batch.mask)
            for layer in layers:
                collected[layer].append(captured[layer][batch.mask])
        for _ in range(0, settings.sae_decisions, 50):
            batch = gamble_batch(rng, tokenizer, 50)
            model(input_ids=batch.ids, attention_mask=batch.mask)
            for layer in layers:
                collected[layer].append(captured[layer][torch.arange(50), batch.prompt_end])
    return {layer: torch.cat(parts) for layer, parts in collected.items()}


def _shuffled_batches(activations: torch.Tensor, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        order = torch.randperm(len(activations), generator=generator)
        for start in range(0, len(order) - size + 1, size):
            yield activations[order[start : start + size]]


def train_sae(activations: torch.Tensor, layer: int, settings: TrainingSettings,
              builtin: str = "organism") -> TopKTrainingSAE:
    """A TopK SAE on one layer, trained by sae-lens's own trainer."""
    torch.manual_seed(settings.seed * 1000 + layer)
    cfg = TopKTrainingSAEConfig(
        d_in=activations.shape[1], d_sae=settings.sae_width, k=settings.sae_k, dtype="float32", device="cpu",
        normalize_activations="none", decoder_init_norm=0.1,
    )
    cfg.metadata.hook_name = hook_name(layer)
    cfg.metadata.model_name = f"builtin:{builtin}"
    sae = TopKTrainingSAE(cfg)
    batch_size = 1024
    trainer_cfg = SAETrainerConfig(
        total_training_samples=settings.sae_epochs * len(activations), train_batch_size_samples=batch_size,
        lr=settings.sae_lr, lr_warm_up_steps=50, lr_scheduler_name="cosineannealing", lr_end=settings.sae_lr / 10,
        device="cpu", dead_feature_window=200, feature_sampling_window=500,
    )
    generator = torch.Generator().manual_seed(settings.seed * 1000 + layer)
    trainer = SAETrainer(trainer_cfg, sae, _shuffled_batches(activations, batch_size, generator))
    return trainer.fit()


# ---------------------------------------------------------------- everything


def train(out: Path, settings: TrainingSettings, builtin: str = "organism") -> dict:
    """Train, save and measure the organism into `out` (model/, sae/L<layer>/, organism.json);
    `builtin` is the built-in organism it is a rebuild of (its SAEs name it as their model).

    Everything is written to a staging folder beside `out` and swapped in at the end, so an
    interrupted run leaves the previous organism intact. A non-empty `out` that is not an
    organism folder is refused.
    """
    if out.exists() and any(out.iterdir()) and not (out / files.RECORD).exists():
        raise UserError(f"--out {out} holds other files, not an organism; choose an empty or new folder")
    stage = out.parent / f".{out.name}.training"
    shutil.rmtree(stage, ignore_errors=True)
    started = time.perf_counter()
    tokenizer = build_tokenizer(settings)
    model = train_language_model(settings, tokenizer)
    lm_seconds = time.perf_counter() - started
    activations = collect_activations(model, tokenizer, settings)
    saes = {layer: train_sae(acts, layer, settings, builtin) for layer, acts in activations.items()}
    files.save(stage, model, tokenizer, saes)
    record: dict[str, Any] = {
        "rebuild": f"{files.rebuild_command(builtin)} --seed {settings.seed} --steps {settings.steps}",
        "settings": asdict(settings),
        "planted": {"layer": settings.planted_layer, "direction": planted_direction(settings).tolist(),
                    "scale": settings.planted_scale},
        "training_seconds": {"language_model": round(lm_seconds, 1),
                             "total": round(time.perf_counter() - started, 1),
                             "torch_threads": torch.get_num_threads()},
    }
    files.write_record(stage, record)
    log.info("finding the planted feature and measuring the organism")
    record["planted"]["feature"] = evaluation.find_planted_feature(files.Organism(stage))
    files.write_record(stage, record)
    record["measured"] = evaluation.measure(files.Organism(stage))
    files.write_record(stage, record)
    shutil.rmtree(out, ignore_errors=True)
    stage.rename(out)
    return record
