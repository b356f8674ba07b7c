"""Gated full attention (Qwen3.5): grouped KV heads, partial rotary, q/k RMSNorm, sigmoid output gate.

The KV cache is a `KVCache(k, v)` of dense [B, S, Hkv, D] buffers indexed by absolute position. A chunk
writes the K/V of its valid slots at their positions (padded slots write nothing), then every query
attends to the WHOLE fixed buffer with the mask key_position <= query_position. Entries beyond that
(stale or never written) get probability exactly 0 and their V is zeroed before the product, so they
can neither contribute nor turn the output into NaN. Because each chunk's computation has the same
shapes whatever came before, a resume on the chunk grid is bitwise identical to the uncached run.

Two ways to read the buffer (`AttentionConfig.key_block`):
  * dense (key_block = 0): one softmax over all S positions. A chunk always touches all S keys, so a
    prefill of L tokens costs O(L * S) however short L is.
  * blocked (key_block = Bk, S a multiple of Bk): an online softmax over absolute key blocks
    0, 1, ..., (the chunk's last position) // Bk, always in that order, so a prefill costs
    O(L^2 / 2 + L * Bk). A block lying wholly beyond a row's positions (visited because a batch-mate
    reaches further) is an exact no-op for that row (scores -inf, probabilities 0, V zeroed, the
    running max unchanged), so the bitwise resume property holds whatever the batch-mates are.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparse_prefix.protocol import KVCache

from . import attention_pallas
from .layers import normal_init, rms_norm

Array = jax.Array
KERNELS = ("xla", "pallas", "auto")
PALLAS_KEY_BLOCK = 64        # keys per step of the Pallas kernel's loop (head_dim 256 fits 64 x 256 tiles)
# programs per query block of the Pallas read (AttentionConfig.key_parts). 4 parts read one chunk at
# depth 7936 in 75 vs 279 us per layer on an H200 (qwen3.5-0.8b; `experiments/bench_attention.py`)
# but slowed the whole 8192-token prefill by ~5% and, with them, the model's one-chunk calls no
# longer matched its 4-chunk steps bit for bit on the GPU (BENCHMARKS.md, ninth session): 1.
PALLAS_KEY_PARTS = 1


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Shape of one gated attention layer (Qwen3.5 names in brackets).

    Attributes:
      d_model: d [hidden_size].  num_heads: H [num_attention_heads].
      num_kv_heads: Hkv [num_key_value_heads], divides H.  head_dim: D [head_dim].
      rotary_dim: the leading dims of each head that rotate [head_dim * partial_rotary_factor], even.
      rope_theta: the rotary base [rope_parameters.rope_theta].
      norm_eps: q/k RMSNorm eps [rms_norm_eps].  norm_offset: 1.0 for (1 + w) norms (Qwen3.5).
      qk_norm: RMSNorm q and k per head.  output_gate: q_proj also yields a sigmoid gate per channel.
      key_block: Bk of the blocked buffer read (0 = dense; module docstring). The model's max_length
        must be a multiple of it.
      kernel: how the buffer is read: "xla" (the dense or blocked read above), "pallas" (one
        Triton kernel per read that loops over key blocks on the device: no host round trip per key
        block on a GPU; `attention_pallas`; Pallas' interpreter off the GPU), or "auto" ("pallas"
        where the default backend is a GPU, else "xla"). "pallas" falls back to "xla" on shapes
        the kernel does not take (`attention_pallas.supported`).
      key_parts: P of the Pallas read: a query block's key blocks dealt by index modulo P to P
        programs, their softmaxes merged in a fixed order (`attention_pallas`). It sets the order
        of the sums, so it is part of the model's numbers (every call of a model uses the same P,
        which keeps resumes bitwise); P > 1 spreads a short deep read (a resumed one-chunk suffix)
        over P times as many programs. The XLA reads ignore it.
    """

    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float = 10_000_000.0
    norm_eps: float = 1e-6
    norm_offset: float = 1.0
    qk_norm: bool = True
    output_gate: bool = True
    key_block: int = 0
    kernel: str = "xla"
    key_parts: int = PALLAS_KEY_PARTS

    def __post_init__(self):
        for name in ("d_model", "num_heads", "num_kv_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"AttentionConfig.{name} must be a positive int, got "
                                 f"{getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"AttentionConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if not isinstance(self.key_block, int) or self.key_block < 0:
            raise ValueError(f"AttentionConfig.key_block must be an int >= 0, got {self.key_block!r}")
        if isinstance(self.key_parts, bool) or not isinstance(self.key_parts, int) or self.key_parts < 1:
            raise ValueError(f"AttentionConfig.key_parts must be an int >= 1, got {self.key_parts!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"AttentionConfig.kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= self.head_dim:
            raise ValueError(f"AttentionConfig.rotary_dim must be even and in 0..{self.head_dim}, "
                             f"got {self.rotary_dim}")


def init_attention_params(key: Array, cfg: AttentionConfig, dtype) -> dict:
    """Random parameters: q_proj [d, H*D*(2 if gate)] (per head: D query then D gate channels, as HF),
    k_proj / v_proj [d, Hkv*D], o_proj [H*D, d], q_norm / k_norm [D] (zeros: (1 + w) norms)."""
    keys = jax.random.split(key, 4)
    std = 0.02
    q_width = cfg.num_heads * cfg.head_dim * (2 if cfg.output_gate else 1)
    params = {
        "q_proj": normal_init(keys[0], (cfg.d_model, q_width), std, dtype),
        "k_proj": normal_init(keys[1], (cfg.d_model, cfg.num_kv_heads * cfg.head_dim), std, dtype),
        "v_proj": normal_init(keys[2], (cfg.d_model, cfg.num_kv_heads * cfg.head_dim), std, dtype),
        "o_proj": normal_init(keys[3], (cfg.num_heads * cfg.head_dim, cfg.d_model), std, dtype),
    }
    if cfg.qk_norm:
        norm_init = 1.0 - cfg.norm_offset
        params["q_norm"] = jnp.full((cfg.head_dim,), norm_init, dtype)
        params["k_norm"] = jnp.full((cfg.head_dim,), norm_init, dtype)
    return params


def init_kv_cache(cfg: AttentionConfig, batch: int, max_length: int, dtype) -> KVCache:
    """Zero K/V buffers [B, S, Hkv, D]."""
    shape = (batch, max_length, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def rotary(x: Array, positions: Array, rotary_dim: int, theta: float) -> Array:
    """Rotate-half RoPE on the first `rotary_dim` dims of x [B, T, heads, D] at int32 positions [B, T].

    Angles are computed in float32; the result is cast back to x.dtype.
    """
    if rotary_dim == 0:
        return x
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq           # [B, T, half]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :].astype(x.dtype)
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :].astype(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    return jnp.concatenate([rot * cos + rotated_half * sin, rest], axis=-1)


def _project(params: dict, cfg: AttentionConfig, x: Array, positions: Array):
    """x [B, T, d] -> (q [B, T, H, D], k, v [B, T, Hkv, D], gate [B, T, H*D] or None), rotated."""
    batch, length, _ = x.shape
    dtype = x.dtype
    q = jnp.einsum("btd,de->bte", x, params["q_proj"].astype(dtype))
    gate = None
    if cfg.output_gate:
        q = q.reshape(batch, length, cfg.num_heads, 2 * cfg.head_dim)
        q, gate = q[..., :cfg.head_dim], q[..., cfg.head_dim:]
        gate = gate.reshape(batch, length, cfg.num_heads * cfg.head_dim)
    else:
        q = q.reshape(batch, length, cfg.num_heads, cfg.head_dim)
    k = jnp.einsum("btd,de->bte", x, params["k_proj"].astype(dtype))
    v = jnp.einsum("btd,de->bte", x, params["v_proj"].astype(dtype))
    k = k.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, params["q_norm"], cfg.norm_eps, offset=cfg.norm_offset)
        k = rms_norm(k, params["k_norm"], cfg.norm_eps, offset=cfg.norm_offset)
    q = rotary(q, positions, cfg.rotary_dim, cfg.rope_theta)
    k = rotary(k, positions, cfg.rotary_dim, cfg.rope_theta)
    return q, k, v, gate


def _buffer_shape(cache: KVCache, layer) -> tuple[int, int]:
    """(B, S) of a cache: leaves [B, S, Hkv, D], or [R, B, S, Hkv, D] read at `layer` (not None)."""
    return cache.k.shape[:2] if layer is None else cache.k.shape[1:3]


def _read(buffer: Array, layer, start, size: int) -> Array:
    """Positions [start, start + size) of one layer's buffer: [B, size, Hkv, D] (no full copy)."""
    if layer is None:
        return jax.lax.dynamic_slice_in_dim(buffer, start, size, axis=1)
    zero = jnp.zeros((), jnp.int32)
    origin = (jnp.asarray(layer, jnp.int32), zero, jnp.asarray(start, jnp.int32), zero, zero)
    return jax.lax.dynamic_slice(buffer, origin, (1,) + buffer.shape[1:2] + (size,)
                                 + buffer.shape[3:])[0]


def write_kv(cache: KVCache, k: Array, v: Array, positions: Array, valid: Array,
             layer: Array | None = None) -> KVCache:
    """Scatter k, v [B, T, Hkv, D] to buffer rows `positions` [B, T]; invalid slots write nothing.

    With `layer` (int32[]), the cache leaves are [R, B, S, Hkv, D] (the layers of a scanned stack)
    and only layer `layer` is written, in place.
    """
    batch, max_length = _buffer_shape(cache, layer)
    target = jnp.where(valid, positions, max_length)           # out of range -> dropped
    rows = jnp.arange(batch)[:, None]
    index = (rows, target) if layer is None else (layer, rows, target)
    return KVCache(k=cache.k.at[index].set(k.astype(cache.k.dtype), mode="drop"),
                   v=cache.v.at[index].set(v.astype(cache.v.dtype), mode="drop"))


def _grouped_scores(q: Array, k: Array) -> Array:
    """q [B, T, Hkv, G, D], k [B, S', Hkv, D] -> float32 scores [B, Hkv, G, T, S'] (scaled by D^-1/2)."""
    return jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                      preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)


def _grouped_values(weights: Array, v: Array) -> Array:
    """weights [B, Hkv, G, T, S'] (compute dtype), v [B, S', Hkv, D] -> float32 [B, T, Hkv, G, D]."""
    return jnp.einsum("bkgts,bskd->btkgd", weights, v, preferred_element_type=jnp.float32)


def attend(q: Array, cache: KVCache, positions: Array, key_block: int = 0,
           layer: Array | None = None, kernel: str = "xla", parts: int = 1) -> Array:
    """Queries q [B, T, H, D] against the buffer, keys at positions <= the query's own.

    `layer` (int32[]) selects one layer of a stacked cache ([R, B, S, Hkv, D] leaves; see `write_kv`).
    Returns [B, T, H*D] in q.dtype. Dense: softmax in float32 (HF's order: scores * D^-1/2, softmax,
    cast, times V). Blocked (key_block > 0): the same softmax accumulated block by block. With
    kernel "pallas" (and a shape `attention_pallas.supported` takes) the blocked read runs as one
    kernel with blocks of `PALLAS_KEY_BLOCK` keys, whatever key_block is, dealt to `parts`
    programs per query block.
    """
    batch, length, heads, dim = q.shape
    kv_heads = cache.k.shape[-2]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)
    max_length = _buffer_shape(cache, layer)[1]
    if kernel == "auto":
        kernel = "pallas" if jax.default_backend() == "gpu" else "xla"
    if kernel == "pallas" and attention_pallas.supported(dim, max_length, PALLAS_KEY_BLOCK):
        out = attention_pallas.attend_pallas(q, cache.k, cache.v, positions, layer,
                                             block_k=PALLAS_KEY_BLOCK, parts=parts)
    elif key_block:
        out = _attend_blocked(q, cache, positions, key_block, layer)
    else:
        out = _attend_dense(q, cache, positions, layer)
    return out.astype(q.dtype).reshape(batch, length, heads * dim)


