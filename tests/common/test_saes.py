"""SAE loading through sae-lens: local directories, releases, random configs; fit checks."""

import subprocess
import sys
from typing import get_args

import pytest
import torch
from sae_lens import SAE, JumpReLUSAE

from common.errors import UserError
from common.organism.files import BUILTINS
from common.saes import BuiltinSae, SaeCache, SaeSpec, check_saes, load_sae
from tests.helpers import save_random_sae


def test_local_directory_loads_the_saved_weights(tmp_path):
    template = save_random_sae(tmp_path, d_in=64)
    spec = SaeSpec(path=template)
    assert check_saes(spec, [0, 1], d_model=64)[1].d_sae == 32
    sae = load_sae(spec, 1, 64, torch.device("cpu"))
    saved = SAE.load_from_disk(tmp_path / "L1")
    assert isinstance(sae, JumpReLUSAE)
    torch.testing.assert_close(sae.W_enc, saved.W_enc)


def test_a_linear_sae_loads_in_a_job_that_never_imports_the_trainer(tmp_path):
    """sae_training's `activation: none` saves architecture "linear", which sae-lens knows only
    once registered: feature_ablation and the other readers of trained SAEs load it all the same."""
    from common.linear_sae import LinearSAE

    for layer in (0, 1):
        LinearSAE.from_dict({"architecture": "linear", "d_in": 16, "d_sae": 24, "dtype": "float32", "device": "cpu",
                             "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post"}}).save_model(tmp_path / f"L{layer}")
    reader = ("import sys, torch\n"
              "from common.saes import SaeSpec, load_sae\n"
              f"sae = load_sae(SaeSpec(path={str(tmp_path / 'L{layer}')!r}), 1, 16, torch.device('cpu'))\n"
              "features = sae.encode(torch.randn(64, 16))\n"
              "print(type(sae).__name__, bool((features < 0).any()), 'common.sae_trainer' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["LinearSAE", "True", "False"]


def test_a_topk_sae_decoding_with_normed_rows_is_edited_as_it_decodes(tmp_path):
    """sae-lens's TopK with rescale_acts_by_decoder_norm decodes f_i x W_dec[i] / |W_dec[i]|: an edit
    must add what the SAE decodes, x + decode(f') - decode(f) (DESIGN), whatever the rows' norms."""
    from common.edits import set_feature

    saved = SAE.from_dict({"architecture": "topk", "d_in": 16, "d_sae": 24, "k": 4, "dtype": "float32", "device": "cpu",
                           "rescale_acts_by_decoder_norm": True, "metadata": {"hook_name": "blocks.0.hook_resid_post"}})
    with torch.no_grad():
        saved.W_dec.mul_(0.1 + torch.rand(24, 1))  # rows of norms 0.1 to 1.1, as a trainer leaves them
    saved.save_model(tmp_path / "L0")
    sae = load_sae(SaeSpec(path=str(tmp_path / "L{layer}")), 0, 16, torch.device("cpu"))
    hidden = torch.randn(6, 16)
    features = saved.encode(hidden)
    torch.testing.assert_close(sae.encode(hidden), features)   # the same SAE
    torch.testing.assert_close(sae.decode(features), saved.decode(features))
    feature = int(features[0].argmax())
    wanted = features.clone()
    wanted[:, feature] = 5.0
    edited = set_feature(sae, feature, 5.0)(hidden, torch.arange(6))
    torch.testing.assert_close(edited, hidden + saved.decode(wanted) - saved.decode(features), atol=1e-5, rtol=1e-5)


def test_d_in_mismatch_is_refused_before_loading(tmp_path):
    spec = SaeSpec(path=save_random_sae(tmp_path, d_in=32))
    with pytest.raises(UserError, match="has d_in 32 but the model's residual stream has d_model 64"):
        check_saes(spec, [0], d_model=64)


@pytest.mark.parametrize("normalization", ["layer_norm", "constant_norm_rescale"])
def test_an_sae_that_rescales_each_token_is_read_but_never_edited(tmp_path, normalization):
    """Its features are in each token's own scale, where an edit's f_i x W_dec[i] is not: a job
    that edits refuses it at planning (a local SAE) and at the edit (a release's too), one that
    reads features takes it."""
    import json

    from common.edits import set_feature, zero_features

    spec = SaeSpec(path=save_random_sae(tmp_path, d_in=64, layers=(0,)))
    cfg = tmp_path / "L0" / "cfg.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "normalize_activations": normalization}))
    assert check_saes(spec, [0], d_model=64)[0].d_sae == 32
    refusal = rf"SAE .*L0 rescales each token's activations at run time \(normalize_activations: {normalization}\)"
    with pytest.raises(UserError, match=refusal):
        check_saes(spec, [0], d_model=64, edited=True)
    sae = load_sae(spec, 0, 64, torch.device("cpu"))
    for edit in (lambda: set_feature(sae, 3, 1.0), lambda: zero_features(sae, torch.ones(1, 32, dtype=torch.bool))):
        with pytest.raises(UserError, match="at blocks.0.hook_resid_post rescales each token's activations"):
            edit()


def test_sae_of_another_hook_is_refused(tmp_path):
    spec = SaeSpec(path=save_random_sae(tmp_path, d_in=64, hook="blocks.{layer}.hook_resid_pre"))
    with pytest.raises(UserError, match=r"trained on blocks\.0\.hook_resid_pre, but layer 0 here means blocks\.0\.hook_resid_post"):
        check_saes(spec, [0], d_model=64)


def test_missing_and_damaged_local_sae(tmp_path):
    spec = SaeSpec(path=save_random_sae(tmp_path, d_in=64, layers=(0,)))
    with pytest.raises(UserError, match=r"no SAE for layer 1: .*L1/cfg\.json does not exist"):
        check_saes(spec, [0, 1], d_model=64)
    (tmp_path / "L0" / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"cannot load the SAE in .*L0"):
        load_sae(spec, 0, 64, torch.device("cpu"))


def test_release_and_ids_are_checked_offline():
    spec = SaeSpec(release="llama_scope_lxr_8x", id="l{layer}r_8x")
    infos = check_saes(spec, [0, 31], d_model=4096)
    assert infos[31].expected_l0 is not None
    with pytest.raises(UserError, match=r"no SAE for layer\(s\) \[32\]"):
        check_saes(spec, [32], d_model=4096)
    with pytest.raises(UserError, match="no release 'llama_scope_lxr_9x'; did you mean"):
        check_saes(SaeSpec(release="llama_scope_lxr_9x", id="l{layer}r_8x"), [0], d_model=4096)


def test_spec_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one SAE source"):
        SaeSpec(path="x", random={"d_sae": 4})
    with pytest.raises(ValueError, match="`release` and `id` go together"):
        SaeSpec(release="llama_scope_lxr_8x")


def test_random_sae_is_seeded_per_layer_and_uses_threshold():
    spec = SaeSpec(random={"d_sae": 16, "seed": 3, "threshold": 0.25})
    a, b = load_sae(spec, 0, 8, torch.device("cpu")), load_sae(spec, 0, 8, torch.device("cpu"))
    torch.testing.assert_close(a.W_enc, b.W_enc)
    assert not torch.allclose(a.W_enc, load_sae(spec, 1, 8, torch.device("cpu")).W_enc)
    assert torch.all(a.threshold == 0.25)
    x = torch.randn(5, 8)
    pre = (x - a.b_dec) @ a.W_enc + a.b_enc
    torch.testing.assert_close(a.encode(x), pre * (pre > 0.25))


def test_cache_holds_one_layer_at_a_time():
    cache = SaeCache(SaeSpec(random={"d_sae": 16}), d_model=8, device=torch.device("cpu"))
    first = cache.get(0)
    assert cache.get(0) is first
    second = cache.get(1)
    assert second is not first and cache.layer == 1
    cache.evict()
    assert cache.sae is None



def test_the_builtin_choices_are_the_shipped_organisms():
    assert set(get_args(BuiltinSae)) == set(BUILTINS)
    assert SaeSpec.model_validate("organism_b").describe(1) == "the model organism organism_b's SAE of layer 1"
    with pytest.raises(ValueError, match=r"builtin\n  Input should be 'organism' or 'organism_b'"):
        SaeSpec.model_validate({"builtin": "organism_c"})


def test_an_organisms_saes_are_refused_for_the_other_organism():
    from common.models import ModelSpec

    with pytest.raises(UserError, match=r"^population_patching\.sae\.builtin: organism's SAEs were trained on "
                       r"builtin:organism, but the model is builtin:organism_b; set population_patching\.sae: "
                       r"organism_b \(its own SAEs\)$"):
        check_saes(SaeSpec.model_validate("organism"), [1], 128, "population_patching.sae",
                   model=ModelSpec.model_validate("organism_b"))
    assert check_saes(SaeSpec.model_validate("organism"), [1], 128, model=ModelSpec.model_validate("organism"))[1].d_sae
