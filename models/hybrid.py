"""Hybrid stacks from a layer pattern (Qwen3.5's "GGGA" groups; Mamba2 + attention), and their presets.

Every layer is pre-norm: x += mixer(norm(x)); x += SwiGLU(norm(x)). Mixers, one letter per layer:
  G  Gated DeltaNet (`gated_deltanet`)      -> a RecurrentState in State.recurrent
  A  gated full attention (`attention`)     -> a KVCache in State.kv
  M  Mamba2 SSD (`mamba2`)                  -> a RecurrentState in State.recurrent
then a final norm and the LM head (tied to the embedding or not). Compute runs in the model's dtype
(bf16 by default); recurrent states are float32; norms and softmax reduce in float32.

`HybridLM` implements `sparse_prefix.protocol.RecurrentLM`: a group step (`hybrid_stack.HybridStack`:
every layer on G = `chunks_per_step` chunks at once, the repeated pattern unit run by a `lax.scan`)
drives `run_chunks` (every recurrent layer's state emitted at the checkpoints in the same pass, the KV
once in the final state); `restore` sets the recurrent part and `length` (the KV needs no copy).
Calls are padded to bucketed shapes (T to C * 2^i, K to 0 or a power of two), so the number of
compilations stays small: `compile_count`.

Parameters are stacked per pattern unit (see `hybrid_stack`): ``params["layers"]`` has one dict per
unit position with leaves [R, ...]; `HybridStack.stack_layers` / `unstack_layers` convert.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_prefix.chunking import (check_decode_args, check_prefill_args, check_state, prefill_compiler_options,
                                    prepare_prefill_args, resolve_step_loop, run_chunks, scan_chunks)
from sparse_prefix.protocol import Checkpoints, MemoryProfile, State, restore_state

from . import mixers
from .attention import AttentionConfig
from .checkpoint_io import register_family
from .gated_deltanet import GDNConfig
from .mamba2_mixer import Mamba2MixerConfig
from .hybrid_stack import HybridStack, pattern_unit
from .registry import register

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    """A hybrid stack. `pattern` has one letter per layer (G, A or M; see the module docstring).

    Attributes:
      vocab_size: V.  d_model: d.  d_ff: the SwiGLU width.  pattern: e.g. "GGGA" * 6.
      chunk_size: C, the exactness grid (a multiple of gdn.sub_chunk and of the Mamba2 chunk).
      max_length: S, the KV buffer length and the longest sequence a state holds.
      gdn / attention / mamba: the mixer configs the pattern needs (None where unused).
      tie_embeddings: the head reuses the embedding matrix.
      norm_eps: RMSNorm eps.  norm_offset: 1.0 for (1 + w) norms (Qwen3.5), 0.0 for plain w.
      dtype: the compute dtype's name (parameters, activations, conv windows, KV).
      chunks_per_step: G, the chunks every step of the prefill loop runs through all layers at once
        (matmuls over G * C rows). Exactness does not depend on G: a resume on the grid C is bitwise
        for any G (the same G in both calls); G changes rounding, not the math. A call of a single
        chunk runs a padded G-chunk step too unless `HybridLM.fit_steps` says otherwise (not exact
        on GPUs: see there).
      scan_layers: run the repeated pattern unit with a `lax.scan` (one compiled unit body); False
        unrolls it (longer compiles, no per-step slicing of the stacked weights).
    """

    vocab_size: int
    d_model: int
    d_ff: int
    pattern: str
    chunk_size: int
    max_length: int
    gdn: Any = None
    attention: Any = None
    mamba: Any = None
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    norm_offset: float = 1.0
    dtype: str = "bfloat16"
    chunks_per_step: int = 1
    scan_layers: bool = True

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"HybridConfig.scan_layers must be a bool, got {self.scan_layers!r}")
        for name in ("vocab_size", "d_model", "d_ff", "chunk_size", "max_length", "chunks_per_step"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"HybridConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"HybridConfig.pattern must be a non-empty string, got {self.pattern!r}")
        unknown = sorted(set(self.pattern) - set(mixers.KINDS))
        if unknown:
            raise ValueError(f"HybridConfig.pattern has unknown layer letters {unknown}; "
                             f"known: {sorted(mixers.KINDS)}")
        for letter in sorted(set(self.pattern)):
            mixers.KINDS[letter].check(self, letter)

    def with_chunking(self, chunk_size: int | None = None, chunks_per_step: int | None = None,
                      sub_chunk: int | None = None) -> "HybridConfig":
        """This config with another chunk size C, chunks per step G and/or GDN sub-chunk c.

        Parameters do not depend on these, so a model's params serve every chunking. When C changes
        and `sub_chunk` is not given, the GDN sub-chunk becomes min(c, C) if that divides C, else C.
        Raises ValueError (naming the field) for an invalid combination.
        """
        chunk = self.chunk_size if chunk_size is None else chunk_size
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk!r}")
        changes: dict[str, Any] = {"chunk_size": chunk}
        if chunks_per_step is not None:
            changes["chunks_per_step"] = chunks_per_step
        if self.gdn is not None:
            default = self.gdn.sub_chunk if chunk % self.gdn.sub_chunk == 0 else chunk
            changes["gdn"] = dataclasses.replace(self.gdn, sub_chunk=default if sub_chunk is None
                                                 else sub_chunk)
        elif sub_chunk is not None:
            raise ValueError("sub_chunk applies to Gated DeltaNet layers; this pattern has none")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready dict (inverse of `from_dict`)."""
        out = dataclasses.asdict(self)
        for name in ("gdn", "attention", "mamba"):
            if getattr(self, name) is not None and hasattr(getattr(self, name), "to_dict"):
                out[name] = getattr(self, name).to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "HybridConfig":
        data = dict(data)
        for name, kind in mixers.CONFIG_TYPES.items():
            if data.get(name) is not None:
                value = data[name]
                data[name] = kind.from_dict(value) if hasattr(kind, "from_dict") else kind(**value)
        return cls(**data)


