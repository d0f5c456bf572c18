"""The figures the READMEs quote about the demo's science, read from the demo's own reports.

    .venv/bin/python benchmarks/demo_figures.py                 # runs the gambling and reasoning demos
    .venv/bin/python benchmarks/demo_figures.py --root runs     # or reads the runs of an earlier `saebatch demo`

The organism has a planted cause (layer 1, feature 402; jobs/_organism/README.md). Each row is
one figure of the chain that must find it, beside its reference: the contrast's |d| rank, the
patching stop and bet effects against the largest of the null controls', the ablation's drop
against the matched control sets', the two organisms' alignment against its permutation null, and
the drop of each organism's circuit that holds its planted feature against its matched groups'.
Rows go to RESULTS.md, so the prose never goes stale.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from results import Row, record  # noqa: E402

from common.manifest_file import load_manifest  # noqa: E402
from common.rundir import RunDir  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "manifests" / "demo"
PLANTED_LAYER, PLANTED_FEATURE = 1, 402


def report_of(root: Path, manifest: str) -> Path:
    return RunDir.for_manifest(load_manifest(DEMO / manifest, run_root=root)).report_dir


def figures(root: Path) -> list[Row]:
    label = "demo figure (organism, planted L1 F402)"
    contrast = pd.read_csv(report_of(root, "gambling_2_contrast.yaml") / "features.csv")
    layer = contrast[contrast.layer == PLANTED_LAYER].assign(size=lambda t: t.cohens_d.abs())
    planted_d = layer[layer.feature == PLANTED_FEATURE].iloc[0].cohens_d
    d_rank = int((layer["size"] > abs(planted_d)).sum()) + 1
    patching = pd.read_csv(report_of(root, "gambling_4_patching.yaml") / "features.csv")
    safe = patching[(patching.prompt == "safe") & (patching.layer == PLANTED_LAYER)]
    risky = patching[(patching.prompt == "risky") & (patching.layer == PLANTED_LAYER)]
    stop, bet = safe[safe.feature == PLANTED_FEATURE].iloc[0], risky[risky.feature == PLANTED_FEATURE].iloc[0]
    null_stop, null_bet = safe[safe.control].stop_effect.abs().max(), risky[risky.control].bet_effect.abs().max()
    ablation = pd.read_csv(report_of(root, "reasoning_3_ablation.yaml") / "summary.csv")
    own = ablation[(ablation.model == "organism") & (ablation.benchmark != "all")]  # the demo's first model
    arithmetic = own.iloc[0].to_dict()  # a dict: "drop" is no Series method
    return [
        Row(f"{label}: contrast |d| rank in its layer", f"d {planted_d:.2f}, rank {d_rank} of {len(layer)}",
            f"{len(layer)} layer-1 features", f"rank {d_rank}"),
        Row(f"{label}: patching stop effect, safe prompt (sampled, 95% interval)",
            f"{stop.stop_effect:.3f} [{stop.stop_effect_low:.3f}, {stop.stop_effect_high:.3f}], paired p "
            f"{stop.p_stops_corrected:.1e}", f"{null_stop:.3f} (largest of {int(stop.controls_in_layer)} null controls)",
            _ratio(stop.stop_effect, null_stop)),
        Row(f"{label}: patching exact P(stop) shift, safe prompt", f"{stop.stop_shift_exact:.3f}",
            f"{stop.stop_effect:.3f} (sampled)", _ratio(stop.stop_shift_exact, stop.stop_effect)),
        Row(f"{label}: patching exact bet shift, risky prompt (variable bets)",
            f"${bet.bet_shift_exact:.2f}", f"${bet.bet_effect:.2f} [{bet.bet_effect_low:.2f}, {bet.bet_effect_high:.2f}] "
            f"sampled; largest null control ${null_bet:.2f}", _ratio(bet.bet_shift_exact, bet.bet_effect)),
        Row(f"{label}: ablating the top features, accuracy drop on {int(arithmetic['items'])} problems",
            f"{100 * arithmetic['drop']:.1f} points ({100 * arithmetic['baseline']:.1f}% to {100 * arithmetic['ablated']:.1f}%), "
            f"null p {arithmetic['null_p_drop']:.3f}, McNemar p {arithmetic['p_ablated_vs_control']:.3f} vs the costliest set",
            f"{100 * arithmetic['control_drop']:.1f} points mean, {100 * arithmetic['control_drop_max']:.1f} max "
            f"({int(arithmetic['control_sets'])} matched sets)", _ratio(arithmetic["drop"], arithmetic["control_drop_max"])),
        *alignment_and_circuits(root),
    ]


def alignment_and_circuits(root: Path) -> list[Row]:
    """Across the two organisms: their layer-1 SAEs' alignment and the transfer of importance,
    each against its permutation null; and per organism its decision circuit holding the feature
    nearest its planted direction, whose drop stands against the matched groups'."""
    label = "demo figure (organism and organism_b)"
    folder = report_of(root, "reasoning_4_alignment.yaml")
    pairs = pd.read_csv(folder / "pairs.csv").iloc[0]
    transfer = pd.read_csv(folder / "transfer.csv").iloc[0]
    rows = [Row(f"{label}: alignment, {pairs.block_a} features with a match in {pairs.block_b} (r > threshold)",
                f"{100 * pairs.share_matched:.0f}% ({pairs.mutual_matches} mutual)",
                f"{100 * pairs.null_share_matched:.0f}% under the permutation null",
                _ratio(pairs.share_matched, pairs.null_share_matched)),
            Row(f"{label}: transfer of importance, {transfer.model} -> {transfer.other} (Spearman, {transfer.important} "
                "important features)", f"{transfer.spearman_all:.2f} (p {transfer.p_spearman_all:.3f})",
                f"{transfer.null_spearman_mean:.2f} under the null", "-")]
    report = (report_of(root, "reasoning_5_circuits.yaml") / "report.md").read_text()
    clusters = pd.read_csv(report_of(root, "reasoning_5_circuits.yaml") / "clusters.csv")
    for model in ("organism", "organism_b"):
        line = next(line for line in report.splitlines() if line.startswith(f"- {model} on decisions: "))
        number = int(line.split(" is in C")[1].split(" ")[0])
        row = clusters[(clusters.model == model) & (clusters.benchmark == "decisions") & (clusters.cluster == number)].iloc[0]
        rows.append(Row(f"{label}: {model}'s decision circuit holding its planted feature ({line.split(': ')[1].split(' (')[0]}), "
                        f"accuracy drop when ablated ({int(row['items'])} decisions)",
                        f"{100 * row['drop']:.1f} points, {row['size']} features, q {row['q']:.1e}; "
                        f"{'a primitive: replicates in ' + row['model_replica'] if row['primitive'] else 'no primitive'}",
                        f"{100 * row['control_drop_max']:.1f} points (largest of the matched groups)",
                        _ratio(row["drop"], row["control_drop_max"])))
    return rows


def _ratio(ours: float, reference: float) -> str:
    return f"{ours / reference:.2f}x" if reference > 0 else "reference 0 (no control moved it)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="run root of an earlier `saebatch demo` (default: run the demo in a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(args.root).absolute() if args.root else Path(folder)
        if not args.root:
            subprocess.run([sys.executable, "-m", "common.cli", "demo", "--cpu", "--root", str(root), "--only", "gambling",
                            "reasoning"], check=True)
        rows = figures(root)
        record(rows)
    for row in rows:
        print(f"{row.benchmark}: {row.ours} | {row.baseline}")


if __name__ == "__main__":
    main()
