"""Edits of the residual stream at the end of a prompt, for patching and ablation.

Feature edits keep the SAE's error term: patched = x + (v - f_i(x)) * W_dec[i], which changes
feature i to v and leaves everything the SAE does not reconstruct untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from common.layers import decoder_blocks
from common.lazy import lazy_import
from common.saes import check_editable

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from torch import nn
else:
    torch = lazy_import("torch")

Edit = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
"""edit(hidden, rows) -> edited hidden: `rows` are the batch rows `hidden` holds, numbered as the
batch started, so an edit with settings per row reads its own even after a decode loop has
dropped finished rows."""


class BatchRows:
    """The rows still in a batch, by their index when it started. A decode loop that drops finished
    rows calls `keep`; the hooks below read the rows through it, and refuse a batch whose size
    it does not know (a loop that dropped rows without saying so would edit the wrong ones)."""

    def __init__(self, size: int):
        self.index = torch.arange(size)

    def keep(self, kept: torch.Tensor) -> None:
        """Only the rows at positions `kept` of the current batch remain."""
        self.index = self.index[kept.to(self.index.device)]

    def now(self, rows: int, device: torch.device) -> torch.Tensor:
        if rows != len(self.index):
            raise RuntimeError(f"a forward of {rows} rows where the batch holds {len(self.index)}: a decode loop "
                               "dropped rows without passing this edit's BatchRows")
        return self.index.to(device)


def _rows(batch: BatchRows | None, hidden: torch.Tensor) -> torch.Tensor:
    if batch is None:
        return torch.arange(hidden.shape[0], device=hidden.device)
    return batch.now(hidden.shape[0], hidden.device)


@contextmanager
def edit_prompt_position(model: nn.Module, layer: int, edit: Edit, offset: int = -1, rows: torch.Tensor | None = None,
                         every_token: bool = False, batch: BatchRows | None = None) -> Iterator[None]:
    """Replace block `layer`'s output at position `offset` by edit(hidden, rows) in prompt forwards.

    Batches must be left-padded, so every row's prompt ends at the same index; `offset` counts
    from that end (-1: the last prompt token). `rows` limits the edit to those batch rows (as
    numbered in `batch`, which follows a decode loop that drops rows).
    Later forwards over a single position (the decoding steps with a cache) are left untouched,
    unless `every_token`: then each generated token is edited too. The first forward is always a
    prompt's, also when it is the last token alone (the rest cached).
    """
    forwards = 0

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor | tuple) -> object:
        nonlocal forwards
        forwards += 1
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] == 1 and forwards > 1 and not every_token:
            return output
        present = _rows(batch, hidden)
        chosen = torch.ones_like(present, dtype=torch.bool) if rows is None else torch.isin(present, rows.to(present.device))
        hidden = hidden.clone()
        hidden[chosen, offset] = edit(hidden[chosen, offset], present[chosen])
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def set_feature(sae: SAE, feature: int | torch.Tensor, value: float | torch.Tensor) -> Edit:
    """An edit that sets an SAE feature to `value`, error term kept; a tensor of features or of
    values (one per batch row) gives each row its own."""
    check_editable(sae.cfg.normalize_activations, f"at {sae.cfg.metadata.hook_name}")

    def edit(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        index = per_row(feature, rows)
        encoded = sae.encode(hidden.to(sae.dtype))
        current = encoded[:, index] if index.ndim == 0 else encoded.gather(1, index[:, None])[:, 0]
        change = per_row(value, rows).to(current.dtype) - current
        return hidden + (change[:, None] * sae.W_dec[index]).to(hidden.dtype)

    return edit


def per_row(setting: float | torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A setting for the batch rows `rows`: a number serves every row, a tensor holds one per row."""
    setting = torch.as_tensor(setting, device=rows.device)
    return setting if setting.ndim == 0 else setting.to(rows.device)[rows]


@contextmanager
def edit_block_output(model: nn.Module, layer: int, edit: Edit, batch: BatchRows | None = None) -> Iterator[None]:
    """Replace block `layer`'s whole output (batch, seq, d_model) by edit(output, rows) in every
    forward, prompt and generated tokens alike (`batch`: as in edit_prompt_position)."""

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor | tuple) -> object:
        hidden = output[0] if isinstance(output, tuple) else output
        edited = edit(hidden, _rows(batch, hidden))
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def zero_features(sae: SAE, chosen: torch.Tensor, prompt_positions: torch.Tensor | None = None) -> Edit:
    """An edit of (batch, seq, d_model) outputs that zero-ablates the features marked in `chosen`
    ((batch, d_sae) bool: each row its own), error term kept: hidden - sum_i f_i(hidden) W_dec[i].

    `prompt_positions` ((batch, prompt length) bool) limits the edit of the forward over the whole
    prompt to those positions (not <bos> or padding, where the SAE was never trained); forwards
    over generated tokens edit every position."""
    check_editable(sae.cfg.normalize_activations, f"at {sae.cfg.metadata.hook_name}")

    def edit(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        features = sae.encode(hidden.to(sae.dtype))
        removed = ((features * chosen.to(features.device)[rows][:, None, :]) @ sae.W_dec).to(hidden.dtype)
        if prompt_positions is not None and hidden.shape[1] == prompt_positions.shape[1]:
            removed = removed * prompt_positions.to(hidden.device)[rows][..., None]
        return hidden - removed

    return edit
