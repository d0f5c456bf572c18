"""The feature correlation job against an independent computation on the built-in model organism."""

import itertools
import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from common.cli import main
from common.comoments import CoMoments
from common.corpus import windows
from common.errors import UserError
from common.launcher import (
    plan_manifest,
    prepare_run,
    reduce_task,
    run_shard_task,
    torch_threads,
)
from common.layers import decoder_blocks
from common.manifest_file import load_manifest
from common.organism.files import Organism
from jobs import feature_correlation
from jobs._feature_graph import Layout, degree_survival, edge_ends
from jobs.feature_correlation import EdgeRule, find_edges, most_frequent
from tests.helpers import REPO, run_all, write_manifest_file

DEMO = REPO / "manifests" / "demo" / "feature_correlation.yaml"
# Small enough for seconds on a CPU; batch_size 1 forwards each window alone, exactly as the
# reference below does, so that the two agree to rounding in the statistics alone.
SMALL = {"run": {"shards": 3},
         "feature_correlation": {"corpus": {"window": 48, "tokens": 3000}, "batch_size": 1, "tokens_per_unit": 500,
                                 "features": {"top": 40, "min_support": 3, "selection_tokens": 1000},
                                 "edges": {"threshold": 0.3, "min_support": 5}}}


def write(folder, overrides: dict, name: str = "manifest.yaml"):
    return write_manifest_file(folder, overrides, base=DEMO, name=name)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    path = write(folder, SMALL)
    return run_all(path), load_manifest(path)


def reference_features(settings, pooling: str = "token") -> tuple[list, dict[int, np.ndarray]]:
    """Each window forwarded alone (block outputs read by plain hooks), encoded by each SAE."""
    organism = Organism()
    model, tokenizer = organism.model(attn_implementation="sdpa"), organism.tokenizer()
    saes = {layer: organism.sae(layer) for layer in range(4)}
    found = list(windows(settings.corpus, tokenizer))
    rows = {layer: [] for layer in saes}
    captured = {}
    hooks = [decoder_blocks(model)[layer].register_forward_hook(
        lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out[0] if isinstance(out, tuple) else out))
        for layer in saes]
    with torch.no_grad():
        for window in found:
            ids = torch.tensor([window.ids])
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            for layer, sae in saes.items():
                content = captured[layer][0, window.prefix :]
                if pooling == "token":
                    rows[layer].append(sae.encode(content).numpy())
                elif pooling == "sequence_mean_of_features":
                    rows[layer].append(sae.encode(content).mean(0, keepdim=True).numpy())
                else:
                    rows[layer].append(sae.encode(content.mean(0, keepdim=True)).numpy())
    for hook in hooks:
        hook.remove()
    return found, {layer: np.concatenate(parts).astype(np.float64) for layer, parts in rows.items()}


@pytest.fixture(scope="module")
def reference(small_run):
    _, manifest = small_run
    with torch_threads(manifest.cluster.cpus_per_task):  # the task's threads: the same float sums
        return reference_features(manifest.settings)


def test_the_first_pass_keeps_the_most_frequent_features(small_run, reference):
    run, manifest = small_run
    choice = manifest.settings.features
    _, rows = reference
    with h5py.File(run.merged_path) as merged:
        for layer, acts in rows.items():
            counts = (acts[: choice.selection_tokens] > 0).sum(0)  # a row per token, in corpus order
            kept = merged[f"layers/L{layer}/features"][()]
            assert len(kept) == choice.top and (counts[kept] >= choice.min_support).all()
            dropped = np.setdiff1d(np.arange(acts.shape[1]), kept)
            assert counts[kept].min() >= counts[dropped].max()  # nothing left out beats what was kept


