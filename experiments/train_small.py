"""Train a small Mamba2 language model on QuALITY articles with optax, and cache it for the CLI.

    sparse-prefix train                     # minutes on a CPU; cached under the user's cache dir
    sparse-prefix generate "The ship"       # real text from the cached model, through the Engine

The corpus is the QuALITY articles in ``<shared>/data/quality`` (each article once, joined by GPT-2's
``<|endoftext|>``), tokenised with the GPT-2 BPE from ``<shared>/tokenizers``; the last two articles are
held out for a validation loss. To keep a CPU run to minutes, the model's vocabulary is the corpus'
most frequent GPT-2 tokens (8191 cover 96% of it) plus one "unknown" id (`CompactTokenizer`): the
output layer, which dominates the cost at this size, shrinks 6x. The model is a 4-layer Mamba2 (d 128,
float32, tied embeddings); training is next-token cross-entropy with AdamW (linear warm-up, cosine
decay, gradient clipping) on random windows of the token stream.

The trained model lives in ``<cache>/models/<name>/`` (``models.checkpoint_io`` layout plus
``train.json``), where ``<cache>`` is ``$SPARSE_PREFIX_CACHE``, else ``$XDG_CACHE_HOME/sparse-prefix``,
else ``~/.cache/sparse-prefix``. It is written to a temporary folder and renamed into place, so a
half-trained or half-written model is never loaded. Nothing here is committed to the repository.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
import optax

from sparse_prefix.chunking import scan_chunks
from sparse_prefix.paths import shared_file

from ..models.checkpoint_io import load_model, save_model
from ..models.mamba2 import (Mamba2Config, Mamba2LM, Mamba2MixerConfig, init_mamba2_state,
                             mamba2_chunk_step, mamba2_logits)

DEFAULT_NAME = "mamba2-quality"
TOKENIZER = "gpt2"
END_OF_TEXT = 50256


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of `train` (defaults: a few minutes on two CPU cores)."""

    steps: int = 400
    batch: int = 8
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup: int = 40
    weight_decay: float = 0.1
    seed: int = 0
    vocab_size: int = 8192
    d_model: int = 128
    n_layer: int = 4
    d_state: int = 32
    headdim: int = 32
    chunk_size: int = 32
    max_length: int = 2048

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("learning_rate", "weight_decay"):
                if not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"{field.name} must be a number >= 0, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or \
                    value < (0 if field.name in ("seed", "warmup") else 1):
                raise ValueError(f"{field.name} must be a positive int, got {value!r}")
        if self.seq_len % self.chunk_size:
            raise ValueError(f"seq_len ({self.seq_len}) must be a multiple of chunk_size ({self.chunk_size})")


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """The user's cache folder for sparse-prefix (see the module docstring)."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("SPARSE_PREFIX_CACHE"):
        return Path(os.environ["SPARSE_PREFIX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparse-prefix"


def model_dir(name: str = DEFAULT_NAME, root: str | os.PathLike | None = None) -> Path:
    """Where the trained model `name` is cached."""
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"model name must be a plain folder name, got {name!r}")
    return cache_root(root) / "models" / name


class CompactTokenizer:
    """GPT-2 BPE restricted to a fixed list of its ids (the model's vocabulary) plus one unknown id.

    Args:
      base: the GPT-2 tokenizer (``encode`` / ``decode``).
      kept: int[V - 1], the GPT-2 ids the model knows; compact id i is kept[i], V - 1 is unknown.
    """

    def __init__(self, base: Any, kept: np.ndarray):
        self.base = base
        self.kept = np.asarray(kept, np.int64)
        self.vocab_size = int(self.kept.size) + 1
        self.unknown = self.vocab_size - 1
        self.name = f"{getattr(base, 'name', 'gpt2')}-compact{self.vocab_size}"
        self._to_compact = {int(t): i for i, t in enumerate(self.kept)}

    @classmethod
    def from_corpus(cls, base: Any, stream: np.ndarray, vocab_size: int) -> "CompactTokenizer":
        """Keep the vocab_size - 1 most frequent ids of a GPT-2 token stream (<|endoftext|> always)."""
        ids, counts = np.unique(stream, return_counts=True)
        frequent = ids[np.argsort(-counts, kind="stable")]
        kept = [END_OF_TEXT] + [int(t) for t in frequent if t != END_OF_TEXT][:vocab_size - 2]
        return cls(base, np.asarray(kept, np.int64))

    def compact(self, ids: np.ndarray) -> np.ndarray:
        """GPT-2 ids -> compact ids int32 (unknown where the id is not kept)."""
        return np.asarray([self._to_compact.get(int(t), self.unknown) for t in ids], np.int32)

    def encode(self, text: str) -> np.ndarray:
        return self.compact(self.base.encode(text))

    def decode(self, ids) -> str:
        """Text of compact ids; the unknown id reads as U+FFFD."""
        parts, run = [], []
        for i in np.asarray(ids, np.int64).reshape(-1):
            if i == self.unknown:
                parts += [self.base.decode(run), "\ufffd"] if run else ["\ufffd"]
                run = []
            else:
                run.append(int(self.kept[i]))
        return "".join(parts + [self.base.decode(run)] if run else parts)


def model_config(config: TrainConfig, vocab_size: int) -> Mamba2Config:
    """The Mamba2 shape trained (float32) for a tokenizer of `vocab_size` ids."""
    mixer = Mamba2MixerConfig(d_model=config.d_model, d_state=config.d_state, headdim=config.headdim)
    return Mamba2Config(mixer=mixer, n_layer=config.n_layer, vocab_size=vocab_size,
                        chunk_size=config.chunk_size, max_length=config.max_length, dtype="float32")


def load_articles(data_dir: str | os.PathLike | None = None) -> list[str]:
    """QuALITY article texts, each once, in file order."""
    path = shared_file("data", "quality", "quality_dev_partial.jsonl", data_dir=data_dir)
    seen, articles = set(), []
    with open(path) as handle:
        for line in handle:
            record = json.loads(line)
            if record["article_id"] not in seen:
                seen.add(record["article_id"])
                articles.append(record["article"])
    return articles


def token_stream(texts: list[str], encode: Callable[[str], np.ndarray]) -> np.ndarray:
    """int32[N]: every text's tokens followed by <|endoftext|>."""
    parts = []
    for text in texts:
        parts += [np.asarray(encode(text), np.int32), np.asarray([END_OF_TEXT], np.int32)]
    return np.concatenate(parts)


def windows(stream: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless random windows int32[batch, length + 1] of the stream (inputs and shifted targets)."""
    if stream.size <= length + 1:
        raise ValueError(f"the token stream ({stream.size}) is shorter than a window ({length + 1})")
    while True:
        starts = rng.integers(0, stream.size - length - 1, size=batch)
        yield np.stack([stream[s:s + length + 1] for s in starts])


def forward_logits(cfg: Mamba2Config, params: Any, tokens: jax.Array) -> jax.Array:
    """Differentiable logits f32[B, T, V] of a fresh prefill (T a multiple of the chunk size)."""
    state = init_mamba2_state(cfg, tokens.shape[0])
    step = functools.partial(mamba2_chunk_step, params, cfg)
    hidden, _ = scan_chunks(step, state, tokens, chunk_size=cfg.chunk_size)
    return mamba2_logits(params, cfg, hidden)


def next_token_loss(params: Any, cfg: Mamba2Config, window: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) of windows int32[B, T + 1]."""
    logits = forward_logits(cfg, params, window[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:]).mean()


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(config.warmup, 1),
                                                  max(config.steps, config.warmup + 1))
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, weight_decay=config.weight_decay))


