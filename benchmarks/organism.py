"""A built-in model organism: training time, file sizes and its measured figures, against simple baselines.

    .venv/bin/python benchmarks/organism.py                         # the organism (seed 0)
    .venv/bin/python benchmarks/organism.py --builtin organism_b    # the second organism (seed 1)

Trains the organism from scratch into a temporary folder with the shipped settings (exactly what
`saebatch organism train [--builtin NAME]` does, with the torch threads its shipped files were
trained with, so that an identical rebuild is possible), times it, says whether the result equals
the shipped files, and measures the rebuilt organism on held-out prompts. Baselines, on the same
prompts: the best constant answer (always bet, or always stop) for the decision rule; the rule's
mean bet for every prompt for bet sizes; the budget the issue sets for time (10 minutes on 2
cores) and size (a few MB, read as 5 MB). Rows go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results import Row, record  # noqa: E402

from common.organism.files import BUILTINS, DEFAULT, RECORD  # noqa: E402
from jobs._organism import evaluation  # noqa: E402
from jobs._organism.rule import risk, typical_bet  # noqa: E402
from jobs._organism.training import BUILTIN_SEEDS, TrainingSettings, train  # noqa: E402

TIME_BUDGET_S, SIZE_BUDGET_MB = 600, 5.0


def same_content(rebuilt: Path, shipped: Path, names: dict) -> bool:
    """Every file equal: JSON files as parsed values (sae-lens writes cfg.json keys in varying
    order), the others byte for byte."""
    shipped_names = json.loads((shipped / RECORD).read_text())["files"]
    if set(names) != set(shipped_names):
        return False
    for name in names:
        a, b = rebuilt / name, shipped / name
        if name.endswith(".json"):
            if json.loads(a.read_text()) != json.loads(b.read_text()):
                return False
        elif a.read_bytes() != b.read_bytes():
            return False
    return True


def constant_baselines(n: int = 400) -> dict:
    """What the best constant answers score on the prompts evaluation.decision_rule/bet_sizes use."""
    rule = np.array([risk(s) for s in evaluation.held_out_states(n)])
    clear = np.abs(rule - 0.5) >= 0.2
    always = max(np.mean(rule[clear] > 0.5), np.mean(rule[clear] < 0.5))
    states = evaluation.held_out_states(200, seed=evaluation.HELD_OUT_SEED + 1, bet_type="variable")
    bets = np.array([evaluation.rule_bet(s) for s in states], dtype=float)
    return {"majority_agreement": always, "bet_mae": float(np.abs(bets - bets.mean()).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--builtin", choices=list(BUILTINS), default=DEFAULT, help="which built-in organism")
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = parser.parse_args()

    shipped = BUILTINS[args.builtin]
    torch.set_num_threads(json.loads((shipped / RECORD).read_text())["training_seconds"]["torch_threads"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "organism"
        started = time.perf_counter()
        rec = train(out, TrainingSettings(seed=BUILTIN_SEEDS[args.builtin]), args.builtin)
        seconds = time.perf_counter() - started
        identical = same_content(out, shipped, rec["files"])
        size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
        measured, feature = rec["measured"], rec["planted"]["feature"]
    base = constant_baselines()
    rule, bets, effect = measured["decision_rule"], measured["bet_sizes"], measured["planted_effect"]
    direction = measured["planted_direction"]
    sae = measured["saes"][str(rec["planted"]["layer"])]
    threads = f"{torch.get_num_threads()} torch thread{'s' if torch.get_num_threads() > 1 else ''}"
    name = args.builtin
    rows = [
        Row(f"{name}: training time (tokenizer, language model, 4 SAEs, measuring), CPU",
            f"{seconds:.0f} s (language model {rec['training_seconds']['language_model']:.0f} s; {threads}); "
            f"rebuilt files equal the shipped ones: {'yes' if identical else 'no'}",
            f"budget {TIME_BUDGET_S} s", f"{TIME_BUDGET_S / seconds:.2f}x ({'within' if seconds <= TIME_BUDGET_S else 'over'} budget)"),
        Row(f"{name}: shipped files (model float16, 4 TopK SAEs float32, tokenizer, record)",
            f"{size_mb:.2f} MB", f"budget {SIZE_BUDGET_MB:g} MB", f"{SIZE_BUDGET_MB / size_mb:.2f}x"),
        Row(f"{name}: decision rule on held-out prompts, majority agreement where the rule is clear "
            "(|P(bet) - 0.5| >= 0.2)",
            f"{rule['majority_agreement']:.1%} of {rule['clear_prompts']} (P(bet) MAE {rule['mean_abs_error']:.3f}, "
            f"r {rule['correlation']:.3f})", f"{base['majority_agreement']:.1%} (best constant answer)",
            f"{rule['majority_agreement'] / base['majority_agreement']:.2f}x"),
        Row(f"{name}: greedy bet against the rule's bet, variable-bet prompts",
            f"MAE ${bets['mean_abs_error_dollars']:.2f}, Spearman {bets['spearman']:.3f}",
            f"MAE ${base['bet_mae']:.2f} (the rule's mean bet everywhere)",
            f"{base['bet_mae'] / bets['mean_abs_error_dollars']:.2f}x smaller error"),
        Row(f"{name}: arithmetic word problems, exact '#### N' answer, greedy",
            f"{measured['arithmetic']['accuracy']:.1%} of {measured['arithmetic']['problems']}", "-", "-"),
        Row(f"{name}: SAE of the planted layer {rec['planted']['layer']} (TopK, 512 features), held-out tokens",
            f"explained variance {sae['explained_variance']:.3f}, L0 {sae['l0']:.1f}, dead {sae['dead_fraction']:.1%}",
            "-", "-"),
        Row(f"{name}: planted feature set to its safe mean vs its risky mean at the decision cue (error term kept)",
            f"feature {feature['index']}: stop rate {effect['stop_rate_at_safe_mean']:.1%} vs "
            f"{effect['stop_rate_at_risky_mean']:.1%}; bet ${effect['bet_at_safe_mean']:.1f} vs "
            f"${effect['bet_at_risky_mean']:.1f}", f"unedited stop rate {effect['stop_rate_unedited']:.1%}", "-"),
        Row(f"{name}: planted direction u set to appetite 0.1 vs 0.9 at the decision cue",
            f"stop rate {direction['stop_rate_at_0.1']:.1%} vs {direction['stop_rate_at_0.9']:.1%}; bet "
            f"${direction['bet_at_0.1']:.1f} vs ${direction['bet_at_0.9']:.1f}",
            f"the rule: stop rate 90.0% vs 10.0%; bet ${typical_bet(0.1):.1f} vs ${typical_bet(0.9):.1f}",
            "-"),
    ]
    for row in rows:
        print(f"{row.benchmark}: {row.ours} | {row.baseline} | {row.ratio}")
    if not args.no_record:
        record(rows)


if __name__ == "__main__":
    main()
