"""Cross-check against transformers' own Qwen3.5 text model (torch CPU, pure-torch GDN path, eager attention).

Same random weights imported through `qwen35_import`; last logits, recurrent states (GDN state and
conv window) and the attention K/V of every position must agree within 1e-4 after a prefill, and after
a cached decode step. (Our logits at every position equal the prefill's: tests/test_hybrid.py.)
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sparse_prefix.models.hybrid import HybridLM, qwen35_config  # noqa: E402
from sparse_prefix.models.qwen35_import import config_from_hf, load_qwen35, params_from_hf  # noqa: E402

T, TOL = 24, 1e-4


def hf_config(tie: bool):
    return transformers.Qwen3_5TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.25},
        tie_word_embeddings=tie)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request):
    """(HF model, our model, our params) with the same random weights (all perturbed off their init)."""
    torch.manual_seed(0)
    config = hf_config(request.param)
    config._attn_implementation = "eager"
    hf = transformers.Qwen3_5ForCausalLM(config).float().eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(0.1 * torch.randn_like(param))
    ours = HybridLM(config_from_hf(config, max_length=64, chunk_size=8, sub_chunk=4, key_block=16),
                    dtype=jnp.float32, donate_state=False)
    return hf, ours, params_from_hf(hf.state_dict(), ours.config, dtype=jnp.float32)


def assert_close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    error = np.max(np.abs(got - want))
    assert error <= TOL * max(1.0, np.max(np.abs(want))), f"{what}: max abs error {error:.3g}"


def assert_states_match(ours_state, cache, length):
    gdn = [i for i, letter in enumerate("GGGA") if letter == "G"]
    for slot, layer in enumerate(gdn):
        assert_close(ours_state.recurrent[slot].ssm, cache.get_recurrent_state(layer), f"ssm {layer}")
        window = cache.get_conv_state(layer)[:, :, 1:].transpose(1, 2)     # HF keeps W inputs
        assert_close(ours_state.recurrent[slot].conv, window, f"conv window {layer}")
    keys, values = cache.layers[3].keys, cache.layers[3].values               # [B, Hkv, T, D]
    assert_close(ours_state.kv[0].k[:, :length], keys.transpose(1, 2), "K")
    assert_close(ours_state.kv[0].v[:, :length], values.transpose(1, 2), "V")


def test_logits_states_and_kv_match_transformers_after_prefill_and_decode(pair):
    hf, ours, params = pair
    tokens = np.random.default_rng(0).integers(0, 96, (2, T + 1))
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tokens[:, :T]), use_cache=True)
    last, prefilled, _ = ours.prefill(params, tokens[:, :T], ours.init_state(2), [8, 13])
    assert_close(last, out.logits[:, -1], "prefill logits")
    assert_states_match(prefilled, out.past_key_values, T)      # K/V of every position checked
    if not ours.config.tie_embeddings:
        return                                                   # the head is all that differs
    with torch.no_grad():
        step = hf(input_ids=torch.tensor(tokens[:, T:]), cache=out.past_key_values, use_cache=True)
    decoded, after = ours.decode(params, tokens[:, T].astype(np.int32), prefilled)
    assert_close(decoded, step.logits[:, -1], "decode logits")
    assert_states_match(after, step.past_key_values, T + 1)


def _safetensors_folder(tmp_path, hf, layout):
    """Write HF weights as safetensors under `layout` ('text' or 'multimodal', with vision / MTP junk)."""
    from safetensors.numpy import save_file

    weights = {name: value.detach().numpy().copy() for name, value in hf.state_dict().items()}
    config = hf.config.to_dict()
    if layout == "multimodal":
        weights = {("lm_head.weight" if name == "lm_head.weight" else
                    name.replace("model.", "model.language_model.", 1)): value
                   for name, value in weights.items()}
        weights["model.visual.blocks.0.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
        weights["mtp.fc.weight"] = np.zeros((2, 2), np.float32)
        config = {"model_type": "qwen3_5", "text_config": config,
                  "tie_word_embeddings": config["tie_word_embeddings"]}
    half = len(weights) // 2
    names = sorted(weights)
    save_file({n: weights[n] for n in names[:half]}, str(tmp_path / "model-00001.safetensors"))
    save_file({n: weights[n] for n in names[half:]}, str(tmp_path / "model-00002.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("layout", ["text", "multimodal"])
def test_checkpoint_folders_of_both_layouts_load_the_same_parameters(pair, tmp_path, layout):
    hf, ours, params = pair
    model, loaded = load_qwen35(_safetensors_folder(tmp_path, hf, layout), dtype=jnp.float32,
                                max_length=64, chunk_size=8, sub_chunk=4, key_block=16)
    assert model.config == ours.config
    flat = lambda tree: [np.asarray(x) for x in __import__("jax").tree_util.tree_leaves(tree)]  # noqa: E731
    for got, want in zip(flat(loaded), flat(params), strict=True):
        np.testing.assert_array_equal(got, want)


def test_import_names_missing_misshapen_and_unexpected_weights(pair):
    hf, ours, _ = pair
    weights = dict(hf.state_dict())
    missing = {k: v for k, v in weights.items() if k != "model.layers.0.linear_attn.A_log"}
    with pytest.raises(ValueError, match="missing weight 'model.layers.0.linear_attn.A_log'"):
        params_from_hf(missing, ours.config)
    misshapen = {**weights, "model.norm.weight": torch.zeros(5)}
    with pytest.raises(ValueError, match="model.norm.weight.*expected"):
        params_from_hf(misshapen, ours.config)
    extra = {**weights, "model.layers.0.linear_attn.surprise": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected text weights.*surprise"):
        params_from_hf(extra, ours.config)
    with pytest.raises(ValueError, match="no Qwen3.5 text weights"):
        params_from_hf({"encoder.weight": torch.zeros(1)}, ours.config)


def test_the_published_08b_config_maps_to_the_preset():
    published = {  # Qwen/Qwen3.5-0.8B config.json (text part; vision omitted)
        "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "qwen3_5_text", "vocab_size": 248320, "hidden_size": 1024,
            "intermediate_size": 3584, "num_hidden_layers": 24, "num_attention_heads": 8,
            "num_key_value_heads": 2, "head_dim": 256, "attention_bias": False, "attn_output_gate": True,
            "linear_num_key_heads": 16, "linear_num_value_heads": 16, "linear_key_head_dim": 128,
            "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-6,
            "full_attention_interval": 4, "hidden_act": "silu",
            "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10],
                                "rope_type": "default", "rope_theta": 10000000,
                                "partial_rotary_factor": 0.25}}}
    assert config_from_hf(published) == qwen35_config()
    with pytest.raises(ValueError, match="attention_bias"):
        config_from_hf({**published["text_config"], "attention_bias": True})
