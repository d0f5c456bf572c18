"""The decorrelation penalty of SAE training: the mean squared Pearson correlation of distinct
feature pairs over a batch, computed without the d_sae x d_sae correlation matrix.

With Z the batch's standardised features (B x d_sae), sum_ij r_ij^2 = ||Z Z^T||_F^2 / B^2, whose
diagonal part is sum_i (||Z_i||^2 / B)^2. Its cost is the (B x B) Gram matrix: one B x d_sae x B
product forward, and one backward (`SquaredGram`). Under mixed precision those two products may run
in bfloat16 (`products`): each Gram entry is a sum over d_sae features, rounded once, and the
penalty sums B^2 squares of them, so the rounding averages out (tests/common/test_sae_trainer.py
bounds the error); the means, variances and sums stay in the features' dtype.
"""

from __future__ import annotations

import torch


def decorrelation_penalty(features: torch.Tensor, products: torch.dtype | None = None) -> torch.Tensor:
    """Mean squared Pearson correlation over distinct feature pairs, from the (B x B) Gram matrix,
    whose products run in `products` (default: the features' dtype)."""
    batch, width = features.shape
    centred = features - features.mean(0)
    variance = centred.pow(2).mean(0)
    z = centred / torch.where(variance > 0, variance, torch.ones_like(variance)).sqrt()  # never sqrt(0): its
    # gradient is infinite, and a feature silent over the batch would get NaN where it should get 0
    total = SquaredGram.apply(z, products or z.dtype) / batch**2
    diagonal = (z.pow(2).sum(0) / batch).pow(2).sum()
    return (total - diagonal) / (width * (width - 1))


class SquaredGram(torch.autograd.Function):
    """||z z^T||_F^2, whose gradient 4 (z z^T) z is one (B x B) @ (B x width) product: autograd
    would spend two on the Gram matrix's backward, each as costly as the forward's. Both products
    run in `products`; the squares are summed in z's dtype."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, products: torch.dtype) -> torch.Tensor:
        rounded = z.to(products)
        gram = rounded @ rounded.T
        ctx.save_for_backward(rounded, gram)
        return gram.to(z.dtype).pow(2).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        rounded, gram = ctx.saved_tensors
        return 4 * grad * (gram @ rounded).to(grad.dtype), None
