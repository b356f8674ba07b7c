"""The embedding lookup and LM head shared by both model families (`models.layers`)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.models.layers import embed_lookup, head_logits

V, D = 512, 64


def _weights(vocab_major: bool):
    key_w, key_h = jax.random.split(jax.random.PRNGKey(3))
    shape = (V, D) if vocab_major else (D, V)
    weight = (jax.random.normal(key_w, shape) * 0.1).astype(jnp.bfloat16)
    hidden = jax.random.normal(key_h, (2, D)).astype(jnp.bfloat16)
    return weight, hidden


@pytest.mark.parametrize("vocab_major", [True, False])
def test_a_one_row_head_equals_that_row_of_a_two_row_batch_bitwise(vocab_major):
    weight, hidden = _weights(vocab_major)
    head = jax.jit(head_logits, static_argnames="vocab_major")
    both = head(hidden, weight, vocab_major=vocab_major)
    one = head(hidden[:1], weight, vocab_major=vocab_major)
    assert one.shape == (1, V) and one.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(one), np.asarray(both[:1]))
    # any leading shape of one row: [1, 1, d] -> [1, 1, V]
    np.testing.assert_array_equal(np.asarray(head(hidden[:1, None], weight, vocab_major=vocab_major)),
                                  np.asarray(both[:1, None]))
    exact = np.asarray(hidden, np.float64) @ (np.asarray(weight, np.float64).T if vocab_major
                                              else np.asarray(weight, np.float64))
    np.testing.assert_allclose(np.asarray(both), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab_major", [True, False])
def test_a_one_row_head_reads_the_stored_weights_without_a_float32_copy(vocab_major):
    weight, hidden = _weights(vocab_major)
    spec = "...d,vd->...v" if vocab_major else "...d,dv->...v"
    copy = f"f32[{','.join(map(str, weight.shape))}]"

    def naive(row, weight):
        return jnp.einsum(spec, row, weight, preferred_element_type=jnp.float32)

    if copy not in jax.jit(naive).lower(hidden[:1], weight).compile().as_text():
        pytest.skip("this XLA computes a one-row product on the stored weights already")
    ours = jax.jit(lambda row, weight: head_logits(row, weight, vocab_major=vocab_major))
    assert copy not in ours.lower(hidden[:1], weight).compile().as_text()


@pytest.mark.parametrize("view", [None, True, False])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.int32])
def test_embedding_rows_come_back_bit_for_bit_in_the_tables_dtype(dtype, view):
    table = (jax.random.normal(jax.random.PRNGKey(5), (V, D)) * 7).astype(dtype)
    tokens = jnp.array([[0, 5, V - 1], [5, 5, 17]], jnp.int32)
    lookup = jax.jit(functools.partial(embed_lookup, view=view))
    rows = lookup(table, tokens)
    assert rows.shape == (2, 3, D) and rows.dtype == table.dtype
    np.testing.assert_array_equal(np.asarray(rows).view(np.uint8), np.asarray(table[tokens]).view(np.uint8))
    one = lookup(table, jnp.int32(17))                       # decode: one token id -> [d]
    np.testing.assert_array_equal(np.asarray(one), np.asarray(table[17]))


def test_a_bfloat16_embedding_is_gathered_without_a_float32_copy_of_the_table():
    table = jnp.ones((V, D), jnp.bfloat16)
    tokens = jnp.zeros((1, 8), jnp.int32)
    copy = f"f32[{V},{D}]"
    if copy not in jax.jit(lambda t, i: t[i]).lower(table, tokens).compile().as_text():
        pytest.skip("this XLA gathers a bfloat16 table as it is stored already")
    assert copy not in jax.jit(embed_lookup).lower(table, tokens).compile().as_text()


def test_bench_head_times_every_variant_and_finds_no_float32_copy_in_ours(tmp_path):
    from sparse_prefix.experiments import bench_head

    out = tmp_path / "head.json"
    assert bench_head.main(["--presets", "hybrid-tiny", "--tokens", "2048", "--repeats", "1",
                            "--out", str(out)]) == 0
    rows = {(row["kind"], row["variant"]): row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("head", "einsum"), ("head", "head_logits"), ("embed", "table[ids]"),
                         ("embed", "uint view"), ("embed", "embed_lookup")}
    assert all(row["seconds"] > 0 and row["vocab"] == 256 and not row["tied"] for row in rows.values())
    assert not rows["head", "head_logits"]["float32_copy"]
    assert rows["head", "head_logits"]["max_abs_diff"] < 1e-4
    assert not rows["embed", "uint view"]["float32_copy"]
    assert all(rows["embed", name]["max_abs_diff"] == 0 for name in ("table[ids]", "uint view", "embed_lookup"))
    for bad in (["--repeats", "0"], ["--tokens", "1500"]):
        with pytest.raises(SystemExit):
            bench_head.main(["--presets", "hybrid-tiny", *bad])
