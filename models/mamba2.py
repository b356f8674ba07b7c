"""Mamba2 (SSD) language model as pure functions over a params pytree, with exact one-pass
checkpoint-emitting prefill (public: `Mamba2LM`, `Mamba2Config`, the mamba2-* presets).

Why pure functions and not Flax modules: the cache needs the model as jitted functions of
(params, state, inputs) -- chunk step, prefill, decode, forward -- whose state is an explicit typed
pytree that the store slices, gathers and donates. Params are NamedTuples with a leading layer axis
(one `lax.scan` over layers compiles a 64-layer model about as fast as a 2-layer one); the config is
a frozen, hashable dataclass, so every model object of one config shares one set of compiled
programs. The per-layer mixer lives in `mamba2_mixer` (re-exported here) for hybrid stacks.

Prefill runs G = `chunks_per_step` chunks of C tokens per loop step (`mamba2_group_step`): every
layer on all G chunks at once -- [B G C, d] projections, per-chunk conv windows and SSD batched over
the chunks, the state passed chunk to chunk in order -- so a chunk's numbers do not depend on its
place in the group and resuming at any multiple of C stays bitwise. The layers are unrolled inside
the step (static weight slices, read in place by the GEMMs; the state stays in the protocol's
per-layer layout), and checkpoints are written by each layer straight into per-layer [B, K, ...]
buffers carried in the loop, only for the emitted chunks (`mamba2_emitting_step`, the opt-in
emission of `run_chunks`).

Numerics follow state-spaces/mamba and HF `Mamba2ForCausalLM`: weights and activations in the compute
dtype (bf16 by default); the residual stream (residual_in_fp32), norms, SSD and the recurrent state in
float32. A padded slot (dt = 0, no conv shift) leaves the state exactly unchanged.

Shape legend: see `sparse_prefix.protocol`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_prefix.chunking import (EmittingGroupStep, check_decode_args, check_prefill_args, check_state,
                                    prefill_compiler_options, prepare_prefill_args, resolve_step_loop,
                                    run_chunks, scan_chunks, write_emitted)
from sparse_prefix.protocol import Checkpoints, MemoryProfile, RecurrentState, State, restore_state

from .checkpoint_io import register_family
from .layers import embed_lookup, head_logits, rms_norm
from .mamba2_mixer import (BACKENDS, Mamba2MixerConfig, MixerParams, full_precision, gated_rms_norm,
                           init_mamba2_mixer, mamba2_mixer_chunk, mamba2_mixer_decode,
                           mamba2_mixer_group, mamba2_mixer_state, uses_kernels)
from .registry import register

Array = jax.Array
__all__ = ["BACKENDS", "LayerParams", "Mamba2Config", "Mamba2LM", "Mamba2MixerConfig", "Mamba2Params",
           "MixerParams", "gated_rms_norm", "init_mamba2_mixer", "init_mamba2_params",
           "init_mamba2_state", "mamba2_chunk_step", "mamba2_emitting_step", "mamba2_group_step",
           "mamba2_logits", "mamba2_mixer_chunk", "mamba2_mixer_decode", "mamba2_mixer_group",
           "mamba2_mixer_state"]


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """A Mamba2 language model: embedding, n_layer (RMSNorm -> mixer -> residual), final norm, head.

    Attributes:
      mixer: the per-layer mixer. n_layer: layers. vocab_size: V (embedding rows, padded).
      chunk_size: C, the prefill chunk and exactness grid. chunks_per_step: G, chunks per prefill
      loop step (bigger matmuls; a call's last step is padded to G chunks, so short calls pay up to
      G - 1 chunks of idle compute). max_length: the longest sequence (a pure SSM keeps no KV: it
      only bounds positions). tie_embeddings: head = embedding^T.
      norm_eps: epsilon of the block and final RMSNorms. dtype: compute / weight dtype name.
    """

    mixer: Mamba2MixerConfig
    n_layer: int
    vocab_size: int
    chunk_size: int = 256
    chunks_per_step: int = 1
    max_length: int = 16384
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    dtype: str = "bfloat16"

    def __post_init__(self):
        if not isinstance(self.mixer, Mamba2MixerConfig):
            raise TypeError(f"mixer must be a Mamba2MixerConfig, got {type(self.mixer).__name__}")
        for field in ("n_layer", "vocab_size", "chunk_size", "chunks_per_step", "max_length"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)

    @property
    def d_model(self) -> int:
        return self.mixer.d_model

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> "Mamba2Config":
        """A copy with top-level fields (or mixer fields, by name) changed."""
        mixer_fields = {f.name for f in dataclasses.fields(Mamba2MixerConfig)}
        mixer_changes = {k: changes.pop(k) for k in list(changes) if k in mixer_fields}
        mixer = dataclasses.replace(self.mixer, **mixer_changes)
        return dataclasses.replace(self, mixer=mixer, **changes)

    def to_dict(self) -> dict:
        """JSON-ready dict (inverse of `from_dict`)."""
        out = dataclasses.asdict(self)
        out["mixer"]["dt_limit"] = list(self.mixer.dt_limit)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Mamba2Config":
        data = dict(data)
        mixer = dict(data.pop("mixer"))
        mixer["dt_limit"] = tuple(mixer.get("dt_limit", (0.0, math.inf)))
        return cls(mixer=Mamba2MixerConfig(**mixer), **data)


# ----------------------------------------------------------------------------- parameters


class LayerParams(NamedTuple):
    """One block: pre-norm weight [d] and the mixer. In `Mamba2Params.layers` every leaf is stacked."""

    norm: Array
    mixer: MixerParams


class Mamba2Params(NamedTuple):
    """embedding [V, d], layers (leaves [n_layer, ...]), norm_f [d], lm_head [d, V] | None (tied)."""

    embedding: Array
    layers: LayerParams
    norm_f: Array
    lm_head: Array | None


# ----------------------------------------------------------------------------- the language model


@functools.partial(jax.jit, static_argnums=1)
def init_mamba2_params(key: Array, cfg: Mamba2Config) -> Mamba2Params:
    """Random parameters: embedding N(0, 0.02), per-layer mixers (out_proj scaled 1/sqrt(n_layer))."""
    dtype = cfg.compute_dtype
    k_embed, k_layers, k_head = jax.random.split(key, 3)
    mixers = init_mamba2_mixer(k_layers, cfg.mixer, dtype, out_scale=1 / math.sqrt(cfg.n_layer),
                               layers=cfg.n_layer)
    embedding = 0.02 * jax.random.normal(k_embed, (cfg.vocab_size, cfg.d_model), dtype)
    lm_head = None if cfg.tie_embeddings else (
        0.02 * jax.random.normal(k_head, (cfg.d_model, cfg.vocab_size), dtype))
    return Mamba2Params(
        embedding=embedding,
        layers=LayerParams(norm=jnp.ones((cfg.n_layer, cfg.d_model), dtype), mixer=mixers),
        norm_f=jnp.ones((cfg.d_model,), dtype),
        lm_head=lm_head)


def init_mamba2_state(cfg: Mamba2Config, batch: int) -> State:
    """Zero `State` for `batch` rows: one `RecurrentState` per layer, no KV, length 0."""
    layers = tuple(mamba2_mixer_state(cfg.mixer, batch, cfg.compute_dtype) for _ in range(cfg.n_layer))
    return State(recurrent=layers, kv=None, length=jnp.zeros((batch,), jnp.int32))


def _stack(states: tuple) -> Any:
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states)


def _unstack(stacked: Any, count: int) -> tuple:
    return tuple(jax.tree_util.tree_map(lambda leaf: leaf[i], stacked) for i in range(count))


def _layers(params: Mamba2Params, cfg: Mamba2Config, hidden: Array, recurrent: tuple, mixer_fn
            ) -> tuple[Array, tuple]:
    """Run every block (scan over the stacked layers, or a loop over `Mamba2LM.prepare_params`'
    per-layer tuple): hidden float32 residual [B, ..., d]."""

    def block(residual, inputs):
        layer, layer_state = inputs
        x = rms_norm(residual, layer.norm, cfg.norm_eps).astype(cfg.compute_dtype)
        y, layer_state = mixer_fn(layer.mixer, x, layer_state)
        return residual + y.astype(jnp.float32), layer_state

    if isinstance(params.layers, LayerParams):
        hidden, stacked = jax.lax.scan(block, hidden, (params.layers, _stack(recurrent)))
        states = _unstack(stacked, cfg.n_layer)
    else:
        states = []
        for layer, layer_state in zip(params.layers, recurrent):
            hidden, layer_state = block(hidden, (layer, layer_state))
            states.append(layer_state)
        states = tuple(states)
    return rms_norm(hidden, params.norm_f, cfg.norm_eps), states


def _layer(params: Mamba2Params, index: int) -> LayerParams:
    """Layer `index`'s parameters: static slices of the stacked leaves, or the `index`-th entry when
    `sliced_layers` has cut them apart already."""
    if isinstance(params.layers, LayerParams):
        return jax.tree_util.tree_map(lambda leaf: leaf[index], params.layers)
    return params.layers[index]


def sliced_layers(params: Mamba2Params, n_layer: int) -> Mamba2Params:
    """`params` with the stacked layers cut into a tuple of per-layer `LayerParams` (unchanged if
    they are cut already). A program does this once, before its step loop: XLA copies a static
    slice of a stacked weight out (a device memcpy, ~10 us for an in_proj of mamba2-1.3b) every
    time a loop body takes it, i.e. once per layer and group step; cut outside the loop, once per
    call (~4 ms per call of mamba2-1.3b on an H200); cut by `Mamba2LM.prepare_params`, never."""
    if not isinstance(params.layers, LayerParams):
        return params
    return params._replace(layers=tuple(
        jax.tree_util.tree_map(lambda leaf: leaf[index], params.layers) for index in range(n_layer)))


def _group_layers(params: Mamba2Params, cfg: Mamba2Config, state: State, tokens: Array, valid: Array,
                  want_boundaries: bool, emission) -> tuple[State, Array, tuple | None]:
    """Every layer on G chunks, unrolled (see `mamba2_group_step`); `emission` is None or
    (`EmittedBuffers`, slot int32[B, G]) and the third result then the updated buffers: each
    layer's SSM states written by its own mixer, every layer's conv windows by one scatter."""
    hidden = embed_lookup(params.embedding, tokens).astype(jnp.float32)
    recurrent, thirds = [], []
    for index, layer_state in enumerate(state.recurrent):
        layer = _layer(params, index)
        x = rms_norm(hidden, layer.norm, cfg.norm_eps).astype(cfg.compute_dtype)
        emit = None if emission is None else (
            RecurrentState(ssm=emission[0].ssm[index], conv=None), emission[1])
        y, layer_state, third = mamba2_mixer_group(layer.mixer, cfg.mixer, x, layer_state, valid,
                                                   want_boundaries, emit=emit)
        hidden = hidden + y.astype(jnp.float32)
        recurrent.append(layer_state)
        thirds.append(third)
    hidden = rms_norm(hidden, params.norm_f, cfg.norm_eps)
    third = tuple(thirds) if want_boundaries else None
    if emission is not None:
        buffers, slot = emission
        windows = jnp.stack([layer_third.conv for layer_third in thirds], axis=2)  # [B, G, n, W-1, Dc]
        third = EmittedBuffers(ssm=tuple(layer_third.ssm for layer_third in thirds),
                               conv=write_emitted(buffers.conv, windows, slot))
    return state._replace(recurrent=tuple(recurrent)), hidden, third


class EmittedBuffers(NamedTuple):
    """Mamba2's checkpoint buffers inside a prefill's step loop (`mamba2_emitting_step`).

    Attributes:
      ssm: per layer float32[B, K, H, P, N] (the protocol layout; the chain kernel writes in place).
      conv: [B, K, n_layer, W-1, Dc], every layer's conv windows in one array: one scatter per step
        writes all layers' emitted windows (one scatter per layer and step, 192 of a few KB each,
        cost ~0.9 ms per mamba2-1.3b call of 8192 tokens on an H200, almost all launch latency).
    """

    ssm: tuple
    conv: Array


def _emitted_recurrent(buffers: EmittedBuffers) -> tuple:
    """`EmittedBuffers` -> the protocol layout: one RecurrentState(ssm [B, K, ...], conv [B, K, ...])
    per layer."""
    return tuple(RecurrentState(ssm=ssm, conv=buffers.conv[:, :, index])
                 for index, ssm in enumerate(buffers.ssm))


def mamba2_group_step(params: Mamba2Params, cfg: Mamba2Config, state: State, tokens: Array,
                      positions: Array, valid: Array, want_boundaries: bool
                      ) -> tuple[State, Array, tuple | None]:
    """The group step of `sparse_prefix.chunking`: all layers on G chunks.

    The layers are unrolled (a Python loop, not a scan): each layer's weights are static slices of
    the stacked parameters (cut once per call by `sliced_layers` where the program does so), and
    the state stays in the protocol's per-layer layout (nothing stacked or unstacked per step).

    Args:
      params, cfg: the model. state: a `State` (one `RecurrentState` per layer).
      tokens: int32[B, G, C]. positions: unused (Mamba2 has no positional encoding).
      valid: bool[B, G, C], a prefix of each chunk.
      want_boundaries: also return the state after each chunk (static).

    Returns:
      (state, final-normed hidden float32[B, G, C, d], boundaries: per layer a `RecurrentState`
      with leaves [B, G, ...] when `want_boundaries`, else None).
    """
    del positions
    return _group_layers(params, cfg, state, tokens, valid, want_boundaries, None)


def mamba2_emitting_step(params: Mamba2Params, cfg: Mamba2Config) -> EmittingGroupStep:
    """`mamba2_group_step` as an `EmittingGroupStep` of `run_chunks`: each layer writes its emitted
    SSM states (only those) into its own checkpoint buffer [B, K, ...] carried in the loop (the
    protocol layout), and the conv windows of all layers go into one stacked buffer
    (`EmittedBuffers`), cut per layer once at the end of the call."""

    def step(state, tokens, positions, valid, buffers, slot):
        del positions
        emission = None if buffers is None else (buffers, slot)
        return _group_layers(params, cfg, state, tokens, valid, False, emission)

    def shapes(state):
        layers = state.recurrent
        conv = layers[0].conv
        if any(layer.conv.shape != conv.shape for layer in layers):
            raise ValueError("Mamba2 layers must share one conv window shape")
        return ([(layer.ssm.shape[1:], layer.ssm.dtype) for layer in layers],
                ((len(layers),) + conv.shape[1:], conv.dtype), conv.shape[0])

    def init_buffers(state, slots):
        ssm, (conv_rest, conv_dtype), batch = shapes(state)
        return EmittedBuffers(
            ssm=tuple(jnp.zeros((batch, slots) + rest, dtype) for rest, dtype in ssm),
            conv=jnp.zeros((batch, slots) + conv_rest, conv_dtype))

    def init_padding(state, real):
        """On the GPU-kernel path: one launch that zeroes only the padding slots of every buffer
        (`pallas_common.padding_zeroed_buffers`); the prefill writes the real ones."""
        from .pallas_common import padding_zeroed_buffers
        ssm, conv, _ = shapes(state)
        buffers = padding_zeroed_buffers(ssm + [conv], real)
        return EmittedBuffers(ssm=tuple(buffers[:-1]), conv=buffers[-1])

    kernels = uses_kernels(cfg.mixer, cfg.chunks_per_step, cfg.chunk_size, cfg.compute_dtype)
    return EmittingGroupStep(step, init_buffers, _emitted_recurrent,
                             init_padding if kernels else None)


def mamba2_chunk_step(params: Mamba2Params, cfg: Mamba2Config, state: State, tokens: Array,
                      positions: Array, valid: Array) -> tuple[State, Array]:
    """The one-chunk step of `sparse_prefix.chunking`: tokens int32[B, C] -> (state, hidden
    f32[B, C, d]) (`mamba2_group_step` with G = 1). `positions` is unused."""
    state, hidden, _ = mamba2_group_step(params, cfg, state, tokens[:, None], positions[:, None],
                                         valid[:, None], False)
    return state, hidden[:, 0]


def mamba2_logits(params: Mamba2Params, cfg: Mamba2Config, hidden: Array) -> Array:
    """Head: final-normed hidden [..., d] -> float32 logits [..., V] (tied or untied)."""
    hidden = hidden.astype(cfg.compute_dtype)
    precision = full_precision(cfg.compute_dtype)
    if params.lm_head is None:
        return head_logits(hidden, params.embedding, vocab_major=True, precision=precision)
    return head_logits(hidden, params.lm_head, vocab_major=False, precision=precision)


class _Programs:
    """The jitted prefill / decode / forward of one config, shared by every model object with it.

    Decode does not depend on `chunks_per_step`: configs that differ only there share the decode
    program of the G = 1 config (`decoder`), and count its traces.
    """

    def __init__(self, cfg: Mamba2Config, donate: bool, decoder: "_Programs | None" = None,
                 static_steps: bool = False, compiler_options: tuple = ()):
        self.traces = 0
        self.static_steps = static_steps
        self.compiler_options = compiler_options
        donate_state = (1,) if donate else ()
        self.prefill = jax.jit(functools.partial(self._prefill, cfg), donate_argnums=donate_state,
                               compiler_options=dict(compiler_options) or None)
        # `FusablePrefill.prefill_program` (one object: engines cache fused programs on it)
        self.program = lambda params, tokens, state, checkpoints, lengths: self._prefill(
            cfg, params, state, tokens, lengths, checkpoints)
        self.decoder = decoder or self
        self.decode = decoder.decode if decoder else jax.jit(functools.partial(self._decode, cfg),
                                                             donate_argnums=donate_state)
        self.forward = jax.jit(functools.partial(self._forward, cfg))
        # One dispatch for the whole zero state (2 n_layer + 1 buffers) instead of one per leaf.
        self.init_state = jax.jit(functools.partial(init_mamba2_state, cfg), static_argnums=0)

    @property
    def compile_count(self) -> int:
        return self.traces + (self.decoder.traces if self.decoder is not self else 0)

    def _prefill(self, cfg, params, state, tokens, lengths, checkpoints):
        self.traces += 1
        params = sliced_layers(params, cfg.n_layer)
        hidden, final, emitted = run_chunks(mamba2_emitting_step(params, cfg), state, tokens, lengths,
                                            checkpoints, chunk_size=cfg.chunk_size,
                                            hidden_size=cfg.d_model,
                                            chunks_per_step=cfg.chunks_per_step,
                                            static_steps=self.static_steps)
        return mamba2_logits(params, cfg, hidden), final, emitted

    def _decode(self, cfg, params, state, token):
        self.traces += 1
        hidden = jnp.take(params.embedding, token, axis=0).astype(jnp.float32)
        hidden, recurrent = _layers(params, cfg, hidden, state.recurrent,
                                    lambda p, x, s: mamba2_mixer_decode(p, cfg.mixer, x, s))
        next_state = State(recurrent=recurrent, kv=None, length=state.length + 1)
        return mamba2_logits(params, cfg, hidden), next_state

    def _forward(self, cfg, params, tokens):
        state = init_mamba2_state(cfg, tokens.shape[0])
        step = functools.partial(mamba2_group_step, params, cfg)
        hidden, _ = scan_chunks(step, state, tokens, chunk_size=cfg.chunk_size,
                                chunks_per_step=cfg.chunks_per_step)
        return mamba2_logits(params, cfg, hidden)


_sliced = jax.jit(sliced_layers, static_argnums=1)


@functools.partial(jax.jit, static_argnums=1)
def _first_slots(emitted: Checkpoints, slots: int) -> Checkpoints:
    """The first `slots` checkpoint slots of every leaf, in one dispatch (not one per leaf)."""
    return jax.tree_util.tree_map(lambda leaf: leaf[:, :slots], emitted)


@functools.lru_cache(maxsize=None)
def _programs(cfg: Mamba2Config, donate: bool, static_steps: bool = False,
              compiler_options: tuple = ()) -> _Programs:
    if cfg.chunks_per_step == 1:
        return _Programs(cfg, donate, static_steps=static_steps, compiler_options=compiler_options)
    return _Programs(cfg, donate, decoder=_programs(cfg.replace(chunks_per_step=1), donate, static_steps),
                     static_steps=static_steps, compiler_options=compiler_options)


class Mamba2LM:
    """Mamba2 implementing `sparse_prefix.protocol.RecurrentLM` (public).

    `prefill` and `decode` consume the `state` they are given (its buffers are donated to the
    result); keep a copy if you need it again, or build the model with `donate_state=False`.

    Args:
      config: the model. min_checkpoint_slots: non-empty checkpoint lists are padded to a power of
        two at least this large, so calls with 1..min_checkpoint_slots checkpoint slots share one
        compilation; a call without checkpoint slots (K = 0) is its own bucket, with no emission.
      donate_state: donate the state buffers to prefill / decode.
      step_loop: the prefill's loop over group steps (`chunking.STEP_LOOPS`): "dynamic" (counted on
        the device, one program per padded width), "static" (counted on the host, one program per
        step count, no host round trip per step), "auto" (static on a GPU). Same numbers either way.
      command_buffers: XLA command buffers (CUDA graphs) for the prefill program on a GPU: "on",
        "off" or "auto" (= "off": on an H200, with them on, the graph update at the start of every
        call left the GPU idle for 3-5 ms; off, mamba2-1.3b's 8192-token prefill read 0.5-2.2 ms
        faster in two runs; `chunking.prefill_compiler_options`).
        Same numbers either way; engines fusing the restore use the same options.
    """

    family = "mamba2"

    def __init__(self, config: Mamba2Config, *, min_checkpoint_slots: int = 4,
                 donate_state: bool = True, step_loop: str = "auto", command_buffers: str = "auto"):
        if not isinstance(config, Mamba2Config):
            raise TypeError(f"config must be a Mamba2Config, got {type(config).__name__}")
        if not isinstance(min_checkpoint_slots, int) or min_checkpoint_slots < 1:
            raise ValueError(f"min_checkpoint_slots must be a positive int, got {min_checkpoint_slots!r}")
        self.config = config
        self.min_checkpoint_slots = min_checkpoint_slots
        self.donate_state = bool(donate_state)
        self.step_loop = resolve_step_loop(step_loop)
        self.command_buffers = command_buffers
        self._programs = _programs(config, self.donate_state, self.step_loop == "static",
                                   prefill_compiler_options(command_buffers, auto_default="off"))
        self._abstract: dict[int, State] = {}

    chunk_size = property(lambda self: self.config.chunk_size)
    chunks_per_step = property(lambda self: self.config.chunks_per_step)
    vocab_size = property(lambda self: self.config.vocab_size)
    max_length = property(lambda self: self.config.max_length)
    dtype = property(lambda self: self.config.compute_dtype)

    @property
    def compile_count(self) -> int:
        """Traces of the jitted prefill and decode so far (shared by models of an equal config;
        decode also by models that differ only in `chunks_per_step`)."""
        return self._programs.compile_count

    def with_chunking(self, chunk_size: int | None = None, chunks_per_step: int | None = None
                      ) -> "Mamba2LM":
        """The same model (same params, slots and donation) with another chunk size C and/or chunks
        per step G. States are exchangeable only between models of one C and one G."""
        changes = {name: value for name, value in (("chunk_size", chunk_size),
                                                    ("chunks_per_step", chunks_per_step))
                   if value is not None}
        return Mamba2LM(self.config.replace(**changes), min_checkpoint_slots=self.min_checkpoint_slots,
                        donate_state=self.donate_state, step_loop=self.step_loop,
                        command_buffers=self.command_buffers)

    def init_params(self, key: Array) -> Mamba2Params:
        return init_mamba2_params(key, self.config)

    def prepare_params(self, params: Mamba2Params) -> Mamba2Params:
        """The serving layout of `params`: the layers as a tuple of per-layer `LayerParams`, so no
        program copies a layer's weights out of the stacked arrays (XLA does that once per call
        and layer otherwise: ~4 ms of a 66 ms mamba2-1.3b prefill of 8192 tokens on an H200).
        Every method takes either layout with the same numbers; the Engine prepares its params.
        It is a copy: drop the stacked params afterwards to keep one set of weights in memory."""
        if not isinstance(params, Mamba2Params):
            raise TypeError(f"params must be Mamba2Params, got {type(params).__name__}")
        if not isinstance(params.layers, LayerParams):
            return params
        return _sliced(params, self.config.n_layer)

    def init_state(self, batch: int) -> State:
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        return self._programs.init_state(int(batch))

    def abstract_state(self, batch: int) -> State:
        """The shapes and dtypes of `init_state(batch)` (jax.ShapeDtypeStruct leaves), no allocation."""
        if batch not in self._abstract:
            self._abstract[batch] = jax.eval_shape(functools.partial(self.init_state, batch))
        return self._abstract[batch]

    def prefill(self, params: Mamba2Params, tokens, state: State, checkpoints,
                lengths=None) -> tuple[Array, State, Checkpoints]:
        """See `RecurrentLM.prefill`. T is padded to C * 2^i and K > 0 to a power of two (no
        recompiles); K = 0 compiles a program without emission."""
        batch = np.shape(tokens)[0] if np.ndim(tokens) == 2 else None
        if batch is not None:
            check_state(state, self.abstract_state(batch))
        padded_tokens, padded_ckpts, lengths_np = self.prepare_prefill(
            tokens, checkpoints, lengths, None if batch is None else np.asarray(state.length))
        slots = np.shape(checkpoints)[-1] if np.ndim(checkpoints) else 0
        logits, final, emitted = self._programs.prefill(params, state, padded_tokens, lengths_np,
                                                        padded_ckpts)
        if padded_ckpts.shape[1] != slots:
            emitted = _first_slots(emitted, slots)
        return logits, final, emitted

    @property
    def prefill_program(self):
        """`FusablePrefill.prefill_program`: ``(params, tokens, state, checkpoints, lengths)``, the pure
        program `prefill` jits (same object each time)."""
        return self._programs.program

    @property
    def prefill_compiler_options(self) -> tuple:
        """The XLA compiler options `prefill` is jitted with ((name, value) pairs; engines that fuse
        the restore into the prefill jit theirs with the same)."""
        return self._programs.compiler_options

    def prepare_prefill(self, tokens, checkpoints, lengths=None, state_length=None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`FusablePrefill.prepare_prefill`: validated (tokens, checkpoints, lengths), T padded to
        C * 2^i (static step loop: to the steps the call needs, `chunking.padded_width`) and K to 0
        or a power of two >= min_checkpoint_slots (`chunking.prepare_prefill_args`)."""
        return prepare_prefill_args(self, tokens, checkpoints, lengths, state_length)

    def decode(self, params: Mamba2Params, token, state: State) -> tuple[Array, State]:
        """One token per row: token int32[B] -> (logits float32[B, V], next state)."""
        batch = np.shape(token)[0] if np.ndim(token) == 1 else -1
        if batch >= 0:
            check_state(state, self.abstract_state(batch))
        token_np = check_decode_args(token, batch=batch, vocab_size=self.vocab_size,
                                     max_length=self.max_length,
                                     state_length=None if batch < 0 else np.asarray(state.length))
        return self._programs.decode(params, state, token_np)

    def restore(self, state: State, checkpoints: Checkpoints, k) -> State:
        """The state at checkpoint slot k int32[B] of each row (see `protocol.restore_state`)."""
        return restore_state(state, checkpoints, k)

    def forward(self, params: Mamba2Params, tokens) -> Array:
        """Logits float32[B, T, V] at every position from a fresh state (training and references)."""
        tokens_np, _, _ = check_prefill_args(tokens, None, np.zeros((0,), np.int32),
                                             vocab_size=self.vocab_size, max_length=self.max_length)
        total = tokens_np.shape[1]
        padded = -(-total // self.chunk_size) * self.chunk_size
        tokens_np = np.pad(tokens_np, ((0, 0), (0, padded - total)))
        return self._programs.forward(params, tokens_np)[:, :total]

    def memory_profile(self) -> MemoryProfile:
        """Bytes and elements of one checkpoint (all layers' SSM state + conv window); no KV."""
        m = self.config.mixer
        ssm = self.config.n_layer * m.nheads * m.headdim * m.d_state
        conv = self.config.n_layer * (m.d_conv - 1) * m.conv_dim
        return MemoryProfile(checkpoint_elements=ssm + conv,
                             checkpoint_bytes=4 * ssm + conv * self.dtype.itemsize,
                             kv_elements_per_token=0, kv_bytes_per_token=0, ssm_elements=ssm)


register_family(Mamba2LM.family, lambda config: Mamba2LM(Mamba2Config.from_dict(config)))


# ----------------------------------------------------------------------------- presets


# Prefill chunking of the real presets: C = 256 (the exactness grid the engine snaps to, and the
# SSD quadratic block), G = 8 chunks per step = 2048 tokens: [2048, d] projections keep the tensor
# cores busy and 48 layers x ~25 kernels per step run a few times per 8k request instead of 32
# times; a call's idle tail is at most 7 chunks (a one-chunk call costs one 2048-token step, about
# what one 256-token step costs when launch-bound). Override with `with_chunking(C, G)`.
PRESET_CHUNK_SIZE, PRESET_CHUNKS_PER_STEP = 256, 8


def _state_spaces(d_model: int, n_layer: int) -> Mamba2Config:
    """A state-spaces/mamba2-* shape: vocab 50277 padded to a multiple of 16, tied embeddings."""
    return Mamba2Config(mixer=Mamba2MixerConfig(d_model=d_model), n_layer=n_layer, vocab_size=50288,
                        chunk_size=PRESET_CHUNK_SIZE, chunks_per_step=PRESET_CHUNKS_PER_STEP,
                        max_length=1 << 17)


_PRESET_SHAPES = {"mamba2-130m": (768, 24), "mamba2-370m": (1024, 48), "mamba2-780m": (1536, 48),
                  "mamba2-1.3b": (2048, 48), "mamba2-2.7b": (2560, 64)}

for _name, (_width, _depth) in _PRESET_SHAPES.items():
    register(_name)(lambda dtype, _w=_width, _d=_depth: Mamba2LM(
        _state_spaces(_w, _d).replace(dtype=jnp.dtype(dtype).name)))


@register("mamba2-tiny")
def _tiny(dtype) -> Mamba2LM:
    """Two layers, d 64, 8 heads of 16, state 16, two groups, vocab 512, chunk 16: for tests."""
    mixer = Mamba2MixerConfig(d_model=64, d_state=16, headdim=16, ngroups=2)
    return Mamba2LM(Mamba2Config(mixer=mixer, n_layer=2, vocab_size=512, chunk_size=16,
                                 max_length=4096, dtype=jnp.dtype(dtype).name))
