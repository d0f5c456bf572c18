"""Feature cards: how a feature is read, by its top-activating contexts (a feature_contexts run).

Written by feature_contexts' reduce (`write_report`: report.md and cards.html), and read by the
reports that name features (`CardBook.of_run`, then `annotate` or `inline`): each named feature
gets its first contexts inline and a link to its card. Also here: which features an earlier run
names (`features_of_run`), for feature_contexts' `features_from`.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from pydantic import Field, model_validator

from common.errors import UserError
from common.lazy import lazy_import
from common.manifest import Manifest, StrictModel
from common.plan import assume, only_estimating
from common.report import Report, format_number
from common.rundir import RunDir
from common.top_activations import EMPTY, HISTOGRAM_EDGES, TopActivations
from jobs._reasoning.chain import one_model

if TYPE_CHECKING:
    import pandas as pd
else:
    pd = lazy_import("pandas")

CARDS_PAGE = "cards.html"
INLINE_CHARS = 40  # characters of context shown on each side of the token in an inline context


class FeatureId(StrictModel, frozen=True):
    """One SAE feature: its layer (block L's output) and its index in that layer's SAE."""

    layer: int = Field(ge=0, description="the layer: block L's output")
    feature: int = Field(ge=0, description="the feature's index in the layer's SAE")

    @model_validator(mode="before")
    @classmethod
    def _pair(cls, data: object) -> object:
        if isinstance(data, (list, tuple)) and len(data) == 2:
            return {"layer": data[0], "feature": data[1]}
        return data

    @property
    def name(self) -> str:
        return f"L{self.layer} F{self.feature}"

    @property
    def anchor(self) -> str:
        return f"L{self.layer}-F{self.feature}"


# ---------------------------------------------------------------- the features an earlier run names


def features_of_run(merged: Path, model: str | None, field: str) -> list[FeatureId]:
    """The features an earlier run names, strongest first: a contrast's selected ones (by |d|), the
    ones a patching run tested (causal first, then by effect), the ones an ablation ablated (by
    attribution score; `model` picks one of its models), those of a circuit run's candidate
    primitives (else of its causal clusters; by the cluster's drop), or the ends of a correlation
    graph's edges (strongest |r| first)."""
    pairs: Iterable[tuple[int, int]]
    with h5py.File(merged, "r") as data:
        job = str(data.attrs.get("job"))
        if job == "feature_contrast":
            table = _table(data["features"])
            table = table[table["selected"].astype(bool)]
            order = table.assign(size=table["cohens_d"].abs()).sort_values("size", ascending=False, kind="stable")
            pairs = zip(order["layer"], order["feature"], strict=True)
        elif job == "population_patching":
            table = _table(data["features"])
            table = table[~table["control"].astype(bool)]
            effect = "stop_effect" if "stop_effect" in table else "stop_shift_exact"
            order = table.assign(size=table[effect].abs().fillna(0)).sort_values(
                ["causal", "size"], ascending=False, kind="stable")
            pairs = zip(order["layer"], order["feature"], strict=True)
        elif job == "feature_ablation":
            pairs = _ablated(data, model, field)
        elif job == "circuit_discovery":
            pairs = _in_circuits(data, model, field)
        elif job == "feature_correlation":
            edges = data["edges"]
            ends = np.stack([edges["layer_a"][()], edges["feature_a"][()], edges["layer_b"][()], edges["feature_b"][()]], 1)
            pairs = ((int(row[i]), int(row[i + 1])) for row in ends for i in (0, 2))
        else:
            raise UserError(f"{field}: {merged} was written by {job!r}; name a feature_contrast, population_patching, "
                            "feature_ablation, circuit_discovery or feature_correlation run")
        return list(dict.fromkeys(FeatureId(layer=int(layer), feature=int(feature)) for layer, feature in pairs))


def _table(group: h5py.Group) -> pd.DataFrame:
    return pd.DataFrame({name: column[()] for name, column in group.items()})


def _ablated(data: h5py.File, model: str | None, field: str) -> list[tuple[int, int]]:
    units = list(data["units"].values())
    chosen = one_model(sorted({str(unit.attrs["model"]) for unit in units}), model, field)
    rows = [(float(score), int(layer), int(feature)) for unit in units if unit.attrs["model"] == chosen
            for layer, feature, score in zip(unit["top/layer"][()], unit["top/feature"][()], unit["top/score"][()],
                                             strict=True)]
    return [(layer, feature) for _, layer, feature in sorted(rows, key=lambda row: -row[0])]


def _in_circuits(data: h5py.File, model: str | None, field: str) -> list[tuple[int, int]]:
    clusters = _table(data["clusters"])
    clusters["model"] = clusters["model"].str.decode("utf-8")
    clusters = clusters[clusters["model"] == one_model(sorted(set(clusters["model"])), model, field)]
    shown = clusters[clusters["primitive"].astype(bool)]
    if shown.empty:
        shown = clusters[clusters["causal"].astype(bool)]
    order = shown.sort_values("drop", ascending=False, kind="stable")
    return [(int(layer[1:]), int(feature[1:])) for text in order["features"]
            for layer, feature in (part.split() for part in text.decode().split(", "))]


# ---------------------------------------------------------------- texts, stored with the contexts


def token_texts(ids: np.ndarray, tokenizer) -> dict[int, str]:
    """Each distinct token id (EMPTY left out) as the text it stands for, a leading space kept."""
    texts = {}
    for token in np.unique(ids[ids != EMPTY]).tolist():
        text = tokenizer.decode([token], clean_up_tokenization_spaces=False)
        piece = tokenizer.convert_ids_to_tokens(token) or ""
        if piece[:1] in ("▁", "Ġ") and not text.startswith(" "):  # sentencepiece and byte-level BPE spaces
            text = " " + text
        texts[token] = text
    return texts


def write_texts(group: h5py.Group, top: TopActivations, tokenizer) -> None:
    """The text of every token in the contexts, beside them: merged.h5 is readable without the tokenizer."""
    texts = token_texts(top.context.numpy(), tokenizer)
    group.create_dataset("token_ids", data=np.fromiter(texts, dtype=np.int64))
    group.create_dataset("token_texts", data=list(texts.values()), dtype=h5py.string_dtype())


def write_logit_texts(group: h5py.Group, logits: dict[str, np.ndarray], tokenizer) -> None:
    for side in ("top", "bottom"):
        ids = logits[f"{side}_ids"]
        texts = token_texts(ids, tokenizer)
        group.create_dataset(f"{side}_texts", data=np.vectorize(texts.get, otypes=[object])(ids),
                             dtype=h5py.string_dtype())


# ---------------------------------------------------------------- the cards, read back


@dataclass(frozen=True)
class Context:
    """One top-activating token: its activation and corpus position, and the text around it."""

    value: float
    position: int
    tokens: list[str]        # the context's tokens, the activating one at `at`
    activations: list[float]
    at: int

    def inline(self, chars: int = INLINE_CHARS) -> str:
        before, after = "".join(self.tokens[: self.at]), "".join(self.tokens[self.at + 1 :])
        return f"…{before[-chars:]}«{self.tokens[self.at]}»{after[:chars]}…".replace("\n", "⏎")


@dataclass(frozen=True)
class Card:
    """What one feature's card shows."""

    feature: FeatureId
    contexts: list[Context]
    active: int
    tokens: int
    total: float
    histogram: np.ndarray
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]

    @property
    def frequency(self) -> float:
        return self.active / self.tokens if self.tokens else float("nan")

    @property
    def mean_when_active(self) -> float:
        return self.total / self.active if self.active else float("nan")


@dataclass(frozen=True)
class CardBook:
    """The cards of a feature_contexts run, by feature, and where its card page is."""

    cards: dict[FeatureId, Card]
    model: str
    corpus: str
    page: Path | None = None  # report/cards.html of the run, for links ...
    linked_from: Path | None = None  # ... from the report folder of the run that links to it

    @classmethod
    def from_merged(cls, merged: h5py.File, page: Path | None = None) -> CardBook:
        top = merged["top"]
        texts = dict(zip(top["token_ids"][()].tolist(), [t.decode() for t in top["token_texts"][()]], strict=True))
        at = int(merged.attrs["context_before"])
        logits = merged["logits"]
        books = {}
        arrays = {name: top[name][()] for name in ("value", "position", "context", "context_activation",
                                                    "histogram", "active", "total")}
        for i, (layer, feature) in enumerate(zip(merged["features/layer"][()], merged["features/feature"][()], strict=True)):
            fid = FeatureId(layer=int(layer), feature=int(feature))
            contexts = []
            for j in np.flatnonzero(arrays["position"][i] != EMPTY):
                ids, acts = arrays["context"][i, j], arrays["context_activation"][i, j]
                inside = ids != EMPTY
                contexts.append(Context(float(arrays["value"][i, j]), int(arrays["position"][i, j]),
                                        [texts[t] for t in ids[inside].tolist()], acts[inside].tolist(),
                                        int(inside[:at].sum())))
            books[fid] = Card(fid, contexts, int(arrays["active"][i]), int(top.attrs["tokens"]), float(arrays["total"][i]),
                              arrays["histogram"][i],
                              _pairs(logits["top_texts"][i], logits["top_values"][i]),
                              _pairs(logits["bottom_texts"][i], logits["bottom_values"][i]))
        return cls(books, str(merged.attrs["model"]), str(merged.attrs["corpus"]), page)

    @classmethod
    def of_run(cls, run: Path, field: str, linked_from: Path | None = None) -> CardBook:
        """The cards of the feature_contexts run at `run` (`field` names it in errors), linked to from
        the report folder `linked_from`."""
        merged = run / "merged.h5"
        if not merged.is_file():
            raise UserError(f"{field}: {run} has no merged.h5; run the feature_contexts step first and wait for "
                            "its reduce")
        with h5py.File(merged, "r") as data:
            if data.attrs.get("job") != "feature_contexts":
                raise UserError(f"{field}: {merged} was written by {data.attrs.get('job')!r}, not feature_contexts")
            return replace(cls.from_merged(data, run / "report" / CARDS_PAGE), linked_from=linked_from)

    def link(self, feature: FeatureId) -> str:
        """A Markdown link to the feature's card from the linking report ('' without a card)."""
        if feature not in self.cards or self.page is None or self.linked_from is None:
            return ""
        return f"[{feature.name}]({os.path.relpath(self.page, self.linked_from)}#{feature.anchor})"

    def inline(self, feature: FeatureId, contexts: int = 1) -> str:
        """The feature's first contexts, for a table cell ('' when the run has no card for it)."""
        card = self.cards.get(feature)
        if card is None:
            return ""
        return " / ".join(c.inline(24) for c in card.contexts[:contexts]).replace("|", "\\|")

    def annotate(self, table: pd.DataFrame, layer: str = "layer", feature: str = "feature",
                 suffix: str = "") -> pd.DataFrame:
        """`table` with each feature's first context and card link (columns `top_context{suffix}`,
        `card{suffix}`); the feature is read from the columns `layer` and `feature`."""
        ids = [FeatureId(layer=int(a), feature=int(b)) for a, b in zip(table[layer], table[feature], strict=True)]
        return table.assign(**{f"top_context{suffix}": [self.inline(f) for f in ids],
                               f"card{suffix}": [self.link(f) for f in ids]})

    def section(self, report: Report, features: list[FeatureId], title: str) -> None:
        """A report section with these features' cards in Markdown (those the run has)."""
        shown = [f for f in features if f in self.cards]
        if not shown:
            return
        report.heading(title)
        for feature in shown:
            report.lines += [*_card_markdown(self.cards[feature], link=self.link(feature)), ""]


def cards_of(run: Path | None, field: str, manifest: Manifest) -> CardBook | None:
    """The cards of the optional `contexts:` run of `manifest`'s report (None: none named), linked
    from where that report ends up (reduce writes it in a staging folder first)."""
    return None if run is None else CardBook.of_run(run, field, RunDir.for_manifest(manifest).report_dir)


def check_contexts(run: Path | None, field: str) -> None:
    """Planning: the `contexts:` run, when named, is a feature_contexts run (or, planning a chain
    ahead of it, will be: common.plan.estimating)."""
    if run is None:
        return
    merged = run / "merged.h5"
    if not merged.is_file():
        only_estimating(UserError(f"{field}: {run} has no merged.h5; run the feature_contexts step first and wait "
                                  "for its reduce, or leave `contexts` out"))
        assume(f"{field}: run {run.name} does not exist yet; its cards are linked once it does")
        return
    with h5py.File(merged, "r") as data:
        if data.attrs.get("job") != "feature_contexts":
            raise UserError(f"{field}: {merged} was written by {data.attrs.get('job')!r}, not feature_contexts")


CONTEXTS_HELP = ("a feature_contexts run (directory or manifest): each feature named in the report gets its first "
                 "contexts inline and a link to its card")
CONTEXTS_MODEL_HELP = ("the model whose features the contexts run shows (needed when the report names the "
                       "features of more than one model)")


def check_contexts_model(run: Path | None, model: str | None, models: list[str], field: str) -> None:
    """Check `contexts_model` (`field`) against the studied `models`: one of them when given, and
    required when a contexts run is named and several models are studied."""
    if model is not None and model not in models:
        raise UserError(f"{field}: {model!r} is not studied here; choose one of {models}")
    if run is not None and model is None and len(models) > 1:
        raise UserError(f"{field}: {len(models)} models are studied ({', '.join(models)}); name the one whose "
                        "features the contexts run shows")


def _pairs(texts: np.ndarray, values: np.ndarray) -> list[tuple[str, float]]:
    return [(t.decode() if isinstance(t, bytes) else str(t), float(v)) for t, v in zip(texts, values, strict=True)]


# ---------------------------------------------------------------- the report of feature_contexts


def write_report(report: Report, book: CardBook, cards: int) -> None:
    """report.md (a table of every feature, then the first `cards` cards) and cards.html (every card)."""
    first = next(iter(book.cards.values()))
    report.text(f"Model `{book.model}`. Corpus: {book.corpus}; {first.tokens:,} tokens. Per feature: its top "
                f"{max(len(c.contexts) for c in book.cards.values())} tokens by activation (ties: the earlier "
                f"token), the token marked «like this» in the text before and after it, the histogram of its "
                f"non-zero activations, how often it is active, and the tokens its decoder direction promotes and "
                f"suppresses most (W_dec[f] @ W_U). Every card: [{CARDS_PAGE}]({CARDS_PAGE}); data: `merged.h5`.")
    rows = [{"layer": c.feature.layer, "feature": c.feature.feature, "active_tokens": c.active,
             "frequency": c.frequency, "max": c.contexts[0].value if c.contexts else 0.0,
             "mean_when_active": c.mean_when_active, "top_context": c.contexts[0].inline(24) if c.contexts else ""}
            for c in book.cards.values()]
    report.heading("Features")
    table = pd.DataFrame(rows)
    report.table(table, "features", shown=table.assign(top_context=table["top_context"].str.replace("|", "\\|")))
    report.heading("Cards")
    for card in list(book.cards.values())[:cards]:
        report.lines += _card_markdown(card, link=f"[card]({CARDS_PAGE}#{card.feature.anchor})")
        report.figure(_histogram_figure(card), f"histogram_{card.feature.anchor}",
                      f"{card.feature.name}: activations when active ({card.active:,} tokens)")
    if len(book.cards) > cards:
        report.text(f"The other {len(book.cards) - cards} cards: [{CARDS_PAGE}]({CARDS_PAGE}).")
    (report.folder / CARDS_PAGE).write_text(cards_html(book))
    report.write()


def _card_markdown(card: Card, link: str) -> list[str]:
    lines = [f"### {card.feature.name}", "",
             f"Active on {card.active:,} of {card.tokens:,} tokens ({100 * card.frequency:.3g}%), mean "
             f"{format_number(card.mean_when_active)} when active. {link}", ""]
    if not card.contexts:
        return [*lines, "Never active on this corpus.", ""]
    lines += [f"{i}. **{format_number(c.value)}**: {_escape(c.inline(80))}" for i, c in enumerate(card.contexts, 1)]
    lines += ["", _logit_line("Promotes", card.promoted), "", _logit_line("Suppresses", card.suppressed), ""]
    return lines


def _logit_line(label: str, pairs: list[tuple[str, float]]) -> str:
    return f"{label}: " + ", ".join(f"`{_code(text)}` ({value:+.3g})" for text, value in pairs)


def _escape(text: str) -> str:
    """Text shown as Markdown, its markup characters escaped."""
    for char in "\\`*_[]<>|#":
        text = text.replace(char, "\\" + char)
    return text


def _code(text: str) -> str:
    return text.replace("`", "'").replace("\n", "⏎") or " "


def _histogram_figure(card: Card):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 1.8))
    used = np.flatnonzero(card.histogram)
    if len(used):
        span = slice(used[0], used[-1] + 1)
        ax.stairs(card.histogram[span], HISTOGRAM_EDGES[span.start : span.stop + 1], fill=True, color="tab:orange")
        ax.set_xscale("log")
    ax.set_xlabel("activation")
    ax.set_ylabel("tokens")
    return fig


