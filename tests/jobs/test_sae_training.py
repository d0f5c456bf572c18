"""sae_training (the reasoning chain's step 2) on the organism: the trained SAEs against their
reported metrics recomputed here, a preempted one-pass training, a task warned by the batch system
before its time limit, and refusals.

The demo chain runs once per session (conftest's `reasoning_chain`).
"""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from sae_lens import SAE

from common.edits import edit_block_output
from common.launcher import load_submissions
from common.manifest_file import load_manifest
from common.rundir import RunDir
from common.sae_quality import evaluate
from jobs._reasoning import read_as_generated
from jobs._reasoning.problems import load_benchmark
from jobs.sae_training import ITEMS_PER_BENCHMARK
from tests.helpers import failing_on_call
from tests.jobs.reasoning import read_csv, refused, write_step


def test_trained_saes_load_in_sae_lens_and_meet_their_reported_metrics(reasoning_chain, organism_model):
    model, tokenizer = organism_model
    metrics = {row["layer"]: row for row in read_csv(reasoning_chain.training.report_dir / "metrics.csv")
               if row["model"] == "organism"}
    benches = [load_benchmark(spec) for spec in load_manifest(reasoning_chain.capture.manifest_path).settings.benchmarks]
    for layer in (1, 2):
        sae = SAE.load_from_disk(reasoning_chain.training.path / "saes" / "organism" / f"L{layer}")
        sae.requires_grad_(False)
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post" and sae.cfg.d_sae == 512
        with h5py.File(reasoning_chain.capture.merged_path, "r") as merged:
            everything = torch.from_numpy(merged[f"models/organism/L{layer}"][()])
            group_of_token = (merged["models/organism/benchmark"][()].astype(np.int64) * ITEMS_PER_BENCHMARK
                              + merged["models/organism/item"][()])
        with h5py.File(reasoning_chain.training.merged_path, "r") as merged:
            held_out = merged[f"held_out_items/organism.L{layer}"][()]  # benchmark x 2^32 + item
        # split by item: the metrics are those of the held-out items' tokens, a tenth of the items
        assert 0.05 < len(held_out) / len(np.unique(group_of_token)) < 0.2
        assert int(metrics[layer]["held_out_items"]) == len(held_out)
        on_held_out = evaluate(sae, everything[torch.from_numpy(np.isin(group_of_token, held_out))])
        assert on_held_out["explained_variance"] == pytest.approx(float(metrics[layer]["explained_variance"]), rel=1e-4)
        on_all_tokens = evaluate(sae, everything)
        assert on_all_tokens["l0"] == pytest.approx(16, abs=0.01)  # topk, k = 16
        # CE with the SAE spliced in at every non-<bos> position of up to 64 held-out items of each
        # benchmark, one at a time, read as the model writes them (prompt and solution tokenized apart)
        losses = []
        for index, bench in enumerate(benches):
            chosen = [item for item in bench.items if index * ITEMS_PER_BENCHMARK + item.index in set(held_out.tolist())]
            for item in chosen[:64]:
                ids = torch.tensor([read_as_generated(tokenizer, bench, item, with_solution=True)[0]])

                def splice(hidden, rows, sae=sae):
                    return torch.cat([hidden[:, :1], sae.decode(sae.encode(hidden[:, 1:]))], dim=1)

                with torch.no_grad(), edit_block_output(model, layer, splice):
                    losses.append((model(input_ids=ids, labels=ids).loss.item(), ids.shape[1] - 1))
        spliced = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
        assert spliced == pytest.approx(float(metrics[layer]["ce_spliced"]), rel=1e-4)
        assert float(metrics[layer]["ce_recovered"]) > 0.9
    with h5py.File(reasoning_chain.training.merged_path, "r") as merged:
        assert merged["curves/organism.L1/decorrelation"][()].min() > 0  # the penalty is in the loss


def test_training_refuses_what_does_not_fit(reasoning_chain, tmp_path, capsys):
    training = {"activations": str(reasoning_chain.capture.path)}
    refused(capsys, write_step(tmp_path, "reasoning_2_training.yaml", "sae_training", {**training, "models": ["gpt2"]}),
            "sae_training.models: model(s) ['gpt2'] have no layers configured in the capture run")
    too_wide = {**training, "sae": {"activation": "topk", "k": 600, "expansion_factor": 4}}
    refused(capsys, write_step(tmp_path, "reasoning_2_training.yaml", "sae_training", too_wide),
            "sae_training.sae.k: 600 is larger than the SAE width 512")
    rare_checkpoints = {**training, "sae": {"checkpoint_minutes": 30}}  # the demo's tasks have 60 minutes
    refused(capsys, write_step(tmp_path, "reasoning_2_training.yaml", "sae_training", rare_checkpoints),
            "sae_training.sae.checkpoint_minutes: 30 is half of cluster.timeout_min (60) or more")


