"""Every job on CUDA against the same work on the CPU, and the launcher handing tasks a GPU.

Run on a machine with a GPU: `python -m pytest -m gpu`. Without one these tests are skipped with
the reason (conftest.py). Each test runs a demo shard of the organism twice, once with
`model.device: cuda:0` in a task that asked for a GPU and once on the CPU, and compares what the
shards hold. Tolerances, per dataset:

- token ids, offsets, spans, the graph's chosen features, item and trial indices: identical;
  an ablation's top 10 features: the same but for one near-tie;
- float outputs: within the rtol / atol stated beside each comparison (float32 models on both
  sides; float16 storage adds its own rounding), where sparse SAE codes may also differ on a few
  entries that sit at a TopK or JumpReLU boundary (`outliers`, the fraction allowed);
- generated text: greedy answers identical, sampled answers identical as well (the sampling noise
  is an integer hash, the same on both devices: common/generation.py), in both cases on at least
  `AGREEMENT` of the rows, the rest being near-ties of the logits that CUDA rounds otherwise.

feature_contrast does no model work (it reads the games' features from HDF5), so it has no CUDA
path to compare. graph_steering's graph is made on the CPU once, for both sides.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from common.cli import main
from common.generation import uniform_noise
from common.launcher import prepare_run, reduce_task, run_shard_task
from common.manifest_file import load_manifest
from common.rundir import RunDir
from common.sparse import read_csr
from tests.helpers import REPO, write_manifest_file

pytestmark = pytest.mark.gpu

DEMO = REPO / "manifests" / "demo"
AGREEMENT = 0.98  # share of generated answers that must be identical on CUDA and CPU
# The CPU side on all the machine's cores (the demo manifests ask for one): the GPU's time is short.
DEVICES = {"cpu": {"gpus_per_task": 0, "cpus_per_task": os.cpu_count() or 1}, "cuda:0": {"gpus_per_task": 1}}


def shard_on(device: str, folder: Path, demo: str, settings: dict, shards: int | None = None) -> RunDir:
    """Shard 0 of demo manifest `demo` with `settings` merged into its job section, run in this
    process on `device` (a task that asked for a GPU when it is CUDA); returns the run."""
    job = yaml.safe_load((DEMO / demo).read_text())["job"]
    overrides = {"cluster": DEVICES[device], job: settings} | ({"run": {"shards": shards}} if shards else {})
    (folder / device).mkdir(parents=True, exist_ok=True)
    run = prepare_run(load_manifest(write_manifest_file(folder / device, overrides, base=DEMO / demo, name=demo)))
    run_shard_task(str(run.path), 0)
    return run


def on_both(folder: Path, demo: str, settings_for) -> tuple[h5py.File, h5py.File]:
    """Shard 0 on the CPU and on CUDA (settings_for(device) is the job section), opened."""
    runs = {device: shard_on(device, folder, demo, settings_for(device)) for device in DEVICES}
    return h5py.File(runs["cpu"].shard_path(0)), h5py.File(runs["cuda:0"].shard_path(0))


def assert_close(cpu: np.ndarray, gpu: np.ndarray, rtol: float, atol: float, outliers: float = 0.0, name: str = ""):
    """gpu within rtol/atol of cpu everywhere but at most `outliers` of the entries."""
    assert cpu.shape == gpu.shape, name
    off = ~np.isclose(gpu, cpu, rtol=rtol, atol=atol)
    assert off.mean() <= outliers, (f"{name}: {off.sum()} of {off.size} entries differ beyond rtol {rtol}, atol "
                                    f"{atol}; largest difference {np.abs(gpu - cpu).max():.3g}")


def assert_agree(cpu, gpu, name: str, share: float = AGREEMENT) -> None:
    cpu, gpu = list(cpu), list(gpu)
    assert len(cpu) == len(gpu), name
    same = np.mean([a == b for a, b in zip(cpu, gpu)])
    assert same >= share, f"{name}: {same:.1%} identical on CUDA and CPU, below {share:.0%}"


def dense(group: h5py.Group) -> np.ndarray:
    return read_csr(group).toarray()


def test_sampling_noise_is_the_same_on_cuda():
    keys = torch.tensor([[0, 0], [123456789, 987654321], [2**32 - 1, 2**32 - 1]], dtype=torch.int64)
    on_cpu = uniform_noise(keys, 7, 128_256)
    assert torch.equal(uniform_noise(keys.cuda(), 7, 128_256).cpu(), on_cpu)


def test_memory_freed_by_earlier_work_counts_as_free_for_batch_size_auto():
    """A unit's work frees its tensors into PyTorch's cache, which the driver counts as taken: the
    next unit's batch is sized from the same free bytes as before that work."""
    from common.batching import free_gpu_bytes

    device = torch.device("cuda:0")
    torch.cuda.synchronize()
    before = free_gpu_bytes(device)
    work = torch.empty(2**30, dtype=torch.uint8, device=device)  # 1 GiB, then freed into the cache
    del work
    assert torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) >= 2**30
    assert abs(free_gpu_bytes(device) - before) < 64 * 2**20


