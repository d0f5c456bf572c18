"""Hostile manifests and inputs: each refused by `saebatch plan` at once, with exit code 2, the
field or file named and no traceback."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from common.cli import main
from tests.helpers import REPO

DEMO = REPO / "manifests" / "demo" / "feature_correlation.yaml"


def demo_text(**sections) -> str:
    """The demo feature_correlation manifest with `sections` merged in, as YAML text."""
    data = yaml.safe_load(DEMO.read_text())
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return yaml.safe_dump(data, sort_keys=False)


def refused(capsys, path, *expected: str) -> str:
    """`saebatch plan path` exits 2 within 5 s, naming each of `expected`, with no traceback."""
    began = time.perf_counter()
    code = main(["plan", str(path)])
    seconds = time.perf_counter() - began
    error = capsys.readouterr().err
    assert code == 2 and seconds < 5, (code, seconds, error)
    assert "Traceback" not in error
    for text in expected:
        assert text in error, (text, error)
    return error


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path, capsys):
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]" for previous, name in zip("abcdefgh", "bcdefghi")]
    path = tmp_path / "bomb.yaml"
    path.write_text(demo_text() + "\n".join(levels) + "\n")
    refused(capsys, path, "its aliases expand past 100,000 values")


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path, capsys):
    path = tmp_path / "recursive.yaml"
    path.write_text(demo_text() + "loop: &loop [1, *loop]\n")
    refused(capsys, path, "an alias refers to the value it is part of")


def test_a_manifest_of_megabytes_is_refused_unread(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_text(demo_text() + "# padding\n" * 200_000)
    refused(capsys, path, "a manifest is a short YAML file")


def test_an_alias_bomb_in_a_field_of_a_wrong_type_is_refused_quickly(tmp_path, capsys):
    """Before, the error message rendered the whole invalid (expanded) value."""
    text = demo_text().replace("  shards: 2", "  shards: &big [" + ", ".join(["x" * 200] * 400) + "]")
    path = tmp_path / "wide.yaml"
    path.write_text(text)
    error = refused(capsys, path, "run.shards")
    assert len(error) < 2_000


@pytest.mark.parametrize("nesting", ["[" * 20_000 + "]" * 20_000, "{a: " * 20_000 + "1" + "}" * 20_000])
def test_nesting_twenty_thousand_deep_is_refused(tmp_path, capsys, nesting):
    path = tmp_path / "deep.yaml"
    path.write_text(demo_text() + f"extra: {nesting}\n")
    refused(capsys, path, "nests too deeply to read")


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path, capsys):
    path = tmp_path / "twice.yaml"
    path.write_text("job: feature_correlation\nrun:\n  shards: 2\ncluster: {cpus_per_task: 1}\nrun:\n  shards: 3\n")
    refused(capsys, path, "key `run` is given twice in one mapping (lines 2 and 5)")


def test_bytes_that_are_not_utf8_are_refused(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(demo_text().encode() + "# caf\xe9\n".encode("latin-1"))
    refused(capsys, path, "is not UTF-8 text (byte 0xe9")


def test_a_directory_given_as_the_manifest_is_named_a_directory(capsys):
    refused(capsys, DEMO.parent, "is a directory; give the path of a YAML manifest", "gambling_1_games.yaml")


@pytest.mark.parametrize(("root", "expected"), [
    ("/etc/saebatch-runs", "is in the system folder /etc"),
    ("/usr/local/runs", "is in the system folder /usr"),
    ("/proc/runs", "is in the system folder /proc"),
    ("/", "is in the system folder /"),
])
def test_a_run_root_in_a_system_folder_is_refused(tmp_path, capsys, root, expected):
    path = tmp_path / "system.yaml"
    path.write_text(demo_text(run={"root": root}))
    refused(capsys, path, "run.root", expected)


def test_a_run_root_that_is_a_symlink_loop_or_under_a_file_is_refused(tmp_path, capsys):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    (tmp_path / "a_file").write_text("not a folder")
    for root, expected in ((loop, "cannot be resolved"), (tmp_path / "a_file" / "runs", "is a file, not a folder")):
        path = tmp_path / "root.yaml"
        path.write_text(demo_text(run={"root": str(root)}))
        refused(capsys, path, "run.root", expected)


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_a_binary_file_as_corpus_is_refused(tmp_path, capsys, kind):
    corpus = tmp_path / f"corpus.{'txt' if kind == 'text' else 'jsonl'}"
    corpus.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n" + bytes(range(256)) if kind == "jsonl"
                       else b"some text\x00\x01\x02" + bytes(range(128, 256)))
    path = tmp_path / "binary.yaml"
    path.write_text(demo_text(feature_correlation={**yaml.safe_load(DEMO.read_text())["feature_correlation"],
                                                   "corpus": {"path": str(corpus), "format": kind, "tokens": 1000}}))
    refused(capsys, path, "feature_correlation.corpus.path", str(corpus))


def test_plan_piped_into_head_ends_quietly():
    """The reader closes the pipe early; plan exits 0 with nothing on stderr."""
    shell = f"{sys.executable} -m common.cli plan {DEMO} | (sleep 1; head -c 1 > /dev/null)"
    result = subprocess.run(["bash", "-c", shell + "; echo ${PIPESTATUS[0]}"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.stdout.strip() == "0" and result.stderr == ""


def test_a_negative_number_of_units_to_list_is_refused(capsys):
    """Python's slice would list all but the last unit and call the rest "more"."""
    assert main(["plan", str(DEMO), "--max-units", "-1"]) == 2
    assert "--max-units -1: give how many unit ids (and shards) to list, 0 or more" in capsys.readouterr().err
    assert main(["plan", str(DEMO), "--max-units", "0"]) == 0
    assert "... and 4 more (--max-units to list them)" in capsys.readouterr().out