def _attend_dense(q: Array, cache: KVCache, positions: Array, layer) -> Array:
    max_length = _buffer_shape(cache, layer)[1]
    keys, values = (_read(buffer, layer, 0, max_length) for buffer in cache)
    scores = _grouped_scores(q, keys)
    key_pos = jnp.arange(max_length, dtype=jnp.int32)
    allowed = key_pos[None, None, :] <= positions[:, :, None]                # [B, T, S]
    scores = jnp.where(allowed[:, None, None], scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(scores - top)
    weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    reachable = key_pos[None, :] <= jnp.max(positions, axis=1)[:, None]      # [B, S]
    values = jnp.where(reachable[:, :, None, None], values.astype(q.dtype), 0)
    return _grouped_values(weights.astype(q.dtype), values)


def _attend_blocked(q: Array, cache: KVCache, positions: Array, block: int, layer) -> Array:
    batch, length, kv_heads, group, dim = q.shape
    max_length = _buffer_shape(cache, layer)[1]
    if max_length % block:
        raise ValueError(f"KV buffer length {max_length} is not a multiple of key_block {block}")
    last = jnp.max(positions, axis=1)                                        # [B]
    num_blocks = jnp.max(last) // block + 1
    stats = (batch, kv_heads, group, length, 1)

    def body(carry):
        index, top, total, acc = carry
        start = index * block
        k = _read(cache.k, layer, start, block)
        v = _read(cache.v, layer, start, block)
        key_pos = start + jnp.arange(block, dtype=jnp.int32)
        allowed = key_pos[None, None, :] <= positions[:, :, None]            # [B, T, Bk]
        scores = jnp.where(allowed[:, None, None], _grouped_scores(q, k), -jnp.inf)
        new_top = jnp.maximum(top, jnp.max(scores, axis=-1, keepdims=True))
        safe_top = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
        rescale = jnp.exp(jnp.where(jnp.isfinite(top), top - safe_top, -jnp.inf))
        weights = jnp.exp(scores - safe_top)
        total = total * rescale + jnp.sum(weights, axis=-1, keepdims=True)
        values = jnp.where((key_pos[None, :] <= last[:, None])[:, :, None, None], v.astype(q.dtype), 0)
        # acc is [B, T, Hkv, G, D]; the softmax statistics are [B, Hkv, G, T, 1].
        to_acc = lambda x: jnp.moveaxis(x[..., 0], 3, 1)[..., None]  # noqa: E731
        acc = acc * to_acc(rescale) + _grouped_values(weights.astype(q.dtype), values)
        return index + 1, new_top, total, acc

    init = (jnp.zeros((), jnp.int32), jnp.full(stats, -jnp.inf, jnp.float32),
            jnp.zeros(stats, jnp.float32), jnp.zeros((batch, length, kv_heads, group, dim), jnp.float32))
    _, _, total, acc = jax.lax.while_loop(lambda carry: carry[0] < num_blocks, body, init)
    total = jnp.moveaxis(total[..., 0], 3, 1)[..., None]
    return acc / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)


