"""The reasoning-circuit chain (seed 003) on the organism: capture, SAE training, causal ablation.

The demo chain runs once per session (conftest's `reasoning_chain`); each step's outputs are
checked against computations made here independently.
"""

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
import yaml
from sae_lens import SAE
from scipy import stats

from common.cli import main
from common.edits import edit_block_output, zero_features
from common.manifest_file import load_manifest
from common.organism.files import Organism
from common.paired import mcnemar
from common.rundir import RunDir
from common.sae_quality import evaluate
from jobs._reasoning.problems import BenchmarkSpec, load_benchmark
from jobs.feature_ablation import attribution, control_sets, top_features
from tests.helpers import REPO, failing_on_call

DEMO = REPO / "manifests" / "demo"
DEMO_BENCHMARK = yaml.safe_load((DEMO / "reasoning_1_capture.yaml").read_text())["activation_capture"]["benchmarks"][0]


@pytest.fixture(scope="module")
def organism():
    organism = Organism()
    return organism.model(attn_implementation=None), organism.tokenizer()


def demo_benchmark():
    return load_benchmark(BenchmarkSpec(**DEMO_BENCHMARK))


# ---------------------------------------------------------------- capture


@pytest.mark.parametrize("item", [0, 299, 599])  # items of different units and shards
def test_captured_activations_equal_an_independent_forward(reasoning_chain, organism, item):
    model, tokenizer = organism
    bench = demo_benchmark()
    ids = tokenizer(bench.with_solution(bench.items[item]), return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # [L + 1]: block L's output
    with h5py.File(reasoning_chain.capture.merged_path, "r") as merged:
        group = merged["models/organism"]
        rows = np.flatnonzero(group["item"][()] == item)
        assert group["position"][()][rows].tolist() == list(range(1, ids.shape[1]))  # every token but <bos>
        for layer in (1, 2):
            captured = group[f"L{layer}"][()][rows].astype(np.float32)
            expected = hidden[layer + 1][0, 1:].numpy()
            np.testing.assert_allclose(captured, expected, rtol=2e-3, atol=2e-2)


# ---------------------------------------------------------------- training


def test_trained_saes_load_in_sae_lens_and_meet_their_reported_metrics(reasoning_chain, organism):
    model, tokenizer = organism
    metrics = {row["layer"]: row for row in _csv(reasoning_chain.training.report_dir / "metrics.csv")}
    bench = demo_benchmark()
    for layer in (1, 2):
        sae = SAE.load_from_disk(reasoning_chain.training.path / "saes" / "organism" / f"L{layer}")
        sae.requires_grad_(False)
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post" and sae.cfg.d_sae == 512
        with h5py.File(reasoning_chain.capture.merged_path, "r") as merged:
            everything = torch.from_numpy(merged[f"models/organism/L{layer}"][()])
            item_of_token = merged["models/organism/item"][()]
        with h5py.File(reasoning_chain.training.merged_path, "r") as merged:
            held_out = merged[f"held_out_items/organism.L{layer}"][()] % 2**32  # one benchmark: index 0
        # split by item: the metrics are those of the held-out items' tokens, a tenth of the items
        assert 0.05 < len(held_out) / len(np.unique(item_of_token)) < 0.2
        assert int(metrics[layer]["held_out_items"]) == len(held_out)
        on_held_out = evaluate(sae, everything[torch.from_numpy(np.isin(item_of_token, held_out))])
        assert on_held_out["explained_variance"] == pytest.approx(float(metrics[layer]["explained_variance"]), rel=1e-4)
        on_all_tokens = evaluate(sae, everything)
        assert on_all_tokens["l0"] == pytest.approx(16, abs=0.01)  # topk, k = 16
        # CE with the SAE spliced in at every non-<bos> position of the held-out items, one at a time
        losses = []
        for item in [item for item in bench.items if item.index in set(held_out.tolist())][:64]:
            ids = tokenizer(bench.with_solution(item), return_tensors="pt").input_ids

            def splice(hidden, rows, sae=sae):
                return torch.cat([hidden[:, :1], sae.decode(sae.encode(hidden[:, 1:]))], dim=1)

            with torch.no_grad(), edit_block_output(model, layer, splice):
                losses.append((model(input_ids=ids, labels=ids).loss.item(), ids.shape[1] - 1))
        spliced = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
        assert spliced == pytest.approx(float(metrics[layer]["ce_spliced"]), rel=1e-4)
        assert float(metrics[layer]["ce_recovered"]) > 0.9
    with h5py.File(reasoning_chain.training.merged_path, "r") as merged:
        assert merged["curves/organism.L1/decorrelation"][()].min() > 0  # the penalty is in the loss


def _csv(path):
    import pandas as pd

    return pd.read_csv(path).to_dict("records")


# ---------------------------------------------------------------- ablation


def test_ablating_the_top_features_costs_more_than_random_ones(reasoning_chain):
    """The demo's science: the top-10 features drop accuracy by more than the seed's 5 points, more
    than every one of the 20 matched random sets, and significantly more than the costliest."""
    summary = {row["benchmark"]: row for row in _csv(reasoning_chain.ablation.report_dir / "summary.csv")}
    row = summary["arithmetic"]
    assert row["items"] == 600 - 64
    assert row["baseline"] > 0.45                       # the organism solves about half of them
    assert row["drop"] > 0.05 and row["drop"] > row["control_drop"] + 0.04
    assert row["control_sets"] == 20 and row["drop"] > row["control_drop_max"] and row["null_p_drop"] == pytest.approx(1 / 21)
    assert row["p_ablated_vs_control"] < 0.05 and row["criterion_met"] and row["beats_control_significantly"]
    with h5py.File(reasoning_chain.ablation.merged_path, "r") as merged:
        unit = merged["units/organism.arithmetic"]
        correct = {c: unit[f"{c}/correct"][()] for c in ("baseline", "ablated", *(f"control_{i:02d}" for i in range(20)))}
    assert row["baseline"] == pytest.approx(correct["baseline"].mean())
    assert row["p_ablated"] == pytest.approx(mcnemar(correct["baseline"], correct["ablated"]))
    drops = [correct["baseline"].mean() - correct[f"control_{i:02d}"].mean() for i in range(20)]
    assert row["control_drop"] == pytest.approx(np.mean(drops)) and row["control_drop_max"] == pytest.approx(max(drops))
    paired = stats.ttest_rel(correct["baseline"].astype(float), correct["ablated"].astype(float)).confidence_interval()
    assert (row["drop_low"], row["drop_high"]) == pytest.approx((paired.low, paired.high))  # the paired t interval
    assert row["drop_low"] < row["drop"] < row["drop_high"]
    report = (reasoning_chain.ablation.report_dir / "report.md").read_text()
    assert f"drop {100 * row['drop']:+.1f} pp (95% interval {100 * row['drop_low']:+.1f} pp" in report


def test_batched_answers_equal_one_item_at_a_time(reasoning_chain, organism):
    """Rows of three conditions share a generate call; each equals its item generated alone."""
    model, tokenizer = organism
    bench = demo_benchmark()
    saes = {layer: SAE.load_from_disk(reasoning_chain.training.path / "saes" / "organism" / f"L{layer}")
            .requires_grad_(False) for layer in (1, 2)}
    with h5py.File(reasoning_chain.ablation.merged_path, "r") as merged:
        unit = merged["units/organism.arithmetic"]
        items = unit["item"][()][:6]
        texts = {c: [t.decode() for t in unit[f"{c}/text"][()][:6]] for c in ("baseline", "ablated")}
        top = np.stack([unit["top/layer"][()], unit["top/feature"][()]], axis=1)
    for position, index in enumerate(items):
        ids = tokenizer(bench.prompt(bench.items[index]), return_tensors="pt")
        for condition in ("baseline", "ablated"):
            hooks = []
            if condition == "ablated":
                for layer, sae in saes.items():
                    chosen = torch.zeros(1, sae.cfg.d_sae, dtype=torch.bool)
                    chosen[0, top[top[:, 0] == layer, 1]] = True
                    keep = torch.ones(ids.input_ids.shape, dtype=torch.bool)
                    keep[0, 0] = False  # <bos> is never edited
                    hooks.append(edit_block_output(model, layer, zero_features(sae, chosen, keep)))
            with torch.no_grad(), hooks[0] if hooks else _nothing(), hooks[1] if hooks else _nothing():
                output = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                        stop_strings=bench.spec.stop_strings, tokenizer=tokenizer)
            alone = tokenizer.decode(output[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
            assert alone == texts[condition][position], (condition, index)


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


def test_attribution_equals_activation_times_gradient_computed_on_the_features(reasoning_chain, organism):
    """The job differentiates block outputs; here the features themselves are the leaves."""
    model, tokenizer = organism
    bench = demo_benchmark()
    sae = SAE.load_from_disk(reasoning_chain.training.path / "saes" / "organism" / "L1").requires_grad_(False)
    items = bench.items[:3]
    scores, active = attribution(model, tokenizer, bench, items, {1: sae}, torch.device("cpu"))
    expected = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    leaves = {}
    for item in items:
        prompt = tokenizer(bench.prompt(item)).input_ids
        solution = tokenizer(bench.continuation(item), add_special_tokens=False).input_ids
        ids = torch.tensor([prompt + solution])

        def through_features(hidden, rows):
            features = sae.encode(hidden[:, 1:]).detach().requires_grad_(True)
            leaves["f"] = features
            rebuilt = hidden[:, 1:] - sae.decode(features).detach() + sae.decode(features)  # same value
            return torch.cat([hidden[:, :1], rebuilt], dim=1)

        with torch.enable_grad(), edit_block_output(model, 1, through_features):
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            log_probs.gather(1, ids[0, 1:, None])[-len(solution):].sum().backward()
        expected += (leaves["f"] * leaves["f"].grad).sum((0, 1)).double().detach()
    np.testing.assert_allclose(scores[1], (expected / len(items)).numpy(), rtol=1e-3, atol=1e-6)
    assert (active[1] > 0).sum() > 16


def test_feature_choice_rules():
    scores = {1: np.array([0.5, 0.1, 0.9]), 2: np.array([0.9, -1.0, 0.2])}
    assert top_features(scores, 3).tolist() == [[1, 2], [2, 0], [1, 0]]  # ties: lower layer first
    active = {1: np.array([40, 35, 1, 38, 0, 2, 36, 44]), 2: np.array([30, 0, 3, 29, 31, 1, 0, 28])}
    top = np.array([[1, 0], [2, 0]])  # active on 40 and 30 positions
    sets = control_sets(active, top, 4, seed=0, unit_id="m.b")
    assert list(sets) == ["control_00", "control_01", "control_02", "control_03"]
    nearest = {1: {1, 3, 6, 7}, 2: {3, 4, 7, 2}}  # the 4 nearest in log count, top excluded
    for chosen in sets.values():
        assert sorted(chosen[:, 0].tolist()) == [1, 2]  # stratified: one per top feature's layer
        assert all(feature in nearest[layer] for layer, feature in chosen.tolist())
    assert len({tuple(map(tuple, c.tolist())) for c in sets.values()}) > 1  # the sets differ
    again = control_sets(active, top, 4, seed=0, unit_id="m.b")
    assert all(np.array_equal(sets[name], again[name]) for name in sets)


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs():
    before = np.array([True] * 10 + [False] * 2 + [True] * 5)
    after = np.array([False] * 10 + [True] * 2 + [True] * 5)
    assert mcnemar(before, after) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar(before, before) == 1.0
    assert mcnemar(before, after) == pytest.approx(stats.binomtest(10, 12).pvalue)


# ---------------------------------------------------------------- bad input


def _write(folder, name, job, section, source=DEMO):
    data = yaml.safe_load((source / name).read_text())
    data["run"]["root"] = str(folder / "runs")
    data[job].update(section)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def refused(capsys, path, message):
    assert main(["plan", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_capture_refuses_bad_models_and_benchmarks(tmp_path, capsys):
    models = [{"name": "organism", "model": "organism", "layers": []}]
    refused(capsys, _write(tmp_path, "reasoning_1_capture.yaml", "activation_capture", {"models": models}),
            "activation_capture.models[0].layers: model 'organism' has no layers configured")
    missing = [{"name": "gsm8k", "format": "gsm8k", "path": str(tmp_path / "nope.jsonl")}]
    refused(capsys, _write(tmp_path, "reasoning_1_capture.yaml", "activation_capture", {"benchmarks": missing}),
            f"activation_capture.benchmarks[0].path: {tmp_path / 'nope.jsonl'} does not exist")
    refused(capsys, _write(tmp_path, "reasoning_1_capture.yaml", "activation_capture", {"max_tokens": 4096}),
            "activation_capture.max_tokens: 4096 exceeds organism's")


def test_training_and_ablation_refuse_what_does_not_fit(reasoning_chain, tmp_path, capsys):
    training = {"activations": str(reasoning_chain.capture.path)}
    refused(capsys, _write(tmp_path, "reasoning_2_training.yaml", "sae_training", {**training, "models": ["gpt2"]}),
            "sae_training.models: model(s) ['gpt2'] have no layers configured in the capture run")
    too_wide = {**training, "sae": {"activation": "topk", "k": 600, "expansion_factor": 4}}
    refused(capsys, _write(tmp_path, "reasoning_2_training.yaml", "sae_training", too_wide),
            "sae_training.sae.k: 600 is larger than the SAE width 512")
    copy = tmp_path / "training_copy"
    shutil.copytree(reasoning_chain.training.path, copy)
    ablation = {"saes": str(copy)}
    refused(capsys, _write(tmp_path, "reasoning_3_ablation.yaml", "feature_ablation", {**ablation, "k": 2000}),
            "feature_ablation.k: 2000 is larger than the SAE width of organism (1024 features over layers [1, 2])")
    refused(capsys, _write(tmp_path, "reasoning_3_ablation.yaml", "feature_ablation",
                           {**ablation, "attribution_items": 600}),
            "feature_ablation.attribution_items: arithmetic has 600 items")
    cfg_path = copy / "saes" / "organism" / "L2" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "d_in": 64}))
    refused(capsys, _write(tmp_path, "reasoning_3_ablation.yaml", "feature_ablation", ablation),
            "has d_in 64 but the model's residual stream has d_model 128")


def test_paper_manifests_validate_and_plan(tmp_path, monkeypatch, capsys):
    """Five models on GSM8K, MATH and FOLIO; MATH is the user's file (a stand-in here), and the
    later steps plan against stand-ins of the earlier steps' outputs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "data").symlink_to(REPO / "manifests" / "data")
    (tmp_path / "data" / "MATH").mkdir(parents=True)
    problems = [{"problem": f"What is {i} + {i}?", "solution": f"It is $\\boxed{{{2 * i}}}$."} for i in range(133)]
    (tmp_path / "data" / "MATH" / "test.jsonl").write_text("\n".join(json.dumps(p) for p in problems))
    capture_manifest = REPO / "manifests" / "reasoning_capture_5models.yaml"
    assert main(["plan", str(capture_manifest)]) == 0
    out = capsys.readouterr().out
    # per model: GSM8K 532 items in 6 units, MATH 132 in 2, FOLIO 200 in 2
    assert "50 work units in 15 shard(s)" in out
    from common.launcher import prepare_run

    capture = prepare_run(load_manifest(capture_manifest))
    widths = {"gpt2-medium": 1024, "pythia-1.4b": 2048, "gemma-2b": 2048, "phi-2": 2560, "llama-3-8b": 4096}
    with h5py.File(capture.merged_path, "w") as merged:
        merged.attrs.update(job="activation_capture", text="prompt_and_solution")
        for entry in load_manifest(capture_manifest).settings.models:
            for layer in entry.layers:
                merged.create_dataset(f"models/{entry.name}/L{layer}", shape=(200_000, widths[entry.name]),
                                      dtype="float16")
    training_manifest = REPO / "manifests" / "reasoning_training_5models.yaml"
    assert main(["plan", str(training_manifest)]) == 0
    assert "15 work units in 15 shard(s)" in capsys.readouterr().out
    training = RunDir.for_manifest(load_manifest(training_manifest)).path
    training.mkdir(parents=True)
    (training / "manifest.yaml").write_text(load_manifest(training_manifest).to_yaml())
    (training / "plan.json").write_text("{}")
    with h5py.File(training / "merged.h5", "w") as merged:
        merged.attrs["job"] = "sae_training"
    for entry in load_manifest(capture_manifest).settings.models:
        for layer in entry.layers:
            folder = training / "saes" / entry.name / f"L{layer}"
            folder.mkdir(parents=True)
            (folder / "cfg.json").write_text(json.dumps({"d_in": widths[entry.name], "d_sae": 8 * widths[entry.name],
                                                         "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post"}}))
    assert main(["plan", str(REPO / "manifests" / "reasoning_ablation_5models.yaml")]) == 0
    assert "15 work units in 15 shard(s)" in capsys.readouterr().out


def test_another_architecture_and_a_model_no_longer_at_hand(tmp_path, monkeypatch):
    """A tiny GPT-2 (blocks under transformer.h) is captured; when its folder is gone, training
    still runs and reports the CE loss recovered as not measured."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.helpers import run_all

    tokenizer = Organism().tokenizer()
    folder = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    capture = _write(tmp_path, "reasoning_1_capture.yaml", "activation_capture", {
        "models": [{"name": "tiny-gpt2", "model": {"path": str(folder)}, "layers": [0, 1]}],
        "benchmarks": [{"name": "arithmetic", "builtin": "organism_arithmetic", "n": 40, "max_new_tokens": 8}],
        "items_per_unit": 20})
    captured = run_all(capture)
    with h5py.File(captured.merged_path, "r") as merged:
        assert merged["models/tiny-gpt2/L1"].shape[1] == 32 and merged["models/tiny-gpt2/L1"].shape[0] > 1000
    folder.rename(tmp_path / "moved")
    training = _write(tmp_path, "reasoning_2_training.yaml", "sae_training", {
        "sae": {"activation": "relu", "expansion_factor": 2, "epochs": 2, "batch_size": 128}})
    metrics = _csv(run_all(training).report_dir / "metrics.csv")
    assert [row["layer"] for row in metrics] == [0, 1]
    assert all(np.isnan(row["ce_recovered"]) and row["explained_variance"] > 0 for row in metrics)


def test_a_preempted_one_pass_training_resumes_to_the_saes_trained_layer_by_layer(reasoning_chain, tmp_path,
                                                                                     monkeypatch):
    """Streamed in buffers of 8 batches: sae_training with `one_pass` trains both layers from one
    read of each buffer, and saves each layer's state every checkpoint_every steps under the run's
    checkpoints/. Stopped in the middle of layer 2's step 7 (layer 1 saved at step 8, layer 2 at
    step 4), the task run again resumes each from its own checkpoint, removes them, and stores the
    SAEs that layer-by-layer units never stopped store."""
    from common import sae_trainer
    from common.launcher import prepare_run, run_shard_task

    sae = {"activation": "topk", "k": 8, "expansion_factor": 2, "epochs": 2, "batch_size": 256, "checkpoint_every": 4,
           "shuffle_buffer_tokens": 2048}
    runs = {}
    for name, one_pass in (("layer_by_layer", False), ("preempted", True)):
        (tmp_path / name).mkdir()
        section = {"activations": str(reasoning_chain.capture.path), "ce_items": 0, "one_pass": one_pass, "sae": sae}
        runs[name] = prepare_run(load_manifest(_write(tmp_path / name, "reasoning_2_training.yaml", "sae_training",
                                                      section)))
    run_shard_task(str(runs["layer_by_layer"].path), 0)
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(sae_trainer.torch.nn.utils, "clip_grad_norm_", failing_on_call(clip, 2 * 7 + 1))
    with pytest.raises(RuntimeError, match="preempted"):
        run_shard_task(str(runs["preempted"].path), 0)
    monkeypatch.setattr(sae_trainer.torch.nn.utils, "clip_grad_norm_", clip)
    saved = {path.stem: torch.load(path, weights_only=False)["step"]
             for path in (runs["preempted"].path / "checkpoints").glob("*.pt")}
    assert saved == {"organism.L1": 8, "organism.L2": 4}
    run_shard_task(str(runs["preempted"].path), 0)
    assert not list((runs["preempted"].path / "checkpoints").glob("*.pt"))
    with h5py.File(runs["layer_by_layer"].shard_path(0)) as alone, h5py.File(runs["preempted"].shard_path(0)) as once:
        assert sorted(alone["units"]) == ["organism.L1", "organism.L2"] and list(once["units"]) == ["organism"]
        for layer in ("L1", "L2"):
            expected, got = alone["units"][f"organism.{layer}"][layer], once["units"]["organism"][layer]
            for name in expected["weights"]:
                np.testing.assert_array_equal(expected["weights"][name][()], got["weights"][name][()],
                                              err_msg=f"{layer} {name}")
            np.testing.assert_array_equal(expected["curves/loss"][()], got["curves/loss"][()])
            assert expected.attrs["explained_variance"] == got.attrs["explained_variance"]
