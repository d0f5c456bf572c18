"""Graph-corrected steering against an independent computation on the built-in model organism."""

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from common.corpus import windows
from common.errors import UserError
from common.launcher import torch_threads
from common.layers import decoder_blocks
from common.manifest_file import load_manifest
from common.organism.files import Organism
from common.plan import estimating
from jobs import _gambling as task
from jobs import graph_steering
from jobs._steering import directions, mean_interval, open_graph, target_in_graph
from tests.helpers import REPO, run_all, write_manifest_file
from tests.jobs.test_feature_correlation import reference_features

DEMO = REPO / "manifests" / "demo"
# A smaller graph than the demo's, at a lower threshold, so that the planted feature has
# neighbours in later layers too.
GRAPH = {"feature_correlation": {"corpus": {"tokens": 32768}, "tokens_per_unit": 8192,
                                 "edges": {"threshold": 0.05, "min_support": 5}}}
STEERING = {"graph_steering": {"correlation": "graph.yaml", "strengths": [-1.0, 4.0],
                               "decisions": {"count": 24}, "neutral": {"tokens": 512}, "batch_size": 8}}
PLANTED = task.planted_cause("builtin:organism")


def write(folder, base: str, overrides: dict, name: str):
    return write_manifest_file(folder, overrides, base=DEMO / base, name=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("steering")
    graph = run_all(write(folder, "feature_correlation_for_steering.yaml", GRAPH, "graph.yaml"))
    path = write(folder, "steering.yaml", STEERING, "steering.yaml")
    return folder, graph, run_all(path), load_manifest(path)


@pytest.fixture(scope="module")
def merged(runs):
    _, _, steering, _ = runs
    with h5py.File(steering.merged_path) as data:
        return {name: pd.DataFrame({column: data[name][column][()] for column in data[name]})
                for name in ("decisions", "tokens", "neighbours", "summary")} | {"attrs": dict(data.attrs)}


def test_the_slopes_are_the_regressions_on_the_target_of_the_raw_features(runs, merged):
    """beta_g = cov(t, g) / var(t) over the graph's token rows, recomputed from the SAE features of
    each window forwarded alone; the neighbours are the features the edge rule joins to the target
    in its layer and later ones."""
    _, graph, _, _ = runs
    settings = load_manifest(graph.path / "manifest.yaml").settings
    with torch_threads(1):
        _, rows = reference_features(settings)
    layer, feature = PLANTED
    t = rows[layer][:, feature]
    expected = {}
    for g_layer in (1, 2, 3):
        for g in range(rows[g_layer].shape[1]):
            values = rows[g_layer][:, g]
            if (g_layer, g) == PLANTED or values.std() == 0:
                continue
            r = np.corrcoef(t, values)[0, 1]
            evidence = ((t > 0) & (values > 0)).sum() if r > 0 else min((t > 0).sum(), (values > 0).sum())
            if abs(r) > settings.edges.threshold and evidence >= settings.edges.min_support:
                expected[(g_layer, g)] = np.cov(t, values, bias=True)[0, 1] / t.var()
    neighbours = merged["neighbours"]
    found = {(int(row.layer), int(row.feature)): row.beta for row in neighbours.itertuples()}
    assert set(found) == set(expected) and len(found) >= 3
    assert {layer_of for layer_of, _ in found} > {1}  # neighbours in later layers too
    for key, beta in expected.items():
        assert found[key] == pytest.approx(beta, rel=1e-4)
    assert list(neighbours["r"].abs()) == sorted(neighbours["r"].abs(), reverse=True)


@pytest.fixture(scope="module")
def organism():
    organism = Organism()
    model = organism.model(attn_implementation=None)
    return model, organism.tokenizer(), {layer: organism.sae(layer) for layer in range(4)}


def independent_shifts(merged, saes, corrected: bool) -> dict[int, torch.Tensor]:
    """Per layer, delta-free: W_dec[target] (+ sum of beta_g W_dec[g] at g's layer)."""
    layer, feature = PLANTED
    shifts = {layer: saes[layer].W_dec[feature].detach().clone()}
    for row in merged["neighbours"].itertuples() if corrected else ():
        extra = row.beta * saes[int(row.layer)].W_dec[int(row.feature)].detach()
        shifts[int(row.layer)] = shifts.get(int(row.layer), 0) + extra
    return shifts


def forward(model, ids: list[int], shifts: dict[int, torch.Tensor], steer_from: int = 1) -> tuple[torch.Tensor, dict]:
    """Logits of one unpadded sequence with shifts added to block outputs at positions steer_from..,
    and each block's output, by plain hooks."""
    outputs = {}

    def hook_for(layer):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if layer in shifts:
                hidden = hidden.clone()
                hidden[:, steer_from:] += shifts[layer]
            outputs[layer] = hidden
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    handles = [decoder_blocks(model)[layer].register_forward_hook(hook_for(layer)) for layer in range(4)]
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs


def test_the_corrected_edit_changes_each_layer_by_its_features_decoder_rows(runs, merged, organism):
    _, graph, _, _ = runs
    model, tokenizer, saes = organism
    with open_graph(graph.path, "correlation") as data:
        target = target_in_graph(data, *PLANTED, None, "graph_steering")
    delta = 1.7
    job = {layer: delta * shift for layer, shift in directions(saes, target, corrected=True).items()}
    expected = {layer: delta * shift for layer, shift in independent_shifts(merged, saes, True).items()}
    assert sorted(job) == sorted(expected)
    for layer in job:
        torch.testing.assert_close(job[layer], expected[layer], rtol=1e-5, atol=1e-6)
    ids = tokenizer("The cat sleeps near the river.").input_ids
    steer = torch.zeros((1, len(ids)), dtype=torch.bool)
    steer[0, 1:] = True  # every content token, not <bos>
    captured = {}
    with graph_steering.steered(model, job, steer):  # the job's hooks, then ours: we see the steered outputs
        hooks = [decoder_blocks(model)[layer].register_forward_hook(
            lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out[0] if isinstance(out, tuple) else out))
            for layer in job]
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        for hook in hooks:
            hook.remove()
    for layer in job:  # its own addition: the steered output less the output steered only below it
        _, below_only = forward(model, ids, {k: v for k, v in expected.items() if k < layer})
        change = captured[layer][0] - below_only[layer][0]
        torch.testing.assert_close(change[0], torch.zeros_like(change[0]))  # <bos> is not steered
        torch.testing.assert_close(change[1:], expected[layer].expand_as(change[1:]), rtol=1e-4, atol=1e-5)


