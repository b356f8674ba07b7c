"""Mamba2 against a peer no one here wrote: transformers' Mamba2ForCausalLM on torch CPU, fp32.

The random HF model has mamba2-tiny's shapes (2 groups, tied embeddings), so the imported model
shares the compiled programs of the other Mamba2 tests.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sparse_prefix.models import build  # noqa: E402
from sparse_prefix.models.hf_import import (config_from_hf, load_pretrained,  # noqa: E402
                                            params_from_state_dict)
from sparse_prefix.models.mamba2 import Mamba2LM  # noqa: E402

B, T = 2, 59


def _hf_config(**overrides):
    fields = dict(num_heads=8, head_dim=16, hidden_size=64, state_size=16, num_hidden_layers=2,
                  n_groups=2, vocab_size=512, chunk_size=8, expand=2, conv_kernel=4,
                  tie_word_embeddings=True)
    fields.update(overrides)
    return transformers.Mamba2Config(**fields)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(_hf_config()).eval()
    with torch.no_grad():  # move the ones/zeros initialised tensors off their defaults
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D", "conv1d.bias")):
                param.add_(0.3 * torch.randn_like(param))
    return model


def _state_dict(model):
    return {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def imported(hf_model):
    cfg = config_from_hf(_hf_config().to_dict(), chunk_size=16, max_length=4096, dtype="float32")
    return Mamba2LM(cfg), params_from_state_dict(_state_dict(hf_model), cfg)


def test_the_hf_config_maps_onto_the_mamba2_tiny_shapes(imported):
    model, _ = imported
    assert model.config == build("mamba2-tiny", dtype=jnp.float32).config


def test_logits_and_final_states_match_transformers_within_1e_4(hf_model, imported):
    model, params = imported
    tokens = np.random.default_rng(0).integers(0, 512, size=(B, T))
    with torch.no_grad():
        out = hf_model(torch.tensor(tokens), use_cache=True)
    want = out.logits.numpy()
    np.testing.assert_allclose(model.forward(params, tokens), want, rtol=1e-4, atol=1e-4)
    logits, state, _ = model.prefill(params, tokens, model.init_state(B), np.zeros(0, np.int32))
    np.testing.assert_allclose(logits, want[:, -1], rtol=1e-4, atol=1e-4)
    for layer, ours in enumerate(state.recurrent):
        ssm = out.cache.get_recurrent_state(layer).numpy()          # [B, H, P, N]
        conv = out.cache.get_conv_state(layer).numpy()              # [B, Dc, W]: last W inputs
        assert np.abs(ssm).max() > 1e-2  # a state that actually moved
        np.testing.assert_allclose(ours.ssm, ssm, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours.conv, conv[:, :, 1:].transpose(0, 2, 1), rtol=1e-4, atol=1e-5)


def test_save_pretrained_safetensors_directory_loads_to_the_same_params(hf_model, imported, tmp_path):
    _, params = imported
    hf_model.save_pretrained(tmp_path)
    model, loaded = load_pretrained(str(tmp_path), dtype="float32", chunk_size=16, max_length=4096)
    assert model.config == imported[0].config
    for got, want in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(got, want)


def test_state_spaces_pytorch_model_bin_layout_loads_to_the_same_params(hf_model, imported, tmp_path):
    _, params = imported
    state = {("backbone.embedding.weight" if name == "backbone.embeddings.weight" else name): tensor
             for name, tensor in hf_model.state_dict().items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"].clone()  # state-spaces saves both
    torch.save(state, tmp_path / "pytorch_model.bin")
    config = {"d_model": 64, "n_layer": 2, "vocab_size": 500, "pad_vocab_size_multiple": 16,
              "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2},
              "rms_norm": True, "residual_in_fp32": True, "tie_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, loaded = load_pretrained(str(tmp_path), dtype="float32", chunk_size=16, max_length=4096)
    assert model.config.vocab_size == 512  # 500 padded to a multiple of 16
    for got, want in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(got, want)


def test_untied_checkpoints_carry_their_own_transposed_head():
    torch.manual_seed(1)
    hf = transformers.Mamba2ForCausalLM(_hf_config(tie_word_embeddings=False))
    cfg = config_from_hf(hf.config.to_dict(), chunk_size=16, dtype="float32")
    params = params_from_state_dict(_state_dict(hf), cfg)
    assert not cfg.tie_embeddings
    np.testing.assert_array_equal(params.lm_head, hf.lm_head.weight.detach().numpy().T)
    np.testing.assert_array_equal(params.layers.mixer.in_proj[1],
                                  hf.backbone.layers[1].mixer.in_proj.weight.detach().numpy().T)


def test_missing_unexpected_and_misshapen_tensors_are_all_named(hf_model, imported):
    cfg = imported[0].config
    state = _state_dict(hf_model)
    state.pop("backbone.layers.1.mixer.D")
    state["backbone.layers.0.mixer.extra"] = np.zeros(3, np.float32)
    state["backbone.norm_f.weight"] = np.zeros(63, np.float32)
    with pytest.raises(ValueError) as info:
        params_from_state_dict(state, cfg)
    message = str(info.value)
    assert "backbone.layers.1.mixer.D" in message and "backbone.layers.0.mixer.extra" in message
    assert "backbone.norm_f.weight: (63,) != (64,)" in message
    with pytest.raises(ValueError, match="hidden_size"):
        config_from_hf({"vocab_size": 5})
    with pytest.raises(FileNotFoundError):
        load_pretrained(os.path.dirname(__file__))


def test_presets_match_transformers_parameter_counts_on_the_meta_device():
    for name, (width, depth) in {"mamba2-130m": (768, 24), "mamba2-1.3b": (2048, 48)}.items():
        with torch.device("meta"):
            hf = transformers.Mamba2ForCausalLM(_hf_config(
                hidden_size=width, num_hidden_layers=depth, num_heads=2 * width // 64, head_dim=64,
                state_size=128, n_groups=1, vocab_size=50288))
        want = sum(p.numel() for p in hf.parameters())  # tied head counted once
        model = build(name)
        shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
        assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes)) == want
