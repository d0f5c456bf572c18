"""Manifests: typos and wrong types fail at once, naming the field and listing the valid keys."""

import shutil
from pathlib import Path

import pytest
import yaml

from common.cli import main
from common.errors import UserError
from common.manifest import upstream_runs
from common.manifest_file import load_manifest, named_manifest
from tests.helpers import REPO

DEMO = REPO / "manifests" / "demo"


def test_demo_manifest_loads_with_defaults(write_manifest):
    manifest = load_manifest(write_manifest())
    assert manifest.job == "token_tracking"
    assert len(manifest.settings.scenarios) == 10
    assert set(manifest.settings.key_spans) == {"balance", "goal", "probability", "choices"}
    assert manifest.cluster.timeout_min == 60


def test_unknown_nested_key_lists_valid_keys_with_defaults(write_manifest):
    path = write_manifest({"token_tracking": {"batch_sise": 4}})
    with pytest.raises(UserError) as error:
        load_manifest(path)
    text = str(error.value)
    assert "token_tracking.batch_sise: unknown key. Did you mean `batch_size`?" in text
    assert "batch_size (default: 16)" in text and "mode (default: 'features_and_attention')" in text


def test_unknown_top_level_key(write_manifest):
    with pytest.raises(UserError, match=r"unknown top-level key\(s\) clutser"):
        load_manifest(write_manifest({"clutser": {"partition": "gpu"}}))


def test_top_level_keys_that_yaml_reads_as_no_strings_are_named(write_manifest):
    path = write_manifest()
    path.write_text(path.read_text() + "2: one\nyes: two\nzz: three\n")
    with pytest.raises(UserError) as refused:
        load_manifest(path)
    assert str(refused.value).startswith(f"manifest {path}: unknown top-level key(s) 2, True, zz; valid keys are")
    assert str(refused.value).endswith("keys must be strings (YAML read 2, True as bool, int: quote them)")


def test_unknown_cluster_key_names_field(write_manifest):
    with pytest.raises(UserError, match=r"cluster\.gpus: unknown key\..*gpus_per_task \(default: 1\)"):
        load_manifest(write_manifest({"cluster": {"gpus": 2}}))


def test_wrong_type_names_field_and_value(write_manifest):
    with pytest.raises(UserError, match=r"token_tracking\.batch_size: .*integer.*got 'ten'"):
        load_manifest(write_manifest({"token_tracking": {"batch_size": "ten"}}))


def test_missing_required_field(write_manifest):
    with pytest.raises(UserError, match=r"token_tracking\.model: required field is missing"):
        load_manifest(write_manifest({"token_tracking": {"model": None}}))


def test_unknown_job_lists_available(write_manifest):
    with pytest.raises(UserError, match=r"unknown job 'token_trekking'.*available jobs: .*token_tracking"):
        load_manifest(write_manifest({"job": "token_trekking"}))


def test_zero_shards_rejected(write_manifest):
    with pytest.raises(UserError, match=r"run\.shards: .*greater than or equal to 1"):
        load_manifest(write_manifest({"run": {"shards": 0}}))


def test_cross_field_checks(write_manifest):
    with pytest.raises(UserError, match="give `sae`, or set mode: attention_only"):
        load_manifest(write_manifest({"token_tracking": {"sae": None}}))
    with pytest.raises(UserError, match="exactly one of `id`"):
        load_manifest(write_manifest({"token_tracking": {"model": {"path": "/x"}}}))
    with pytest.raises(UserError, match=r"lacks template field\(s\) \['round'\]"):
        load_manifest(write_manifest({"token_tracking": {"scenarios": [
            {"name": "a", "fields": {"balance": 1, "history": ""}}]}}))