def test_merged_statistics_equal_numpy_on_the_concatenated_features(small_run, reference):
    run, manifest = small_run
    _, rows = reference
    with h5py.File(run.merged_path) as merged:
        layers = [int(x) for x in merged.attrs["layers"]]
        kept = {layer: merged[f"layers/L{layer}/features"][()] for layer in layers}
        data = np.hstack([rows[layer][:, kept[layer]] for layer in layers])
        assert merged.attrs["rows"] == len(data) == manifest.settings.corpus.tokens
        expected_r = np.corrcoef(data.T)
        on = (data > 0).astype(np.int64)
        offsets = np.cumsum([0] + [len(kept[layer]) for layer in layers])
        for (i, a), (j, b) in itertools.combinations_with_replacement(enumerate(layers), 2):
            block = merged[f"blocks/L{a}-L{b}"]
            rs, cs = slice(offsets[i], offsets[i + 1]), slice(offsets[j], offsets[j + 1])
            np.testing.assert_allclose(block["r"][()], expected_r[rs, cs], rtol=0, atol=1e-10)
            np.testing.assert_array_equal(block["coactive"][()], on[:, rs].T @ on[:, cs])
        np.testing.assert_allclose(merged["layers/L2/mean"][()], data[:, offsets[2] : offsets[3]].mean(0), atol=1e-12)
        mi = merged[f"blocks/L{layers[0]}-L{layers[1]}/mi"][()]
        for x, y in [(0, 0), (3, 7), (11, 2)]:
            p, q = on[:, x].astype(bool), on[:, offsets[1] + y].astype(bool)
            direct = sum(np.mean((p == u) & (q == v)) * np.log2(np.mean((p == u) & (q == v)) / (np.mean(p == u) * np.mean(q == v)))
                         for u, v in itertools.product([True, False], repeat=2) if np.mean((p == u) & (q == v)) > 0)
            assert mi[x, y] == pytest.approx(direct, abs=1e-12)


def test_the_report_counts_the_edges_the_rule_gives(small_run, reference):
    run, manifest = small_run
    rule = manifest.settings.edges
    _, rows = reference
    summary = json.loads((run.report_dir / "summary.json").read_text())
    with h5py.File(run.merged_path) as merged:
        layers = [int(x) for x in merged.attrs["layers"]]
        kept = {layer: merged[f"layers/L{layer}/features"][()] for layer in layers}
        stored = {(int(a), int(fa), int(b), int(fb)) for a, fa, b, fb in zip(
            *(merged[f"edges/{c}"][()] for c in ("layer_a", "feature_a", "layer_b", "feature_b")), strict=True)}
    expected = set()
    for a, b in itertools.combinations_with_replacement(layers, 2):
        x, y = rows[a][:, kept[a]], rows[b][:, kept[b]]
        for i, j in itertools.product(range(x.shape[1]), range(y.shape[1])):
            if a == b and j <= i:
                continue
            r = np.corrcoef(x[:, i], y[:, j])[0, 1]
            evidence = ((x[:, i] > 0) & (y[:, j] > 0)).sum() if r > 0 else min((x[:, i] > 0).sum(), (y[:, j] > 0).sum())
            if abs(r) > rule.threshold and evidence >= rule.min_support:
                expected.add((a, int(kept[a][i]), b, int(kept[b][j])))
    assert stored == expected and len(expected) > 50
    within = sum(1 for a, _, b, _ in expected if a == b)
    assert summary["within_layer_total"] == within and summary["cross_layer_total"] == len(expected) - within
    assert summary["within_layer"]["layer_1"] == sum(1 for a, _, b, _ in expected if a == b == 1)
    assert summary["cross_layer"]["layer_0_vs_3"] == sum(1 for a, _, b, _ in expected if (a, b) == (0, 3))
    top = (run.report_dir / "top_pairs.csv").read_text().splitlines()
    assert top[0].startswith("layer_a,feature_a,layer_b,feature_b,r,mi_bits,coactive")
    report = (run.report_dir / "report.md").read_text()
    assert f"{within:,} within-layer and {len(expected) - within:,} cross-layer edges" in report
    assert (run.report_dir / "heatmaps.png").stat().st_size > 10_000 and (run.report_dir / "degrees.png").exists()
    assert (run.report_dir / "cross_layer.png").stat().st_size > 10_000 and (run.report_dir / "edge_matrix.png").exists()
    cross = pd.read_csv(run.report_dir / "top_cross_layer_pairs.csv")
    assert len(cross) and (cross["layer_a"] < cross["layer_b"]).all() and cross["r"].abs().is_monotonic_decreasing


