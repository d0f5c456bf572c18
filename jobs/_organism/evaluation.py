"""What the organism does, measured on held-out prompts: the figures organism.json states.

Held-out prompts come from seeds that training never uses (training draws from seed, seed + 1
and seed + 2 of its settings; these start at 10,000).
"""

from __future__ import annotations

import random
import re
from contextlib import nullcontext
from typing import cast

import numpy as np
import torch
from scipy import stats

from common.edits import Edit, edit_prompt_position, set_feature
from common.layers import capture_residuals
from common.organism.files import Organism
from jobs import _slot_machine as slot_machine
from jobs._organism.arithmetic import problem, problem_prompt
from jobs._organism.batches import mixed_batches
from jobs._organism.corpus import random_state
from jobs._organism.rule import risk, typical_bet

HELD_OUT_SEED = 10_000
BET_PREFIX = "1) Bet $"
NOT_MEASURED = float("nan")  # a figure the model gives nothing to measure from (it wrote no amount)


def held_out_states(n: int, seed: int = HELD_OUT_SEED, bet_type: str | None = None) -> list[slot_machine.GameState]:
    rng = random.Random(seed)
    states: list[slot_machine.GameState] = []
    while len(states) < n:
        state = random_state(rng)
        if bet_type in (None, state.bet_type):
            states.append(state)
    return states


def _left_padded(tokenizer, texts: list[str], suffix: str = "") -> dict[str, torch.Tensor]:
    """A left-padded batch; `suffix` is tokenized on its own, as continuations were in training."""
    tail = tokenizer(suffix, add_special_tokens=False).input_ids if suffix else []
    rows = [ids + tail for ids in tokenizer(texts).input_ids]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


@torch.no_grad()
def bet_probability(model, tokenizer, prompts: list[str], layer: int | None = None, edit: Edit | None = None,
                    batch_size: int = 100) -> torch.Tensor:
    """P(bet) per prompt: the next-token probability of "1" against "2" after the decision cue."""
    bet, stop = tokenizer.convert_tokens_to_ids(["1", "2"])
    chunks = []
    for start in range(0, len(prompts), batch_size):
        inputs = _left_padded(tokenizer, prompts[start : start + batch_size])
        with edit_prompt_position(model, cast(int, layer), edit) if edit else nullcontext():  # an edit has a layer
            logits = model(**inputs).logits[:, -1]
        chunks.append(torch.softmax(logits[:, [bet, stop]].float(), dim=-1)[:, 0])
    return torch.cat(chunks)


@torch.no_grad()
def greedy_bets(model, tokenizer, prompts: list[str], layer: int | None = None, edit: Edit | None = None) -> list[int | None]:
    """The amount the model writes after "1) Bet $" (greedy), edited at the decision cue if asked."""
    suffix_tokens = len(tokenizer(BET_PREFIX, add_special_tokens=False).input_ids)
    inputs = _left_padded(tokenizer, prompts, suffix=BET_PREFIX)
    inputs.pop("position_ids")  # generate derives them from the mask
    with edit_prompt_position(model, cast(int, layer), edit, offset=-1 - suffix_tokens) if edit else nullcontext():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [int(m[1]) if (m := re.match(r"(\d+)", text)) else None for text in texts]


def decision_rule(model, tokenizer, n: int = 400) -> dict:
    """How closely P(bet) follows the rule's appetite; majority agreement where the rule is clear."""
    states = held_out_states(n)
    rule = torch.tensor([risk(s) for s in states])
    predicted = bet_probability(model, tokenizer, [slot_machine.prompt(s) for s in states])
    clear = (rule - 0.5).abs() >= 0.2
    return {
        "prompts": n,
        "mean_abs_error": round(float((predicted - rule).abs().mean()), 4),
        "correlation": round(float(np.corrcoef(predicted, rule)[0, 1]), 4),
        "majority_agreement": round(float(((predicted > 0.5) == (rule > 0.5))[clear].float().mean()), 4),
        "clear_prompts": int(clear.sum()),
    }


def rule_bet(state: slot_machine.GameState) -> int:
    """The rule's most likely variable bet (its mean, rounded to $5 and capped)."""
    return max(5, min(5 * round(typical_bet(risk(state)) / 5), 100, state.balance))


def bet_sizes(model, tokenizer, n: int = 200) -> dict:
    """The model's greedy bet against the rule's most likely bet, on variable-bet prompts."""
    states = held_out_states(n, seed=HELD_OUT_SEED + 1, bet_type="variable")
    bets = greedy_bets(model, tokenizer, [slot_machine.prompt(s) for s in states])
    pairs = [(bet, rule_bet(s)) for bet, s in zip(bets, states, strict=True) if bet is not None]
    figures = {"prompts": n, "unreadable": n - len(pairs), "mean_abs_error_dollars": NOT_MEASURED, "spearman": NOT_MEASURED}
    if len(pairs) >= 2:  # a barely trained model may write no amount at all
        written, rule = np.array(pairs, dtype=float).T
        figures["mean_abs_error_dollars"] = round(float(np.abs(written - rule).mean()), 2)
        figures["spearman"] = round(float(stats.spearmanr(written, rule).statistic), 4)
    return figures


def _mean_bet(bets: list[int | None]) -> float:
    written = [b for b in bets if b is not None]
    return round(float(np.mean(written)), 2) if written else NOT_MEASURED


