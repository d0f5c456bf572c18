"""Reading the run of an earlier step while planning: its saved manifest, else the manifest file it
was named by; refused outside planning, or when neither is at hand."""

import shutil

import pytest

from common.errors import UserError
from common.manifest_file import load_manifest
from common.plan import estimating
from common.rundir import RunDir
from common.upstream import upstream_to_estimate
from tests.helpers import REPO

DEMO = REPO / "manifests" / "demo"
MISSING = UserError("feature_contrast.games: the games have not run")


@pytest.fixture
def contrast(tmp_path, monkeypatch):
    """The demo contrast step, naming the games by their manifest; neither has run."""
    for step in ("gambling_1_games.yaml", "gambling_2_contrast.yaml"):
        shutil.copy(DEMO / step, tmp_path / step)
    monkeypatch.chdir(tmp_path)
    return load_manifest(tmp_path / "gambling_2_contrast.yaml")


def test_outside_planning_a_missing_run_is_refused(contrast):
    with pytest.raises(UserError, match="the games have not run"):
        upstream_to_estimate(contrast.settings.games, "gambling_games", "feature_contrast.games", MISSING)


def test_a_run_not_there_yet_is_read_from_the_manifest_it_was_named_by(contrast, tmp_path):
    with estimating():
        manifest, where = upstream_to_estimate(contrast.settings.games, "gambling_games", "feature_contrast.games",
                                               MISSING)
    assert manifest == load_manifest(tmp_path / "gambling_1_games.yaml") and where == "gambling_1_games.yaml"


def test_a_run_directory_is_read_from_its_saved_manifest(contrast, tmp_path):
    games = load_manifest(tmp_path / "gambling_1_games.yaml")
    run = RunDir(tmp_path / "games-run")
    run.path.mkdir()
    run.manifest_path.write_text(games.to_yaml())
    with estimating():
        manifest, where = upstream_to_estimate(run.path, "gambling_games", "feature_contrast.games", MISSING)
    assert manifest == games and where == "games-run/manifest.yaml"


def test_a_manifest_of_another_job_is_refused(contrast):
    with estimating(), pytest.raises(UserError, match=r"^feature_contrast\.games: gambling_1_games\.yaml is a "
                                                      r"gambling_games manifest, not feature_contrast$"):
        upstream_to_estimate(contrast.settings.games, "feature_contrast", "feature_contrast.games", MISSING)


def test_a_missing_run_named_by_its_directory_says_how_to_plan_anyway(tmp_path):
    with estimating(), pytest.raises(UserError) as refused:
        upstream_to_estimate(tmp_path / "no-run", "gambling_games", "feature_contrast.games", MISSING)
    assert str(refused.value) == ("feature_contrast.games: the games have not run (to plan before that run exists, "
                                  "name it by its manifest file rather than its run directory)")
