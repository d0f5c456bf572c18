"""What the tests of the reasoning chain (seed 003: activation_capture -> sae_training ->
feature_ablation) share: the demo's benchmark, its manifests written with changes, and refusals.

The demo chain itself runs once per session (tests/conftest.py's `reasoning_chain`); the organism's
model and tokenizer are tests/jobs/conftest.py's `organism_model`.
"""

import yaml

from common.cli import main
from jobs._reasoning.problems import BenchmarkSpec, load_benchmark
from tests.helpers import REPO

DEMO = REPO / "manifests" / "demo"
DEMO_BENCHMARK = yaml.safe_load((DEMO / "reasoning_1_capture.yaml").read_text())["activation_capture"]["benchmarks"][0]


def demo_benchmark():
    return load_benchmark(BenchmarkSpec(**DEMO_BENCHMARK))


def read_csv(path):
    import pandas as pd

    return pd.read_csv(path).to_dict("records")


def write_step(folder, name, job, section, source=DEMO):
    """The demo step `name` with its `job` section updated by `section`, runs under folder/runs."""
    data = yaml.safe_load((source / name).read_text())
    data["run"]["root"] = str(folder / "runs")
    data[job].update(section)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def refused(capsys, path, message):
    assert main(["plan", str(path)]) == 2
    assert message in capsys.readouterr().err
