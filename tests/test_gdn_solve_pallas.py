"""The Pallas UT solve of the Gated DeltaNet (`gdn_solve_pallas`), run in Pallas' interpreter on CPU:
it solves (I + L) X = R as numpy does in float64 and reads nothing of L on or above the diagonal. As
the model's solver (`GDNConfig.solver="pallas"`), together with the recursion kernel, it keeps a
prefill resumed on the chunk grid bitwise: tests/test_gdn_pallas.py."""

import jax
import numpy as np
import pytest

from sparse_prefix.models.gated_deltanet import GDNConfig, use_pallas_solver
from sparse_prefix.models.gdn_solve_pallas import supported, unit_lower_solve_pallas

HIGHEST = jax.lax.Precision.HIGHEST


def _system(rng, lead, size, width):
    lower = np.tril(rng.normal(size=lead + (size, size)) * 0.3, -1).astype(np.float32)
    rhs = rng.normal(size=lead + (size, width)).astype(np.float32)
    return lower, rhs


@pytest.mark.parametrize("size,width,block,block_v", [(64, 32, 16, 16), (64, 48, 32, 32),
                                                      (32, 32, 32, 16)])
def test_the_kernel_solves_the_unit_lower_system_as_float64_numpy_does(size, width, block, block_v):
    lower, rhs = _system(np.random.default_rng(size + width), (2, 3), size, width)
    got = np.asarray(unit_lower_solve_pallas(lower, rhs, HIGHEST, block=block, block_v=block_v))
    want = np.linalg.solve(np.eye(size) + lower.astype(np.float64), rhs.astype(np.float64))
    assert got.shape == (2, 3, size, width)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_the_kernel_reads_nothing_on_or_above_the_diagonal():
    lower, rhs = _system(np.random.default_rng(1), (2,), 64, 32)
    garbage = lower + np.triu(np.full((64, 64), np.nan, np.float32))
    clean = unit_lower_solve_pallas(lower, rhs, HIGHEST, block=16)
    dirty = unit_lower_solve_pallas(garbage, rhs, HIGHEST, block=16)
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))


def test_shape_support_is_reported_and_bad_shapes_are_refused():
    assert supported(256, 256) and supported(16, 48)
    assert not supported(8, 16)              # the system below Triton's 16
    assert not supported(48, 16)             # not a power of two
    assert not supported(64, 40)             # no power-of-two column block >= 16 divides 40
    with pytest.raises(ValueError, match="supported"):
        unit_lower_solve_pallas(np.zeros((8, 8), np.float32), np.zeros((8, 16), np.float32), HIGHEST)
    with pytest.raises(ValueError, match="same leading dims"):
        unit_lower_solve_pallas(np.zeros((2, 16, 16), np.float32), np.zeros((3, 16, 16), np.float32),
                                HIGHEST)
    with pytest.raises(ValueError, match="solver"):
        GDNConfig(d_model=32, num_k_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16,
                  solver="bogus")


def test_auto_takes_the_kernel_only_on_a_gpu_for_reduced_precision():
    assert use_pallas_solver("pallas", 32, 32, HIGHEST)
    assert not use_pallas_solver("pallas", 8, 32, HIGHEST)          # unsupported: doubling
    assert use_pallas_solver("auto", 32, 32, None) == (jax.default_backend() == "gpu")
    assert not use_pallas_solver("auto", 32, 32, HIGHEST)
    assert not use_pallas_solver("doubling", 32, 32, None)
