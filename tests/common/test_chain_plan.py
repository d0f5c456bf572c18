"""Planning whole chains before any run exists: estimates from the upstream manifests, labelled as
such; runtime from the stated H200 rates; `plan --chain` sums the steps; submitting still refuses."""

import re
import shutil

import pytest

from common.cli import main
from common.errors import UserError
from common.launcher import prepare_run
from common.manifest_file import load_manifest
from common.runtime import ModelSize, Work, sae_variant, seconds
from common.sizing import chain_report, size_manifest
from tests.helpers import REPO

PAPER = REPO / "manifests"
SEED_000 = [PAPER / f"{name}_llama31_8b.yaml" for name in ("gambling_games", "feature_contrast", "population_patching")]
SEED_003 = [PAPER / f"reasoning_{name}_5models.yaml" for name in ("capture", "training", "ablation")]
LLAMA31_8B = ModelSize("meta-llama/Llama-3.1-8B", 8_030_261_248)


@pytest.fixture
def fresh_checkout(tmp_path, monkeypatch):
    """A checkout's root as cloned: the shipped data (GSM8K, FOLIO), no runs/ and no data/MATH (the
    benchmark a user provides); paths in the manifests are relative to it."""
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "data").symlink_to(REPO / "manifests" / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _table(out: str) -> dict[str, list[str]]:
    """The rows of `plan --chain`'s table by their first cell (step number or 'total')."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and (cells[0].isdigit() or cells[0] == "total") and len(cells) >= 5 and "step" not in line:
            rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize("chain", [SEED_000, SEED_003], ids=["seed_000", "seed_003"])
def test_plan_chain_sizes_a_seed_chain_on_a_fresh_checkout(fresh_checkout, capsys, chain):
    assert main(["plan", "--chain", *map(str, chain)]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert set(rows) == {"1", "2", "3", "total"}
    assert rows["2"][1].endswith("*") and rows["3"][1].endswith("*")  # steps resting on runs not there yet
    steps = [float(rows[step][-3]) for step in ("1", "2", "3")]  # GPU-hours, before the output size
    assert float(rows["total"][-3]) == pytest.approx(sum(steps), abs=0.011)
    assert int(rows["total"][1]) == sum(int(rows[step][2]) for step in ("1", "2", "3"))  # shards
    assert "does not exist yet; taken from" in out
    assert "issue 21" in out  # the measured generation rate is named with its source
    assert not (fresh_checkout / "runs").exists()  # planning creates nothing


def test_the_chain_total_is_the_sum_of_its_steps(fresh_checkout):
    sizes = [size_manifest(str(path)) for path in SEED_003]
    for size in sizes:
        assert size.seconds == pytest.approx(sum(size.shard_seconds))
        assert size.gpu_hours == pytest.approx(size.seconds * size.manifest.cluster.gpus_per_task / 3600)
        assert size.seconds > 0
    total = _table(chain_report(sizes))["total"]
    assert float(total[-3]) == pytest.approx(sum(size.gpu_hours for size in sizes), abs=0.006)


def test_a_missing_upstream_run_is_estimated_from_its_manifest_and_labelled(fresh_checkout, capsys):
    assert main(["plan", str(SEED_000[2])]) == 0
    out = capsys.readouterr().out
    # the contrast's 7 layers of 32,768 features, the seed's selected share (1,340 of 7 x 32,768 kept:
    # 191 a layer), 20 controls a layer, and the shared unpatched unit
    assert f"{1 + 7 * round(1340 / 7) + 7 * 20} work units in 16 shard(s) (estimate: an input does not exist yet" in out
    assert "191 features a layer patched" in out
    assert "run feature_contrast-" in out and "run gambling_games-" in out  # both missing runs, by name
    assert "GPU-hours" in out and "shard 0: " in out and ", about " in out


def test_submitting_a_step_whose_upstream_run_is_missing_still_refuses(fresh_checkout):
    with pytest.raises(UserError, match=r"feature_contrast\.games: .* has no merged\.h5; run the games first"):
        prepare_run(load_manifest(SEED_000[1]))
    with pytest.raises(UserError, match=r"sae_training\.activations: .* has no merged\.h5"):
        prepare_run(load_manifest(SEED_003[1]))
    with pytest.raises(UserError, match=r"data/MATH/test\.jsonl does not exist"):
        prepare_run(load_manifest(SEED_003[0]))
    assert not (fresh_checkout / "runs").exists()


def test_a_missing_run_named_by_its_directory_cannot_be_estimated(fresh_checkout, capsys):
    manifest = fresh_checkout / "contrast.yaml"
    manifest.write_text(SEED_000[1].read_text().replace("gambling_games_llama31_8b.yaml", str(fresh_checkout)))
    assert main(["plan", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "has no merged.h5; run the games first" in err
    assert "name it by its manifest file rather than its run directory" in err


def test_one_plan_takes_one_manifest_unless_chained(fresh_checkout, capsys):
    assert main(["plan", str(SEED_000[0]), str(SEED_000[1])]) == 2
    assert "give --chain" in capsys.readouterr().err


def test_the_estimate_before_a_run_agrees_with_the_plan_after_it(gambling_chain, tmp_path, monkeypatch):
    """The demo contrast planned from the games' manifest alone, then from the finished games run."""
    for step in (REPO / "manifests" / "demo").glob("gambling_*.yaml"):
        shutil.copy(step, tmp_path / step.name)
    monkeypatch.chdir(tmp_path)
    before = size_manifest("gambling_2_contrast.yaml")
    monkeypatch.chdir(gambling_chain.folder)
    after = size_manifest("gambling_2_contrast.yaml")
    assert before.assumed and not after.assumed
    assert before.plan.units == after.plan.units
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="has no merged.h5"):  # and outside planning the copy still refuses
        prepare_run(load_manifest(tmp_path / "gambling_2_contrast.yaml"))