def _output(params: dict, cfg: AttentionConfig, out: Array, gate: Array | None) -> Array:
    if gate is not None:
        out = (out * jax.nn.sigmoid(gate.astype(jnp.float32))).astype(out.dtype)
    return jnp.einsum("bte,ed->btd", out, params["o_proj"].astype(out.dtype))


def read_positions(positions: Array, valid: Array) -> Array:
    """The positions a chunk's queries read at: padded slots at -1, so they read no key at all.

    A padded slot's own position is the call's base (`chunking.run_chunks`), so reading there made
    every all-padding block of query rows walk the whole prefix in the kernel (a 256-token suffix
    of a 1024-slot step resumed at 7936 read ~4x the keys it needed). Real rows are unchanged: a
    key block's loop count is set by the deepest real row, and a row's output never depends on the
    other rows (module docstring). positions int32[B, T], valid bool[B, T] -> int32[B, T].
    """
    return jnp.where(valid, positions, -1)


def attention_chunk(params: dict, cfg: AttentionConfig, x: Array, cache: KVCache, positions: Array,
                    valid: Array, layer: Array | None = None) -> tuple[Array, KVCache]:
    """Gated attention over T query slots (one chunk, or the G chunks of a group flattened).

    Args:
      x: [B, T, d] (normed, compute dtype).  cache: KVCache [B, S, Hkv, D] (or [R, B, S, Hkv, D]
        with `layer`, see `write_kv`).  positions: int32[B, T] absolute positions of the slots.
      valid: bool[B, T] (a prefix of every chunk).  layer: int32[] for a stacked cache, else None.

    Returns:
      (y [B, T, d] (garbage at padded slots), cache with the valid slots' K/V written). All K/V
      are written before any query reads, and the key loop runs over blocks 0 .. (the last real
      position in x) // Bk: a query's result is the same whatever else x holds. Padded slots
      read no key (`read_positions`).
    """
    q, k, v, gate = _project(params, cfg, x, positions)
    cache = write_kv(cache, k, v, positions, valid, layer)
    out = attend(q, cache, read_positions(positions, valid), cfg.key_block, layer, cfg.kernel,
                 cfg.key_parts)
    return _output(params, cfg, out, gate), cache


def attention_group(params: dict, cfg: AttentionConfig, x: Array, cache: KVCache, positions: Array,
                    valid: Array, layer: Array | None = None) -> tuple[Array, KVCache]:
    """Gated attention over G consecutive chunks at once: x [B, G, C, d], positions int32[B, G, C],
    valid bool[B, G, C] -> (y [B, G, C, d], cache). The K/V of every valid slot of the G chunks are
    written at their absolute positions, then all G*C queries read (`attention_chunk`)."""
    batch, group, chunk = valid.shape
    flat = lambda t: t.reshape((batch, group * chunk) + t.shape[3:])  # noqa: E731
    y, cache = attention_chunk(params, cfg, flat(x), cache, flat(positions), flat(valid), layer)
    return y.reshape(x.shape[:3] + y.shape[2:]), cache


def attention_step(params: dict, cfg: AttentionConfig, x: Array, cache: KVCache, position: Array
                   ) -> tuple[Array, KVCache]:
    """One token: x [B, d] at absolute position int32[B] -> (y [B, d], cache)."""
    y, cache = attention_chunk(params, cfg, x[:, None, :], cache, position[:, None],
                               jnp.ones((x.shape[0], 1), bool))
    return y[:, 0], cache