def train(config: TrainConfig = TrainConfig(), *, data_dir: str | os.PathLike | None = None,
          log: Callable[[str], None] = print) -> tuple[Mamba2LM, Any, dict[str, Any]]:
    """Train the small model; returns (model, params, metadata with losses and timings)."""
    from sparse_prefix.tokenizers import load_tokenizer

    base = load_tokenizer(TOKENIZER, data_dir=data_dir)
    articles = load_articles(data_dir)
    full_train = token_stream(articles[:-2], base.encode)
    tokenizer = CompactTokenizer.from_corpus(base, full_train, config.vocab_size)
    train_stream = tokenizer.compact(full_train)
    valid_stream = tokenizer.compact(token_stream(articles[-2:], base.encode))
    cfg = model_config(config, tokenizer.vocab_size)
    model = Mamba2LM(cfg)
    params = model.init_params(jax.random.PRNGKey(config.seed))
    optimizer = make_optimizer(config)
    opt_state = optimizer.init(params)

    @jax.jit
    def update(params, opt_state, window):
        loss, grads = jax.value_and_grad(next_token_loss)(params, cfg, window)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    evaluate = jax.jit(lambda params, window: next_token_loss(params, cfg, window))
    rng = np.random.default_rng(config.seed)
    batches = windows(train_stream, config.batch, config.seq_len, rng)
    valid = next(windows(valid_stream, 4 * config.batch, config.seq_len, np.random.default_rng(1)))
    log(f"training {cfg.n_layer}-layer Mamba2 (d {cfg.d_model}) on {train_stream.size} QuALITY tokens "
        f"for {config.steps} steps of {config.batch}x{config.seq_len}")
    start, losses = time.perf_counter(), []
    for step in range(1, config.steps + 1):
        params, opt_state, loss = update(params, opt_state, next(batches))
        losses.append(float(loss))
        if step % 50 == 0 or step == config.steps:
            log(f"  step {step:5d}  loss {np.mean(losses[-50:]):.3f}  ({time.perf_counter() - start:.0f} s)")
    valid_loss = float(evaluate(params, valid))
    log(f"validation loss {valid_loss:.3f} nats/token (uniform: {np.log(tokenizer.vocab_size):.2f})")
    metadata = {"tokenizer": TOKENIZER, "vocabulary": tokenizer.kept.tolist(),
                "unknown_fraction": float(np.mean(train_stream == tokenizer.unknown)),
                "train_tokens": int(train_stream.size),
                "final_train_loss": float(np.mean(losses[-50:])), "valid_loss": valid_loss,
                "seconds": time.perf_counter() - start, "config": dataclasses.asdict(config)}
    return model, params, metadata