@pytest.mark.parametrize("prompt_cached", [True, False])
def test_the_memory_model_of_batch_size_auto_predicts_a_generations_peak(prompt_cached):
    """A random bf16 Llama generating 50 tokens for 1,024 rows (prompts in the batch, or a shared
    prefix): the peak above the weights within 20% of what `batch_size: auto` sizes batches by."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.batching import generation_memory
    from common.generation import prompt_prefix, sample
    from common.models import Architecture
    from common.organism.files import Organism
    from jobs.population_patching import PROMPTS

    config = LlamaConfig(vocab_size=32_000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
    device = torch.device("cuda:0")
    model = LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
    tokenizer, rows, prompt = Organism().tokenizer(), 1024, PROMPTS[0].text
    tokens = len(tokenizer(prompt).input_ids)
    memory = generation_memory(Architecture.from_raw(config.to_dict()), "bfloat16", 0, tokens, 50,
                               prompt_cached=prompt_cached)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated()
    prefix = None if prompt_cached else prompt_prefix(model, tokenizer, prompt, rows, device, new_tokens=51)
    sample(model, tokenizer, [prompt] * rows, list(range(rows)), 0.7, 50, device, prefix=prefix)
    peak = torch.cuda.max_memory_allocated() - weights
    assert 0.8 <= peak / memory.peak(rows) <= 1.2, (f"peak {peak / 2**30:.2f} GiB against {memory.peak(rows) / 2**30:.2f}"
                                                    " GiB predicted")


def test_token_tracking(tmp_path):
    cpu, gpu = on_both(tmp_path, "token_tracking.yaml", lambda device: {"model": {"device": device}})
    assert sorted(cpu["units"]) == sorted(gpu["units"])
    for scenario in cpu["units"]:
        a, b = cpu["units"][scenario], gpu["units"][scenario]
        for name in ("token_ids", "offsets"):
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=f"{scenario}/{name}")
        for span in a["key_positions"]:
            np.testing.assert_array_equal(a["key_positions"][span][()], b["key_positions"][span][()])
        for layer in a["attention"]:  # float16 probabilities
            assert_close(a["attention"][layer][()], b["attention"][layer][()], 0, 2e-3, name=f"{scenario} attention {layer}")
        for layer in a["features"]:
            assert_close(dense(a["features"][layer]), dense(b["features"][layer]), 1e-3, 1e-3, outliers=1e-3,
                         name=f"{scenario} features {layer}")


def test_feature_correlation_graph(tmp_path):
    """The merged graph (one shard, so that the reduce runs): r within 1e-4, the same edges."""
    merged = {}
    for device in DEVICES:
        run = shard_on(device, tmp_path, "feature_correlation.yaml",
                       {"model": {"device": device}, "corpus": {"tokens": 8192}, "features": {"selection_tokens": 4096}},
                       shards=1)
        reduce_task(str(run.path))
        merged[device] = h5py.File(run.merged_path)
    cpu, gpu = merged["cpu"], merged["cuda:0"]
    for layer in cpu["layers"]:
        np.testing.assert_array_equal(cpu["layers"][layer]["features"][()], gpu["layers"][layer]["features"][()])
        assert_close(cpu["layers"][layer]["mean"][()], gpu["layers"][layer]["mean"][()], 1e-4, 1e-6, name=layer)
    for block in cpu["blocks"]:
        assert_close(cpu["blocks"][block]["r"][()], gpu["blocks"][block]["r"][()], 0, 1e-4, name=f"{block} r")
        assert_close(cpu["blocks"][block]["coactive"][()], gpu["blocks"][block]["coactive"][()], 0, 2, outliers=1e-3,
                     name=f"{block} coactive")
    edges = [set(zip(*(f["edges"][c][()] for c in ("layer_a", "feature_a", "layer_b", "feature_b")))) for f in (cpu, gpu)]
    assert len(edges[0] ^ edges[1]) <= 0.01 * len(edges[0]), "the edge sets differ beyond 1%"


def test_gambling_games(tmp_path):
    cpu, gpu = on_both(tmp_path, "gambling_1_games.yaml", lambda device: {"model": {"device": device}})
    games = sorted(cpu["units"])
    histories = [np.array_equal(cpu["units"][g]["history"][()], gpu["units"][g]["history"][()]) for g in games]
    assert np.mean(histories) >= AGREEMENT - 0.05, f"{np.mean(histories):.1%} of games replay identically"
    for game, same in zip(games, histories):
        if not same:
            continue
        a, b = cpu["units"][game], gpu["units"][game]
        assert list(a["decisions/response"][()]) == list(b["decisions/response"][()])
        assert_close(a["decisions/p_stop"][()], b["decisions/p_stop"][()], 1e-4, 1e-5, name=f"{game} exact P(stop)")
        for layer in a["features"]:
            assert_close(dense(a["features"][layer]), dense(b["features"][layer]), 1e-3, 1e-3, outliers=1e-2,
                         name=f"{game} features {layer}")


def test_population_patching(tmp_path, gambling_chain):
    cpu, gpu = on_both(tmp_path, "gambling_4_patching.yaml",
                       lambda device: {"model": {"device": device}, "features": str(gambling_chain.contrast.path),
                                       "trials": 40, "contexts": None})
    for unit in cpu["units"]:
        a, b = cpu["units"][unit], gpu["units"][unit]
        for name in ("condition", "prompt", "trial", "value", "exact/condition", "exact/prompt"):
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=f"{unit}/{name}")
        for name in ("exact/p_stop", "exact/coverage"):  # float64 softmax of float32 logits
            assert_close(a[name][()], b[name][()], 1e-4, 1e-5, name=f"{unit} {name}")
        assert_agree(a["response"][()], b["response"][()], f"{unit} responses")


def test_feature_contexts(tmp_path):
    """Listed features (no upstream run), one shard so that the reduce runs: the same top tokens but
    for near-ties, activations within 1e-4, the same counts but for TopK boundary tokens."""
    merged = {}
    for device in DEVICES:
        run = shard_on(device, tmp_path, "gambling_3_contexts.yaml",
                       {"model": {"device": device}, "features_from": None, "corpus": {"tokens": 8192},
                        "features": [[1, 402], [0, 7], [2, 88], [3, 100]]}, shards=1)
        reduce_task(str(run.path))
        merged[device] = h5py.File(run.merged_path)
    cpu, gpu = merged["cpu"], merged["cuda:0"]
    same = cpu["top/position"][()] == gpu["top/position"][()]
    assert same.mean() >= AGREEMENT, f"{same.mean():.1%} of the top tokens are the same"
    assert_close(cpu["top/value"][()], gpu["top/value"][()], 1e-4, 1e-5, name="top activations")
    assert_close(cpu["top/active"][()], gpu["top/active"][()], 1e-2, 2, name="active tokens")
    np.testing.assert_array_equal(cpu["logits/top_ids"][:, :3], gpu["logits/top_ids"][:, :3])


def test_activation_capture(tmp_path):
    cpu, gpu = on_both(tmp_path, "reasoning_1_capture.yaml", lambda device: {
        "models": [{"name": "organism", "model": {"id": "builtin:organism", "device": device}, "layers": [1, 2]}]})
    for unit in cpu["units"]:
        a, b = cpu["units"][unit], gpu["units"][unit]
        for name in ("item", "position"):
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=f"{unit}/{name}")
        for layer in ("L1", "L2"):  # float16: a rounding step apart at most, on the residual's scale
            values = a[layer][()].astype(np.float32)
            assert_close(values, b[layer][()].astype(np.float32), 2e-3, 1e-3 * np.abs(values).max(), name=f"{unit} {layer}")


@pytest.mark.parametrize("precision", ["float32", "auto"])
def test_sae_training_reaches_the_same_sae(tmp_path, reasoning_chain, precision):
    """float32 on both devices; and `auto` (bf16 autocast on CUDA) against float32 on the CPU."""
    cpu, gpu = on_both(tmp_path, "reasoning_2_training.yaml",
                       lambda device: {"activations": str(reasoning_chain.capture.path), "device": device,
                                       "sae": {"precision": precision}})
    from jobs.sae_training import sae_groups

    cpu_saes, gpu_saes = sae_groups(cpu), sae_groups(gpu)
    assert sorted(cpu_saes) == sorted(gpu_saes) == ["organism.L1", "organism.L2", "organism_b.L1", "organism_b.L2"]
    for unit in cpu_saes:
        a, b = cpu_saes[unit].attrs, gpu_saes[unit].attrs
        assert (a["precision"], b["precision"]) == ("float32", "float32" if precision == "float32" else "bf16")
        assert abs(a["explained_variance"] - b["explained_variance"]) < 0.01, unit
        assert abs(a["l0"] - b["l0"]) <= 0.05 * a["l0"], unit
        assert abs(a["dead_fraction"] - b["dead_fraction"]) <= 0.02, unit
        if precision != "float32":
            continue  # bf16's rounding takes another path to an SAE of the same quality
        decoder = [saes[unit]["weights/W_dec"][()] for saes in (cpu_saes, gpu_saes)]
        cosines = (decoder[0] * decoder[1]).sum(1) / (np.linalg.norm(decoder[0], axis=1) * np.linalg.norm(decoder[1], axis=1))
        assert np.median(cosines) > 0.9, f"{unit}: decoder rows trained on CUDA point elsewhere"


def test_topk_training_on_cuda_repeats_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """TopK with AuxK, decorrelation and resampling on the GPU, 4,096-token batches of 32 features
    per token over 1,024: two runs from one seed, and a run stopped at step 13 and resumed from its
    checkpoint of step 10, end with the same weights (a sum by atomic adds would differ)."""
    from common import sae_trainer
    from common.sae_trainer import train_sae
    from tests.common.test_sae_trainer import assert_same_weights, config, sparse_data
    from tests.helpers import failing_on_call

    device = torch.device("cuda:0")
    data = sparse_data(tokens=65_536, d_in=128, true_features=512, active=8)
    settings = config(activation="topk", k=32, aux_k=64, expansion_factor=8, epochs=1, batch_size=4096,
                      checkpoint_every=10, checkpoint_minutes=0, decorrelation=0.01, dead_after_tokens=20_000,
                      resample_every=7)
    whole = train_sae(data, settings, "h", "m", device)
    assert_same_weights(whole.sae, train_sae(data, settings, "h", "m", device).sae)
    checkpoint = tmp_path / "unit.pt"
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(sae_trainer.torch.nn.utils, "clip_grad_norm_", failing_on_call(clip, 13))
    with pytest.raises(RuntimeError, match="preempted"):
        train_sae(data, settings, "h", "m", device, checkpoint=checkpoint)
    monkeypatch.setattr(sae_trainer.torch.nn.utils, "clip_grad_norm_", clip)
    assert torch.load(checkpoint, weights_only=False)["step"] == 10
    assert_same_weights(whole.sae, train_sae(data, settings, "h", "m", device, checkpoint=checkpoint).sae)


def test_feature_ablation(tmp_path, reasoning_chain):
    cpu, gpu = on_both(tmp_path, "reasoning_3_ablation.yaml",
                       lambda device: {"saes": str(reasoning_chain.training.path), "device": device})
    for unit in cpu["units"]:
        a, b = cpu["units"][unit], gpu["units"][unit]
        for layer in a["attribution"]:
            values = a["attribution"][layer][()]
            assert_close(values, b["attribution"][layer][()], 1e-3, 1e-4 * np.abs(values).max(), name=f"{unit} {layer}")
        np.testing.assert_array_equal(a["item"][()], b["item"][()])
        tops = [set(zip(f["top/layer"][()], f["top/feature"][()])) for f in (a, b)]
        assert len(tops[0] & tops[1]) >= len(tops[0]) - 1, f"{unit}: the top features differ by more than one near-tie"
        # greedy answers of the same edits: the control sets are drawn beside the top set, so equal edits
        # only where the top sets are equal, and then a control set where its features are too
        conditions = ["baseline"]
        if tops[0] == tops[1]:
            conditions += ["ablated"] + [name for name in a if name.startswith("control_")
                                         and _same_features(a[name], b[name])]
        for condition in conditions:
            assert_agree(a[f"{condition}/text"][()], b[f"{condition}/text"][()], f"{unit} {condition} answers")


def _by_feature(important: h5py.Group) -> np.ndarray:
    """The important features' attributions in (layer, feature) order."""
    order = np.lexsort((important["feature"][()], important["layer"][()]))
    return important["attribution"][()][order]