class _Programs:
    """The jitted programs of one (config, backend, donation); `traces` counts compilations."""

    def __init__(self, stack: HybridStack, donate: bool, static_steps: bool = False,
                 compiler_options: tuple = ()):
        self.stack = stack
        self.static_steps = static_steps
        self.compiler_options = compiler_options
        self.fit_verdicts: dict[int, bool] = {}     # batch size -> `HybridLM.verify_step_fit`
        # forward (training, references) reads attention KV densely with XLA, runs the GDN state
        # recursion as an XLA scan and the UT solve by doubling: reverse-mode AD cannot go through
        # the blocked read's while loop nor the Pallas kernels; forward's logits equal prefill's
        # within tolerance.
        config = stack.config
        if config.attention is not None and (config.attention.key_block
                                             or config.attention.kernel != "xla"):
            config = dataclasses.replace(config, attention=dataclasses.replace(
                config.attention, key_block=0, kernel="xla"))
        if config.gdn is not None and (config.gdn.recurrence != "xla"
                                       or config.gdn.solver in ("pallas", "auto")):
            solver = "doubling" if config.gdn.solver in ("pallas", "auto") else config.gdn.solver
            config = dataclasses.replace(config, gdn=dataclasses.replace(
                config.gdn, recurrence="xla", solver=solver))
        self.forward_stack = HybridStack(config, stack.backend)
        self.traces = 0
        self.donate = donate
        argnums = (2,) if donate else ()
        self.program = self._prefill          # one object: engines cache fused programs on it
        self.prefill = jax.jit(self._prefill, donate_argnums=argnums,
                               compiler_options=dict(compiler_options) or None)
        self.decode = jax.jit(self._decode, donate_argnums=argnums)
        self.forward = jax.jit(self._forward)
        self.init_params = jax.jit(stack.init_params)
        # One dispatch for the whole zero state (every recurrent and KV buffer), not one per leaf.
        self.init_state = jax.jit(stack.init_state, static_argnums=0)

    def _prefill(self, params, tokens, state, checkpoints, lengths):
        self.traces += 1
        stack, config = self.stack, self.stack.config
        step = stack.emitting_step(params)
        hidden, final, emitted = run_chunks(step, stack.to_unit_state(state), tokens, lengths,
                                            checkpoints, chunk_size=config.chunk_size,
                                            hidden_size=config.d_model, hidden_dtype=stack.dtype,
                                            chunks_per_step=config.chunks_per_step,
                                            static_steps=self.static_steps, fit_single_chunk=True)
        final = stack.from_unit_state(final, state, tokens.shape[1])
        emitted = emitted._replace(recurrent=stack.unstack_recurrent(emitted.recurrent, axis=2))
        return stack.logits(params, hidden), final, emitted

    def _decode(self, params, token, state):
        self.traces += 1
        return self.stack.token_step(params, state, token)

    def _forward(self, params, tokens):
        self.traces += 1
        stack = self.forward_stack
        state = stack.to_unit_state(stack.init_state(tokens.shape[0]))
        hidden, _ = scan_chunks(functools.partial(stack.group_step, params), state, tokens,
                                chunk_size=stack.config.chunk_size,
                                chunks_per_step=stack.config.chunks_per_step)
        return stack.logits(params, hidden)