def tokenizer_of(metadata: dict[str, Any], data_dir: str | os.PathLike | None = None) -> CompactTokenizer:
    """The tokenizer a trained model was trained with (from its metadata)."""
    from sparse_prefix.tokenizers import load_tokenizer

    return CompactTokenizer(load_tokenizer(metadata["tokenizer"], data_dir=data_dir),
                            np.asarray(metadata["vocabulary"], np.int64))





def save_trained(directory: str | os.PathLike, model: Mamba2LM, params: Any, metadata: dict) -> Path:
    """Write the model to `directory` atomically (temporary folder, then rename over any old one)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".tmp-{directory.name}-{uuid.uuid4().hex}"
    try:
        save_model(str(staging), model, params)
        (staging / "train.json").write_text(json.dumps(metadata, indent=1))
        old = directory.parent / f".old-{directory.name}-{uuid.uuid4().hex}"
        if directory.exists():
            os.rename(directory, old)
        os.rename(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_trained(name: str = DEFAULT_NAME, root: str | os.PathLike | None = None
                 ) -> tuple[Mamba2LM, Any, dict[str, Any]]:
    """(model, params, training metadata) of a cached trained model.

    Raises:
      FileNotFoundError: it was never trained (the message says how to train it).
    """
    directory = model_dir(name, root)
    if not (directory / "train.json").is_file():
        raise FileNotFoundError(f"no trained model {name!r} in {directory.parent}; run "
                                f"`sparse-prefix train --name {name}` first (a few minutes on a CPU)")
    model, params = load_model(str(directory))
    metadata = json.loads((directory / "train.json").read_text())
    if len(metadata.get("vocabulary", ())) + 1 != model.vocab_size:
        raise ValueError(f"the cached model in {directory} has {model.vocab_size} token ids but its "
                         f"vocabulary {len(metadata.get('vocabulary', ())) + 1}; retrain with --force")
    return model, params, metadata
