"""Mamba2 weights from Hugging Face checkpoints (public).

Two layouts are read:
  * transformers `Mamba2ForCausalLM` (config.json with `hidden_size`, `num_heads`, ...; weights in
    `model.safetensors` or shards listed by `model.safetensors.index.json`);
  * state-spaces/mamba2-* (config.json with `d_model`, `ssm_cfg`, ...; `pytorch_model.bin`, read
    with torch, an optional dependency: `pip install torch==2.13.0`).
Both name their tensors `backbone.layers.{i}.mixer.*` (state-spaces says `backbone.embedding`,
transformers `backbone.embeddings`). Every tensor's shape is checked against the config; missing
and unexpected names raise a ValueError that lists them.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from .mamba2 import LayerParams, Mamba2Config, Mamba2LM, Mamba2MixerConfig, Mamba2Params, MixerParams


def _number(value) -> float:
    """A float from config JSON; transformers writes infinities as {"__float__": "Infinity"}."""
    if isinstance(value, Mapping) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def _dt_limit(value) -> tuple[float, float]:
    low, high = (0.0, math.inf) if value is None else value
    return (_number(low), _number(high))


def config_from_hf(hf_config: Mapping, *, chunk_size: int = 256, max_length: int = 1 << 17,
                   dtype: str = "bfloat16") -> Mamba2Config:
    """A `Mamba2Config` from a transformers or state-spaces config.json dict.

    `chunk_size` is ours (the exactness grid), not the checkpoint's: it changes rounding only.
    """
    if "d_model" in hf_config:
        return _config_from_state_spaces(hf_config, chunk_size, max_length, dtype)
    if "hidden_size" not in hf_config:
        raise ValueError("config has neither 'hidden_size' (transformers) nor 'd_model' (state-spaces)")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act must be 'silu', got {hf_config['hidden_act']!r}")
    eps = float(hf_config.get("layer_norm_epsilon", 1e-5))
    mixer = Mamba2MixerConfig(
        d_model=int(hf_config["hidden_size"]), d_state=int(hf_config.get("state_size", 128)),
        d_conv=int(hf_config.get("conv_kernel", 4)), expand=int(hf_config.get("expand", 2)),
        headdim=int(hf_config.get("head_dim", 64)), ngroups=int(hf_config.get("n_groups", 1)),
        norm_eps=eps, dt_limit=_dt_limit(hf_config.get("time_step_limit")),
        use_bias=bool(hf_config.get("use_bias", False)),
        conv_bias=bool(hf_config.get("use_conv_bias", True)))
    if "num_heads" in hf_config and int(hf_config["num_heads"]) != mixer.nheads:
        raise ValueError(f"num_heads {hf_config['num_heads']} != hidden_size * expand / head_dim "
                         f"= {mixer.nheads}")
    return Mamba2Config(mixer=mixer, n_layer=int(hf_config["num_hidden_layers"]),
                        vocab_size=int(hf_config["vocab_size"]), chunk_size=chunk_size,
                        max_length=max_length,
                        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
                        norm_eps=eps, dtype=dtype)


def _config_from_state_spaces(cfg: Mapping, chunk_size: int, max_length: int, dtype: str
                              ) -> Mamba2Config:
    ssm = dict(cfg.get("ssm_cfg", {}))
    if ssm.get("layer", "Mamba2") != "Mamba2":
        raise ValueError(f"ssm_cfg.layer must be 'Mamba2', got {ssm.get('layer')!r}")
    if cfg.get("d_intermediate", 0) or cfg.get("attn_layer_idx"):
        raise ValueError("state-spaces configs with MLP (d_intermediate) or attention layers are "
                         "not Mamba2 LMs")
    if not cfg.get("rms_norm", True):
        raise ValueError("only rms_norm=True state-spaces configs are supported")
    multiple = int(cfg.get("pad_vocab_size_multiple", 1))
    vocab = -(-int(cfg["vocab_size"]) // multiple) * multiple
    mixer = Mamba2MixerConfig(
        d_model=int(cfg["d_model"]), d_state=int(ssm.get("d_state", 128)),
        d_conv=int(ssm.get("d_conv", 4)), expand=int(ssm.get("expand", 2)),
        headdim=int(ssm.get("headdim", 64)), ngroups=int(ssm.get("ngroups", 1)),
        dt_limit=_dt_limit(ssm.get("dt_limit")), use_bias=bool(ssm.get("bias", False)),
        conv_bias=bool(ssm.get("conv_bias", True)))
    return Mamba2Config(mixer=mixer, n_layer=int(cfg["n_layer"]), vocab_size=vocab,
                        chunk_size=chunk_size, max_length=max_length,
                        tie_embeddings=bool(cfg.get("tie_embeddings", True)), dtype=dtype)


def _expected_shapes(cfg: Mamba2Config) -> dict[str, tuple[int, ...]]:
    """torch-layout name -> shape, for every tensor a checkpoint of `cfg` must (or may) hold."""
    m = cfg.mixer
    shapes = {"backbone.embeddings.weight": (cfg.vocab_size, m.d_model),
              "backbone.norm_f.weight": (m.d_model,)}
    per_layer = {"norm.weight": (m.d_model,),
                 "mixer.in_proj.weight": (m.in_proj_size, m.d_model),
                 "mixer.conv1d.weight": (m.conv_dim, 1, m.d_conv),
                 "mixer.dt_bias": (m.nheads,), "mixer.A_log": (m.nheads,), "mixer.D": (m.nheads,),
                 "mixer.norm.weight": (m.d_inner,), "mixer.out_proj.weight": (m.d_model, m.d_inner)}
    if m.use_bias:
        per_layer.update({"mixer.in_proj.bias": (m.in_proj_size,), "mixer.out_proj.bias": (m.d_model,)})
    if m.conv_bias:
        per_layer["mixer.conv1d.bias"] = (m.conv_dim,)
    for i in range(cfg.n_layer):
        shapes.update({f"backbone.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    shapes["lm_head.weight"] = (cfg.vocab_size, m.d_model)
    return shapes


def params_from_state_dict(state_dict: Mapping, cfg: Mamba2Config) -> Mamba2Params:
    """Our params from a torch-named state dict (values: numpy / jax / torch-converted arrays).

    Args:
      state_dict: name -> array in the transformers or state-spaces naming (torch layouts).
      cfg: the model config (shapes are checked against it).

    Returns:
      `Mamba2Params` in `cfg.dtype` (dt_bias, A_log and D in float32).

    Raises:
      ValueError: a missing, unexpected or wrongly shaped tensor (all of them are listed).
    """
    tensors = {("backbone.embeddings.weight" if name == "backbone.embedding.weight" else name): value
               for name, value in state_dict.items()}
    expected = _expected_shapes(cfg)
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing = sorted(set(expected) - set(tensors) - optional)
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(f"{name}: {tuple(np.shape(tensors[name]))} != {expected[name]}"
                   for name in set(tensors) & set(expected)
                   if tuple(np.shape(tensors[name])) != expected[name])
    if missing or unexpected or wrong:
        raise ValueError("checkpoint does not match the config: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
                         f"wrong shapes {wrong[:8]}")
    if cfg.tie_embeddings and "lm_head.weight" in tensors and not np.array_equal(
            np.asarray(tensors["lm_head.weight"]), np.asarray(tensors["backbone.embeddings.weight"])):
        raise ValueError("the config ties embeddings but lm_head.weight differs from the embedding")
    dtype = cfg.compute_dtype

    def get(name, cast=dtype, transform=lambda a: a):
        return jnp.asarray(transform(np.asarray(tensors[name], np.float32)), cast)

    def layers(name, cast=dtype, transform=lambda a: a):
        full = [f"backbone.layers.{i}.{name}" for i in range(cfg.n_layer)]
        if full[0] not in tensors:
            return None
        return jnp.asarray(np.stack([transform(np.asarray(tensors[n], np.float32)) for n in full]),
                           cast)

    mixer = MixerParams(
        in_proj=layers("mixer.in_proj.weight", transform=np.transpose),
        in_proj_bias=layers("mixer.in_proj.bias"),
        conv_weight=layers("mixer.conv1d.weight", transform=lambda w: w[:, 0, :].T),
        conv_bias=layers("mixer.conv1d.bias"),
        dt_bias=layers("mixer.dt_bias", jnp.float32), A_log=layers("mixer.A_log", jnp.float32),
        D=layers("mixer.D", jnp.float32), norm=layers("mixer.norm.weight"),
        out_proj=layers("mixer.out_proj.weight", transform=np.transpose),
        out_proj_bias=layers("mixer.out_proj.bias"))
    lm_head = None if cfg.tie_embeddings else get("lm_head.weight", transform=np.transpose)
    return Mamba2Params(embedding=get("backbone.embeddings.weight"),
                        layers=LayerParams(norm=layers("norm.weight"), mixer=mixer),
                        norm_f=get("backbone.norm_f.weight"), lm_head=lm_head)


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards in `model.safetensors.index.json`."""
    from safetensors.flax import load_file  # reads bf16 too (numpy cannot hold it)

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors (or index) in {directory}")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update({k: np.asarray(v, np.float32)
                        for k, v in load_file(os.path.join(directory, name)).items()})
    return tensors


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
    """A state-spaces `pytorch_model.bin` as float32 numpy arrays (needs torch)."""
    try:
        import torch
    except ImportError as err:  # torch is optional: the crosscheck extra
        raise ImportError("reading pytorch_model.bin needs torch: pip install torch==2.13.0") from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: tensor.detach().float().numpy() for name, tensor in state.items()}


def load_pretrained(directory: str, *, dtype: str = "bfloat16", chunk_size: int = 256,
                    max_length: int = 1 << 17, **model_kwargs) -> tuple[Mamba2LM, Mamba2Params]:
    """(model, params) from a local checkpoint directory of either layout (public).

    Args:
      directory: holds config.json and model.safetensors (shards) or pytorch_model.bin.
      dtype: compute / weight dtype. chunk_size, max_length: ours (see `Mamba2Config`).
      model_kwargs: passed to `Mamba2LM` (min_checkpoint_slots, donate_state).
    """
    with open(os.path.join(directory, "config.json")) as handle:
        cfg = config_from_hf(json.load(handle), chunk_size=chunk_size, max_length=max_length,
                             dtype=dtype)
    binary = os.path.join(directory, "pytorch_model.bin")
    has_safetensors = any(name.endswith(".safetensors") for name in os.listdir(directory))
    tensors = read_safetensors(directory) if has_safetensors or not os.path.exists(binary) \
        else read_torch_bin(binary)
    return Mamba2LM(cfg, **model_kwargs), params_from_state_dict(tensors, cfg)
