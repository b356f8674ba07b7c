"""The demo model path: compact tokenizer, atomic model cache, `generate` through the Engine (untrained)."""

import jax
import numpy as np
import pytest

from sparse_prefix import cli
from sparse_prefix.experiments import train_small
from sparse_prefix.experiments.train_small import (CompactTokenizer, TrainConfig, load_trained, model_config,
                                                   model_dir, save_trained, tokenizer_of)
from sparse_prefix.models.mamba2 import Mamba2LM
from sparse_prefix.tokenizers import load_tokenizer

TEXT = "The ship sailed at dawn. The crew slept."


@pytest.fixture(scope="module")
def gpt2():
    """The GPT-2 BPE of ../shared/tokenizers; the tests that need it skip only when ../shared is absent."""
    try:
        return load_tokenizer("gpt2")
    except FileNotFoundError as error:
        pytest.skip(f"../shared (the tokenizer files) is absent: {error}")


def test_the_compact_tokenizer_keeps_frequent_ids_and_marks_the_rest_unknown(gpt2):
    stream = np.concatenate([gpt2.encode(TEXT)] * 3 + [gpt2.encode(" zebra")])
    tokenizer = CompactTokenizer.from_corpus(gpt2, stream, vocab_size=8)
    assert tokenizer.vocab_size == 8 and tokenizer.unknown == 7
    assert tokenizer.kept[0] == train_small.END_OF_TEXT
    ids = tokenizer.encode(TEXT)
    assert np.all((0 <= ids) & (ids < 8)) and np.any(ids == tokenizer.unknown)
    known = ids[ids != tokenizer.unknown]
    assert tokenizer.decode(known) == gpt2.decode(tokenizer.kept[known])
    assert "\ufffd" in tokenizer.decode(ids)
    full = CompactTokenizer.from_corpus(gpt2, stream, vocab_size=64)
    assert full.decode(full.encode(TEXT)) == TEXT


def test_bad_training_settings_and_model_names_are_refused():
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        TrainConfig(seq_len=100, chunk_size=32)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="plain folder name"):
        model_dir("../escape")


def test_generate_serves_a_cached_model_and_restarts_warm(tmp_path, gpt2, capsys):
    config = TrainConfig(vocab_size=64, d_model=32, n_layer=1, d_state=8, headdim=16, chunk_size=4,
                         seq_len=8, max_length=256)
    tokenizer = CompactTokenizer.from_corpus(gpt2, gpt2.encode(TEXT * 4), vocab_size=64)
    model = Mamba2LM(model_config(config, tokenizer.vocab_size))
    params = model.init_params(jax.random.PRNGKey(0))
    metadata = {"tokenizer": "gpt2", "vocabulary": tokenizer.kept.tolist()}
    target = model_dir("tiny-demo", tmp_path)
    save_trained(target, model, params, metadata)
    save_trained(target, model, params, metadata)                # replacing is atomic too
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny-demo"]
    loaded, loaded_params, loaded_meta = load_trained("tiny-demo", tmp_path)
    assert tokenizer_of(loaded_meta).kept.tolist() == tokenizer.kept.tolist()
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded_params)
    args = ["generate", TEXT, "--name", "tiny-demo", "--cache-dir", str(tmp_path), "--max-new-tokens", "4"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert "cold start" in first and "turn 2 prompt" in first
    turn2 = first.split("turn 2 prompt:")[1]
    assert "resumed at 0," not in turn2                            # turn 2 resumed from turn 1's cache
    assert cli.main(args) == 0
    second = capsys.readouterr().out
    assert "warm restart" in second
    assert "resumed at 0," not in second.split("turn 1 prompt:")[1]   # turn 1 resumed from the snapshot
    assert cli.main(["generate", TEXT, "--name", "absent", "--cache-dir", str(tmp_path)]) == 2
    assert "sparse-prefix train" in capsys.readouterr().err
    save_trained(target, model, params, {"tokenizer": "gpt2", "vocabulary": [1, 2, 3]})
    with pytest.raises(ValueError, match="vocabulary"):
        load_trained("tiny-demo", tmp_path)