def test_decision_shift_and_kl_equal_an_independent_forward(runs, merged, organism):
    _, _, _, manifest = runs
    s = manifest.settings
    model, tokenizer, saes = organism
    strength = 4.0
    decisions = merged["decisions"][merged["decisions"]["strength"] == strength]
    tokens = merged["tokens"][merged["tokens"]["strength"] == strength]
    delta = float(decisions["delta"].iloc[0])
    assert delta == pytest.approx(strength * float(merged["attrs"]["unit_activation"]))
    # the tokens that write each option's label: "1" and " 1", "2" and " 2" (the organism's are words or digits)
    bet, stop = ([i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() == label] for label in "12")
    assert len(bet) == len(stop) == 2
    prompts = graph_steering.decision_prompts(s.decisions)
    texts = list(windows(s.neutral, tokenizer))
    for method in ("naive", "corrected"):
        shifts = {layer: delta * shift for layer, shift in independent_shifts(merged, saes, method == "corrected").items()}
        for i in (0, 7, 23):
            ids = tokenizer(prompts[i]).input_ids
            base, _ = forward(model, ids, {})
            steered, _ = forward(model, ids, shifts)
            for name, logits in (("base", base), (method, steered)):
                p = torch.softmax(logits[-1], -1)
                expected = float(p[stop].sum() / (p[stop].sum() + p[bet].sum()))
                assert decisions[f"p_stop_{name}"].iloc[i] == pytest.approx(expected, abs=1e-5)
        for w in (0, 3):
            base, _ = forward(model, texts[w].ids, {})
            steered, _ = forward(model, texts[w].ids, shifts)
            log_p, log_q = (torch.log_softmax(x[texts[w].prefix :], -1) for x in (base, steered))
            kl = (log_p.exp() * (log_p - log_q)).sum(-1).numpy()
            np.testing.assert_allclose(tokens.loc[tokens["window"] == w, f"kl_{method}"], kl, rtol=1e-3, atol=1e-6)


def test_raising_the_planted_feature_lowers_the_stop_probability_and_the_report_says_so(runs, merged):
    _, _, steering, _ = runs
    summary = merged["summary"]
    summary["method"] = summary["method"].str.decode("utf-8")
    # the planted cause alone: more appetite, fewer stops (the corrected edit's outcome is what is measured)
    up = summary[(summary["strength"] == 4.0) & (summary["method"] == "naive")].iloc[0]
    down = summary[(summary["strength"] == -1.0) & (summary["method"] == "naive")].iloc[0]
    assert up["shift_high"] < -0.05 and down["shift_low"] > 0
    assert (summary["kl"] > 0).all() and summary[["shift", "kl"]].notna().all().all()
    report = (steering.report_dir / "report.md").read_text()
    assert "Decision shift and off-target cost" in report and "Corrected minus naive" in report
    for name in ("effects.csv", "paired.csv", "neighbours.csv", "steering.png"):
        assert (steering.report_dir / name).stat().st_size > 0
    paired = pd.read_csv(steering.report_dir / "paired.csv")
    assert list(paired["strength"]) == [-1.0, 4.0] and paired["p_kl_difference"].between(0, 1).all()


