"""Corpus windows through a model and its SAEs: the residual stream of a batch of windows, and
each layer's SAE features of every content token.

The forward pass stops after the last layer asked for (common.layers.capture_residuals), and
padding and each window's special prefix are kept out of what is returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.corpus import Window, pad_windows
from common.layers import capture_residuals
from common.lazy import lazy_import, no_grad

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
else:
    torch = lazy_import("torch")


@dataclass
class WindowEncoder:
    """The model and one SAE per layer, turning windows into residual streams and SAE features."""

    model: torch.nn.Module
    saes: dict[int, SAE]
    device: torch.device
    pad_id: int

    @no_grad
    def residuals(self, batch: list[Window]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Per layer, the (windows, longest, d_model) block outputs on the device in the SAE's dtype,
        and the (windows, longest) mask of content tokens (not padding, not the prefix)."""
        ids, real, content = pad_windows(batch, self.pad_id)
        layers = sorted(self.saes)
        with capture_residuals(self.model, layers, stop=True) as residuals:
            self.model(input_ids=ids.to(self.device), attention_mask=real.to(self.device), use_cache=False)
        return ({layer: residuals[layer].to(self.device, self.saes[layer].W_enc.dtype) for layer in layers},
                content.to(self.device))

    @no_grad
    def token_features(self, batch: list[Window]) -> dict[int, torch.Tensor]:
        """Per layer, the (content tokens, d_sae) SAE features, a row per content token in corpus order."""
        residuals, content = self.residuals(batch)
        return {layer: self.saes[layer].encode(residual[content]) for layer, residual in residuals.items()}
