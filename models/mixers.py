"""The mixer kinds a hybrid stack is made of, one uniform adapter per pattern letter.

Each `MixerKind` tells `hybrid.HybridLM` whether the layer keeps a recurrent state (State.recurrent)
or a KV cache (State.kv), how to check its config, and how to initialise, run G consecutive chunks of
a prefill (the group step) and run one token. Shapes: x [B, G, C, d] for a group, [B, d] for a token;
positions int32[B, G, C] / [B]; valid bool[B, G, C] (a prefix of every chunk).

Group adapters share one signature, ``group(params, config, letter, x, state, positions, valid,
backend, want_boundaries, layer) -> (y [B, G, C, d], state, boundaries)``: recurrent kinds return
their state after each chunk (leaves [B, G, ...]) when `want_boundaries`, KV kinds None; `layer` is
the traced index of the layer inside a stacked KV cache ([R, B, S, Hkv, D] leaves; recurrent kinds
ignore it). A recurrent kind may also write its emitted states itself, ``group_emit(params, config,
letter, x, state, positions, valid, backend, emit) -> (y, state, buffers)`` with an
`sparse_prefix.chunking.EmitTarget` (the GDN recursion kernel writes from inside its loop); for
kinds without it the stack scatters the `group` boundaries into the buffers.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from .attention import AttentionConfig, attention_group, attention_step, init_attention_params, init_kv_cache
from .gated_deltanet import GDNConfig, gdn_mixer_group, gdn_mixer_step, init_gdn_params, init_gdn_state
from .mamba2_mixer import (Mamba2MixerConfig, init_mamba2_mixer, mamba2_mixer_decode, mamba2_mixer_group,
                           mamba2_mixer_state)


class MixerKind(NamedTuple):
    """Adapters of one layer kind (config is a `hybrid.HybridConfig`, letter the pattern letter)."""

    recurrent: bool
    check: Callable[[Any, str], None]
    init_params: Callable[..., dict]          # (key, config, letter, dtype)
    init_state: Callable[..., Any]            # (config, letter, batch, dtype)
    group: Callable[..., tuple]               # (params, config, letter, x, state, positions, valid,
                                              #  backend, want_boundaries, layer) -> (y, state, bounds)
    step: Callable[..., tuple]                # (params, config, letter, x, state, position)
    group_emit: Callable[..., tuple] | None = None    # (params, config, letter, x, state, positions,
                                                      #  valid, backend, emit) -> (y, state, buffers)


def _require(config, field: str, kind: type, letter: str) -> None:
    value = getattr(config, field)
    if not isinstance(value, kind):
        raise ValueError(f"pattern letter {letter!r} needs HybridConfig.{field} to be a {kind.__name__}, "
                         f"got {type(value).__name__}")
    if value.d_model != config.d_model:
        raise ValueError(f"HybridConfig.{field}.d_model ({value.d_model}) differs from d_model "
                         f"({config.d_model})")


def _check_gdn(config, letter: str) -> None:
    _require(config, "gdn", GDNConfig, letter)
    if config.chunk_size % config.gdn.sub_chunk:
        raise ValueError(f"chunk_size ({config.chunk_size}) must be a multiple of gdn.sub_chunk "
                         f"({config.gdn.sub_chunk})")


def _check_attention(config, letter: str) -> None:
    _require(config, "attention", AttentionConfig, letter)
    block = config.attention.key_block
    if block and config.max_length % block:
        raise ValueError(f"max_length ({config.max_length}) must be a multiple of attention.key_block "
                         f"({block})")


GATED_DELTANET = MixerKind(
    recurrent=True,
    check=_check_gdn,
    init_params=lambda key, config, letter, dtype: init_gdn_params(key, config.gdn, dtype),
    init_state=lambda config, letter, batch, dtype: init_gdn_state(config.gdn, batch, dtype),
    group=lambda params, config, letter, x, state, positions, valid, backend, want, layer: gdn_mixer_group(
        params, config.gdn, x, state, valid, want, backend=backend),
    step=lambda params, config, letter, x, state, position: gdn_mixer_step(params, config.gdn, x, state),
    group_emit=lambda params, config, letter, x, state, positions, valid, backend, emit: gdn_mixer_group(
        params, config.gdn, x, state, valid, backend=backend, emit=emit),
)

ATTENTION = MixerKind(
    recurrent=False,
    check=_check_attention,
    init_params=lambda key, config, letter, dtype: init_attention_params(key, config.attention, dtype),
    init_state=lambda config, letter, batch, dtype: init_kv_cache(config.attention, batch,
                                                                  config.max_length, dtype),
    group=lambda params, config, letter, x, state, positions, valid, backend, want, layer: (
        *attention_group(params, config.attention, x, state, positions, valid, layer), None),
    step=lambda params, config, letter, x, state, position: attention_step(
        params, config.attention, x, state, position),
)

MAMBA2 = MixerKind(
    recurrent=True,
    check=lambda config, letter: _require(config, "mamba", Mamba2MixerConfig, letter),
    init_params=lambda key, config, letter, dtype: init_mamba2_mixer(
        key, config.mamba, dtype, out_scale=1.0 / config.pattern.count(letter) ** 0.5),
    init_state=lambda config, letter, batch, dtype: mamba2_mixer_state(config.mamba, batch, dtype),
    group=lambda params, config, letter, x, state, positions, valid, backend, want, layer: (
        mamba2_mixer_group(params, config.mamba, x, state, valid, want)),
    step=lambda params, config, letter, x, state, position: mamba2_mixer_decode(
        params, config.mamba, x, state),
)

KINDS: dict[str, MixerKind] = {"G": GATED_DELTANET, "A": ATTENTION, "M": MAMBA2}
# HybridConfig fields holding mixer configs, and their types (for `HybridConfig.from_dict`).
CONFIG_TYPES: dict[str, type] = {"gdn": GDNConfig, "attention": AttentionConfig,
                                 "mamba": Mamba2MixerConfig}
