"""The feature_contexts job against an independent computation on the organism, its sharding, its
cards, and the reports that link to them."""

import random

import h5py
import numpy as np
import pytest
import torch

from common.cli import main
from common.corpus import windows
from common.errors import UserError
from common.launcher import plan_manifest, reduce_task, torch_threads
from common.layers import decoder_blocks
from common.manifest_file import load_manifest
from common.organism.files import Organism
from common.rundir import RunDir
from jobs import feature_ablation, feature_contrast
from jobs._feature_cards import CARDS_PAGE, CardBook, FeatureId
from jobs._gambling import planted_cause
from jobs._organism.corpus import document
from jobs._reasoning import sae_path_template
from tests.helpers import REPO, run_all, write_manifest_file

DEMO = REPO / "manifests" / "demo" / "gambling_3_contexts.yaml"
PLANTED = FeatureId(layer=planted_cause("builtin:organism")[0], feature=planted_cause("builtin:organism")[1])
LISTED = [[PLANTED.layer, PLANTED.feature], [0, 7], [3, 100], [1, 5], [0, 7]]  # one twice: kept once
# Small enough for seconds on a CPU; batch_size 1 forwards each window alone, as the reference does.
SMALL = {"run": {"shards": 3},
         "feature_contexts": {"features_from": None, "features": LISTED, "corpus": {"window": 48, "tokens": 3000},
                              "batch_size": 1, "tokens_per_unit": 700, "top_k": 6, "context_before": 5,
                              "context_after": 2, "cards": 2}}


def write(folder, overrides: dict, name: str = "manifest.yaml"):
    return write_manifest_file(folder, overrides, base=DEMO, name=name)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("contexts")
    path = write(folder, SMALL)
    return run_all(path), load_manifest(path)


def reference(settings) -> dict:
    """Each window forwarded alone (block outputs read by plain hooks) and encoded by each SAE; per
    feature every activation with its corpus position and its window's tokens."""
    organism = Organism()
    model, tokenizer = organism.model(attn_implementation="sdpa"), organism.tokenizer()
    features = list(dict.fromkeys(FeatureId(layer=a, feature=b) for a, b in LISTED))
    saes = {f.layer: organism.sae(f.layer) for f in features}
    captured = {}
    hooks = [decoder_blocks(model)[layer].register_forward_hook(
        lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out[0] if isinstance(out, tuple) else out))
        for layer in saes]
    values, ids, window_of = [], [], []
    with torch.no_grad():
        for number, window in enumerate(windows(settings.corpus, tokenizer)):
            model(input_ids=torch.tensor([window.ids]))
            values.append(np.stack([saes[f.layer].encode(captured[f.layer][0, window.prefix :])[:, f.feature].numpy()
                                    for f in features], axis=1))
            ids += window.ids[window.prefix :]
            window_of += [number] * window.content
    for hook in hooks:
        hook.remove()
    return {"features": features, "values": np.concatenate(values), "ids": np.array(ids), "window": np.array(window_of)}


def test_top_contexts_histograms_and_frequencies_match_a_direct_computation(small_run):
    run, manifest = small_run
    s = manifest.settings
    with torch_threads(manifest.cluster.cpus_per_task):
        ref = reference(s)
    values, tokens = ref["values"], len(ref["values"])
    with h5py.File(run.merged_path) as merged:
        assert [FeatureId(layer=a, feature=b) for a, b in zip(merged["features/layer"], merged["features/feature"])] \
            == ref["features"]
        top = {name: merged[f"top/{name}"][()] for name in ("value", "position", "context", "histogram", "active")}
        assert merged.attrs["tokens"] == tokens == 3000
    for f in range(len(ref["features"])):
        active = np.flatnonzero(values[:, f] > 0)
        order = active[np.lexsort((active, -values[active, f]))][: s.top_k]  # larger first, ties: earlier
        found = top["position"][f][top["position"][f] >= 0]
        assert found.tolist() == order.tolist()
        assert np.allclose(top["value"][f][: len(order)], values[order, f], rtol=1e-5, atol=1e-6)
        for position, context in zip(order, top["context"][f]):
            around = np.arange(position - s.context_before, position + s.context_after + 1)
            inside = (around >= 0) & (around < tokens)
            inside[inside] &= ref["window"][around[inside]] == ref["window"][position]  # never the next window's
            assert context.tolist() == np.where(inside, ref["ids"][np.clip(around, 0, tokens - 1)], -1).tolist()
        assert top["active"][f] == len(active)
        assert top["histogram"][f].sum() == len(active)
    assert top["active"][0] > 0  # the planted feature fires in the organism's text


