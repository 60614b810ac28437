"""Run by tests/package/wheel.sh inside a fresh virtual environment where only the libmoe
wheel (and its dependency numpy) is installed: the package imports from the environment, not
from the repository, runs a forward and a backward, and refuses the old constructor keyword."""
import pathlib
import sys

import numpy as np

import moe

where = pathlib.Path(moe.__file__).resolve()
assert where.is_relative_to(pathlib.Path(sys.prefix).resolve()), where
assert "site-packages" in where.parts, where

# The worked example of docs/spec.md: y = 0.55·(0.8, 0.6) + 0.45·(0.6, 0.8).
m = moe.MoE(2, 3, 2, expert="linear_relu", noise="none")
m.W_g = [[1, 0, -1], [0, 1, 1]]
m.W1 = [np.eye(2), [[0, 1], [1, 0]], [[5, 5], [5, 5]]]
m.b1 = np.zeros((3, 2))
y = m.forward(np.array([[0.8, 0.6]]))
np.testing.assert_allclose(y, [[0.70997, 0.69003]], atol=1e-5)
dx = m.backward(np.ones_like(y))
assert dx.shape == (1, 2) and np.isfinite(dx).all()
assert m.stats["load_after"] == [1, 1, 0]

try:
    moe.MoE(2, 3, 2, expert_bias=False)
except ValueError as e:
    assert "bias" in str(e), e
else:
    raise AssertionError("expert_bias= was accepted")
print(f"wheel smoke test: moe from {where.parent}, y = {y[0, 0]:.3f} {y[0, 1]:.3f}")
