"""How well an SAE does its job: on activations (L0, explained variance, dead features, feature
correlation) and inside the model (the next-token loss it recovers when spliced in)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.edits import edit_block_output
from common.lazy import lazy_import, no_grad

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
else:
    torch = lazy_import("torch")


@no_grad
def evaluate(sae: SAE, x: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Over tokens `x` (raw activations): L0 (non-zero features per token), explained variance
    1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2, the fraction of features never non-zero, and
    the mean squared correlation of distinct feature pairs (per batch, averaged over the full batches:
    a remainder of a few tokens would read as near-perfect correlation)."""
    from common.decorrelation import decorrelation_penalty

    device = sae.W_dec.device
    batches = range(0, len(x), batch_size)  # x stays as stored (float16): a float32 copy would double it
    mean = torch.stack([x[start : start + batch_size].double().sum(0) for start in batches]).sum(0).div(len(x))
    mean = mean.float().to(device)
    error = total = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device)
    correlations = []
    for start in batches:
        part = x[start : start + batch_size].to(device).float()
        features = sae.encode(part)
        error += float((sae.decode(features) - part).pow(2).sum())
        total += float((part - mean).pow(2).sum())
        l0 += float((features != 0).sum())
        fired |= (features != 0).any(0)
        if len(part) == min(batch_size, len(x)) > 1:
            correlations.append(float(decorrelation_penalty(features)))
    return {"tokens": len(x), "l0": l0 / len(x), "explained_variance": 1 - error / total,
            "dead_fraction": float((~fired).float().mean()), "mse_per_token": error / len(x),
            "mean_squared_correlation": sum(correlations) / max(1, len(correlations))}


@no_grad
def ce_loss_recovered(model, batches: list[dict[str, torch.Tensor]], layer: int, sae: SAE) -> dict[str, float]:
    """Next-token loss with the model untouched, with block `layer`'s output replaced by the SAE's
    reconstruction, and with it zeroed; recovered = (zeroed - spliced) / (zeroed - clean).

    Each batch holds input_ids, attention_mask and `edited` ((batch, seq) bool): the positions the
    SAE was trained on (special tokens such as <bos> stay untouched in both edits)."""
    losses = {}
    for name in ("clean", "spliced", "zeroed"):
        total = count = 0.0
        for batch in batches:
            edited = batch["edited"][..., None]

            def replace(hidden: torch.Tensor, rows: torch.Tensor, edited=edited, name=name) -> torch.Tensor:
                new = sae.decode(sae.encode(hidden.to(sae.dtype))).to(hidden.dtype) if name == "spliced" \
                    else torch.zeros_like(hidden)
                return torch.where(edited.to(hidden.device)[rows], new, hidden)

            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
            if name == "clean":
                loss = model(**inputs).loss
            else:
                with edit_block_output(model, layer, replace):
                    loss = model(**inputs).loss
            tokens = float((labels[:, 1:] != -100).sum())
            total, count = total + float(loss) * tokens, count + tokens
        losses[name] = total / count
    gap = losses["zeroed"] - losses["clean"]
    recovered = (losses["zeroed"] - losses["spliced"]) / gap if gap > 0 else float("nan")
    return {"ce_clean": losses["clean"], "ce_spliced": losses["spliced"], "ce_zeroed": losses["zeroed"],
            "ce_recovered": recovered}