# ---------------------------------------------------------------- cards.html


def cards_html(book: CardBook) -> str:
    """One self-contained page: a card per feature, each context's tokens shaded by the feature's
    activation on them, the activating token outlined, the histogram as inline SVG."""
    body = "\n".join(_card_html(card) for card in book.cards.values())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Feature cards: {html.escape(book.model)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>Feature cards</h1><p>Model <code>{html.escape(book.model)}</code>."
            f" Corpus: {html.escape(book.corpus)}.</p>{body}</body></html>")


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto}.card{border:1px solid #ccc;border-radius:6px;"
          "padding:8px 12px;margin:12px 0}.ctx{font-family:monospace;white-space:pre-wrap;margin:2px 0}"
          ".hit{outline:2px solid #c00}.v{display:inline-block;width:5em;color:#555}td{padding:0 8px}")


def _card_html(card: Card) -> str:
    peak = max((c.value for c in card.contexts), default=1.0)
    lines = []
    for c in card.contexts:
        spans = "".join(f"<span style='background:rgba(255,140,0,{max(a, 0) / peak:.2f})'"
                        f"{' class=hit' if i == c.at else ''} title='{a:.3g}'>{html.escape(t)}</span>"
                        for i, (t, a) in enumerate(zip(c.tokens, c.activations, strict=True)))
        lines.append(f"<div class=ctx><span class=v>{c.value:.3g}</span>{spans}</div>")
    logits = "".join(f"<tr><td>{label}</td><td>{', '.join(f'<code>{html.escape(t)}</code> {v:+.3g}' for t, v in pairs)}</td></tr>"
                     for label, pairs in (("promotes", card.promoted), ("suppresses", card.suppressed)))
    return (f"<div class=card id='{card.feature.anchor}'><h2>{card.feature.name}</h2><p>active on {card.active:,} of "
            f"{card.tokens:,} tokens ({100 * card.frequency:.3g}%), mean {format_number(card.mean_when_active)} when "
            f"active</p>{_histogram_svg(card.histogram)}{''.join(lines) or '<p>never active</p>'}<table>{logits}</table></div>")


def _histogram_svg(counts: np.ndarray) -> str:
    used = np.flatnonzero(counts)
    if not len(used):
        return ""
    shown = counts[used[0] : used[-1] + 1]
    bars = "".join(f"<rect x='{3 * i}' y='{40 - 40 * n / shown.max():.1f}' width='3' height='{40 * n / shown.max():.1f}'/>"
                   for i, n in enumerate(shown) if n)
    low, high = HISTOGRAM_EDGES[used[0]], HISTOGRAM_EDGES[used[-1] + 1]
    return (f"<svg width='{3 * len(shown)}' height='40' fill='darkorange'>{bars}</svg> "
            f"<small>activations {low:.3g} to {high:.3g} (log scale)</small>")