def _same_features(a: h5py.Group, b: h5py.Group) -> bool:
    """Whether two ablated sets ([layer, feature] rows) hold the same features."""
    return set(zip(a["layer"][()], a["feature"][()])) == set(zip(b["layer"][()], b["feature"][()]))


def test_graph_steering(tmp_path):
    """On one graph (made on the CPU): P(stop) under each steering within 1e-4, KL within 1e-4 of
    its scale, the same windows."""
    graph = shard_on("cpu", tmp_path / "graph", "feature_correlation_for_steering.yaml",
                     {"model": {"device": "cpu"}, "corpus": {"tokens": 8192}, "tokens_per_unit": 4096}, shards=1)
    reduce_task(str(graph.path))
    cpu, gpu = on_both(tmp_path, "steering.yaml", lambda device: {
        "model": {"device": device}, "correlation": str(graph.path), "strengths": [-1.0, 4.0],
        "decisions": {"count": 24}, "neutral": {"tokens": 512}, "batch_size": 8})
    assert sorted(cpu["units"]) == sorted(gpu["units"])
    for unit in cpu["units"]:
        a, b = cpu["units"][unit], gpu["units"][unit]
        for name in a["decisions"]:  # probabilities from float64 softmax of float32 logits
            assert_close(a["decisions"][name][()], b["decisions"][name][()], 1e-4, 1e-5, name=f"{unit} {name}")
        np.testing.assert_array_equal(a["tokens/window"][()], b["tokens/window"][()])
        for name in (n for n in a["tokens"] if n.startswith("kl_")):
            values = a["tokens"][name][()]
            assert_close(values, b["tokens"][name][()], 1e-3, 1e-4 * max(np.abs(values).max(), 1e-6), name=f"{unit} {name}")


