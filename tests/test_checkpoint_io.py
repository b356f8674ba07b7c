"""Orbax save / restore of params and the model config."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.models import create
from sparse_prefix.models.checkpoint_io import (load_model, read_model_config, restore_params,
                                                save_model, save_params)


def test_a_saved_model_loads_back_bitwise_with_its_config_and_dtypes(tmp_path):
    model, params = create("mamba2-tiny", seed=3)  # bf16 weights, float32 A_log / D / dt_bias
    save_model(str(tmp_path / "ckpt"), model, params)
    loaded_model, loaded = load_model(str(tmp_path / "ckpt"))
    assert loaded_model.config == model.config
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
    for got, want in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    record = read_model_config(str(tmp_path / "ckpt"))
    assert record["family"] == "mamba2" and record["config"]["n_layer"] == 2
    assert json.loads((tmp_path / "ckpt" / "model.json").read_text()) == record


def test_restoring_into_a_different_tree_or_an_empty_directory_fails_clearly(tmp_path):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
    save_params(str(tmp_path / "p"), tree)
    back = restore_params(str(tmp_path / "p"), tree)
    np.testing.assert_array_equal(back["w"], tree["w"])
    assert back["b"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="do not match"):
        restore_params(str(tmp_path / "p"), {"w": tree["w"], "other": tree["b"]})
    with pytest.raises(FileNotFoundError):
        restore_params(str(tmp_path / "nothing"), tree)
    with pytest.raises(FileExistsError):
        save_params(str(tmp_path / "p"), tree)