def test_one_shard_or_three_and_any_shard_order_give_the_same_graph(small_run, tmp_path):
    run, manifest = small_run
    single = run_all(write(tmp_path, {**SMALL, "run": {"shards": 1}, "feature_correlation": {
        **SMALL["feature_correlation"], "tokens_per_unit": 3000}}))
    with h5py.File(run.merged_path) as three, h5py.File(single.merged_path) as one:
        for name in ("blocks/L0-L2/r", "blocks/L1-L1/mi", "blocks/L3-L3/coactive", "layers/L0/features"):
            np.testing.assert_allclose(three[name][()], one[name][()], rtol=0, atol=1e-12)
    shards = [run.shard_path(k) for k in range(3)]
    feature_correlation.reduce(manifest, shards[::-1], tmp_path)  # corpus order, whatever the shard order
    with h5py.File(run.merged_path) as first, h5py.File(tmp_path / "merged.h5") as again:
        np.testing.assert_array_equal(first["blocks/L0-L1/r"][()], again["blocks/L0-L1/r"][()])


@pytest.mark.parametrize("pooling", ["sequence_mean_of_features", "sequence_features_of_mean_activation"])
def test_sequence_pooling_has_a_row_per_window(tmp_path, pooling):
    overrides = {"run": {"shards": 1}, "feature_correlation": {
        "corpus": {"window": 32, "tokens": 1600}, "batch_size": 4, "tokens_per_unit": 1600, "pooling": pooling,
        "features": {"top": None}}}
    path = write(tmp_path, overrides)
    run = run_all(path)
    found, rows = reference_features(load_manifest(path).settings, pooling)
    with h5py.File(run.merged_path) as merged:
        assert merged.attrs["rows"] == len(found) and merged.attrs["pooling"] == pooling
        assert len(merged["layers/L1/features"]) == 512  # every feature
        np.testing.assert_allclose(merged["layers/L1/mean"][()], rows[1].mean(0), rtol=0, atol=1e-5)
        r = merged["blocks/L1-L2/r"][()]
        live = ~np.isnan(r)
        with np.errstate(invalid="ignore", divide="ignore"):  # features that never fire have no r
            expected = np.corrcoef(rows[1].T, rows[2].T)[:512, 512:]
        np.testing.assert_allclose(r[live], expected[live], rtol=0, atol=1e-4)  # batched windows: float32 rounding
        assert live.sum() > 10_000


# ---------------------------------------------------------------- the rules at their edges


def crafted(r: float, coactive: int, active: tuple[int, int]) -> CoMoments:
    """Two features with correlation exactly `r` and the given counts (one layer of two)."""
    stats = CoMoments.empty(2)
    stats.n, stats.m2[:] = 1000, 1.0
    stats.comoment = np.array([[1.0, r], [r, 1.0]])
    stats.active = np.array(active)
    stats.coactive = np.array([[active[0], coactive], [coactive, active[1]]])
    return stats


@pytest.mark.parametrize(("r", "coactive", "active", "is_edge"), [
    (0.3, 500, (600, 600), False),       # |r| must exceed the threshold
    (0.3000001, 500, (600, 600), True),
    (0.9, 10, (600, 600), True),          # exactly the support
    (0.9, 9, (600, 600), False),          # one row short: the rare-feature artefact
    (1.0, 1, (1, 1), False),              # the seed's r = 1.0 from a single shared row
    (-0.5, 0, (10, 900), True),           # negative: the rarer feature's rows are the evidence
    (-0.5, 0, (9, 900), False),
    (-0.3, 0, (500, 500), False),
])
def test_edge_rule_at_its_edges(r, coactive, active, is_edge):
    layout = Layout([5], {5: np.array([7, 9])})
    edges = find_edges(crafted(r, coactive, active), layout, 5, 5, EdgeRule(threshold=0.3, min_support=10))
    assert (len(edges.rows) == 1) == is_edge
    assert edges.unsupported == int(abs(r) > 0.3 and not is_edge)


def test_a_feature_is_never_its_own_neighbour_and_silent_features_have_none():
    stats = crafted(0.9, 500, (600, 600))
    stats.m2[1] = 0.0  # never varies: r is NaN
    edges = find_edges(stats, Layout([0], {0: np.array([0, 1])}), 0, 0, EdgeRule())
    assert len(edges.rows) == 0 and edges.unsupported == 0


def test_degree_survival_counts_features_without_edges_in_the_whole():
    degrees, share = degree_survival(np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 3]))
    assert degrees.tolist() == [1, 3] and share.tolist() == [0.2, 0.1]
    degrees, share = degree_survival(np.array([2, 2, 5, 0]))
    assert degrees.tolist() == [2, 5] and share.tolist() == [0.75, 0.25]


