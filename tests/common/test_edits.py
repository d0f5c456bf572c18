"""The feature edits keep the SAE's error term: checked against the identity they rest on,
edited(x) = decode(f') + (x - decode(f)) with f = encode(x) and f' the edited code, computed
independently in float64 on real sae-lens SAEs at awkward sizes."""

import pytest
import torch
from sae_lens import SAE

from common.edits import set_feature, zero_features

ARCHITECTURES = {"standard": {}, "jumprelu": {}, "topk": {"k": 3}}


def random_sae(architecture: str, d_in: int, d_sae: int, seed: int) -> SAE:
    """A real sae-lens SAE with random weights, biases and thresholds (features that fire often)."""
    sae = SAE.from_dict({"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
                         "device": "cpu", **ARCHITECTURES[architecture]})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in sae.named_parameters():
            value.copy_(torch.randn(value.shape, generator=generator) * (0.05 if name == "threshold" else 0.5))
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()
    return sae


def reference(sae: SAE, x: torch.Tensor, edited_code) -> torch.Tensor:
    """decode(f') + x - decode(f) in float64, f' = edited_code(f)."""
    weights = {name: value.detach().double() for name, value in sae.named_parameters()}
    code = sae.encode(x.float()).double()
    decode = lambda f: f @ weights["W_dec"] + weights["b_dec"]  # noqa: E731
    return decode(edited_code(code.clone())) + x.double() - decode(code)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize(("rows", "d_in", "d_sae"), [(1, 7, 13), (5, 7, 13), (3, 33, 5)])
def test_set_feature_is_the_error_term_kept_identity(architecture, rows, d_in, d_sae):
    sae = random_sae(architecture, d_in, d_sae, seed=rows + d_in)
    x = torch.randn(rows, d_in, generator=torch.Generator().manual_seed(1)) * 2
    features = torch.arange(rows) % d_sae
    values = torch.linspace(-1.0, 3.0, rows)
    batch_rows = torch.arange(rows)

    def setting(code):
        code[batch_rows, features] = values.double()
        return code

    got = set_feature(sae, features, values)(x, batch_rows)
    torch.testing.assert_close(got.double(), reference(sae, x, setting), rtol=1e-5, atol=1e-5)
    one = set_feature(sae, int(features[-1]), 0.25)(x, batch_rows)  # one feature and value for every row

    def one_setting(code):
        code[:, int(features[-1])] = 0.25
        return code

    torch.testing.assert_close(one.double(), reference(sae, x, one_setting), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize(("batch", "seq", "d_in", "d_sae"), [(1, 1, 7, 13), (3, 5, 7, 13), (2, 9, 33, 5)])
def test_zero_features_is_the_error_term_kept_identity(architecture, batch, seq, d_in, d_sae):
    sae = random_sae(architecture, d_in, d_sae, seed=batch * seq)
    x = torch.randn(batch, seq, d_in, generator=torch.Generator().manual_seed(2))
    chosen = torch.rand(batch, d_sae, generator=torch.Generator().manual_seed(3)) < 0.5
    rows = torch.arange(batch)
    expected = reference(sae, x, lambda code: code * ~chosen[:, None, :])
    torch.testing.assert_close(zero_features(sae, chosen)(x, rows).double(), expected, rtol=1e-5, atol=1e-5)
    positions = torch.zeros(batch, seq, dtype=torch.bool)
    positions[:, seq // 2:] = True  # the prompt forward edits these positions only
    limited = zero_features(sae, chosen, positions)(x, rows).double()
    torch.testing.assert_close(limited[positions], expected[positions], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(limited[~positions], x.double()[~positions])


def test_an_edit_reads_the_settings_of_the_rows_it_holds():
    """After a decode loop dropped rows, rows [0, 2] of a batch of 3 keep their own features."""
    sae = random_sae("standard", 7, 13, seed=4)
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(5))
    edit = set_feature(sae, torch.tensor([1, 2, 3]), torch.tensor([0.5, 1.5, 2.5]))
    whole = edit(x, torch.arange(3))
    torch.testing.assert_close(edit(x[[0, 2]], torch.tensor([0, 2])), whole[[0, 2]])


def test_float16_hidden_states_are_edited_in_the_saes_precision():
    sae = random_sae("jumprelu", 7, 13, seed=6)
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(7))
    got = set_feature(sae, 2, 1.0)(x.half(), torch.arange(4))

    def setting(code):
        code[:, 2] = 1.0
        return code

    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), reference(sae, x.half(), setting), rtol=2e-3, atol=2e-3)
