"""TopK SAE training from the k features of each token, and AuxK for its dead features.

The k largest pre-activations are found densely (one d_in x d_sae product, unavoidable), but
everything after touches k features per token: the decoder sums k rows (`embedding_bag`), and the
encoder's backward (`TopKEncode`) is a sparse product of the k gradients per row, so the
backward's cost grows with k, not with the width.

AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): features that have not fired
for `dead_after_tokens` training tokens are dead (common/dead_features.py); the `aux_k` largest of their pre-activations
reconstruct the main reconstruction's residual e, and aux_coefficient * ||e - e_hat||^2 /
||e - mean e||^2 joins the loss (e itself carries no gradient), which pulls dead features toward
what the live ones miss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.sae_settings import TrainingConfig


class TopKEncode(torch.autograd.Function):
    """The k largest pre-activations of each row and where they are (and, given a `dead` mask, the
    `aux_k` largest among dead features), with a backward that touches only those: (d_in x k) work
    per row instead of autograd's dense (d_in x d_sae) products."""

    @staticmethod
    def forward(ctx, centred: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                dead: torch.Tensor | None, aux_k: int):
        z = centred @ W_enc + b_enc
        values, indices = torch.topk(z, k, dim=-1)
        if dead is not None:
            aux_values, aux_indices = _largest_dead(z, dead, aux_k)
        else:
            aux_values, aux_indices = values[:, :0], indices[:, :0]
        ctx.save_for_backward(centred, W_enc, torch.cat([indices, aux_indices], dim=1))
        ctx.mark_non_differentiable(indices, aux_indices)
        # out of autocast's bfloat16: the weights' own dtype
        return values.to(W_enc.dtype), indices, aux_values.to(W_enc.dtype), aux_indices

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor, _indices, grad_aux: torch.Tensor, _aux_indices):
        centred, W_enc, indices = ctx.saved_tensors
        batch, k = indices.shape
        grads = torch.cat([grad_values, grad_aux], dim=1).flatten().to(W_enc.dtype)
        rows = torch.arange(batch, device=indices.device).repeat_interleave(k)
        grad_z = torch.sparse_coo_tensor(torch.stack([rows, indices.flatten()]), grads, (batch, W_enc.shape[1]),
                                         check_invariants=False)  # repeated entries (aux and main) add up
        grad_centred = torch.sparse.mm(grad_z, W_enc.T)
        # The bias's gradient is one more column of the encoder's product (a column of ones), not an
        # index_add: a GPU's atomic adds sum in another order each run, and a resumed training
        # would not end with the weights of an uninterrupted one.
        ones = centred.new_ones(batch, 1, dtype=W_enc.dtype)
        both = torch.sparse.mm(grad_z.t().coalesce(), torch.cat([centred.to(W_enc.dtype), ones], dim=1))
        return grad_centred, both[:, :-1].T, both[:, -1], None, None, None


def _largest_dead(z: torch.Tensor, dead: torch.Tensor, aux_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `aux_k` largest pre-activations of dead features per row, as many picks whatever the
    number dead (counting them would make the host wait for the GPU every step): picks beyond the
    dead features are live ones masked to -inf, given value 0, so that they add nothing."""
    picked, indices = torch.topk(z.masked_fill(~dead, -torch.inf), min(aux_k, z.shape[1]), dim=-1)
    return picked.masked_fill(~torch.isfinite(picked), 0), indices


@dataclass
class TopKTerms:
    reconstruction: torch.Tensor        # mean ||x - x_hat||^2
    auxiliary: torch.Tensor             # AuxK's term, weighted (0 without dead features)
    features: torch.Tensor | None       # dense (B x d_sae) features, when the decorrelation term needs them
    l0: torch.Tensor
    fired: torch.Tensor                 # (d_sae,) bool: features non-zero on some token of the batch


def topk_terms(W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
               x: torch.Tensor, config: TrainingConfig, dead: torch.Tensor | None = None) -> TopKTerms:
    """TopK's loss terms on the scaled batch `x` (common/sae_trainer.py's `encode` is the same SAE
    computed densely); `dead` marks the features AuxK may use."""
    aux = dead if config.aux_k and dead is not None else None
    values, indices, aux_values, aux_indices = TopKEncode.apply(x - b_dec, W_enc, b_enc, config.k, aux, config.aux_k)
    values = values.relu()
    decoded = torch.nn.functional.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec
    auxiliary = x.new_zeros(())
    if aux is not None:
        residual = (x - decoded).detach()
        rebuilt = torch.nn.functional.embedding_bag(aux_indices, W_dec, per_sample_weights=aux_values.relu(),
                                                    mode="sum")
        spread = (residual - residual.mean(0)).pow(2).sum(1).mean()
        term = config.aux_coefficient * (rebuilt - residual).pow(2).sum(1).mean() / spread.clamp_min(1e-12)
        auxiliary = torch.where(aux.any(), term, 0.0)  # none dead: no term (a test, not a wait for the GPU)
    dense = values.new_zeros(len(x), W_dec.shape[0]).scatter(1, indices, values) if config.decorrelation else None
    return TopKTerms((decoded - x).pow(2).sum(1).mean(), auxiliary, dense, (values != 0).sum(1).float().mean().detach(),
                     _fired(indices, values, W_dec.shape[0]))


def _fired(indices: torch.Tensor, values: torch.Tensor, d_sae: int) -> torch.Tensor:
    """(d_sae,) bool: the features with a positive value on some row, counted by index_add (a boolean
    mask index would make the host wait for the GPU every step)."""
    counts = torch.zeros(d_sae, dtype=torch.int32, device=indices.device)
    return counts.index_add_(0, indices.flatten(), (values > 0).flatten().to(torch.int32)) > 0