# ---------------------------------------------------------------- the rates, computed independently


def test_generation_at_the_measured_batch_takes_the_measured_time():
    # issue 21: 85.6 answers/s of 50 new tokens at batch 512 on Llama-3.1-8B (120 ms a decode step)
    answers = 85.6 * 3600
    hour = seconds(Work("decode", answers * 50, LLAMA31_8B, rows=512))
    assert hour == pytest.approx(3600, rel=0.005)
    # one row at a time can never beat reading the 16 GB of bf16 weights once a token at 4.8 TB/s
    assert seconds(Work("decode", 100, LLAMA31_8B, rows=1)) >= 100 * 2 * 8_030_261_248 / 4.8e12


def test_sae_training_at_the_measured_width_runs_at_the_measured_rates():
    width = 4096 * 32768  # issue 22: d_in 4,096 x 32,768 features, batch 4,096
    for variant, rate in (("relu", 28_968), ("relu+decorrelation", 19_248), ("topk", 29_791)):
        assert seconds(Work("sae_training", rate * 60, width=width, variant=variant)) == pytest.approx(60)
    assert seconds(Work("sae_training", 1000, width=width // 4, variant="relu")) == pytest.approx(1000 / 28_968 / 4)
    assert sae_variant("none", 0.01) == "relu+decorrelation" and sae_variant("topk", 0) == "topk"


def test_gpu_hours_of_a_known_manifest(fresh_checkout, tmp_path):
    """Patching Llama-3.1-8B from a feature table: 2 prompts x 50 trials, 512 answers a generate
    call (1,024 a batch, split by prompt), sampled only; worked out from the published rates."""
    table = tmp_path / "features.csv"
    table.write_text("layer,feature,mean_safe,mean_bankrupt,selected\n"
                     + "".join(f"25,{feature},0.1,0.9,true\n" for feature in range(99)))
    manifest = tmp_path / "patching.yaml"
    paper = re.sub(r"  batch_size: .*\n", "  batch_size: 1024\n", SEED_000[2].read_text())
    manifest.write_text(re.sub(r"  features: .*\n", f"  feature_table: {table}\n", paper)
                        .replace("controls: 20", "controls: 0")
                        .replace("shards: 16", "shards: 4")
                        + "  decisions: sampled\n")
    size = size_manifest(str(manifest))
    assert not size.assumed and len(size.plan.units) == 100
    answers = (1 + 2 * 99) * 2 * 50  # the unpatched baseline once, each feature at its two means
    decode = answers / 85.6  # issue 21's measured point: 512 rows a call, 50 tokens an answer
    sae = 2 * 4096 * 32768 * 4  # layer 25's SAE in float32 (LlamaScope's width, assumed)
    load = 4 * (2 * 8_030_261_248 + sae) / 2e9  # each of the 4 shards loads the model and the SAE
    batches = 0
    for shard in size.plan.shards:  # a batch of 1,024 answers computes each prompt's cache once
        conditions = sum(1 if unit == "baseline" else 2 for unit in shard)
        batches += -(-conditions * 2 * 50 // 1024)
    prompt_tokens = sum(len(prompt.text) / 4 for prompt in size.manifest.settings.prompts)
    caches = batches * prompt_tokens * 2 * 8_030_261_248 / (0.4 * 790e12)
    assert size.gpu_hours == pytest.approx((decode + load + caches) / 3600, rel=0.01)


def test_a_step_whose_gpu_work_asks_for_no_gpu_is_flagged_not_counted(capsys):
    """The demo manifests run on CPUs (gpus_per_task: 0): their GPU work counts no GPU-hours, and
    the table says so instead of showing a bare 0.00."""
    assert main(["plan", "--chain", str(REPO / "manifests" / "demo" / "token_tracking.yaml")]) == 0
    out = capsys.readouterr().out
    assert _table(out)["1"][1] == "token_tracking!" and float(_table(out)["1"][-3]) == 0
    assert "ask for no GPU (cluster.gpus_per_task: 0): no GPU-hours counted" in out