def _check_batch(batch) -> int:
    if not isinstance(batch, (int, np.integer)) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    return int(batch)


@functools.partial(jax.jit, static_argnums=1)
def _first_slots(emitted: Checkpoints, slots: int) -> Checkpoints:
    """The first `slots` checkpoint slots of every leaf, in one dispatch (not one per leaf)."""
    return jax.tree_util.tree_map(lambda leaf: leaf[:, :slots], emitted)


@functools.lru_cache(maxsize=16)
def _programs(config: HybridConfig, backend: str, donate: bool, static_steps: bool = False,
              compiler_options: tuple = ()) -> _Programs:
    return _Programs(HybridStack(config, backend), donate, static_steps, compiler_options)


FIT_STEPS = ("auto", "on", "off")
GEMMS = ("auto", "cublas", "xla")


def gemm_compiler_options(gemm: str) -> tuple:
    """XLA compiler options of a prefill program for its matmuls, as (name, value) pairs.

    "cublas" (and "auto") on a GPU turn XLA's Triton GEMM fusions off, so every matmul runs a
    cuBLAS kernel. On an H200 (jax 0.11.2, qwen3.5-0.8b, one run): 84.9 vs 95.4 ms for 8192 tokens,
    and every GEMM row came out with the same bits at 256, 512, 1024 and 8192 rows -- with Triton
    GEMMs the autotuner picked split-K configurations for the small-M shapes, whose rows differ
    from the large-M ones. (The GDN rule's batched matmuls still differ by batch count, which is
    why `fit_steps` stays off by default.) "xla": XLA's own choice. Off a GPU: ()."""
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    if gemm != "xla" and jax.default_backend() == "gpu":
        return (("xla_gpu_enable_triton_gemm", False),)
    return ()


