"""Manifests: typos and wrong types fail at once, naming the field and listing the valid keys."""

import pytest
import yaml

from common.cli import main
from common.errors import UserError
from common.manifest import load_manifest


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