@torch.no_grad()
def arithmetic(model, tokenizer, n: int = 200) -> dict:
    """Exact-match accuracy of the "#### N" answer, greedy decoding, held-out problems."""
    rng = random.Random(HELD_OUT_SEED + 2)
    problems = [problem(rng) for _ in range(n)]
    inputs = _left_padded(tokenizer, [problem_prompt(p.question) for p in problems])
    inputs.pop("position_ids")
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    answers = [re.search(r"#### (\d+)", text) for text in texts]
    correct = [m is not None and int(m[1]) == p.answer for p, m in zip(problems, answers, strict=True)]
    return {"problems": n, "accuracy": round(float(np.mean(correct)), 4)}


@torch.no_grad()
def decision_activations(model, tokenizer, layer: int, n: int = 400,
                         seed: int = HELD_OUT_SEED + 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals at the decision cue of held-out prompts, and the rule's appetite for each."""
    states = held_out_states(n, seed=seed)
    with capture_residuals(model, [layer]) as captured:
        model(**_left_padded(tokenizer, [slot_machine.prompt(s) for s in states]))
    return captured[layer][:, -1], torch.tensor([risk(s) for s in states])


def find_planted_feature(organism: Organism) -> dict:
    """The planted layer's SAE feature whose decoder direction is closest to u.

    Also records its activation means over clearly safe (appetite < 0.3) and clearly risky
    (> 0.7) decisions, the values the planted-cause edit sets it to.
    """
    layer = organism.planted_layer
    sae, model, tokenizer = organism.sae(layer), organism.model(), organism.tokenizer()
    decoder = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    cosines = decoder @ organism.direction
    index = int(cosines.argmax())
    residuals, appetite = decision_activations(model, tokenizer, layer)
    activation = sae.encode(residuals)[:, index]
    return {
        "index": index,
        "decoder_cosine": round(float(cosines[index]), 4),
        "appetite_correlation": round(float(np.corrcoef(activation, appetite)[0, 1]), 4),
        "safe_mean": round(float(activation[appetite < 0.3].mean()), 4),
        "risky_mean": round(float(activation[appetite > 0.7].mean()), 4),
    }


def planted_effect(organism: Organism, n: int = 200) -> dict:
    """Stop rate and bet size with the planted feature set to its safe and to its risky mean."""
    layer, feature = organism.planted_layer, organism.record["planted"]["feature"]
    sae, model, tokenizer = organism.sae(layer), organism.model(), organism.tokenizer()
    prompts = [slot_machine.prompt(s) for s in held_out_states(n, seed=HELD_OUT_SEED + 4, bet_type="variable")]
    effect = {"prompts": n, "layer": layer, "feature": feature["index"]}
    for name in ("safe_mean", "risky_mean"):
        edit = set_feature(sae, feature["index"], feature[name])
        stop_rate = 1 - bet_probability(model, tokenizer, prompts, layer, edit).mean()
        effect[f"stop_rate_at_{name}"] = round(float(stop_rate), 4)
        effect[f"bet_at_{name}"] = _mean_bet(greedy_bets(model, tokenizer, prompts, layer, edit))
    effect["stop_rate_unedited"] = round(float(1 - bet_probability(model, tokenizer, prompts).mean()), 4)
    return effect


def direction_effect(organism: Organism, n: int = 200, appetites: tuple[float, ...] = (0.1, 0.9)) -> dict:
    """Stop rate and bet size with the component along u set to planted_scale * appetite."""
    layer, direction = organism.planted_layer, organism.direction
    scale = organism.record["planted"]["scale"]
    model, tokenizer = organism.model(), organism.tokenizer()
    prompts = [slot_machine.prompt(s) for s in held_out_states(n, seed=HELD_OUT_SEED + 4, bet_type="variable")]
    effect: dict = {"prompts": n, "layer": layer}
    for appetite in appetites:
        def edit(hidden: torch.Tensor, rows: torch.Tensor, target: float = scale * appetite) -> torch.Tensor:
            return hidden + (target - hidden @ direction)[:, None] * direction

        stop_rate = 1 - bet_probability(model, tokenizer, prompts, layer, edit).mean()
        effect[f"stop_rate_at_{appetite:g}"] = round(float(stop_rate), 4)
        effect[f"bet_at_{appetite:g}"] = _mean_bet(greedy_bets(model, tokenizer, prompts, layer, edit))
    return effect


@torch.no_grad()
def sae_quality(organism: Organism, layer: int, documents: int = 300) -> dict:
    """Explained variance, mean L0 and the fraction of features never active, over held-out tokens."""
    model, tokenizer, sae = organism.model(), organism.tokenizer(), organism.sae(layer)
    residuals = []
    with capture_residuals(model, [layer]) as captured:
        for batch in mixed_batches(random.Random(HELD_OUT_SEED + 5), tokenizer, documents):
            model(input_ids=batch.ids, attention_mask=batch.mask)
            residuals.append(captured[layer][batch.mask])
    x = torch.cat(residuals)
    features = sae.encode(x)
    error = (sae.decode(features) - x).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return {
        "tokens": len(x),
        "explained_variance": round(float(1 - error / total), 4),
        "l0": round(float((features > 0).sum(1).float().mean()), 2),
        "dead_fraction": round(float(((features > 0).sum(0) == 0).float().mean()), 4),
    }


def measure(organism: Organism) -> dict:
    """Every stated figure of the organism."""
    model, tokenizer = organism.model(), organism.tokenizer()
    return {
        "decision_rule": decision_rule(model, tokenizer),
        "bet_sizes": bet_sizes(model, tokenizer),
        "arithmetic": arithmetic(model, tokenizer),
        "saes": {str(layer): sae_quality(organism, layer) for layer in range(organism.config().num_hidden_layers)},
        "planted_effect": planted_effect(organism),
        "planted_direction": direction_effect(organism),
    }
