"""feature_contrast: statistics against independent computations, and the organism's planted cause."""

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from common.cli import main
from common.manifest_file import load_manifest
from jobs.feature_contrast import Selection, contrast, correct
from tests.helpers import REPO

DEMO = REPO / "manifests" / "demo"


def test_statistics_equal_a_feature_by_feature_computation():
    rng = np.random.default_rng(0)
    bankrupt = rng.gamma(2, 1, (25, 6)) * (rng.random((25, 6)) < 0.6)
    safe = rng.gamma(2, 1.5, (70, 6)) * (rng.random((70, 6)) < 0.4)
    bankrupt[:, 5] = safe[:, 5] = 0.0  # never active: nothing to test
    table = contrast(bankrupt, safe)
    for f in range(5):
        a, b = bankrupt[:, f], safe[:, f]
        pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
        assert table["cohens_d"][f] == pytest.approx((a.mean() - b.mean()) / pooled, rel=1e-12)
        welch = stats.ttest_ind(a, b, equal_var=False)
        assert table["t"][f] == pytest.approx(welch.statistic, rel=1e-12)
        assert table["p"][f] == pytest.approx(welch.pvalue, rel=1e-10)
        assert table["active_safe"][f] == pytest.approx((b > 0).mean())
    assert np.isnan(table["p"][5]) and np.isnan(table["cohens_d"][5])


def test_corrections_and_the_selection_at_its_edges():
    p = np.array([0.0001, 0.0004, 0.02, np.nan, 0.0002, 0.9])
    d = np.array([1.0, 0.8, 3.0, 2.0, -0.9, 5.0])
    table = correct(pd.DataFrame({"p": p, "cohens_d": d}), Selection(correction="bh", alpha=0.001, min_abs_d=0.8))
    tested = p[~np.isnan(p)]
    order = np.argsort(tested)
    bh = tested[order] * len(tested) / np.arange(1, len(tested) + 1)
    bh = np.minimum.accumulate(bh[::-1])[::-1]  # step-up: monotone from the largest p down
    expected = np.empty_like(bh)
    expected[order] = np.minimum(bh, 1)
    np.testing.assert_allclose(table["q_bh"].dropna(), expected, rtol=1e-12)
    np.testing.assert_allclose(table["p_bonferroni"].dropna(), np.minimum(tested * 5, 1), rtol=1e-12)
    # q of 0.0004 is 0.0005 < 0.001 but |d| = 0.8 is not above 0.8; untested features are never selected
    assert table["selected"].tolist() == [True, False, False, False, True, False]
    strict = correct(pd.DataFrame({"p": p, "cohens_d": d}), Selection(correction="bonferroni", alpha=0.001))
    assert strict["selected"].tolist() == [True, False, False, False, False, False]  # 0.0002 x 5 = 0.001: not below
    assert strict["p_bonferroni"][4] == pytest.approx(0.001)


def test_the_chain_finds_the_organisms_planted_feature(gambling_chain):
    games, contrast_run = gambling_chain.games, gambling_chain.contrast
    table = pd.read_csv(contrast_run.report_dir / "features.csv")
    planted = table[(table.layer == 1) & (table.feature == 402)].iloc[0]
    assert planted.selected and planted.cohens_d > 0.8  # higher where the model went on to bet
    layer = table[table.layer == 1]
    rank = int((layer.cohens_d.abs() > abs(planted.cohens_d)).sum()) + 1
    selected_rank = int((layer[layer.selected].cohens_d.abs() > abs(planted.cohens_d)).sum()) + 1
    # among the top 2% of the layer by |d| (7th of 512 on the demo's games): a contrast ranks the cause's
    # correlates beside it, the patching tells them apart
    assert rank <= 10 and len(layer) == 512
    report = (contrast_run.report_dir / "report.md").read_text()
    assert "## Ground truth: the organism's planted cause" in report
    assert (f"ranks {rank} of {len(layer)} layer-1 features by |d|, and it is selected, {selected_rank} of the "
            f"layer's {int(layer.selected.sum())} selected features") in report
    with h5py.File(games.merged_path) as merged:
        outcomes = [g.attrs["outcome"] for g in merged["units"].values()]
        finals = {name: g["features/L1/data"].size for name, g in merged["units"].items()}
    with h5py.File(contrast_run.merged_path) as out:
        assert out.attrs["job"] == "feature_contrast"
        sizes = yaml.safe_load(out.attrs["group_sizes"].replace("'", '"'))
        assert sizes[1] == {"bankrupt": outcomes.count("bankrupt"), "safe": outcomes.count("stopped")}
        assert out["features/selected"][()].sum() == table.selected.sum() > 0
    assert len(finals) == 128


def test_the_games_run_is_saved_as_its_directory(gambling_chain):
    games, contrast_run = gambling_chain.games, gambling_chain.contrast
    saved = load_manifest(contrast_run.manifest_path).settings.games
    assert saved == games.path  # not the manifest file name: the run's identity includes it


def test_missing_or_foreign_upstream_runs_and_small_groups_are_refused(gambling_chain, tmp_path, capsys):
    games = gambling_chain.games

    def refused(settings: dict, message: str) -> None:
        data = yaml.safe_load((DEMO / "gambling_2_contrast.yaml").read_text())
        data["run"]["root"] = str(tmp_path / "runs")
        data["feature_contrast"].update(settings)
        path = tmp_path / "contrast.yaml"
        path.write_text(yaml.safe_dump(data))
        assert main(["plan", str(path)]) == 2
        assert message in capsys.readouterr().err

    refused({"games": str(tmp_path)}, f"feature_contrast.games: {tmp_path} has no merged.h5; run the games first")
    refused({"games": str(games.path), "layers": [1, 3]},
            "feature_contrast.layers: the games recorded SAE features at layers [1, 2], not at [3]")
    refused({"games": str(games.path), "min_games": 500}, "each group needs 500 (min_games). Play more games")
    other = tmp_path / "other"
    other.mkdir()
    with h5py.File(other / "merged.h5", "w") as foreign:
        foreign.attrs["job"] = "token_tracking"
    refused({"games": str(other)}, "was written by 'token_tracking', not gambling_games")


def test_a_feature_constant_in_each_group_separates_them_perfectly():
    """Constant 2.0 in bankrupt games and 0 in safe ones: d and t infinite, p 0, selected; the same
    constant in both: nothing to test."""
    rng = np.random.default_rng(0)
    bankrupt, safe = rng.normal(0, 1, (30, 3)), rng.normal(0, 1, (40, 3))
    bankrupt[:, 0], safe[:, 0] = 2.0, 0.0
    bankrupt[:, 1], safe[:, 1] = 1.0, 1.0
    table = pd.DataFrame(contrast(bankrupt, safe)).assign(layer=1)
    assert np.isposinf(table.cohens_d[0]) and np.isposinf(table.t[0]) and table.p[0] == 0.0
    assert table.loc[1, ["cohens_d", "t", "p"]].isna().all()
    flipped = pd.DataFrame(contrast(safe, bankrupt))
    assert np.isneginf(flipped.cohens_d[0])
    chosen = correct(table, Selection(alpha=0.05, min_abs_d=0.5, correction="bh"))
    assert chosen.selected[0] and not chosen.selected[1]
