"""Import Qwen3.5 checkpoints (HF layout) into `hybrid.HybridLM` parameters.

Accepts the multimodal layout of `Qwen3_5ForConditionalGeneration` (text weights under
``model.language_model.*``; ``model.visual.*`` and the MTP head ``mtp.*`` are skipped) and the
text-only layout of `Qwen3_5ForCausalLM` (``model.*``). Torch `nn.Linear` weights are [out, in]; ours
are [in, out]. The depthwise conv weight [Dc, 1, W] becomes [W, Dc].

Host-side code: plain Python / NumPy until the final `jnp.asarray`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .attention import AttentionConfig
from .gated_deltanet import GDNConfig
from .hybrid import HybridConfig, HybridLM
from .hybrid_stack import HybridStack

_SKIPPED_PREFIXES = ("model.visual.", "mtp.", "model.mtp.")
_LAYER_LETTER = {"linear_attention": "G", "full_attention": "A"}


def _as_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a mapping or a transformers config, got {type(config).__name__}")


def text_config_of(config: Any) -> dict:
    """The `qwen3_5_text` part of a Qwen3.5 config (dict or transformers object), tie flag resolved."""
    outer = _as_dict(config)
    text = _as_dict(outer["text_config"]) if outer.get("text_config") is not None else outer
    if "tie_word_embeddings" not in text and "tie_word_embeddings" in outer:
        text["tie_word_embeddings"] = outer["tie_word_embeddings"]
    return text


def config_from_hf(config: Any, *, max_length: int = 16384, chunk_size: int = 256,
                   sub_chunk: int | None = None, key_block: int = 1024,
                   chunks_per_step: int = 4, attention_kernel: str = "auto") -> HybridConfig:
    """A `HybridConfig` from a Qwen3.5 config (the full `qwen3_5` one or its `qwen3_5_text` part).

    Raises ValueError for features this implementation does not have (attention bias, activations
    other than SiLU, an ungated attention output, rope scaling other than the default).
    `max_length`, `chunk_size`, `sub_chunk` (default: `chunk_size`), `key_block` (0 = dense
    attention reads), `chunks_per_step` and `attention_kernel` are ours (see `hybrid.qwen35_config`).
    """
    text = text_config_of(config)
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act must be 'silu', got {text['hidden_act']!r}")
    if text.get("attention_bias", False):
        raise ValueError("attention_bias=True is not supported")
    if not text.get("attn_output_gate", True):
        raise ValueError("attn_output_gate=False is not supported")
    layer_types = text.get("layer_types")
    if layer_types is None:
        interval = text.get("full_attention_interval", 4)
        layer_types = ["linear_attention" if (i + 1) % interval else "full_attention"
                       for i in range(text["num_hidden_layers"])]
    unknown = sorted(set(layer_types) - set(_LAYER_LETTER))
    if unknown:
        raise ValueError(f"unsupported layer_types {unknown}")
    rope = dict(text.get("rope_parameters") or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} is not supported (only 'default')")
    theta = float(rope.get("rope_theta", text.get("rope_theta", 10_000.0)))
    partial = float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)))
    head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    d_model, eps = int(text["hidden_size"]), float(text.get("rms_norm_eps", 1e-6))
    return HybridConfig(
        vocab_size=int(text["vocab_size"]), d_model=d_model, d_ff=int(text["intermediate_size"]),
        pattern="".join(_LAYER_LETTER[kind] for kind in layer_types),
        chunk_size=chunk_size, max_length=max_length, chunks_per_step=chunks_per_step,
        gdn=GDNConfig(d_model=d_model, num_k_heads=int(text["linear_num_key_heads"]),
                      num_v_heads=int(text["linear_num_value_heads"]),
                      head_k_dim=int(text["linear_key_head_dim"]),
                      head_v_dim=int(text["linear_value_head_dim"]),
                      conv_width=int(text.get("linear_conv_kernel_dim", 4)), norm_eps=eps,
                      sub_chunk=chunk_size if sub_chunk is None else sub_chunk,
                      recurrence="auto", solver="auto"),
        attention=AttentionConfig(d_model=d_model, num_heads=int(text["num_attention_heads"]),
                                  num_kv_heads=int(text["num_key_value_heads"]), head_dim=head_dim,
                                  rotary_dim=int(head_dim * partial), rope_theta=theta, norm_eps=eps,
                                  norm_offset=1.0, key_block=key_block,
                                  kernel=attention_kernel),
        tie_embeddings=bool(text.get("tie_word_embeddings", False)), norm_eps=eps, norm_offset=1.0)


def _to_numpy(value: Any) -> np.ndarray:
    """A weight as float32 NumPy (torch tensors of any dtype, jax / NumPy arrays)."""
    if hasattr(value, "detach"):                       # torch, without importing it
        return value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _text_prefix(names) -> str:
    if any(name.startswith("model.language_model.") for name in names):
        return "model.language_model."
    if any(name.startswith("model.layers.") or name == "model.embed_tokens.weight" for name in names):
        return "model."
    raise ValueError("no Qwen3.5 text weights found (expected model.language_model.* or model.*)")


class _Weights:
    """Consumes named weights once each and reports what is missing or left over."""

    def __init__(self, weights: Mapping[str, Any], prefix: str):
        self._weights, self._prefix, self._used = weights, prefix, set()

    def take(self, name: str, shape: tuple[int, ...], *, transpose: bool = False) -> np.ndarray:
        full = name if name == "lm_head.weight" else self._prefix + name
        if full not in self._weights:
            raise ValueError(f"missing weight {full!r}")
        value = _to_numpy(self._weights[full])
        value = value.T if transpose else value
        if value.shape != shape:
            raise ValueError(f"weight {full!r} has shape {value.shape}, expected {shape}")
        self._used.add(full)
        return value

    def leftover(self) -> list[str]:
        return sorted(name for name in self._weights if name not in self._used
                      and not name.startswith(_SKIPPED_PREFIXES)
                      and not name.endswith("rotary_emb.inv_freq"))


def _gdn_params(w: _Weights, base: str, cfg: HybridConfig) -> dict:
    g, d = cfg.gdn, cfg.d_model
    conv = w.take(base + "conv1d.weight", (g.conv_dim, 1, g.conv_width))
    return {
        "in_proj_qkv": w.take(base + "in_proj_qkv.weight", (d, g.conv_dim), transpose=True),
        "in_proj_z": w.take(base + "in_proj_z.weight", (d, g.value_dim), transpose=True),
        "in_proj_b": w.take(base + "in_proj_b.weight", (d, g.num_v_heads), transpose=True),
        "in_proj_a": w.take(base + "in_proj_a.weight", (d, g.num_v_heads), transpose=True),
        "conv_weight": conv[:, 0, :].T,
        "dt_bias": w.take(base + "dt_bias", (g.num_v_heads,)),
        "A_log": w.take(base + "A_log", (g.num_v_heads,)),
        "norm_weight": w.take(base + "norm.weight", (g.head_v_dim,)),
        "out_proj": w.take(base + "out_proj.weight", (g.value_dim, d), transpose=True),
    }


def _attention_params(w: _Weights, base: str, cfg: HybridConfig) -> dict:
    a, d = cfg.attention, cfg.d_model
    kv_width = a.num_kv_heads * a.head_dim
    return {
        "q_proj": w.take(base + "q_proj.weight", (d, 2 * a.num_heads * a.head_dim), transpose=True),
        "k_proj": w.take(base + "k_proj.weight", (d, kv_width), transpose=True),
        "v_proj": w.take(base + "v_proj.weight", (d, kv_width), transpose=True),
        "o_proj": w.take(base + "o_proj.weight", (a.num_heads * a.head_dim, d), transpose=True),
        "q_norm": w.take(base + "q_norm.weight", (a.head_dim,)),
        "k_norm": w.take(base + "k_norm.weight", (a.head_dim,)),
    }


def params_from_hf(weights: Mapping[str, Any], config: HybridConfig, *, dtype=jnp.bfloat16) -> dict:
    """`HybridLM` parameters from HF-named weights (a state dict or safetensors contents).

    Returns the stacked layout of `hybrid_stack` (``layers``: one dict per unit position, leaves
    [R, ...]). Raises ValueError naming any missing, misshapen or unexpected text weight.
    """
    if not isinstance(config, HybridConfig) or set(config.pattern) - {"G", "A"}:
        raise ValueError("config must be a Qwen3.5 HybridConfig (pattern of G and A)")
    w = _Weights(weights, _text_prefix(list(weights)))
    d = config.d_model
    layers = []
    for index, letter in enumerate(config.pattern):
        base = f"layers.{index}."
        mixer = (_gdn_params(w, base + "linear_attn.", config) if letter == "G"
                 else _attention_params(w, base + "self_attn.", config))
        mlp = "mlp."
        layers.append({
            "input_norm": w.take(base + "input_layernorm.weight", (d,)),
            "mixer": mixer,
            "post_norm": w.take(base + "post_attention_layernorm.weight", (d,)),
            "mlp": {"gate_proj": w.take(base + mlp + "gate_proj.weight", (d, config.d_ff), transpose=True),
                    "up_proj": w.take(base + mlp + "up_proj.weight", (d, config.d_ff), transpose=True),
                    "down_proj": w.take(base + mlp + "down_proj.weight", (config.d_ff, d),
                                        transpose=True)},
        })
    params = {"embed": w.take("embed_tokens.weight", (config.vocab_size, d)),
              "layers": HybridStack(config, "chunked").stack_layers(layers),
              "final_norm": w.take("norm.weight", (d,))}
    if not config.tie_embeddings:
        params["lm_head"] = w.take("lm_head.weight", (d, config.vocab_size), transpose=True)
    leftover = w.leftover()
    if config.tie_embeddings and leftover == ["lm_head.weight"]:
        leftover = []                                  # a tied checkpoint may still ship the head
    if leftover:
        raise ValueError(f"unexpected text weights (not imported): {leftover[:8]}")
    keep_f32 = {"A_log", "dt_bias"}

    def cast(path, value):
        name = path[-1].key if hasattr(path[-1], "key") else None
        return jnp.asarray(value, jnp.float32 if name in keep_f32 else dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def load_qwen35(path: str | os.PathLike, *, dtype=jnp.bfloat16, max_length: int = 16384,
                chunk_size: int = 256, sub_chunk: int | None = None, key_block: int = 1024,
                chunks_per_step: int = 4, attention_kernel: str = "auto") -> tuple[HybridLM, dict]:
    """(model, params) from a local Qwen3.5 checkpoint folder (config.json + *.safetensors)."""
    from safetensors import safe_open

    folder = os.fspath(path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"no config.json in {folder!r}")
    with open(config_path) as handle:
        config = config_from_hf(json.load(handle), max_length=max_length, chunk_size=chunk_size,
                                sub_chunk=sub_chunk, key_block=key_block,
                                chunks_per_step=chunks_per_step, attention_kernel=attention_kernel)
    files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {folder!r}")
    weights = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="flax") as handle:
            for key in handle.keys():
                if not key.startswith(_SKIPPED_PREFIXES):
                    weights[key] = handle.get_tensor(key)
    return HybridLM(config, dtype=dtype), params_from_hf(weights, config, dtype=dtype)
