"""The token-tracking job against independent computations on the built-in model organism."""

import h5py
import numpy as np
import pytest
import torch
import yaml

from common.errors import UserError
from common.launcher import plan_manifest
from common.manifest_file import load_manifest
from common.organism.files import Organism
from common.saes import load_sae
from common.sparse import read_csr
from jobs import token_tracking
from tests.helpers import DEMO_MANIFEST, run_all, save_random_sae

D_MODEL = 128  # the organism's residual width


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    data = yaml.safe_load(DEMO_MANIFEST.read_text())
    data["run"]["root"] = str(folder / "runs")
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(data))
    return run_all(path), load_manifest(path)


@pytest.fixture(scope="module")
def reference():
    """Scenario -> an unbatched forward pass: attentions, hidden states, tokens."""
    model, tokenizer = Organism().model(), Organism().tokenizer()
    settings = load_manifest(DEMO_MANIFEST).settings
    out = {}
    for scenario in settings.scenarios:
        prompt = settings.prompt(scenario)
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            result = model(**encoded, output_attentions=True, output_hidden_states=True)
        out[scenario.name] = (result, encoded["input_ids"][0])
    return out


def test_attention_equals_unbatched_forward(demo_run, reference):
    run, _ = demo_run
    with h5py.File(run.merged_path) as merged:
        for name, (result, ids) in reference.items():
            unit = merged["units"][name]
            np.testing.assert_array_equal(unit["token_ids"][()], ids.numpy())
            for layer in range(4):
                stored = unit[f"attention/L{layer}"][()]
                assert stored.dtype == np.float16 and stored.shape == (4, len(ids), len(ids))
                np.testing.assert_allclose(stored, result.attentions[layer][0].numpy(), atol=1e-3)


def test_features_equal_sae_of_hidden_states_next_index(demo_run, reference):
    """Layer L's features are the SAE of hidden_states[L + 1] (blocks before the last)."""
    run, manifest = demo_run
    with h5py.File(run.merged_path) as merged:
        for layer in range(3):
            sae = load_sae(manifest.settings.sae, layer, D_MODEL, torch.device("cpu"))
            k = sae.cfg.k
            for name, (result, _) in reference.items():
                x = result.hidden_states[layer + 1][0]
                expected = sae.encode(x).detach().numpy()
                pre = (sae.process_sae_in(x) @ sae.W_enc + sae.b_enc).topk(k + 1).values
                clear = (pre[:, k - 1] - pre[:, k] > 1e-4).numpy()  # batching moves values by ~1e-6: skip near-ties
                stored = read_csr(merged["units"][name][f"features/L{layer}"]).toarray()
                assert stored.shape == expected.shape and clear.mean() > 0.9
                np.testing.assert_allclose(stored[clear], expected[clear], atol=1e-4)
                assert 0 < (stored > 0).sum(axis=1).mean() <= k  # TopK: at most k active


def test_key_positions_cover_the_span_text(demo_run):
    run, _ = demo_run
    with h5py.File(run.merged_path) as merged:
        unit = merged["units"]["Bankruptcy_90_all_in"]
        tokens = [t.decode() for t in unit["tokens"][()]]
        prompt = unit.attrs["prompt"]
        offsets = unit["offsets"][()]
        for span, text in [("balance", "$90"), ("probability", "30%"), ("goal", "double the initial funds ($200)")]:
            positions = unit["key_positions"][span][()]
            assert len(positions) and np.all(np.diff(positions) == 1)
            assert text in "".join(tokens[p] for p in positions)
            covered = prompt[offsets[positions[0], 0] : offsets[positions[-1], 1]]
            assert text in covered and len(covered) <= len(text) + 2
        choices = unit["key_positions"]["choices"][()]
        assert "".join(tokens[p] for p in choices).replace(" ", "") == "BetStop"


def test_report_numbers_equal_independent_computation(demo_run, reference):
    run, manifest = demo_run
    import pandas as pd

    table = pd.read_csv(run.report_dir / "span_attention.csv")
    assert len(table) == 10 * 4 * 4  # scenarios x layers x spans
    with h5py.File(run.merged_path) as merged:
        for name, (result, _) in reference.items():
            for span in ("balance", "choices"):
                positions = merged["units"][name]["key_positions"][span][()]
                for layer in (0, 3):
                    expected = result.attentions[layer][0, :, -1, positions].sum(-1).mean().item()
                    row = table.query("scenario == @name and layer == @layer and span == @span").iloc[0]
                    assert row.attention == pytest.approx(expected, abs=2e-3)
                    assert row.per_token == pytest.approx(expected / len(positions), abs=2e-3)
                    uniform = len(positions) / result.attentions[layer].shape[-1]
                    assert row.vs_uniform == pytest.approx(expected / uniform, rel=1e-2)
    top = pd.read_csv(run.report_dir / "top_features.csv")
    sae = load_sae(manifest.settings.sae, 1, D_MODEL, torch.device("cpu"))
    final = sae.encode(reference["Risky_40"][0].hidden_states[2][0, -1]).detach().numpy()
    expected = [f for f in np.argsort(-final, kind="stable")[:5] if final[f] > 0]
    rows = top.query("scenario == 'Risky_40' and layer == 1").sort_values("rank")
    assert rows["feature"].tolist()[:3] == expected[:3]
    report = (run.report_dir / "report.md").read_text()
    for name in ("span_attention.png", "attention_heatmaps.png", "top_features.csv"):
        assert (run.report_dir / name).is_file() and name.split(".")[0] in report