def test_a_preempted_one_pass_training_resumes_to_the_saes_trained_layer_by_layer(reasoning_chain, tmp_path,
                                                                                     monkeypatch):
    """Streamed in buffers of 8 batches: sae_training with `one_pass` trains both layers from one
    read of each buffer, and saves each layer's state every checkpoint_every steps under the run's
    checkpoints/. Stopped in the middle of layer 2's step 7 (layer 1 saved at step 8, layer 2 at
    step 4), the task run again resumes each from its own checkpoint, removes them, and stores the
    SAEs that layer-by-layer units never stopped store."""
    from common import sae_trainer
    from common.launcher import plan_manifest, prepare_run, reduce_task, run_shard_task

    sae = {"activation": "topk", "k": 8, "expansion_factor": 2, "epochs": 2, "batch_size": 256, "checkpoint_every": 4,
           "checkpoint_minutes": 0, "shuffle_buffer_tokens": 2048}
    runs = {}
    for name, one_pass in (("layer_by_layer", False), ("preempted", True)):
        (tmp_path / name).mkdir()
        section = {"activations": str(reasoning_chain.capture.path), "models": ["organism"],  # the capture has two
                   "ce_items": 0, "one_pass": one_pass, "sae": sae}
        runs[name] = prepare_run(load_manifest(write_step(tmp_path / name, "reasoning_2_training.yaml", "sae_training",
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
    # The next step tests the models with trained SAEs: one of the capture's two here.
    reduce_task(str(runs["layer_by_layer"].path))
    ablation = write_step(tmp_path, "reasoning_3_ablation.yaml", "feature_ablation",
                          {"saes": str(runs["layer_by_layer"].path)})
    units = plan_manifest(load_manifest(ablation))[1].units
    assert sorted(unit.id for unit in units) == ["organism.arithmetic"]  # not organism_b, captured but not trained


def test_a_task_stopped_while_it_measures_the_ce_loss_resumes_with_its_training_done(reasoning_chain, tmp_path,
                                                                                        monkeypatch, capsys):
    """The CE loss is measured after the training, past its last safe point, with no periodic
    checkpoint due for 25 minutes: the final state is saved first, so a task stopped there (the batch
    system's warning requeues it at once) resumes at the last step and trains no more."""
    from common.launcher import prepare_run, run_shard_task
    from jobs import sae_training

    section = {"activations": str(reasoning_chain.capture.path), "models": ["organism"], "ce_items": 4,
               "one_pass": True, "sae": {"activation": "topk", "k": 8, "expansion_factor": 2, "epochs": 2,
                                         "batch_size": 256, "checkpoint_minutes": 25}}
    run = prepare_run(load_manifest(write_step(tmp_path, "reasoning_2_training.yaml", "sae_training", section)))
    monkeypatch.setattr(sae_training, "_ce_metrics", failing_on_call(sae_training._ce_metrics, 0))
    with pytest.raises(RuntimeError, match="preempted"):
        run_shard_task(str(run.path), 0)
    monkeypatch.undo()
    assert sorted(path.stem for path in run.checkpoints_dir.glob("*.pt")) == ["organism.L1", "organism.L2"]
    capsys.readouterr()
    run_shard_task(str(run.path), 0)  # its log to stderr
    resumed = re.findall(r"organism blocks\.(\d)\.hook_resid_post: resuming from step (\d+) of (\d+)",
                         capsys.readouterr().err)
    assert [layer for layer, _, _ in resumed] == ["1", "2"] and all(step == last for _, step, last in resumed)
    assert not list(run.checkpoints_dir.glob("*.pt"))


def test_a_task_warned_by_the_batch_system_saves_mid_training_and_its_requeued_run_resumes_there(reasoning_chain,
                                                                                                  tmp_path):
    """`submit --executor local`, then USR2 to the task mid-training, as Slurm sends before a time
    limit, with no periodic checkpoint due for ten minutes: the task saves after the step in
    progress, submitit's own handler requeues it, and the requeued task resumes from that step."""
    section = {"activations": str(reasoning_chain.capture.path), "models": ["organism"], "ce_items": 0,
               "one_pass": True, "sae": {"activation": "topk", "k": 8, "expansion_factor": 2, "epochs": 10,
                                         "batch_size": 512}}
    path = write_step(tmp_path, "reasoning_2_training.yaml", "sae_training", section)
    submit = subprocess.Popen([sys.executable, "-m", "common.cli", "submit", str(path), "--executor", "local", "--wait"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = RunDir.for_manifest(load_manifest(path))
    job_id, log = "", None
    try:
        for _ in range(3000):  # until the task has trained 100 steps
            if submissions := load_submissions(run):
                job_id = submissions[0]["shards"]["0"]
                log = run.logs_dir / "submitit" / f"{job_id}_0_log.err"
                done = re.findall(r"(\d+)/\d+ \[", log.read_text()) if log.exists() else []
                if done and int(done[-1]) >= 100:
                    break
            time.sleep(0.1)
        (task,) = Path(f"/proc/{job_id}/task/{job_id}/children").read_text().split()  # the controller's child
        subprocess.run(["kill", f"-{signal.SIGUSR2.name}", task], check=True)
        out, err = submit.communicate(timeout=600)
    finally:
        submit.kill()
    assert submit.returncode == 0, (out, err)
    text = log.read_text()
    assert "saving the state before the task stops" in text and "Requeued job" in text
    resumed = re.findall(r"organism blocks\.(\d)\.hook_resid_post: resuming from step (\d+) of (\d+)", text)
    assert [layer for layer, _, _ in resumed] == ["1", "2"] and len({step for _, step, _ in resumed}) == 1
    assert 100 <= int(resumed[0][1]) < int(resumed[0][2])
    assert not list(run.checkpoints_dir.glob("*.pt"))
    assert {sae.name for sae in (run.path / "saes" / "organism").iterdir()} == {"L1", "L2"}
