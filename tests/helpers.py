"""Helpers shared by several test modules."""

from pathlib import Path

from sae_lens import SAE

REPO = Path(__file__).resolve().parent.parent
DEMO_MANIFEST = REPO / "manifests" / "demo" / "token_tracking.yaml"


def save_random_sae(folder: Path, d_in: int, d_sae: int = 32, hook: str = "blocks.{layer}.hook_resid_post",
                    layers=(0, 1)) -> str:
    """Random JumpReLU SAEs saved in sae-lens's format at folder/L<layer>; returns the path template."""
    for layer in layers:
        sae = SAE.from_dict({"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
                             "device": "cpu", "metadata": {"hook_name": hook.format(layer=layer)}})
        sae.save_model(folder / f"L{layer}")
    return str(folder / "L{layer}")
