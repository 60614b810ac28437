"""Run by tests/package/wheel.sh inside a fresh virtual environment where only the libmoe
wheel (and its dependency numpy) is installed: the package imports from the environment, not
from the repository, runs a forward and a backward, and refuses the old constructor keyword.
With an argument (a kernel level), moe.cpu_info() must say that level is in use: wheel.sh
runs it again under MOE_MAX_ISA=avx2, as on a CPU with AVX2 alone."""
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
info = moe.cpu_info()
if len(sys.argv) > 1:
    assert info["level"] == sys.argv[1], info
# bf16 and int8 products on whatever kernels the level allows (widened / portable on avx2).
x = np.random.default_rng(0).standard_normal((20, 32)).astype(np.float32)
for precision in ["bf16", "int8"]:
    q = moe.MoE(32, 4, 2, d_ff=48, expert="swiglu", noise="none", seed=3, precision=precision)
    f = moe.MoE(32, 4, 2, d_ff=48, expert="swiglu", noise="none", seed=3)
    yq, yf = q.forward(x, training=False), f.forward(x, training=False)
    assert np.abs(yq - yf).max() <= 3e-2 * np.abs(yf).max(), (precision, info)
print(f"wheel smoke test: moe from {where.parent}, y = {y[0, 0]:.3f} {y[0, 1]:.3f}, "
      f"level {info['level']} ({info['bf16_experts']}; int8 {info['int8_kernel']})")