def test_shards_are_readable_on_their_own(demo_run):
    run, _ = demo_run
    with h5py.File(run.shard_path(0)) as shard:
        attrs = shard.attrs
        assert attrs["complete"] and attrs["model"] == "builtin:organism"
        assert "block L" in attrs["layer_convention"] and "hook_resid_post" in attrs["layer_convention"]
        assert list(attrs["layers"]) == [0, 1, 2, 3] and attrs["attention_dtype"] == "float16"
        assert "the model organism's SAE of layer 0" in attrs["sae_ids"]


def test_batch_size_does_not_change_results(write_manifest, demo_run):
    run, _ = demo_run
    single = run_all(write_manifest({"token_tracking": {"batch_size": 1, "layers": [0, 3]}, "run": {"shards": 1}}))
    with h5py.File(run.merged_path) as batched, h5py.File(single.merged_path) as alone:
        for name in ("Desperate_10", "Big_success_280"):
            for layer in (0, 3):
                a, b = batched["units"][name], alone["units"][name]
                np.testing.assert_allclose(a[f"attention/L{layer}"][()], b[f"attention/L{layer}"][()], atol=1e-3)
                np.testing.assert_array_equal(a["key_positions/balance"][()], b["key_positions/balance"][()])


@pytest.mark.parametrize("mode", ["attention_only", "features_only"])
def test_modes_record_only_what_they_name(write_manifest, mode):
    overrides = {"token_tracking": {"mode": mode, "layers": "1-2", "scenarios": [
        {"name": "short", "fields": {"history": "", "balance": 20, "round": 2}}]}, "run": {"shards": 1}}
    if mode == "attention_only":
        overrides["token_tracking"]["sae"] = None
    run = run_all(write_manifest(overrides))
    with h5py.File(run.merged_path) as merged:
        unit = merged["units"]["short"]
        assert ("attention" in unit) == (mode == "attention_only")
        assert ("features" in unit) == (mode == "features_only")
        assert sorted(unit.get("attention", unit.get("features"))) == ["L1", "L2"]
    report = (run.report_dir / "report.md").read_text()
    assert ("Top SAE features" in report) == (mode == "features_only")
    assert ("Attention of the decision token" in report) == (mode == "attention_only")


def test_bad_input_is_refused_at_plan_time(write_manifest, tmp_path):
    def refused(overrides, message):
        with pytest.raises(UserError, match=message):
            plan_manifest(load_manifest(write_manifest(overrides)))

    refused({"token_tracking": {"layers": "0-7"}}, r"token_tracking\.layers: layer\(s\) \[4, 5, 6, 7\] outside the model")
    refused({"token_tracking": {"key_spans": {"balance": "Balance left: \\$\\d+"}}},
            r"token_tracking\.key_spans\.balance: pattern .* matches nothing in the prompt of scenario 'Bankruptcy_90_all_in'")
    refused({"token_tracking": {"heatmap_layers": [1], "layers": [0, 2]}}, "not among the tracked layers")
    refused({"run": {"shards": 11}}, r"run\.shards is 11 but the manifest has only 10")
    template = save_random_sae(tmp_path, d_in=32, layers=range(4))
    refused({"token_tracking": {"sae": {"path": template, "builtin": None}}}, "d_in 32 but .* d_model 128")
    refused({"token_tracking": {"sae": {"release": "llama_scope_lxr_8x", "id": "l{layer}r_8x", "builtin": None}}},
            r"token_tracking\.sae\.release: llama_scope_lxr_8x holds SAEs of meta-llama/Llama-3.1-8B \(d_in 4096\)")
    refused({"token_tracking": {"key_spans": {"bal/ance": "Current"}}}, "must be letters, digits or '_'")
    refused({"token_tracking": {"prompt_template": "{history:d} {balance} {round}"}},
            "prompt_template cannot be filled for scenario")


def test_key_positions_use_offsets_not_token_text():
    offsets = np.array([[0, 0], [0, 4], [4, 9], [9, 10], [10, 13]])  # BOS, then four tokens
    assert token_tracking.key_positions(r"x(\$\d+)", "abcdefghix$90", offsets).tolist() == [4]
    assert token_tracking.key_positions(r"hix\$9", "abcdefghix$90", offsets).tolist() == [2, 3, 4]
    assert token_tracking.key_positions(r"abc", "abcdefghix$90", offsets).tolist() == [1]


@pytest.mark.science
def test_decision_cue_attends_to_the_balance_the_organism_decides_on(demo_run):
    """The organism's rule reads the balance. In every scenario some head of the stored attention
    gives the balance span at least twice what uniform attention would, and over the scenarios the
    balance is, per token, the span the decision token attends to most."""
    run, _ = demo_run
    ratios: dict[str, list[float]] = {}
    with h5py.File(run.merged_path) as merged:
        for unit in merged["units"].values():
            n_tokens = len(unit["token_ids"][()])
            for span in ("balance", "goal", "probability", "choices"):
                positions = unit[f"key_positions/{span}"][()]
                best = max(unit[f"attention/L{layer}"][()][:, -1, positions].sum(-1).max() for layer in range(4))
                ratios.setdefault(span, []).append(float(best) / (len(positions) / n_tokens))
    assert min(ratios["balance"]) >= 1.5
    mean = {span: np.mean(values) for span, values in ratios.items()}
    assert max(mean, key=mean.get) == "balance", mean