def test_feature_alignment(tmp_path, reasoning_chain):
    """Both organisms' compared features read at the same anchors: identical features and keys,
    activations within 1e-3 of their scale (SAE codes at a TopK boundary may differ)."""
    cpu, gpu = on_both(tmp_path, "reasoning_4_alignment.yaml",
                       lambda device: {"ablation": str(reasoning_chain.ablation.path), "device": device})
    assert sorted(cpu["units"]) == sorted(gpu["units"])
    for unit in cpu["units"]:
        a, b = cpu["units"][unit], gpu["units"][unit]
        np.testing.assert_array_equal(a["item"][()], b["item"][()])
        assert list(a["anchor"].asstr()[()]) == list(b["anchor"].asstr()[()])
        for layer in (name for name in a if name.startswith("L")):
            np.testing.assert_array_equal(a[f"{layer}/features"][()], b[f"{layer}/features"][()])
            values = a[f"{layer}/values"][()]
            assert_close(values, b[f"{layer}/values"][()], 1e-3, 1e-3 * max(np.abs(values).max(), 1e-6), outliers=1e-2,
                         name=f"{unit} {layer}")


def test_circuit_discovery(tmp_path, reasoning_chain):
    """The important features and their attributions alike but for near-ties; where both devices
    chose the same features, greedy answers of each cluster's ablation agree."""
    assert reasoning_chain.alignment  # the circuits read its matches
    cpu, gpu = on_both(tmp_path, "reasoning_5_circuits.yaml", lambda device: {
        "ablation": str(reasoning_chain.ablation.path), "alignment": str(reasoning_chain.alignment.path),
        "device": device})
    for unit in cpu["units"]:
        a, b = cpu["units"][unit], gpu["units"][unit]
        np.testing.assert_array_equal(a["item"][()], b["item"][()])
        important = [set(zip(f["important/layer"][()], f["important/feature"][()])) for f in (a, b)]
        assert len(important[0] ^ important[1]) <= 2, f"{unit}: the important features differ by more than a near-tie"
        if important[0] != important[1]:
            continue  # other features cluster otherwise: nothing further is comparable
        attribution = [_by_feature(f["important"]) for f in (a, b)]  # near-ties may come in another order
        assert_close(attribution[0], attribution[1], 1e-3, 1e-4 * np.abs(attribution[0]).max(), name=f"{unit} attribution")
        for condition in ["baseline"] + [name for name in a if name.startswith("C") and "answer" in a[name]
                                         and name in b and _same_features(a[name], b[name])]:
            assert_agree(a[f"{condition}/answer"][()], b[f"{condition}/answer"][()], f"{unit} {condition} answers")


def test_submit_local_gives_the_task_a_gpu(tmp_path, capsys):
    """Through submitit's local executor with gpus_per_task: 1 and device: auto, to merged.h5."""
    path = write_manifest_file(tmp_path, {"cluster": {"gpus_per_task": 1}, "token_tracking": {"model": {"device": "auto"}}},
                               base=DEMO / "token_tracking.yaml")
    assert main(["submit", str(path), "--executor", "local"]) == 0
    run = RunDir.for_manifest(load_manifest(path))
    assert run.merged_path.is_file()
    for shard in range(2):
        with h5py.File(run.shard_path(shard)) as file:
            devices = file.attrs["devices"]
        assert devices.startswith(torch.cuda.get_device_name(0)) and "CUDA_VISIBLE_DEVICES=" in devices