def plan_of(path):
    manifest = load_manifest(path)
    return graph_steering.plan(manifest)


@pytest.mark.parametrize(("target", "field"), [({"layer": 1, "feature": 9999}, "graph_steering.target.feature"),
                                              ({"layer": 0, "feature": 3}, "graph_steering.target.layer"),
                                              ({"layer": 7, "feature": 3}, "graph_steering.target.layer")])
def test_a_bad_target_is_refused_naming_the_field(runs, target, field, tmp_path):
    folder, _, _, _ = runs
    path = write(folder, "steering.yaml", {**STEERING, "graph_steering": {**STEERING["graph_steering"], "target": target}},
                 "bad.yaml")
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        plan_of(path)
    # before the graph exists, planning from its manifest, too
    write(tmp_path, "feature_correlation_for_steering.yaml", {}, "feature_correlation_for_steering.yaml")
    with estimating(), pytest.raises(UserError, match=field.replace(".", r"\.")):
        plan_of(write(tmp_path, "steering.yaml", {"graph_steering": {"target": target}}, "bad_early.yaml"))


def test_a_target_the_graph_does_not_keep_is_refused_with_the_fix(tmp_path):
    graph = {"run": {"shards": 1}, "feature_correlation": {"corpus": {"tokens": 2048}, "tokens_per_unit": 2048,
                                     "features": {"top": 8, "selection_tokens": 1024}}}
    run_all(write(tmp_path, "feature_correlation_for_steering.yaml", graph, "graph.yaml"))
    with pytest.raises(UserError, match=r"graph_steering\.target\.feature: .*features\.top: null"):
        plan_of(write(tmp_path, "steering.yaml", STEERING, "steering.yaml"))


def test_a_graph_of_pooled_windows_is_refused_since_steering_edits_tokens(tmp_path):
    """Its means, spreads and slopes are per window: strength 1 would be some 75x too weak."""
    pooled = {"run": {"shards": 1}, "feature_correlation": {"corpus": {"tokens": 2048}, "tokens_per_unit": 2048,
                                      "pooling": "sequence_mean_of_features"}}
    graph = write(tmp_path, "feature_correlation_for_steering.yaml", pooled, "graph.yaml")
    steering = write(tmp_path, "steering.yaml", STEERING, "steering.yaml")
    refusal = r"graph_steering\.correlation: .*pooling sequence_mean_of_features.*pooling: token"
    with estimating(), pytest.raises(UserError, match=refusal):  # planned from the graph's manifest
        plan_of(steering)
    run_all(graph)
    with pytest.raises(UserError, match=refusal):  # and from its merged.h5
        plan_of(steering)


def test_the_plan_is_a_unit_per_strength_and_the_same_every_time(runs):
    folder, _, _, _ = runs
    path = folder / "steering.yaml"
    first = plan_of(path)
    assert [unit.id for unit in first] == ["strength_-1", "strength_+4"]
    assert plan_of(path) == first
    assert [unit.payload["strength"] for unit in first] == [-1.0, 4.0]


def test_the_interval_of_a_clustered_mean_is_the_t_test_without_clusters():
    from scipy import stats

    values = np.array([0.3, -0.1, 0.5, 0.2, 0.9, 0.0])
    mean, low, high, p = mean_interval(values)
    result = stats.ttest_1samp(values, 0)
    assert p == pytest.approx(result.pvalue) and (low, high) == pytest.approx(tuple(result.confidence_interval()))
    # clusters of equal size: the t interval of the cluster means
    clustered = mean_interval(values, np.array([0, 0, 1, 1, 2, 2]))
    means = values.reshape(3, 2).mean(1)
    assert clustered[:3] == pytest.approx((means.mean(), *stats.ttest_1samp(means, 0).confidence_interval()))


def test_the_steered_positions_are_the_content_tokens_or_the_last_one():
    found = [graph_steering.Window(0, [1, 5, 6, 7], 1), graph_steering.Window(0, [1, 8], 1)]
    for positions, expected in (("all", [[0, 1, 1, 1], [0, 1, 0, 0]]), ("last", [[0, 0, 0, 1], [0, 1, 0, 0]])):
        ids, real, steer = graph_steering.Forwards(None, 0, torch.device("cpu"), positions).batch(found)
        assert steer.int().tolist() == expected
        assert real.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]] and ids.tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