def test_the_cross_layer_heatmap_shows_each_feature_beside_a_partner():
    # strongest first; with two per side, (7, 30) does not fit, (5, 20) does (both ends already shown)
    between = pd.DataFrame({"feature_a": [5, 6, 7, 5, 6], "feature_b": [10, 20, 30, 20, 40]})
    lower, upper = edge_ends(between, 2)
    assert lower.tolist() == [5, 6] and upper.tolist() == [10, 20]
    lower, upper = edge_ends(between, 5)
    assert lower.tolist() == [5, 6, 7] and upper.tolist() == [10, 20, 30, 40]


def test_most_frequent_breaks_ties_by_id_and_respects_the_support():
    counts = np.array([5, 9, 9, 2, 9, 0, 7])
    assert most_frequent(counts, 2, 1).tolist() == [1, 2]
    assert most_frequent(counts, 4, 1).tolist() == [1, 2, 4, 6]
    assert most_frequent(counts, 10, 5).tolist() == [0, 1, 2, 4, 6]  # fewer than top qualify
    assert most_frequent(counts, 3, 10).tolist() == []


# ---------------------------------------------------------------- shards share one feature choice


def test_shards_adopt_a_published_choice_and_reduce_refuses_disagreeing_shards(tmp_path):
    path = write(tmp_path, {**SMALL, "run": {"shards": 2}})
    run = prepare_run(load_manifest(path))
    published = {"rows": 0, "tokens": 0, "layers": {str(layer): {"features": list(range(layer, layer + 40)),
                                                                  "active_rows": [0] * 40} for layer in range(4)}}
    (run.shards_dir / feature_correlation.CHOICE_FILE).write_text(json.dumps(published))
    run_shard_task(str(run.path), 0)
    (run.shards_dir / feature_correlation.CHOICE_FILE).unlink()  # shard 1 makes its own choice
    run_shard_task(str(run.path), 1)
    with h5py.File(run.shard_path(0)) as shard:
        assert json.loads(shard.attrs["features"])["2"] == list(range(2, 42))
    with pytest.raises(UserError, match="counted other features than .*shard_00000.h5: the shards disagree"):
        reduce_task(str(run.path))


def test_a_resumed_shard_refuses_a_changed_feature_choice(tmp_path):
    run = prepare_run(load_manifest(write(tmp_path, {**SMALL, "run": {"shards": 1}})))
    with h5py.File(run.shards_dir / "shard_00000.h5.partial", "w") as partial:  # an attempt killed mid-way
        partial.attrs.update(format="saebatch-shard/1", run_id=run.load_plan().run_id, shard_index=0,
                             features=json.dumps({"0": [1, 2, 3]}))
        partial.create_group("units")
    with pytest.raises(UserError, match="shard 0 was started with another feature choice than .*feature_choice.json"):
        run_shard_task(str(run.path), 0)


