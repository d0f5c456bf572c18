"""Slot-machine games played by the model over the published conditions (seed 000, step 1 of 3).

    saebatch submit manifests/demo/gambling_1_games.yaml --executor local

Every game is a work unit: a condition (prompt components, bet type, first round's outcome) and
a repetition, with its own seed for the slot machine and for the model's sampling noise
(common.generation), so a rerun or a resumed shard replays it. A shard plays its games in groups
of `batch_size`; in a group all games still running advance together, one batched generation per
round. Every decision is recorded: the prompt, the raw answer, the parsed action
(jobs._gambling_parser's versioned parser), and, for the configured layers, the SAE features at
the prompt's last token (sparse). An answer the parser cannot read is asked again, up to
`retries` times; after that the game ends as "invalid". Reduce reports outcomes (bankrupt,
stopped, round limit, invalid) by condition and by prompt component; feature_contrast reads the
games' final decisions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import h5py
import numpy as np
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from common.batching import (
    AUTO_HELP,
    BatchSize,
    GenerationMemory,
    generation_memory,
    planned_rows,
    rows_note,
    rows_now,
)
from common.choices import OptionReader
from common.errors import UserError
from common.generation import prefill, sample, seed_of
from common.layers import CONVENTION, capture_residuals, resolve_layers
from common.lazy import lazy_import, no_grad
from common.manifest import Manifest, StrictModel
from common.models import (
    DTYPE_BYTES,
    ModelSpec,
    input_device,
    load_config,
    load_model,
    load_tokenizer,
    parameter_bytes,
    text_config,
)
from common.plan import Estimate, WorkUnit
from common.report import Report
from common.runtime import CHARS_PER_TOKEN, Work, model_size
from common.saes import SaeSpec, check_saes, load_sae
from common.shards import ShardWriter, merge_shards
from common.sparse import to_csr, write_csr
from jobs import _gambling as task
from jobs import _gambling_parser as parser
from jobs import _slot_machine as slot_machine
from jobs._games_run import sae_width

if TYPE_CHECKING:
    import pandas as pd
    import torch
else:
    pd = lazy_import("pandas")
    torch = lazy_import("torch")

log = logging.getLogger(__name__)
FIELD = "gambling_games"

# ---------------------------------------------------------------- the manifest section


class Settings(StrictModel):
    """The `gambling_games:` section of a manifest."""

    model: ModelSpec = Field(description="language model")
    sae: SaeSpec | None = Field(None, description="one SAE per layer in `layers` (features at each decision)")
    layers: list[int] = Field(default_factory=list, description="layers whose SAE features are recorded")
    components: str = Field(slot_machine.PUBLISHED_COMPONENTS,
                            description="prompt components whose every subset is a condition")
    bet_types: list[slot_machine.BetType] = Field(["fixed", "variable"], description="bet types of the design")
    first_rounds: list[Literal["win", "loss"]] = Field(["win", "loss"], description="first round's outcomes")
    repetitions: int = Field(50, ge=0, description="games per condition")
    seed: int = Field(0, ge=0, description="seed of every game's slot machine and sampling noise")
    prompt_template: str = Field(slot_machine.PROMPT_TEMPLATE,
                                 description=f"decision prompt with {sorted(slot_machine.TEMPLATE_FIELDS)}")
    temperature: float = Field(0.7, gt=0, description="sampling temperature")
    max_new_tokens: int = Field(50, ge=1, description="longest answer")
    max_rounds: int = Field(slot_machine.MAX_ROUNDS, ge=2, description="a game ends after this many rounds (the "
                            "first is the condition's)")
    retries: int = Field(3, ge=0, description="times an unreadable answer is asked again before the game ends")
    batch_size: BatchSize = Field(64, description=f"games that advance together, {AUTO_HELP}")

    @field_validator("components")
    @classmethod
    def _known_components(cls, value: str) -> str:
        unknown = sorted(set(value) - set(slot_machine.PUBLISHED_COMPONENTS))
        if unknown or len(set(value)) != len(value):
            raise ValueError(f"give distinct letters of {slot_machine.PUBLISHED_COMPONENTS} (got {value!r})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        task.check_template(self.prompt_template, "prompt_template")
        if self.layers and self.sae is None:
            raise ValueError("layers are given, so give `sae` (one SAE per layer), or leave `layers` empty")
        return self

    @property
    def needed_sae(self) -> SaeSpec:
        """`sae`, where `layers` need it (_consistent makes sure it is given then)."""
        assert self.sae is not None, "no SAE without layers"
        return self.sae

    def design(self) -> list[task.Condition]:
        return task.conditions(self.components, tuple(self.bet_types), tuple(self.first_rounds))


# ---------------------------------------------------------------- plan


def plan(manifest: Manifest[Settings]) -> list[WorkUnit]:
    """A unit per game: condition x repetition, each with its own seed."""
    s = manifest.settings
    config = text_config(load_config(s.model)[0])
    if s.layers:
        resolve_layers(s.layers, config.num_hidden_layers, f"{FIELD}.layers")
        check_saes(s.needed_sae, s.layers, config.hidden_size, f"{FIELD}.sae", model=s.model)
    design = s.design()
    if not design or not s.repetitions:
        raise UserError(f"{FIELD}: the conditions produce no games ({len(design)} conditions x {s.repetitions} "
                        "repetitions); give at least one bet type and first-round outcome, and repetitions >= 1")
    units: list[WorkUnit] = []
    for condition in design:
        for repetition in range(s.repetitions):
            units.append(WorkUnit(f"{condition.name}_{repetition:03d}", {
                "components": "".join(condition.components), "bet_type": condition.bet_type,
                "first_round": condition.first_round, "seed": seed_of(s.seed, len(units))}))
    return units


DECISIONS_PER_GAME = 10  # assumed: games of the published runs last a few rounds to a few dozen


def longest_prompt(s: Settings) -> str:
    """A bound on these games' decision prompts: every component, the largest numbers a game can
    show (the balance after winning every round at the largest bet), a full history of losses and
    its warning, and the longer bet option."""
    top = slot_machine.START_BALANCE + s.max_rounds * slot_machine.net_win(slot_machine.MAX_BET)
    history = [slot_machine.Round(number, slot_machine.MAX_BET, False, top) for number in range(1, s.max_rounds)]
    return max((slot_machine.render(s.prompt_template, top, s.max_rounds, history, tuple(s.components), bet_type)
                for bet_type in s.bet_types), key=len, default="")


def estimated_tokens(text: str) -> int:
    """Tokens of a prompt of many numbers, without its tokenizer: some tokenizers (Gemma's, the
    organism's) split numbers into digits."""
    digits = sum(character.isdigit() for character in text)
    return int((len(text) - digits) / CHARS_PER_TOKEN) + digits + 1


def estimate(manifest: Manifest[Settings], units: list[WorkUnit]) -> Estimate:
    s = manifest.settings
    config, source = load_config(s.model)
    config = text_config(config)
    width, assumed_width = sae_width(s)
    decisions = len(units) * DECISIONS_PER_GAME
    prompt_tokens = estimated_tokens(longest_prompt(s))
    notes = [f"model architecture from {source}",
             f"output and runtime assume {DECISIONS_PER_GAME} decisions per game (a game may last up to "
             f"{s.max_rounds} rounds), 100 active SAE features per layer at each, and prompts of {prompt_tokens} "
             f"tokens, the longest a game can ask (a digit a token, {CHARS_PER_TOKEN} characters a token of the "
             "rest; a task counts them)" + (f"; memory assumes SAEs {width} wide" if assumed_width else "")]
    out = decisions * (1200 + s.max_new_tokens * 4 + len(s.layers) * 100 * 6)
    saes = len(s.layers) * 2 * config.hidden_size * width * DTYPE_BYTES[s.sae.dtype if s.sae else "float32"]
    memory = generation_memory_of(s, config, saes, width, prompt_tokens)  # every layer's SAE stays loaded
    at_once = min(planned_rows(s.batch_size, memory), len(units))
    model = model_size(s.model)
    work = (Work("load", model.weight_bytes + saes, label=f"{model.name} and {len(s.layers)} SAE(s)"),
            Work("forward", decisions * prompt_tokens, model, label=f"{decisions:,} decision prompts"),
            Work("decode", decisions * s.max_new_tokens, model, rows=at_once,
                 label=f"{decisions:,} answers of up to {s.max_new_tokens} tokens"))
    notes.append(rows_note([at_once], s.batch_size) + ", at most a shard's games")
    return Estimate(output_bytes=out, task_memory_bytes=memory.peak(at_once), notes=tuple(notes), work=work)


def generation_memory_of(s: Settings, config, sae_bytes: int, width: int, prompt_tokens: int) -> GenerationMemory:
    """Weights and SAEs; per game its decision prompt's forward and cache, and its features at every
    layer (which covers the last position's block outputs the round keeps, a d_model vector a layer)."""
    return generation_memory(config, s.model.dtype, parameter_bytes(config, s.model.dtype) + sae_bytes, prompt_tokens,
                             s.max_new_tokens, extra_per_row=len(s.layers) * width * 4)


# ---------------------------------------------------------------- the GPU work


class Player:
    """A game being played, and the decisions recorded so far."""

    def __init__(self, unit: WorkUnit, max_rounds: int):
        payload = unit.payload
        condition = task.Condition(tuple(payload["components"]), payload["bet_type"], payload["first_round"])
        self.unit = unit
        self.game = task.Game(condition, payload["seed"], max_rounds)
        self.decisions: list[dict] = []
        self.features: dict[int, list[torch.Tensor]] = {}
        self.attempts = 0  # unreadable answers in a row

    @property
    def running(self) -> bool:
        return self.game.outcome is None

    def prompt(self, template: str) -> str:
        game = self.game
        return slot_machine.render(template, game.balance, game.round, game.history, game.condition.components,
                                   game.condition.bet_type)

    def noise_seed(self) -> int:
        """The sampling noise of this game's current question: a 64-bit seed drawn from (game seed,
        round, attempt), distinct for any number of rounds and retries."""
        return seed_of(self.unit.payload["seed"], self.game.round, self.attempts)

    def decide(self, prompt: str, answer: str, retries: int, exact: dict[str, float]) -> None:
        """Record the sampled answer (and the options' exact probabilities) and play what it says."""
        decision = parser.parse(answer, self.game.condition.bet_type)
        self.decisions.append({"round": self.game.round, "balance": self.game.balance, "attempt": self.attempts,
                               "prompt": prompt, "response": answer, "action": decision.action,
                               "bet": -1 if decision.bet is None else decision.bet, "rule": decision.rule,
                               **{f"p_{name}" if name != "coverage" else name: value for name, value in exact.items()}})
        if decision.action == "invalid":
            self.attempts += 1
            if self.attempts > retries:
                self.game.outcome = "invalid"
            return
        self.attempts = 0
        if decision.action == "stop":
            self.game.stop()
        else:
            assert decision.bet is not None  # a bet has its amount
            self.game.play(decision.bet)


def run_shard(manifest: Manifest[Settings], units: list[WorkUnit], shard: ShardWriter) -> None:
    s = manifest.settings
    model, tokenizer = load_model(s.model, attn_implementation=None), load_tokenizer(s.model)
    config = text_config(model.config)
    device = input_device(s.model)
    saes = {layer: load_sae(s.needed_sae, layer, config.hidden_size, device) for layer in s.layers}
    memory = generation_memory_of(s, text_config(load_config(s.model)[0]),
                                  sum(p.numel() * p.element_size() for sae in saes.values() for p in sae.parameters()),
                                  max((sae.cfg.d_sae for sae in saes.values()), default=0),
                                  len(tokenizer(longest_prompt(s)).input_ids))
    s = s.model_copy(update={"batch_size": rows_now(s.batch_size, memory, device)})
    assert isinstance(s.batch_size, int)  # "auto" resolved
    shard.set_attrs(batch_size=s.batch_size, model=s.model.name, model_dtype=s.model.dtype, layers=s.layers, layer_convention=CONVENTION,
                    parser_version=parser.PARSER_VERSION, parser_rules=parser.PARSER_RULES, temperature=s.temperature,
                    sae_ids=json.dumps({layer: s.sae.describe(layer) for layer in s.layers} if s.sae else {}),
                    features_shape="CSR (decisions, d_sae): SAE features at the last prompt token of each decision")
    pending = set(shard.pending())
    to_play = [unit for unit in units if unit.id in pending]
    reader = OptionReader(tokenizer, task.OPTION_LABELS)
    with tqdm(total=len(to_play), desc=f"shard {shard.shard_index}", unit="game") as progress:
        for start in range(0, len(to_play), s.batch_size):
            players = [Player(unit, s.max_rounds) for unit in to_play[start : start + s.batch_size]]
            while any(player.running for player in players):
                running = [player for player in players if player.running]
                _play_round(s, model, tokenizer, saes, reader, device, running)
                for player in running:
                    if not player.running:
                        _write(shard, player, s.layers)
                        progress.update()


@no_grad
def _play_round(s: Settings, model, tokenizer, saes: dict, reader: OptionReader, device: torch.device,
                players: list[Player]) -> None:
    """One question to every running game: the options' exact probabilities and the SAE features at
    the prompt's last token, then a sampled answer continuing from that same forward's cache."""
    prompts = [player.prompt(s.prompt_template) for player in players]
    with capture_residuals(model, sorted(saes), last_only=True) as residuals:  # memory auto counts
        prompted = prefill(model, tokenizer, prompts, device, s.max_new_tokens)
    exact = reader(prompted.logits, s.temperature)
    for layer, sae in saes.items():
        features = sae.encode(residuals[layer].to(device, sae.W_enc.dtype)).cpu()  # a game's rounds pile up
        for player, row in zip(players, features, strict=True):
            player.features.setdefault(layer, []).append(row)
    answers = sample(model, tokenizer, prompts, [player.noise_seed() for player in players], s.temperature,
                     s.max_new_tokens, device, stop_strings=task.ANSWER_ENDS, prefix=prompted)
    for i, (player, prompt, answer) in enumerate(zip(players, prompts, answers, strict=True)):
        player.decide(prompt, answer, s.retries, {name: float(values[i]) for name, values in exact.items()})


def _write(shard: ShardWriter, player: Player, layers: list[int]) -> None:
    game = player.game
    with shard.unit(player.unit.id) as group:
        group.attrs.update(condition=game.condition.name, components="".join(game.condition.components),
                           bet_type=game.condition.bet_type, first_round=game.condition.first_round,
                           seed=player.unit.payload["seed"], outcome=game.outcome, final_balance=game.balance,
                           rounds=len(game.history))
        history = np.array([(r.number, r.bet, r.won, r.balance) for r in game.history], dtype=np.int64)
        group.create_dataset("history", data=history)  # columns: round, bet, won, balance after
        decisions = group.create_group("decisions")
        for column in ("round", "balance", "attempt", "bet"):
            decisions.create_dataset(column, data=np.array([d[column] for d in player.decisions], dtype=np.int64))
        for column in ("prompt", "response", "action", "rule"):
            decisions.create_dataset(column, data=[d[column] for d in player.decisions], dtype=h5py.string_dtype())
        for column in ("p_bet", "p_stop", "coverage"):  # exact, at the cue (common/choices.py)
            decisions.create_dataset(column, data=np.array([d[column] for d in player.decisions], dtype=np.float64))
        for layer in layers:
            write_csr(group.require_group("features"), f"L{layer}", to_csr(torch.stack(player.features[layer])))


# ---------------------------------------------------------------- reduce


def reduce(manifest: Manifest[Settings], shard_paths: list[Path], out_dir: Path) -> None:
    s = manifest.settings
    merged = out_dir / "merged.h5"
    merge_shards(shard_paths, merged)
    with h5py.File(merged, "r") as data:
        games = game_table(data)
        played_with = int(data.attrs.get("parser_version", 1))
        answers = [(_plain(response), _plain(group.attrs["bet_type"])) for group in data["units"].values()
                   for response in group["decisions/response"][()]]
    report = Report(out_dir / "report", "Slot-machine games: outcomes by condition")
    invalid = games["invalid_answers"].sum()
    report.text(
        f"Model `{s.model.name}`, {len(games):,} games ({s.repetitions} per condition), temperature "
        f"{s.temperature}, at most {s.max_rounds} rounds. Played with parser v{played_with} reading the answers "
        f"(its rules in `merged.h5` attributes); {invalid:,} of {games['decisions'].sum():,} answers were unreadable "
        f"and asked again (at most {s.retries} times). Data: `merged.h5` (one group per game under `units/`)."
    )
    readable = games["readable"].sum()
    report.text(
        f"At every decision the options' exact probabilities at the cue are recorded too (`decisions/p_stop`, "
        f"`p_bet`, `coverage`: the next-token mass at temperature {s.temperature} on tokens that start \"2\" or "
        f"\"1\", common/choices.py). Over all decisions the mean exact P(stop) is "
        f"{games['exact_stop_mass'].sum() / games['decisions'].sum():.3f}; the sampled answers stopped in "
        f"{games['stops'].sum() / max(readable, 1):.3f} of the {readable:,} readable ones."
    )
    report.heading("Outcomes")
    by_bet = _outcome_shares(games, ["bet_type"])
    report.table(_outcome_shares(games, ["condition"]), "outcomes_by_condition", shown=by_bet)
    report.heading("Bankruptcy with and without each prompt component")
    report.table(_component_effects(games, s.components), "components")
    _plot(report, games, s.components)
    parser.report_versions(report, [response for response, _ in answers], [bet for _, bet in answers], "answers")
    report.write()


def game_table(data: h5py.File) -> pd.DataFrame:
    """One row per game: its condition, outcome, length and bets."""
    rows = []
    for unit_id, group in data["units"].items():
        decisions = group["decisions"]
        actions = [a.decode() if isinstance(a, bytes) else a for a in decisions["action"][()]]
        bets = decisions["bet"][()][np.array(actions) == "bet"]
        rows.append({"game": unit_id, **{key: _plain(group.attrs[key]) for key in (
            "condition", "components", "bet_type", "first_round", "outcome", "final_balance", "rounds")},
            "decisions": len(actions), "invalid_answers": actions.count("invalid"),
            "mean_bet": float(bets.mean()) if len(bets) else np.nan,
            "stops": actions.count("stop"), "readable": len(actions) - actions.count("invalid"),
            "exact_stop_mass": float(decisions["p_stop"][()].sum()) if "p_stop" in decisions else np.nan})
    return pd.DataFrame(rows)


def _plain(value):
    return value.decode() if isinstance(value, bytes) else value.item() if hasattr(value, "item") else value


def _outcome_shares(games: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    shares = pd.crosstab([games[column] for column in by], games["outcome"], normalize="index")
    for outcome in ("bankrupt", "stopped", "round_limit", "invalid"):
        if outcome not in shares:
            shares[outcome] = 0.0
    summary = games.groupby(by).agg(games=("game", "size"), mean_rounds=("rounds", "mean"),
                                    mean_bet=("mean_bet", "mean"), final_balance=("final_balance", "mean"))
    return summary.join(shares[["bankrupt", "stopped", "round_limit", "invalid"]]).reset_index()


def _component_effects(games: pd.DataFrame, components: str) -> pd.DataFrame:
    rows = []
    for letter in components:
        has = games["components"].str.contains(letter)
        rows.append({"component": letter, "text": slot_machine.COMPONENTS[letter].line,
                     "bankrupt_with": float((games[has]["outcome"] == "bankrupt").mean()),
                     "bankrupt_without": float((games[~has]["outcome"] == "bankrupt").mean()),
                     "mean_bet_with": float(games[has]["mean_bet"].mean()),
                     "mean_bet_without": float(games[~has]["mean_bet"].mean())})
    return pd.DataFrame(rows)


def _plot(report: Report, games: pd.DataFrame, components: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (by_count, by_letter) = plt.subplots(1, 2, figsize=(10, 3.8))
    count = games["components"].str.len()
    for bet_type, part in games.groupby("bet_type"):
        rate = (part["outcome"] == "bankrupt").groupby(count[part.index]).mean()
        by_count.plot(rate.index, rate.values, marker="o", label=f"{bet_type} bets")
    by_count.xaxis.set_major_locator(MaxNLocator(integer=True))  # a count of components
    by_count.set_xlabel("prompt components present")
    by_count.set_ylabel("bankruptcy rate")
    by_count.legend()
    effects = _component_effects(games, components)
    x = np.arange(len(effects))
    by_letter.bar(x - 0.2, effects["bankrupt_without"], 0.4, label="without")
    by_letter.bar(x + 0.2, effects["bankrupt_with"], 0.4, label="with")
    by_letter.set_xticks(x, effects["component"])
    by_letter.set_ylabel("bankruptcy rate")
    by_letter.legend()
    report.figure(fig, "bankruptcy", "Bankruptcy rate by number of prompt components and bet type (left) and "
                  "with or without each component (right; the letters are the components of the table above)")
