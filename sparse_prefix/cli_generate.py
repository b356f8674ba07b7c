"""``sparse-prefix train`` and ``sparse-prefix generate``: a small trained model served by the Engine.

``train`` fits a small Mamba2 on the QuALITY articles of the shared folder (a few minutes on a CPU,
`sparse_prefix.experiments.train_small`) and caches it under the user's cache folder. ``generate``
loads it, restores the engine's cache snapshot of earlier runs (a warm restart; a missing or foreign
snapshot just means a cold start), continues the prompt, then continues an extended prompt (prompt +
completion + ``--then``) and prints how much of it came from the cache, and saves the snapshot.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``train`` and ``generate`` sub-commands."""
    train = subparsers.add_parser(
        "train", help="train the small demo model on QuALITY articles and cache it",
        description="Train a 4-layer Mamba2 with optax on the QuALITY articles of the shared folder "
                    "(GPT-2 tokenizer) and cache it under the user's cache folder.")
    train.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    train.add_argument("--seed", type=int, default=0, help="initialisation and batching seed")
    _common(train)
    train.add_argument("--force", action="store_true", help="retrain even if the model is cached")
    train.set_defaults(func=run_train)

    generate = subparsers.add_parser(
        "generate", help="continue a prompt with the cached small model through the Engine",
        description="Continue PROMPT, then the extended prompt PROMPT + completion + --then, showing "
                    "what the prefix cache saved. Run `sparse-prefix train` once first.")
    generate.add_argument("prompt", help="the text to continue")
    generate.add_argument("--then", default=" Then", help="text appended for the second, extending turn")
    generate.add_argument("--max-new-tokens", type=int, default=40, help="tokens per turn (default 40)")
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    generate.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest (default 40)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")
    generate.add_argument("--policy", default="ldp:8+fork", help="checkpoint policy (default ldp:8+fork)")
    generate.add_argument("--no-snapshot", action="store_true",
                          help="neither restore nor save the engine's cache snapshot")
    _common(generate)
    generate.set_defaults(func=run_generate)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="cached model name (default: train_small.DEFAULT_NAME, "
                                       "mamba2-quality)")
    parser.add_argument("--cache-dir", metavar="DIR", help="cache folder (default: $SPARSE_PREFIX_CACHE, "
                                                           "else ~/.cache/sparse-prefix)")
    parser.add_argument("--data-dir", metavar="DIR", help="the shared data folder (QuALITY, tokenizers)")


def run_train(args: argparse.Namespace) -> int:
    from sparse_prefix.experiments.train_small import (DEFAULT_NAME, TrainConfig, model_dir, save_trained,
                                                       train)

    target = model_dir(args.name or DEFAULT_NAME, args.cache_dir)
    if (target / "train.json").is_file() and not args.force:
        print(f"{target} already holds a trained model (use --force to retrain)")
        return 0
    model, params, metadata = train(TrainConfig(steps=args.steps, seed=args.seed), data_dir=args.data_dir)
    save_trained(target, model, params, metadata)
    print(f"saved to {target}")
    return 0


def _describe(label: str, stats, length: int) -> str:
    return (f"[{label}: {length} tokens, overlap {stats.overlap_depth}, resumed at "
            f"{stats.resume_position}, recomputed {stats.recomputed_tokens}, stored "
            f"{stats.checkpoints_stored} checkpoints, prefill {1e3 * stats.timings['prefill']:.1f} ms]")


def run_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from sparse_prefix.engine import Engine, Sampling
    from sparse_prefix.experiments.train_small import DEFAULT_NAME, cache_root, load_trained, tokenizer_of
    from sparse_prefix.persist import SnapshotError

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    name = args.name or DEFAULT_NAME
    model, params, metadata = load_trained(name, args.cache_dir)
    tokenizer = tokenizer_of(metadata, args.data_dir)
    engine = Engine(model, params, policy=args.policy, capacity_entries=16)
    snapshot = cache_root(args.cache_dir) / "engine" / name
    if not args.no_snapshot:
        try:
            engine.load(snapshot)
            print(f"[warm restart: {engine.stats()['entries']} cached entries from {snapshot}]")
        except SnapshotError as error:
            print(f"[cold start: {error}]")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                        banned=(tokenizer.unknown,))
    prompt = tokenizer.encode(args.prompt)
    first = engine.generate(prompt, args.max_new_tokens, sampling)
    print(args.prompt + tokenizer.decode(first.tokens))
    print(_describe("turn 1 prompt", first.prompt, prompt.size))
    extended = np.concatenate([prompt, first.tokens, tokenizer.encode(args.then)])
    second = engine.generate(extended, args.max_new_tokens, sampling)
    print()
    print(tokenizer.decode(extended) + tokenizer.decode(second.tokens))
    print(_describe("turn 2 prompt", second.prompt, extended.size))
    stats = engine.stats()
    print(f"[cache: {stats['entries']} entries, hit rate {stats['hit_rate']:.0%}, "
          f"{stats['saved_fraction']:.0%} of prompt tokens not recomputed, "
          f"{stats['resident_bytes'] / 1024:.0f} KiB resident]")
    if not args.no_snapshot:
        engine.save(snapshot)
    engine.close()
    return 0
