"""Features that stopped firing during training: which they are, and resampling them.

A feature is dead once it has not fired for `dead_after_tokens` training tokens. AuxK
(common/topk_training.py) gives dead features a gradient; resampling (Bricken et al. 2023,
"Towards monosemanticity") instead restarts them: each takes the direction of a batch input drawn
with probability proportional to the input's squared reconstruction error (what the SAE misses
most), as decoder row and, tied as at initialisation, as encoder column, with its bias and Adam
moments cleared.
"""

from __future__ import annotations

import torch


class FiringRecord:
    """How many training tokens ago each feature last fired: dead ones are silent for longer than
    `dead_after_tokens`."""

    def __init__(self, d_sae: int, device: torch.device):
        self.last_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.seen = 0

    def update(self, fired: torch.Tensor, tokens: int) -> None:
        self.seen += tokens
        self.last_fired = torch.where(fired, self.seen, self.last_fired)  # no wait for the GPU, as a mask index would

    def dead(self, after_tokens: int) -> torch.Tensor:
        return self.seen - self.last_fired > after_tokens


@torch.no_grad()
def resample(dead: torch.Tensor, x: torch.Tensor, errors: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor,
             b_enc: torch.Tensor, W_dec: torch.Tensor, optimizer: torch.optim.Optimizer, norm: float,
             generator: torch.Generator, threshold: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """Restart the `dead` features from inputs of the batch `x` drawn by their squared
    reconstruction `errors` (per row); decoder rows get norm `norm`; a JumpReLU's `threshold`
    (the parameter, its initial value) starts over too. Returns the restarted features."""
    chosen = torch.nonzero(dead)[:, 0]
    if not len(chosen) or not bool((errors > 0).any()):
        return chosen[:0]
    picks = torch.multinomial(errors.double().cpu(), len(chosen), replacement=True, generator=generator)
    directions = x[picks.to(x.device)] - b_dec
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12) * norm
    W_dec[chosen] = directions.to(W_dec.dtype)
    W_enc[:, chosen] = directions.T.to(W_enc.dtype)
    b_enc[chosen] = 0
    restarted = [(W_dec, (chosen,)), (W_enc, (slice(None), chosen)), (b_enc, (chosen,))]
    if threshold is not None:
        threshold[0][chosen] = threshold[1]
        restarted.append((threshold[0], (chosen,)))
    for parameter, where in restarted:
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in optimizer.state.get(parameter, {}):
                optimizer.state[parameter][moment][where] = 0
    return chosen