def test_a_gemma2_model_from_a_folder_runs_with_its_own_attention(tmp_path):
    """Gemma 2 soft-caps attention logits: transformers must choose eager attention for it."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tests.helpers import save_random_sae

    config = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma2")
    Organism().tokenizer().save_pretrained(tmp_path / "gemma2")
    saes = save_random_sae(tmp_path / "saes", d_in=64, d_sae=48)
    run = run_all(write(tmp_path, {"run": {"shards": 2}, "feature_correlation": {
        "model": {"id": None, "path": str(tmp_path / "gemma2")}, "sae": {"builtin": None, "path": saes},
        "layers": [0, 1], "corpus": {"window": 32, "tokens": 640}, "tokens_per_unit": 320, "features": {"top": None}}}))
    with h5py.File(run.merged_path) as merged:
        assert merged.attrs["rows"] == 640 and merged["blocks/L0-L1/r"].shape == (48, 48)


@pytest.mark.gpu  # skipped, saying why, where torch sees no GPU (conftest)
def test_sums_on_the_gpu_equal_those_on_the_cpu(monkeypatch):
    from common.comoments import SparseSums

    rows = torch.rand(300, 700, dtype=torch.float64) * (torch.rand(300, 700) < 0.02)
    for share in (2.0, 0.0):  # scattered pairs, then dense products
        monkeypatch.setattr(SparseSums, "DENSE_SHARE", share)
        sums = {device: SparseSums.zeros(700, device) for device in ("cpu", "cuda")}
        for device_sums in sums.values():
            device_sums.add(rows)
        np.testing.assert_allclose(sums["cuda"].comoments().pearson(), sums["cpu"].comoments().pearson(),
                                   rtol=0, atol=1e-12)


# ---------------------------------------------------------------- bad input, before any GPU time


def refused(tmp_path, overrides: dict, message: str, capsys):
    assert main(["plan", str(write(tmp_path, overrides))]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_more_features_than_the_sae_has(tmp_path, capsys):
    refused(tmp_path, {"feature_correlation": {"features": {"top": 600}}},
            "feature_correlation.features.top: 600 is more than the 512 features of layer 0's SAE; choose at most "
            "512", capsys)


def test_statistics_too_big_for_the_memory_asked_for(tmp_path, capsys):
    refused(tmp_path, {"cluster": {"mem_gb": 0.05}, "feature_correlation": {"features": {"top": None}}},
            "the statistics of 2,048 features (512 of layer 0, 512 of layer 1, 512 of layer 2, 512 of layer 3) need "
            "about 0.1 GB, more than cluster.mem_gb = 0.05 GB. Keep fewer features (feature_correlation.features.top:"
            " 312 or less per layer), choose fewer layers, or raise cluster.mem_gb", capsys)


def test_statistics_of_saes_of_unknown_width_are_checked_at_the_assumed_width(tmp_path, capsys):
    """A pretrained release's widths are known only once loaded: the check counts the assumed width."""
    paper = write_manifest_file(tmp_path, {"feature_correlation": {"features": {"top": None}}},
                                base=REPO / "manifests" / "feature_correlation_gemma2_2b.yaml")
    assert main(["plan", str(paper)]) == 2
    err = capsys.readouterr().err
    assert ("the statistics of 65,536 features (16384 of layer 4, 16384 of layer 8, 16384 of layer 12, 16384 of layer "
            "16; SAE widths are known only once loaded: 16384 assumed) need about 137.4 GB, more than cluster.mem_gb "
            "= 32 GB") in err, err


def test_corpus_missing_empty_or_short(tmp_path, capsys):
    absent = write(tmp_path, {"feature_correlation": {"corpus": {"path": str(tmp_path / "absent.jsonl"), "builtin": None}}})
    with pytest.raises(UserError, match="absent.jsonl does not exist"):  # submitting refuses
        plan_manifest(load_manifest(absent))
    assert main(["plan", str(absent)]) == 0  # planning estimates, and says so
    assert "absent.jsonl is not here; taken to hold the 32,768 tokens asked for" in capsys.readouterr().out
    (tmp_path / "empty.txt").write_text("\n")
    refused(tmp_path, {"feature_correlation": {"corpus": {"path": str(tmp_path / "empty.txt"), "builtin": None}}},
            "empty.txt holds no text", capsys)
    short = tmp_path / "short.jsonl"
    texts = [f"The cat {i} sleeps by the house." for i in range(40)]
    short.write_text("\n".join(json.dumps({"text": text}) for text in texts))
    size = sum(len(Organism().tokenizer()(text, add_special_tokens=False).input_ids) for text in texts)
    corpus = {"path": str(short), "builtin": None}
    refused(tmp_path, {"feature_correlation": {"corpus": corpus}}, "feature_correlation.corpus.tokens: the corpus "
            f"holds only {size} tokens of the 32,768 asked; lower feature_correlation.corpus.tokens, or set "
            "feature_correlation.corpus.allow_short: true", capsys)
    allowed = load_manifest(write(tmp_path, {"feature_correlation": {"corpus": {**corpus, "allow_short": True},
                                                                      "tokens_per_unit": 128}}))
    _, plan = plan_manifest(allowed)
    assert plan.units[-1].payload["stop"] == size and len(plan.units) == -(-size // 128)


def test_units_must_hold_a_window(tmp_path, capsys):
    assert main(["plan", str(write(tmp_path, {"feature_correlation": {"tokens_per_unit": 100}}))]) == 2
    assert "tokens_per_unit (100) must be at least corpus.window (128)" in capsys.readouterr().err


def test_window_longer_than_the_model_reads(tmp_path, capsys):
    refused(tmp_path, {"feature_correlation": {"corpus": {"window": 5000}, "tokens_per_unit": 5000}},
            "feature_correlation.corpus.window: 5000 tokens exceed the model's", capsys)