def test_the_merge_does_not_depend_on_the_sharding(small_run, tmp_path):
    run, _ = small_run
    single = run_all(write(tmp_path, {**SMALL, "run": {"shards": 1}}))
    with h5py.File(run.merged_path) as three, h5py.File(single.merged_path) as one:
        names = []
        three.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
        assert len(names) > 10
        for name in names:
            assert np.array_equal(three[name][()], one[name][()]), name


def test_logit_effects_are_the_decoder_direction_through_the_unembedding(small_run):
    run, _ = small_run
    organism = Organism()
    unembedding = organism.model().get_output_embeddings().weight.detach().float()
    with h5py.File(run.merged_path) as merged:
        layer, feature = merged["features/layer"][0], merged["features/feature"][0]
        effects = organism.sae(int(layer)).W_dec[int(feature)].detach() @ unembedding.T
        assert merged["logits/top_ids"][0].tolist() == effects.topk(10).indices.tolist()
        assert merged["logits/bottom_ids"][0].tolist() == effects.topk(10, largest=False).indices.tolist()
        assert np.allclose(merged["logits/top_values"][0], effects.topk(10).values.numpy(), atol=1e-5)


def test_the_report_has_a_card_per_feature(small_run):
    run, _ = small_run
    report = (run.report_dir / "report.md").read_text()
    assert "### L1 F402" in report and "### L0 F7" in report and "### L3 F100" not in report  # cards: 2
    assert "histogram_L1-F402.png" in report and (run.report_dir / "histogram_L1-F402.png").is_file()
    page = (run.report_dir / CARDS_PAGE).read_text()
    assert all(f"id='{anchor}'" in page for anchor in ("L1-F402", "L0-F7", "L3-F100", "L1-F5"))


def test_the_planted_features_top_contexts_are_cues_of_high_appetite_prompts(gambling_chain):
    """Its top contexts in the demo are the decision cue (the last prompt token) of slot-machine
    prompts whose risk appetite is high: the feature carries the appetite (jobs/_organism/README.md)."""
    run = gambling_chain.contexts
    settings = load_manifest(run.manifest_path).settings
    card = CardBook.of_run(run.path, "contexts").cards[PLANTED]
    tokenizer = Organism().tokenizer()
    rng, start, cues = random.Random(settings.corpus.seed), 0, {}
    while start < settings.corpus.tokens:  # each decision's cue position and its appetite, drawn again
        drawn = document(rng)
        lengths = [len(tokenizer(piece, add_special_tokens=False).input_ids) for piece in drawn.pieces]
        if drawn.appetite is not None:
            cues[start + lengths[0] - 1] = drawn.appetite
        start += sum(lengths)
    assert len(card.contexts) == settings.top_k
    assert all(context.position in cues for context in card.contexts)
    assert all(context.tokens[context.at] == " " and "".join(context.tokens[: context.at]).endswith("Choice:")
               for context in card.contexts)
    appetites = np.array(list(cues.values()))
    top = np.array([cues[context.position] for context in card.contexts])
    assert top.min() > np.median(appetites) and top.mean() > np.percentile(appetites, 75)


