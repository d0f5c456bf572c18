"""The reserved-room KV cache holds what transformers' DynamicCache holds, without copying itself
at every step."""

import torch
from transformers import DynamicCache

from common.kv_cache import ReservedLayer, reserved_cache
from common.organism.files import Organism


def _forward(model, cache, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]


def _same(reserved, dynamic) -> None:
    for ours, theirs in zip(reserved.layers, dynamic.layers, strict=True):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    assert reserved.get_seq_length() == dynamic.get_seq_length()


def test_a_reserved_cache_holds_what_a_dynamic_cache_holds_through_every_operation():
    model = Organism().model(attn_implementation=None)
    reserved, dynamic = reserved_cache(model, room=4), DynamicCache(config=model.config)
    assert all(isinstance(layer, ReservedLayer) for layer in reserved.layers)
    ids = torch.randint(4, 500, (1, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_forward(model, reserved, ids), _forward(model, dynamic, ids))
    for cache in (reserved, dynamic):
        cache.batch_repeat_interleave(6)
    buffer = reserved.layers[0].buffers[0].data_ptr()
    steps = torch.randint(4, 500, (6, 7), generator=torch.Generator().manual_seed(1))
    for step in range(7):  # 4 steps fit the room; the fifth grows the buffers, once
        assert torch.equal(_forward(model, reserved, steps[:, step : step + 1]),
                           _forward(model, dynamic, steps[:, step : step + 1]))
        _same(reserved, dynamic)
        assert (reserved.layers[0].buffers[0].data_ptr() == buffer) == (step < 4)
    kept = torch.tensor([0, 2, 5])
    for cache in (reserved, dynamic):
        cache.batch_select_indices(kept)
        cache.crop(-2)
    _same(reserved, dynamic)
    assert reserved.get_seq_length() == 9 + 7 - 2 and reserved.layers[0].keys.shape[0] == 3


def test_an_offloaded_reserved_layer_comes_back_whole():
    model = Organism().model(attn_implementation=None)
    cache = reserved_cache(model, room=3)
    _forward(model, cache, torch.randint(4, 500, (2, 5), generator=torch.Generator().manual_seed(2)))
    layer = cache.layers[0]
    keys = layer.keys.clone()
    layer.offload()
    layer.prefetch()
    assert torch.equal(layer.keys, keys) and layer.buffers[0].shape[-2] == 5 + 3
