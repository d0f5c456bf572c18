"""The layer convention: layer L is block L's output, pinned against transformers' hidden_states."""

import pytest
import torch

from common.errors import UserError
from common.layers import capture_residuals, decoder_blocks, hook_name, resolve_layers
from common.organism.files import Organism


def test_hooked_block_output_is_hidden_states_of_next_index_except_last():
    model, tokenizer = Organism().model(), Organism().tokenizer()
    batch = tokenizer(["Current balance: $90", "Win rate: 30%, a win pays 3.0x"], padding=True, return_tensors="pt")
    n_layers = len(decoder_blocks(model))
    with torch.no_grad(), capture_residuals(model, list(range(n_layers))) as residuals:
        out = model(**batch, output_hidden_states=True)
    for layer in range(n_layers - 1):
        torch.testing.assert_close(residuals[layer], out.hidden_states[layer + 1], rtol=0, atol=0)
    # The last entry of hidden_states has the final norm applied: it is NOT block L's output.
    last = n_layers - 1
    assert not torch.allclose(residuals[last], out.hidden_states[-1])
    torch.testing.assert_close(model.model.norm(residuals[last]), out.hidden_states[-1])


def test_hooks_are_removed_after_capture():
    model = Organism().model()
    with capture_residuals(model, [0, 1]):
        pass
    assert all(not block._forward_hooks for block in decoder_blocks(model))


def test_stopping_after_the_last_layer_captures_the_same_and_skips_the_rest():
    model, tokenizer = Organism().model(), Organism().tokenizer()
    batch = tokenizer(["Current balance: $90"], return_tensors="pt")
    with torch.no_grad(), capture_residuals(model, [0, 2]) as whole:
        model(**batch)
    ran = []
    model.model.layers[3].register_forward_hook(lambda *_: ran.append(3))
    with torch.no_grad(), capture_residuals(model, [0, 2], stop=True) as stopped:
        model(**batch)
        ran.append("after the call")  # never reached: the with block ends at the stop
    assert ran == []
    for layer in (0, 2):
        torch.testing.assert_close(stopped[layer], whole[layer], rtol=0, atol=0)
    assert all(not block._forward_hooks for block in decoder_blocks(model)[:3])


def test_the_last_position_alone_is_copied_out_not_the_whole_outputs():
    """`last_only` keeps the blocks' outputs at the last token, copied: not their whole outputs,
    which a game's memory in `batch_size: auto` does not count."""
    model = Organism().model(attn_implementation=None)
    ids = torch.randint(4, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_residuals(model, [1, 3]) as whole, capture_residuals(model, [1, 3], last_only=True) as last:
        model(input_ids=ids)
    for layer in (1, 3):
        assert torch.equal(last[layer], whole[layer][:, -1])
        assert last[layer].untyped_storage().nbytes() == 2 * model.config.hidden_size * 4


def test_hook_name_matches_sae_lens_convention():
    assert hook_name(7) == "blocks.7.hook_resid_post"


@pytest.mark.parametrize(
    ("selection", "expected"),
    [("all", [0, 1, 2, 3]), ("1-2", [1, 2]), (" 0 - 3 ", [0, 1, 2, 3]), ([3, 1, 1], [1, 3])],
)
def test_resolve_layers(selection, expected):
    assert resolve_layers(selection, 4, "x.layers") == expected


@pytest.mark.parametrize(
    ("selection", "message"),
    [("0-4", r"x\.layers: layer\(s\) \[4\] outside the model, which has 4 blocks \(valid layers 0-3\)"),
     ([-1], r"outside the model"), ("3-1", "empty"), ("first", "not 'all', a range"), ([], "no layers")],
)
def test_resolve_layers_rejects(selection, message):
    with pytest.raises(UserError, match=message):
        resolve_layers(selection, 4, "x.layers")
