"""The organism's measured figures as `saebatch organism train` and `measure` print them."""

from __future__ import annotations


def print_figures(feature: dict, measured: dict) -> None:
    """The figures of organism.json's `measured` (evaluation.measure), with its planted feature."""
    rule, bets, effect = measured["decision_rule"], measured["bet_sizes"], measured["planted_effect"]
    print(f"  decision rule: P(bet) mean abs error {rule['mean_abs_error']:.3f}, correlation "
          f"{rule['correlation']:.3f}, majority agreement {rule['majority_agreement']:.1%} on "
          f"{rule['clear_prompts']} clear prompts")
    print(f"  bet sizes: mean abs error ${bets['mean_abs_error_dollars']:.2f}, Spearman {bets['spearman']:.3f}")
    print(f"  arithmetic: {measured['arithmetic']['accuracy']:.1%} of {measured['arithmetic']['problems']} problems")
    for layer, sae in measured["saes"].items():
        print(f"  SAE layer {layer}: explained variance {sae['explained_variance']:.3f}, L0 {sae['l0']:.1f}, "
              f"dead {sae['dead_fraction']:.1%}")
    print(f"  planted feature {feature['index']} of layer {effect['layer']}: decoder cosine with u "
          f"{feature['decoder_cosine']:.3f}; set to its safe mean {feature['safe_mean']:.2f} -> stop rate "
          f"{effect['stop_rate_at_safe_mean']:.1%}, bet ${effect['bet_at_safe_mean']:.1f}; to its risky mean "
          f"{feature['risky_mean']:.2f} -> stop rate {effect['stop_rate_at_risky_mean']:.1%}, "
          f"bet ${effect['bet_at_risky_mean']:.1f}")
    direction = measured["planted_direction"]
    print(f"  planted direction u set to appetite 0.1 / 0.9: stop rate {direction['stop_rate_at_0.1']:.1%} / "
          f"{direction['stop_rate_at_0.9']:.1%}, bet ${direction['bet_at_0.1']:.1f} / ${direction['bet_at_0.9']:.1f}")