class HybridLM:
    """A hybrid recurrent LM (public; implements `RecurrentLM`).

    `prefill` and `decode` consume the `state` they are given (its buffers -- the KV above all -- are
    donated to the result); keep a copy if you need it again, or build with `donate_state=False`.
    Models of an equal (config, backend, donation) share their compiled programs.

    Args:
      config: the stack.  dtype: overrides config.dtype (the compute dtype) when given.
      backend: the Gated DeltaNet backend, "chunked" (default) or "sequential" (the reference).
      min_checkpoint_slots: checkpoint lists are padded to a power of two at least this large.
      donate_state: donate the state buffers to prefill / decode.
      step_loop: the prefill's loop over group steps (`chunking.STEP_LOOPS`): "dynamic" (counted on
        the device, one program per padded width), "static" (counted on the host, one program per
        step count, no host round trip per step), "auto" (static on a GPU). Same numbers either way.
      fit_steps: whether a call that lays out a single chunk (a short resumed suffix) runs that one
        chunk (G = 1) instead of a G-chunk step padded with G - 1 empty chunks: "off" (default,
        exact by construction), "on", or "auto" (on for a batch size once `verify_step_fit` found
        the two bit-for-bit equal on random weights and tokens, at the first such call). Only "off"
        keeps resumes bitwise: the GDN rule's batched matmuls run other kernels at G = 1 than at
        G = 4 on a GPU (cuBLAS picks by batch count), and on an H200 a one-chunk call differed from
        the 4-chunk step in 1 of 4 token draws after `verify_step_fit` had passed (BENCHMARKS.md,
        ninth session) -- a sampled check proves nothing for other inputs. Running the one-chunk
        call's rule on G chunks between optimization barriers did not help (tenth session: 12 of
        12 draws differed; XLA compiles the other layers per row count too, e.g. other cuBLAS
        algorithms for the projections). "on" / "auto" are for speed measurements (9-11 vs 14-15
        ms per one-chunk call on an H200). No effect when G = 1.
      gemm: the prefill's matmul kernels (`gemm_compiler_options`): "auto" / "cublas" (cuBLAS on a
        GPU: faster there, and in a standalone test row-for-row the same bits at every row count;
        inside the model not guaranteed, see `fit_steps`), or "xla".
      command_buffers: XLA command buffers (CUDA graphs) for the prefill program on a GPU: "on",
        "off" or "auto" (= "on"; `chunking.prefill_compiler_options`). Off, every kernel launches on
        its own and nothing is re-recorded when a call's buffers move. On an H200, Engine hits of
        the group preset (one 1024-token step, 135 kernels) spent 1.28 ms per call in
        `command_buffer::update` with them on and took 3.10 vs 3.61 ms with them off (fifteenth
        session, one profiled run); the full 24-layer stack read slower with them off in the third
        session. Same numbers either way; engines fusing the restore use the same options.
    """

    family = "hybrid"

    def __init__(self, config: HybridConfig, *, dtype=None, backend: str = "chunked",
                 min_checkpoint_slots: int = 4, donate_state: bool = True, step_loop: str = "auto",
                 fit_steps: str = "off", gemm: str = "auto", command_buffers: str = "auto"):
        if not isinstance(config, HybridConfig):
            raise TypeError(f"config must be a HybridConfig, got {type(config).__name__}")
        if backend not in ("chunked", "sequential"):
            raise ValueError(f"backend must be 'chunked' or 'sequential', got {backend!r}")
        if dtype is not None:
            config = dataclasses.replace(config, dtype=jnp.dtype(dtype).name)
        self.config = config
        self.backend = backend
        self.min_checkpoint_slots = int(min_checkpoint_slots)
        self.step_loop = resolve_step_loop(step_loop)
        if fit_steps not in FIT_STEPS:
            raise ValueError(f"fit_steps must be one of {FIT_STEPS}, got {fit_steps!r}")
        self.fit_steps = fit_steps
        self.gemm = gemm
        self.command_buffers = command_buffers
        self._programs = _programs(config, backend, bool(donate_state), self.step_loop == "static",
                                   gemm_compiler_options(gemm)
                                   + prefill_compiler_options(command_buffers, auto_default="on"))
        self._abstract: dict[int, State] = {}

    chunk_size = property(lambda self: self.config.chunk_size)
    chunks_per_step = property(lambda self: self.config.chunks_per_step)
    vocab_size = property(lambda self: self.config.vocab_size)
    max_length = property(lambda self: self.config.max_length)
    dtype = property(lambda self: jnp.dtype(self.config.dtype))
    stack = property(lambda self: self._programs.stack)

    @property
    def compile_count(self) -> int:
        """Traces of the jitted prefill / decode / forward so far (shared by models of an equal config)."""
        return self._programs.traces

    def with_chunking(self, chunk_size: int | None = None, chunks_per_step: int | None = None,
                      sub_chunk: int | None = None) -> "HybridLM":
        """The same model (backend, checkpoint slots, donation) with another chunk size C, chunks per
        step G and/or GDN sub-chunk c (`HybridConfig.with_chunking`); the parameters stay valid."""
        return HybridLM(self.config.with_chunking(chunk_size, chunks_per_step, sub_chunk),
                        backend=self.backend, min_checkpoint_slots=self.min_checkpoint_slots,
                        donate_state=self._programs.donate, step_loop=self.step_loop,
                        fit_steps=self.fit_steps, gemm=self.gemm, command_buffers=self.command_buffers)

    def init_params(self, key: Array) -> dict:
        """Random parameters (jitted): embed [V, d], layers, final_norm [d], lm_head [d, V] if untied."""
        return self._programs.init_params(key)

    def per_layer_params(self, params: dict) -> dict:
        """`params` with every layer's weights as their own arrays under ``params["per_layer"]``
        (`HybridStack.per_layer_params`): no prefill step slices a layer's weights out of the
        stacked unit, and the layers run unrolled (compiles take ~2x as long). Every method takes
        either layout with the same numbers. Not the Engine's default (it has no `prepare_params`):
        on an H200 (qwen3.5-0.8b, one run) it tied the stacked layout at L = 8192 (92.1 vs 92.6 ms),
        emitted 31 checkpoints for less (+2.3% vs +5.0%), and read slower on one 1024-token call
        (19.8 vs 15.7 ms). A copy: drop the stacked params to keep one set of weights in memory."""
        return self.stack.per_layer_params(params)

    def init_state(self, batch: int) -> State:
        """Zero state for `batch` rows: recurrent states, KV buffers [B, S, Hkv, D], length 0 (one
        jitted dispatch)."""
        return self._programs.init_state(_check_batch(batch))

    def abstract_state(self, batch: int) -> State:
        """`init_state(batch)` as ShapeDtypeStructs (nothing allocated)."""
        if batch not in self._abstract:
            batch = _check_batch(batch)
            self._abstract[batch] = jax.eval_shape(lambda: self.stack.init_state(batch))
        return self._abstract[batch]

    def memory_profile(self) -> MemoryProfile:
        """Elements and bytes of one checkpoint (recurrent part) vs one token of attention KV."""
        state = self.abstract_state(1)
        leaves = jax.tree_util.tree_leaves(state.recurrent)
        elements = sum(math.prod(leaf.shape[1:]) for leaf in leaves)
        size = sum(math.prod(leaf.shape[1:]) * leaf.dtype.itemsize for leaf in leaves)
        ssm = sum(math.prod(layer.ssm.shape[1:]) for layer in state.recurrent)
        kv_leaves = jax.tree_util.tree_leaves(state.kv) if state.kv is not None else []
        kv_elements = sum(math.prod(leaf.shape[2:]) for leaf in kv_leaves)
        kv_bytes = sum(math.prod(leaf.shape[2:]) * leaf.dtype.itemsize for leaf in kv_leaves)
        return MemoryProfile(checkpoint_elements=elements, checkpoint_bytes=size,
                             kv_elements_per_token=kv_elements, kv_bytes_per_token=kv_bytes,
                             ssm_elements=ssm)

    # ------------------------------------------------------------------ the contract (host side)

    def prefill(self, params: dict, tokens, state: State, checkpoints, lengths=None
                ) -> tuple[Array, State, Checkpoints]:
        """`RecurrentLM.prefill`: logits f32[B, V] at each row's last real token, final state, checkpoints.

        tokens int32[B, T]; checkpoints int32[K] or [B, K] relative to the start of tokens (<= 0:
        padding); lengths int32[B] (default T). Emitted leaves are [B, K, ...]. T is padded to
        C * 2^i and K to a power of two (K = 0 is a bucket of its own: no emission buffers), so
        calls share compilations.
        """
        batch = np.shape(tokens)[0] if np.ndim(tokens) == 2 else None
        if batch is not None:
            check_state(state, self.abstract_state(batch))
        tokens_np, ckpt_np, lengths_np = self.prepare_prefill(
            tokens, checkpoints, lengths, None if batch is None else np.asarray(state.length))
        slots = np.shape(checkpoints)[-1] if np.ndim(checkpoints) else 0
        logits, final, emitted = self._programs.prefill(params, tokens_np, state, ckpt_np, lengths_np)
        if ckpt_np.shape[1] != slots:
            emitted = _first_slots(emitted, slots)
        return logits, final, emitted

    @property
    def prefill_program(self):
        """`FusablePrefill.prefill_program`: the pure program `prefill` jits (same object each time)."""
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
        or a power of two >= min_checkpoint_slots (`chunking.prepare_prefill_args`). A call that
        lays out one chunk gets the width C (run as one chunk) where `fits_one_chunk` allows it,
        else at least 2C (one G-chunk step)."""
        batch = np.shape(tokens)[0] if np.ndim(tokens) == 2 else None
        fit = (lambda: self.fits_one_chunk(batch)) if batch else False   # asked for one-chunk calls only
        return prepare_prefill_args(self, tokens, checkpoints, lengths, state_length, fit_one_chunk=fit)

    def fits_one_chunk(self, batch: int) -> bool:
        """Whether a one-chunk call of `batch` rows runs as one chunk (`fit_steps`); "auto" runs
        `verify_step_fit(batch)` the first time it is asked (models of an equal config share it)."""
        if self.chunks_per_step == 1 or self.fit_steps == "off":
            return False
        if self.fit_steps == "on":
            return True
        verdicts = self._programs.fit_verdicts
        if batch not in verdicts:
            verdicts[batch] = self.verify_step_fit(batch)
        return verdicts[batch]

    def verify_step_fit(self, batch: int = 1) -> bool:
        """Whether one chunk prefilled as a single-chunk step gives the bits it gets inside a G-chunk
        step, on this backend, for `batch` rows: logits and every final-state leaf of a partial
        chunk resumed from a one-chunk state, both ways, compared bitwise (random weights and
        tokens; the kernels XLA picks depend on shapes, not values). Two extra compilations, and a
        second set of (random) weights on the device while it runs."""
        batch = _check_batch(batch)
        chunk, group = self.chunk_size, self.chunks_per_step
        if group == 1:
            return True
        programs = self._programs
        params = programs.init_params(jax.random.PRNGKey(0))
        rng = np.random.default_rng(0)
        wide = group * chunk if programs.static_steps else 2 * chunk
        none = np.zeros((batch, 0), np.int32)

        def call(tokens, state, width, lengths):
            padded = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))
            return programs.prefill(params, padded, state, none, lengths)

        first = rng.integers(0, self.vocab_size, (batch, chunk), dtype=np.int32)
        _, start, _ = call(first, programs.init_state(batch), wide, np.full(batch, chunk, np.int32))
        tail = rng.integers(0, self.vocab_size, (batch, chunk), dtype=np.int32)
        part = np.full(batch, chunk - chunk // 4, np.int32)
        results = []
        for width in (wide, chunk):
            state = jax.tree_util.tree_map(lambda leaf: leaf.copy(), start)
            logits, final, _ = call(tail, state, width, part)
            results.append([logits] + jax.tree_util.tree_leaves(final))
        return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(*results))

    def decode(self, params: dict, token, state: State) -> tuple[Array, State]:
        """`RecurrentLM.decode`: token int32[B] -> (logits f32[B, V], the state one token longer)."""
        batch = np.shape(token)[0] if np.ndim(token) == 1 else -1
        if batch >= 0:
            check_state(state, self.abstract_state(batch))
        token_np = check_decode_args(token, batch=batch, vocab_size=self.vocab_size,
                                     max_length=self.max_length,
                                     state_length=None if batch < 0 else np.asarray(state.length))
        return self._programs.decode(params, token_np, state)

    def restore(self, state: State, checkpoints: Checkpoints, k) -> State:
        """`RecurrentLM.restore`: the recurrent part of slot k int32[B]; KV kept, length set.

        The KV buffers of `state` must hold the prefix (e.g. the final state of the emitting call).
        """
        if not isinstance(checkpoints, Checkpoints):
            raise TypeError(f"checkpoints must be Checkpoints, got {type(checkpoints).__name__}")
        k_np = np.asarray(k)
        batch, slots = np.shape(checkpoints.lengths)
        if k_np.dtype.kind not in "iu" or k_np.shape != (batch,):
            raise ValueError(f"k must be an integer array of shape [{batch}], got {k_np.dtype} {k_np.shape}")
        if np.any((k_np < 0) | (k_np >= slots)):
            raise ValueError(f"k must lie in 0..{slots - 1}, got {k_np.tolist()}")
        check_state(state, self.abstract_state(batch))
        return restore_state(state, checkpoints, jnp.asarray(k_np, jnp.int32))

    def forward(self, params: dict, tokens) -> Array:
        """Logits f32[B, T, V] at every position from a fresh state (training and references).

        T is padded up to a multiple of C (padding after the real tokens changes no real logit).
        Attention reads its KV densely here (reverse-mode AD cannot pass the blocked read's while
        loop), so these logits equal prefill's within tolerance, not bitwise.
        """
        tokens_np, _, _ = check_prefill_args(tokens, None, np.zeros((0,), np.int32),
                                             vocab_size=self.vocab_size, max_length=self.max_length)
        total = tokens_np.shape[1]
        padded = -(-total // self.chunk_size) * self.chunk_size
        if padded > self.max_length:
            raise ValueError(f"tokens padded to {padded} exceed max_length {self.max_length}")
        return self._programs.forward(params, np.pad(tokens_np, ((0, 0), (0, padded - total))))[:, :total]


register_family(HybridLM.family, lambda config: HybridLM(HybridConfig.from_dict(config)))


# ----------------------------------------------------------------------------- presets


def qwen35_config(*, layers: int = 24, max_length: int = 16384, chunk_size: int = 256,
                  chunks_per_step: int = 4, sub_chunk: int | None = None,
                  vocab_size: int = 248_320, key_block: int = 1024,
                  attention_kernel: str = "auto") -> HybridConfig:
    """Qwen3.5-0.8B's text stack (`qwen3_5_text`): d 1024, d_ff 3584, groups of 3 GDN + 1 attention,
    attention 8 q / 2 kv heads x 256 (rotary on 64 dims, theta 1e7, q/k norm, output gate),
    GDN 16 key / 16 value heads x 128, conv 4, vocab 248320, tied embeddings, (1 + w) norms, eps 1e-6.

    Implementation choices (not part of the checkpoint; `with_chunking` changes the first three):
      * chunk_size C = 256, the exactness grid the engine snaps checkpoints to;
      * chunks_per_step G = 4: every prefill step runs all layers on 1024 tokens (matmuls of 1024
        rows keep an H100 busy), and a call pays at most G - 1 = 3 padded chunks (768 tokens) at
        its tail (a one-chunk call too, unless `HybridLM.fit_steps` runs it alone: faster, not
        exact on GPUs);
      * GDN sub-chunk c = C (default): the state recursion takes one step per chunk (L / 256
        sequential steps per layer; c = 64 would take 4x as many tiny dependent matmuls) at ~c
        intra-chunk FLOPs per token (~6 MFLOP per token and layer at c = 256, 15% of a layer's);
      * attention reads the KV buffer with `attention_kernel` "auto": on a GPU one Pallas kernel per
        read (key blocks looped on the device: no host round trip per block), elsewhere XLA's read
        in blocks of `key_block` (0 = dense);
      * the GDN state recursion is `recurrence="auto"`: on a GPU, for bf16 models, one Pallas kernel
        looping over the sub-chunks on the device (`gdn_pallas`), elsewhere a `lax.scan`;
      * the GDN UT solve is `solver="auto"`: on a GPU, for bf16 models, one Pallas kernel of blocked
        forward substitution (`gdn_solve_pallas`), elsewhere the doubling's batched matmuls.
    """
    if layers % 4:
        raise ValueError(f"layers must be a multiple of 4 (GGGA groups), got {layers}")
    return HybridConfig(
        vocab_size=vocab_size, d_model=1024, d_ff=3584, pattern="GGGA" * (layers // 4),
        chunk_size=chunk_size, max_length=max_length, chunks_per_step=chunks_per_step,
        gdn=GDNConfig(d_model=1024, num_k_heads=16, num_v_heads=16, head_k_dim=128, head_v_dim=128,
                      conv_width=4, norm_eps=1e-6,
                      sub_chunk=chunk_size if sub_chunk is None else sub_chunk, recurrence="auto",
                      solver="auto"),
        attention=AttentionConfig(d_model=1024, num_heads=8, num_kv_heads=2, head_dim=256,
                                  rotary_dim=64, rope_theta=10_000_000.0, norm_eps=1e-6,
                                  key_block=key_block, kernel=attention_kernel),
        tie_embeddings=True, norm_eps=1e-6, norm_offset=1.0)


def hybrid_tiny_config() -> HybridConfig:
    """A small Qwen3.5-like stack for CPU tests: the unit GGA twice (scanned), value heads outnumber
    key heads, untied head, C = 8, one chunk per step, attention reading its buffer in blocks of 16."""
    return HybridConfig(
        vocab_size=256, d_model=32, d_ff=64, pattern="GGA" * 2, chunk_size=8, max_length=128,
        gdn=GDNConfig(d_model=32, num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8,
                      conv_width=4, sub_chunk=4),
        attention=AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=4,
                                  rope_theta=10_000.0, key_block=16),
        tie_embeddings=False)


def mamba2_attention_tiny_config() -> HybridConfig:
    """A small Mamba2 + attention stack (Nemotron-H / Jamba style: attention without rotary, gate or
    q/k norm, plain RMSNorm weights), C = 8, dense attention reads."""
    return HybridConfig(
        vocab_size=256, d_model=32, d_ff=64, pattern="MMAM", chunk_size=8, max_length=128,
        mamba=Mamba2MixerConfig(d_model=32, d_state=16, d_conv=4, expand=2, headdim=16, ngroups=1),
        attention=AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=0,
                                  norm_offset=0.0, qk_norm=False, output_gate=False),
        tie_embeddings=True, norm_eps=1e-5, norm_offset=0.0)


@register("qwen3.5-0.8b")
def _qwen35_08b(dtype):
    return HybridLM(qwen35_config(), dtype=dtype)


@register("qwen3.5-0.8b-group")
def _qwen35_08b_group(dtype):
    return HybridLM(qwen35_config(layers=4), dtype=dtype)


@register("hybrid-tiny")
def _hybrid_tiny(dtype):
    return HybridLM(hybrid_tiny_config(), dtype=dtype)


@register("mamba2-attn-tiny")
def _mamba2_attention_tiny(dtype):
    return HybridLM(mamba2_attention_tiny_config(), dtype=dtype)