def test_not_yaml_and_not_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_manifest(bad)
    bad.write_text("- a list")
    with pytest.raises(UserError, match="`job:` key"):
        load_manifest(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_manifest(tmp_path / "absent.yaml")


def test_run_id_tracks_science_not_cluster(write_manifest):
    base = load_manifest(write_manifest()).run_id()
    assert load_manifest(write_manifest({"cluster": {"partition": "gpu", "timeout_min": 5}})).run_id() == base
    assert load_manifest(write_manifest({"token_tracking": {"layers": "0-1"}})).run_id() != base
    assert load_manifest(write_manifest({"run": {"shards": 1}})).run_id() != base


def test_resolved_manifest_round_trips(write_manifest, tmp_path):
    manifest = load_manifest(write_manifest())
    again = tmp_path / "resolved.yaml"
    again.write_text(manifest.to_yaml())
    reloaded = load_manifest(again)
    assert reloaded == manifest
    assert "scenarios" in yaml.safe_load(manifest.to_yaml())["token_tracking"]  # defaults are filled


def test_cli_prints_error_without_traceback(write_manifest, capsys):
    code = main(["plan", str(write_manifest({"token_tracking": {"lyers": "all"}}))])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: manifest") and "token_tracking.lyers: unknown key" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- the runs a manifest names


@pytest.fixture
def gambling_steps(tmp_path, monkeypatch):
    """The demo's gambling chain copied to tmp_path (each step names the previous one's manifest by a
    relative path), run from there: no run exists."""
    for step in sorted(DEMO.glob("gambling_*.yaml")):
        shutil.copy(step, tmp_path / step.name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_run_named_by_its_manifest_becomes_that_runs_directory(gambling_steps):
    games = load_manifest(gambling_steps / "gambling_1_games.yaml")
    contrast = load_manifest(gambling_steps / "gambling_2_contrast.yaml")
    assert contrast.settings.games == games.run_path() == gambling_steps / "runs" / f"gambling_games-{games.run_id()}"
    assert named_manifest(games.run_path()) == (games, gambling_steps / "gambling_1_games.yaml")
    patching = load_manifest(gambling_steps / "gambling_4_patching.yaml")  # two steps back, through the contrast
    contexts = load_manifest(gambling_steps / "gambling_3_contexts.yaml")
    assert contexts.settings.features_from == contrast.run_path()
    assert upstream_runs(patching.settings) == {"features": contrast.run_path(),  # retest: None is no run
                                                "contexts": contexts.run_path()}
    saved = gambling_steps / "saved.yaml"
    saved.write_text(patching.to_yaml())
    assert load_manifest(saved) == patching  # the saved form names the runs by directory


def test_a_run_named_by_its_directory_is_kept_beside_the_manifest(gambling_steps, monkeypatch):
    path = gambling_steps / "gambling_2_contrast.yaml"
    path.write_text(path.read_text().replace("games: gambling_1_games.yaml", "games: games-run"))
    (gambling_steps / "elsewhere").mkdir()
    monkeypatch.chdir(gambling_steps / "elsewhere")
    games = load_manifest(path).settings.games
    assert games == gambling_steps / "games-run" and named_manifest(games) is None


def test_the_run_root_given_moves_the_upstream_runs_too(gambling_steps, tmp_path):
    contrast = load_manifest(gambling_steps / "gambling_2_contrast.yaml", run_root=tmp_path / "demo")
    assert contrast.settings.games.parent == tmp_path / "demo" == contrast.run_path().parent


def test_the_run_path_is_read_from_the_manifest_alone(gambling_steps, monkeypatch):
    contrast = load_manifest(gambling_steps / "gambling_2_contrast.yaml")
    expected = gambling_steps / "runs" / f"feature_contrast-{contrast.run_id()}"

    def no_disk(*args, **kwargs):
        raise AssertionError("the run path read the disk")

    for method in ("exists", "is_file", "is_dir", "open", "read_text", "stat", "resolve", "iterdir"):
        monkeypatch.setattr(Path, method, no_disk)
    assert contrast.run_path() == expected
    elsewhere = contrast.model_copy(update={"run": contrast.run.model_copy(update={"dir": Path("/x")})})
    assert elsewhere.run_path() == Path("/x")


def test_an_invalid_upstream_manifest_is_refused_naming_its_file(gambling_steps, capsys):
    (gambling_steps / "gambling_1_games.yaml").write_text("job: gambling_games\ngambling_games: {repetitons: 2}\n")
    assert main(["plan", str(gambling_steps / "gambling_2_contrast.yaml")]) == 2
    err = capsys.readouterr().err
    assert "gambling_1_games.yaml is invalid" in err and "gambling_games.repetitons: unknown key" in err


@pytest.mark.parametrize("loop", ["itself", "through another"])
def test_a_chain_that_leads_back_to_itself_is_refused(gambling_steps, capsys, loop):
    step = (gambling_steps / "gambling_4_patching.yaml").read_text()
    first, second = gambling_steps / "p1.yaml", gambling_steps / "p2.yaml"
    first.write_text(step + f"  retest: {'p1.yaml' if loop == 'itself' else 'p2.yaml'}\n")
    second.write_text(step + "  retest: p1.yaml\n")
    assert main(["plan", str(first)]) == 2
    err = capsys.readouterr().err
    cycle = "p1.yaml -> p1.yaml" if loop == "itself" else "p1.yaml -> p2.yaml -> p1.yaml"
    assert f"population_patching.retest: p1.yaml leads back to itself ({cycle}); name the run of an earlier step" in err
    assert "Traceback" not in err
