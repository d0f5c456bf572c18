"""The layer convention, owned here and nowhere else.

Layer L is the output of transformer block L (0-based, `model.model.layers[L]` for Llama-style
models): the residual stream that SAE releases call `blocks.L.hook_resid_post`. It is read with a
forward hook on the block. HF's `hidden_states[L + 1]` is the same tensor for every block but the
last, whose entry has the final norm applied; that tuple is therefore never used.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from common.errors import UserError
from common.lazy import lazy_import

if TYPE_CHECKING:
    import torch
    from torch import nn
else:
    torch = lazy_import("torch")

CONVENTION = (
    "layer L = output of transformer block L (0-based) = blocks.L.hook_resid_post; "
    "read by a forward hook on the block, not from hidden_states"
)

# Where the list of decoder blocks lives, per model family.
_BLOCK_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers")


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    for path in _BLOCK_PATHS:
        module: object = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
        if isinstance(module, torch.nn.ModuleList):
            return module
    raise UserError(
        f"cannot find the decoder blocks of {type(model).__name__} (looked at {', '.join(_BLOCK_PATHS)})"
    )


class _LastLayerCaptured(Exception):
    """Raised by the last hook of `capture_residuals(stop=True)` to skip the rest of the forward."""


@contextmanager
def capture_residuals(model: nn.Module, layers: list[int], stop: bool = False,
                      last_only: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Fill a dict {layer: (batch, seq, d_model) block output} during the forward passes inside.

    With `stop`, the forward pass ends once the last layer is captured: the blocks above it, the
    final norm and the logits are never computed, and the `with` block ends there quietly (the
    model call inside it returns nothing, and what follows it in the block does not run).
    With `last_only`, {layer: (batch, d_model)} at the last position, copied out as the forward
    runs: the whole outputs are never held (memory that a batch's size would have to leave room for).
    """
    blocks = decoder_blocks(model)
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor | tuple) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            captured[layer] = hidden[:, -1].detach().clone() if last_only else hidden.detach()  # (a view would hold all)
            if stop and layer == max(layers):
                raise _LastLayerCaptured

        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        yield captured
    except _LastLayerCaptured:
        pass
    finally:
        for handle in handles:
            handle.remove()


def resolve_layers(selection: str | list[int], n_layers: int, field: str) -> list[int]:
    """'all', 'A-B' (inclusive) or a list of layer indices -> sorted unique layers, range-checked."""
    if isinstance(selection, str):
        text = selection.strip()
        if text == "all":
            return list(range(n_layers))
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
        if not match:
            raise UserError(f"{field}: {selection!r} is not 'all', a range 'A-B' or a list of layers")
        first, last = int(match[1]), int(match[2])
        if first > last:
            raise UserError(f"{field}: range {selection!r} is empty (write the lower layer first)")
        layers = list(range(first, last + 1))
    else:
        layers = sorted(set(selection))
    if not layers:
        raise UserError(f"{field}: no layers selected")
    outside = [layer for layer in layers if not 0 <= layer < n_layers]
    if outside:
        raise UserError(
            f"{field}: layer(s) {outside} outside the model, which has {n_layers} blocks "
            f"(valid layers 0-{n_layers - 1})"
        )
    return layers