def test_reports_link_their_features_to_the_cards(gambling_chain, tmp_path):
    patching = (gambling_chain.patching.report_dir / "report.md").read_text()
    cards = gambling_chain.contexts.path / "report" / CARDS_PAGE
    assert "## Card of the planted feature" in patching and "Choice:« »" in patching
    link = f"{cards.relative_to(gambling_chain.contexts.path.parent).as_posix()}#{PLANTED.anchor}"
    assert f"[{PLANTED.name}](../../{link})" in patching  # relative: from runs/<patching>/report
    # the contrast's report, reduced again with the contexts run named
    contrast = load_manifest(gambling_chain.contrast.manifest_path)
    settings = contrast.settings.model_copy(update={"contexts": gambling_chain.contexts.path})
    feature_contrast.reduce(contrast.model_copy(update={"settings": settings}),
                            sorted(gambling_chain.contrast.shards_dir.glob("shard_*.h5")), tmp_path)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Card of the planted feature" in report and "top_context" in report
    assert f"cards.html#{PLANTED.anchor})" in report


def test_features_from_takes_the_contrasts_selection_strongest_first(gambling_chain):
    run = gambling_chain.contexts
    with h5py.File(gambling_chain.contrast.merged_path) as contrast:
        table = {name: contrast[f"features/{name}"][()] for name in ("layer", "feature", "cohens_d", "selected")}
    chosen = np.flatnonzero(table["selected"])
    strongest = chosen[np.argsort(-np.abs(table["cohens_d"][chosen]), kind="stable")][:24]
    with h5py.File(run.merged_path) as merged:
        assert merged["features/layer"][()].tolist() == table["layer"][strongest].tolist()
        assert merged["features/feature"][()].tolist() == table["feature"][strongest].tolist()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"features": [[1, 512]]}, "feature_contexts.features: feature 512 of layer 1 is beyond the 512 features"),
    ({"features": [[4, 3]]}, "feature_contexts.features: layer 4 does not exist; the model has layers 0 to 3"),
    ({"features": [[1, 2]], "features_from": "/nowhere"}, "give exactly one of `features`"),
    ({"features": []}, "feature_contexts.features: List should have at least 1 item"),
])
def test_bad_features_are_refused_before_any_work(tmp_path, capsys, overrides, message):
    section = {"features_from": None, **overrides}
    path = write(tmp_path, {"feature_contexts": section})
    assert main(["plan", str(path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("name", "assumed"), [
    ("gambling_3_contexts", "its features taken to lie at layers [1, 2], those of "),
    ("reasoning_6_contexts", "(its SAEs): an SAE of 4 x d_model features at each captured layer"),  # as trained
])
def test_planning_ahead_of_the_chain_takes_the_upstream_layers(tmp_path, monkeypatch, capsys, name, assumed):
    """No run exists yet: the features' layers (and SAEs) are those the upstream manifest leads to."""
    monkeypatch.chdir(tmp_path)  # runs/ is relative: no upstream run exists here
    assert main(["plan", str(REPO / "manifests" / "demo" / f"{name}.yaml")]) == 0
    out = capsys.readouterr().out
    assert "24 features at layers [1, 2] (assumed)" in out and assumed in out, out


def test_an_upstream_run_of_another_kind_is_refused(gambling_chain, tmp_path):
    path = write(tmp_path, {"feature_contexts": {"features_from": str(gambling_chain.games.path)}})
    with pytest.raises(UserError, match="written by 'gambling_games'; name a feature_contrast"):
        plan_manifest(load_manifest(path))
    games = write(tmp_path, {"job": "feature_contrast", "feature_contexts": None,
                             "feature_contrast": {"games": str(gambling_chain.games.path),
                                                  "contexts": str(gambling_chain.games.path)}}, name="contrast.yaml")
    with pytest.raises(UserError, match="feature_contrast.contexts: .* was written by 'gambling_games', not feature_contexts"):
        plan_manifest(load_manifest(games))


def test_the_plan_is_the_logit_unit_then_token_ranges(small_run):
    run, _ = small_run
    plan = run.load_plan()
    assert [unit.id for unit in plan.units][:3] == ["logit_effects", "tokens_0000", "tokens_0700"]
    assert [unit.payload for unit in plan.units][-1] == {"start": 2800, "stop": 3000}


def test_reduce_again_gives_the_same_cards(small_run):
    run, _ = small_run
    before = [(run.report_dir / name).read_text() for name in (CARDS_PAGE, "features.csv")]
    reduce_task(str(run.path))
    assert [(run.report_dir / name).read_text() for name in (CARDS_PAGE, "features.csv")] == before
    assert RunDir(run.path).merged_path.is_file()


def test_the_correlation_graphs_edges_get_cards(tmp_path):
    """Cards for the ends of a graph's strongest edges (features_from a correlation run), then the
    same graph's report, run again with those cards, links both ends of its edges to them."""
    graph = {"run": {"shards": 1}, "feature_correlation": {
        "corpus": {"window": 64, "tokens": 2048}, "tokens_per_unit": 1024,
        "features": {"top": 24, "min_support": 3, "selection_tokens": 1024}, "edges": {"min_support": 5}}}
    correlation_yaml = REPO / "manifests" / "demo" / "feature_correlation.yaml"
    first = run_all(write_manifest_file(tmp_path, graph, base=correlation_yaml, name="graph.yaml"))
    contexts = run_all(write(tmp_path, {"run": {"shards": 1}, "feature_contexts": {
        "features_from": str(first.path), "max_features": 16, "corpus": {"window": 64, "tokens": 2048},
        "tokens_per_unit": 2048}}, name="contexts.yaml"))
    with h5py.File(first.merged_path) as merged:
        edges = [(merged["edges/layer_a"][i], merged["edges/feature_a"][i], merged["edges/layer_b"][i],
                  merged["edges/feature_b"][i]) for i in range(2)]
    expected = list(dict.fromkeys(FeatureId(layer=int(e[i]), feature=int(e[i + 1])) for e in edges for i in (0, 2)))
    book = CardBook.of_run(contexts.path, "contexts")
    assert list(book.cards)[: len(expected)] == expected  # the strongest edge's ends first
    again = run_all(write_manifest_file(tmp_path, {**graph, "feature_correlation": {
        **graph["feature_correlation"], "contexts": str(contexts.path)}}, base=correlation_yaml, name="again.yaml"))
    report = (again.report_dir / "report.md").read_text()
    first_edge = expected[:2]
    assert all(f"[{f.name}](../../{contexts.path.name}/report/cards.html#{f.anchor})" in report for f in first_edge)
    assert "top_context_a" in report and "card_b" in report


def test_an_ablations_features_get_cards(reasoning_chain, tmp_path):
    """Cards for the features an ablation ablated (its model's trained SAEs), then the ablation's
    report, reduced again with them, links its top features to their cards."""
    ablation = reasoning_chain.ablation
    saes = sae_path_template(reasoning_chain.training.path, "organism")
    contexts = run_all(write(tmp_path, {"run": {"shards": 1}, "feature_contexts": {
        "features_from": str(ablation.path), "from_model": "organism", "sae": {"builtin": None, "path": saes},
        "max_features": 5, "corpus": {"window": 64, "tokens": 2048}, "tokens_per_unit": 2048}}, name="contexts.yaml"))
    with h5py.File(ablation.merged_path) as merged:
        top = [(s, int(layer), int(f)) for unit in merged["units"].values() if unit.attrs["model"] == "organism"
               for s, layer, f in zip(unit["top/score"][()], unit["top/layer"][()], unit["top/feature"][()])]
    strongest = list(dict.fromkeys(FeatureId(layer=layer, feature=f) for _, layer, f in sorted(top, key=lambda t: -t[0])))
    assert list(CardBook.of_run(contexts.path, "contexts").cards) == strongest[:5]
    manifest = load_manifest(ablation.manifest_path)
    settings = manifest.settings.model_copy(update={"contexts": contexts.path, "contexts_model": "organism"})
    (tmp_path / "again").mkdir()
    feature_ablation.reduce(manifest.model_copy(update={"settings": settings}),
                            sorted(ablation.shards_dir.glob("shard_*.h5")), tmp_path / "again")
    report = (tmp_path / "again" / "report" / "report.md").read_text()
    assert f"cards.html#{strongest[0].anchor})" in report
