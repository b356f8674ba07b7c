"""The device side of a hybrid stack: layer params stacked per pattern unit, the group step, decode.

A pattern such as "GGGA" * 6 is a unit ("GGGA") repeated R (6) times. Parameters are stored stacked:
``params["layers"]`` is a tuple with one dict per unit position, every leaf with a leading [R] axis,
so the prefill runs the unit once per repeat in a `lax.scan` (one compiled unit body, not 24 unrolled
layers). `stack_layers` / `unstack_layers` convert from / to one dict per layer. `per_layer_params`
gives every layer its own arrays (``params["per_layer"]``); the group step then runs the layers
unrolled, with no per-step slicing of stacked weights (longer compiles; see `HybridLM.per_layer_params`).

Inside a prefill the state travels in the *unit layout* (`to_unit_state`), converted once per call:
  * recurrent: one `RecurrentState` per recurrent unit position, leaves [B, R, ...] (batch first, as
    `sparse_prefix.chunking.run_chunks` stacks emitted states on axis 1);
  * kv: one `KVCache` per attention unit position, leaves [R, B, S, Hkv, D], written and read in
    place at the scanned layer index.
The protocol's `State` (one entry per layer) is what callers see (`from_unit_state`).

Shapes: see `sparse_prefix.protocol`; G chunks per step, R repeats of the unit, P = len(unit).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from sparse_prefix.chunking import EmitTarget, EmittingGroupStep, write_emitted, zeroed_buffers
from sparse_prefix.protocol import KVCache, State

from . import mixers
from .gated_deltanet import rule_precision, use_pallas_recurrence
from .pallas_common import padding_zeroed_buffers
from .layers import embed_lookup, head_logits, normal_init, rms_norm
from .mlp import init_mlp_params, swiglu

Array = jax.Array
PER_LAYER = "per_layer"     # the per-layer layout's key (`HybridStack.per_layer_params`)


@functools.partial(jax.jit, static_argnums=1)
def _unstack_copies(stacked: tuple, repeats: int) -> tuple:
    """Stacked unit layers (one dict per unit position, leaves [R, ...]) -> one dict per pattern
    layer, each leaf its own array (one dispatch)."""
    return tuple(jax.tree_util.tree_map(lambda leaf: leaf[r], unit_layer)
                 for r in range(repeats) for unit_layer in stacked)


def pattern_unit(pattern: str) -> tuple[str, int]:
    """The shortest unit u with pattern == u * R, and R ("GGGAGGGA" -> ("GGGA", 2))."""
    size = len(pattern)
    for width in range(1, size + 1):
        if size % width == 0 and pattern[:width] * (size // width) == pattern:
            return pattern[:width], size // width
    raise ValueError(f"pattern must be a non-empty string, got {pattern!r}")


class HybridStack:
    """Pure functions of (params, state, inputs) for one hybrid config (`hybrid.HybridConfig`).

    Args:
      config: the stack (its dtype is the compute dtype).  backend: "chunked" or "sequential" (GDN).
    """

    def __init__(self, config: Any, backend: str):
        self.config = config
        self.backend = backend
        self.dtype = jnp.dtype(config.dtype)
        self.unit, self.repeats = pattern_unit(config.pattern)
        self.kinds = tuple(mixers.KINDS[letter] for letter in self.unit)
        counters, slots = {True: 0, False: 0}, []
        for kind in self.kinds:           # index of each unit position among its kind in the unit
            slots.append(counters[kind.recurrent])
            counters[kind.recurrent] += 1
        self.slots = tuple(slots)
        self.unit_recurrent, self.unit_kv = counters[True], counters[False]

    # ------------------------------------------------------------------ parameters

    def layer_index(self, layer: int) -> tuple[int, int]:
        """(repeat r, unit position p) of pattern layer `layer` = r * P + p."""
        return divmod(layer, len(self.unit))

    def state_index(self, layer: int) -> int:
        """The entry of pattern layer `layer` in State.recurrent or State.kv (by its kind)."""
        repeat, position = self.layer_index(layer)
        per_unit = self.unit_recurrent if self.kinds[position].recurrent else self.unit_kv
        return repeat * per_unit + self.slots[position]

    def stack_layers(self, layers: Sequence[dict]) -> tuple:
        """One dict per pattern layer -> ``params["layers"]``: one dict per unit position, leaves [R, ...]."""
        if len(layers) != len(self.config.pattern):
            raise ValueError(f"expected {len(self.config.pattern)} layers, got {len(layers)}")
        width = len(self.unit)
        return tuple(jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *layers[p::width])
                     for p in range(width))

    def unstack_layers(self, stacked: Sequence[dict]) -> tuple:
        """``params["layers"]`` -> one dict per pattern layer (inverse of `stack_layers`)."""
        return tuple(self.layer_params({"layers": stacked}, layer)
                     for layer in range(len(self.config.pattern)))

    def layer_params(self, params: dict, layer: int) -> dict:
        """The parameters of pattern layer `layer` (a static slice of the stacked leaves, or the
        layer's own dict in the layout of `per_layer_params`)."""
        if PER_LAYER in params:
            return params[PER_LAYER][layer]
        repeat, position = self.layer_index(layer)
        return jax.tree_util.tree_map(lambda leaf: leaf[repeat], params["layers"][position])

    def per_layer_params(self, params: dict) -> dict:
        """The per-layer layout: ``params["layers"]`` (stacked per unit position) replaced by
        ``params["per_layer"]``, one dict per pattern layer with its own arrays. The group step then
        runs the layers unrolled and reads every weight where it lies (a scan over the stacked unit
        slices each layer's weights out of the stack on every step). Same numbers either way."""
        if not isinstance(params, dict) or ("layers" not in params and PER_LAYER not in params):
            raise TypeError("params must be a hybrid parameter dict with 'layers' (stacked) or "
                            f"'{PER_LAYER}', got {type(params).__name__}")
        if PER_LAYER in params:
            return params
        layers = _unstack_copies(params["layers"], self.repeats)
        prepared = {name: value for name, value in params.items() if name != "layers"}
        prepared[PER_LAYER] = layers
        return prepared

    def init_params(self, key: Array) -> dict:
        """Random parameters: embed [V, d], layers (stacked, see the module docstring), final_norm [d],
        lm_head [d, V] when the head is untied."""
        cfg, dtype = self.config, self.dtype
        keys = jax.random.split(key, len(cfg.pattern) + 2)
        norm = jnp.full((cfg.d_model,), 1.0 - cfg.norm_offset, dtype)
        layers = []
        for letter, layer_key in zip(cfg.pattern, keys[2:]):
            mixer_key, mlp_key = jax.random.split(layer_key)
            layers.append({"input_norm": norm,
                           "mixer": mixers.KINDS[letter].init_params(mixer_key, cfg, letter, dtype),
                           "post_norm": norm,
                           "mlp": init_mlp_params(mlp_key, cfg.d_model, cfg.d_ff, dtype)})
        params = {"embed": normal_init(keys[0], (cfg.vocab_size, cfg.d_model), 0.02, dtype),
                  "layers": self.stack_layers(layers), "final_norm": norm}
        if not cfg.tie_embeddings:
            params["lm_head"] = normal_init(keys[1], (cfg.d_model, cfg.vocab_size), 0.02, dtype)
        return params

    # ------------------------------------------------------------------ state

    def init_state(self, batch: int) -> State:
        """Zero state for `batch` rows: recurrent states, KV buffers [B, S, Hkv, D], length 0."""
        recurrent, kv = [], []
        for letter in self.config.pattern:
            kind = mixers.KINDS[letter]
            (recurrent if kind.recurrent else kv).append(
                kind.init_state(self.config, letter, batch, self.dtype))
        return State(recurrent=tuple(recurrent), kv=tuple(kv) if kv else None,
                     length=jnp.zeros((batch,), jnp.int32))

    def to_unit_state(self, state: State) -> State:
        """Per-layer `State` -> the unit layout (module docstring). One copy of every buffer (none
        when R = 1)."""
        repeats, n_rec, n_kv = self.repeats, self.unit_recurrent, self.unit_kv
        recurrent = tuple(
            jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves, axis=1),
                                   *[state.recurrent[r * n_rec + j] for r in range(repeats)])
            for j in range(n_rec))
        kv = tuple(KVCache(*(jnp.stack([state.kv[r * n_kv + j][field] for r in range(repeats)])
                             for field in range(2)))
                   for j in range(n_kv))
        return State(recurrent=recurrent, kv=kv or None, length=state.length)

    def unstack_recurrent(self, recurrent: tuple, axis: int = 1) -> tuple:
        """Unit-layout recurrent states (R on `axis`) -> one entry per recurrent layer."""
        return tuple(jax.tree_util.tree_map(lambda leaf: jnp.take(leaf, r, axis=axis), recurrent[j])
                     for r in range(self.repeats) for j in range(self.unit_recurrent))

    def from_unit_state(self, unit_state: State, before: State, width: int) -> State:
        """The unit layout -> per-layer `State` after a prefill call.

        Args:
          unit_state: the call's final state in the unit layout.
          before: the per-layer state the call started from (its KV buffers, donated, receive the
            call's positions; with R = 1 the stacked buffers are returned as they are).
          width: T, the call's token width: only positions [before.length, + T) were written.
        """
        recurrent = self.unstack_recurrent(unit_state.recurrent)
        if unit_state.kv is None:
            return State(recurrent=recurrent, kv=None, length=unit_state.length)
        if self.repeats == 1:
            kv = tuple(KVCache(cache.k[0], cache.v[0]) for cache in unit_state.kv)
            return State(recurrent=recurrent, kv=kv, length=unit_state.length)
        rows = jnp.arange(before.length.shape[0])[:, None]
        written = before.length.astype(jnp.int32)[:, None] + jnp.arange(width, dtype=jnp.int32)
        max_length = unit_state.kv[0].k.shape[2]
        source = jnp.minimum(written, max_length - 1)
        kv = []
        for r in range(self.repeats):
            for j in range(self.unit_kv):
                stacked, old = unit_state.kv[j], before.kv[r * self.unit_kv + j]
                kv.append(KVCache(*(old_leaf.at[rows, written].set(new_leaf[r, rows, source], mode="drop")
                                    for old_leaf, new_leaf in zip(old, stacked))))
        return State(recurrent=recurrent, kv=tuple(kv), length=unit_state.length)

    # ------------------------------------------------------------------ compute

    def _norm(self, x: Array, weight: Array) -> Array:
        return rms_norm(x, weight, self.config.norm_eps, offset=self.config.norm_offset)

    def logits(self, params: dict, hidden: Array) -> Array:
        """hidden [..., d] (final-normed) -> f32[..., V]."""
        hidden = hidden.astype(self.dtype)
        if self.config.tie_embeddings:
            return head_logits(hidden, params["embed"].astype(self.dtype), vocab_major=True)
        return head_logits(hidden, params["lm_head"].astype(self.dtype), vocab_major=False)

    def _block(self, layer: dict, x: Array, mixed: Array) -> Array:
        """Residual around the mixer output, then the pre-norm SwiGLU residual."""
        x = x + mixed.astype(x.dtype)
        return x + swiglu(layer["mlp"], self._norm(x, layer["post_norm"]))

    def group_step(self, params: dict, state: State, tokens: Array, positions: Array, valid: Array,
                   want_boundaries: bool) -> tuple[State, Array, tuple | None]:
        """The group step of `run_chunks`: G consecutive chunks through every layer.

        Args:
          params: stacked parameters, or the per-layer layout (`per_layer_params`).
          state: the unit layout (module docstring).
          tokens, positions: int32[B, G, C].  valid: bool[B, G, C] (a prefix of every chunk).
          want_boundaries: return the recurrent state after each chunk (static).

        Returns:
          (state, final-normed hidden [B, G, C, d], boundaries: the unit-layout recurrent tuple with
          leaves [B, G, R, ...], or None). Padded slots leave the state exactly unchanged.
        """
        return self._layers(params, state, tokens, positions, valid, want_boundaries, None, None)

    def emitting_step(self, params: dict) -> EmittingGroupStep:
        """The group step as an `EmittingGroupStep` of `run_chunks` (what `HybridLM.prefill` runs):
        the checkpoint buffers (the unit layout's recurrent tuple with leaves [B, K, R, ...]) travel
        through the layer loop and every recurrent layer writes its emitted states into them in
        place (`EmitTarget`; the GDN recursion kernel from inside its loop), instead of the layer
        scan stacking every chunk's states for one transpose and scatter per step."""

        def step(state, tokens, positions, valid, buffers, slot):
            return self._layers(params, state, tokens, positions, valid, False, buffers, slot)

        def init_padding(state, real):
            """One launch that zeroes only the padding slots (`padding_zeroed_buffers`); every
            recurrent layer writes every real slot once."""
            leaves, tree = jax.tree_util.tree_flatten(state.recurrent)
            buffers = padding_zeroed_buffers([(leaf.shape[1:], leaf.dtype) for leaf in leaves], real)
            return jax.tree_util.tree_unflatten(tree, buffers)

        return EmittingGroupStep(step, zeroed_buffers, lambda buffers: buffers,
                                 init_padding if self.uses_kernels() else None, any_group=True)

    def uses_kernels(self) -> bool:
        """Whether the prefill runs Pallas kernels (the GDN recursion resolves to its kernel): then
        the checkpoint buffers start from one padding-zeroing launch instead of a fill of zeros."""
        gdn = self.config.gdn
        if gdn is None or not any(letter == "G" for letter in self.unit):
            return False
        return use_pallas_recurrence(gdn.recurrence, gdn.sub_chunk, gdn.head_k_dim, gdn.head_v_dim,
                                     rule_precision(self.dtype))

    def _layers(self, params: dict, state: State, tokens: Array, positions: Array, valid: Array,
                want_boundaries: bool, buffers: tuple | None, emit_slot: Array | None
                ) -> tuple[State, Array, tuple | None]:
        """Every layer on G chunks; returns (state, hidden, boundaries or the written buffers).
        `buffers` (leaves [B, K, R, ...]) with `emit_slot` int32[B, G]: write the emitted states."""
        cfg = self.config
        x = embed_lookup(params["embed"], tokens).astype(self.dtype)
        emitting = buffers is not None

        def unit(carry, inputs):
            x, kv, repeat, buffers = carry
            layers, recurrent = inputs
            kv, recurrent, bounds = list(kv), list(recurrent), [None] * self.unit_recurrent
            buffers = list(buffers) if emitting else None
            for position, (letter, kind, slot) in enumerate(zip(self.unit, self.kinds, self.slots)):
                layer = layers[position]
                held = recurrent if kind.recurrent else kv
                args = (layer["mixer"], cfg, letter, self._norm(x, layer["input_norm"]), held[slot],
                        positions, valid, self.backend)
                if emitting and kind.recurrent and kind.group_emit is not None:
                    mixed, held[slot], buffers[slot] = kind.group_emit(
                        *args, EmitTarget(buffers[slot], emit_slot, repeat))
                else:
                    mixed, held[slot], bound = kind.group(*args, want_boundaries or emitting, repeat)
                    if emitting and kind.recurrent:
                        buffers[slot] = write_emitted(buffers[slot], bound, emit_slot, repeat)
                    elif kind.recurrent:
                        bounds[slot] = bound
                x = self._block(layer, x, mixed)
            outputs = (tuple(recurrent), tuple(bounds) if want_boundaries else None)
            return (x, tuple(kv), repeat + 1, tuple(buffers) if emitting else None), outputs

        if cfg.scan_layers and PER_LAYER not in params:
            recurrent = jax.tree_util.tree_map(lambda leaf: jnp.moveaxis(leaf, 1, 0), state.recurrent)
            carry = (x, state.kv or (), jnp.zeros((), jnp.int32), buffers)
            (x, kv, _, buffers), (recurrent, bounds) = jax.lax.scan(
                unit, carry, (params["layers"], recurrent))
            recurrent = jax.tree_util.tree_map(lambda leaf: jnp.moveaxis(leaf, 0, 1), recurrent)
            if want_boundaries:
                bounds = jax.tree_util.tree_map(lambda leaf: jnp.moveaxis(leaf, 0, 2), bounds)
        else:  # unrolled in Python: per-layer (or static slices of the stacked) weights, states, KV
            kv, per_repeat, width = state.kv or (), [], len(self.unit)
            for r in range(self.repeats):
                if PER_LAYER in params:
                    layers = params[PER_LAYER][r * width:(r + 1) * width]
                else:
                    layers = jax.tree_util.tree_map(lambda leaf: leaf[r], params["layers"])
                recurrent = jax.tree_util.tree_map(lambda leaf: leaf[:, r], state.recurrent)
                (x, kv, _, buffers), outputs = unit((x, kv, r, buffers), (layers, recurrent))
                per_repeat.append(outputs)
            recurrent = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves, axis=1),
                                               *[out[0] for out in per_repeat])
            bounds = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves, axis=2),
                                            *[out[1] for out in per_repeat]) if want_boundaries else None
        state = state._replace(recurrent=recurrent, kv=kv or None)
        return state, self._norm(x, params["final_norm"]), buffers if emitting else bounds

    def token_step(self, params: dict, state: State, token: Array) -> tuple[Array, State]:
        """One token per row at position state.length: token int32[B] -> (logits f32[B, V], state).

        Decode keeps the per-layer `State` and runs the layers unrolled (no buffer is stacked per
        token)."""
        position = state.length.astype(jnp.int32)
        recurrent, kv = list(state.recurrent), list(state.kv or ())
        x = embed_lookup(params["embed"], token).astype(self.dtype)
        for layer_index, letter in enumerate(self.config.pattern):
            kind, layer = mixers.KINDS[letter], self.layer_params(params, layer_index)
            held, index = (recurrent if kind.recurrent else kv), self.state_index(layer_index)
            mixed, held[index] = kind.step(layer["mixer"], self.config, letter,
                                           self._norm(x, layer["input_norm"]), held[index], position)
            x = self._block(layer, x, mixed)
        state = State(recurrent=tuple(recurrent), kv=tuple(kv) if kv else None, length=position + 1)
        return self.logits(params, self._norm(x, params["final_norm"])), state
