"""moe.MoE(router="expert_choice"): expert-choice routing (Zhou et al. 2022) against the
PyTorch implementation of the formula in torch_ref_ec.py — selection, stats, forward y and
every gradient — plus the hand example, the options it refuses, and `moe train --router
expert_choice`."""
import itertools
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import moe
import torch_ref as R
from torch_ref import close
import torch_ref_ec as EC

ROOT = Path(__file__).resolve().parents[2]
MOE = os.environ.get("MOE_BIN", str(ROOT / "build" / "bin" / "moe"))


def test_hand_example():
    # h = x; tokens 2 and 3 tie at (0.5, 0.5): each expert's second pick is token 2 (lower
    # index first), so token 2 gets both experts and token 3 none.
    m = moe.MoE(2, 2, 1, expert="linear_relu", noise="none", router="expert_choice")
    m.W_g = np.eye(2)
    m.W1 = [np.eye(2), [[0, 1], [1, 0]]]
    m.b1 = np.zeros((2, 2))
    y = m.forward(np.array([[2, 0], [0, 2], [1, 1], [0, 0]], dtype=np.float32))
    s = 1 / (1 + math.exp(-2))
    np.testing.assert_allclose(y, [[2 * s, 0], [2 * s, 0], [1, 1], [0, 0]], rtol=1e-6, atol=1e-7)
    r = m.routing
    np.testing.assert_array_equal(r.ec_tokens, [[0, 2], [1, 2]])
    np.testing.assert_allclose(r.ec_gates, [[s, 0.5], [s, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(r.gates, [[s, 0], [0, s], [0.5, 0.5], [0, 0]], rtol=1e-6)
    st = m.stats
    assert st["capacity"] == 2 and st["load_after"] == [2, 2]
    assert st["dropped_tokens"] == 1 and st["experts_per_token"] == [1, 2, 1]
    assert st["aux_loss"] == 0.0 and m.aux_loss == 0.0


def test_token_choice_has_no_ec_fields():
    m = moe.MoE(4, 3, 2, noise="none")
    m.forward(np.ones((5, 4), dtype=np.float32))
    assert m.routing.ec_tokens is None and m.routing.ec_gates is None
    assert "experts_per_token" not in m.stats


KINDS = ["linear_relu", "mlp", "swiglu"]
CFS = [None, 0.5, 1.0, 2.5]
NOISE = ["none", "learned", "fixed", "linear"]
CASES = list(itertools.product(KINDS, [1, 2], CFS, [False, True], NOISE))
CASES = [c for i, c in enumerate(CASES) if i % 3 == 0 or c[2] is None]  # keep it quick


def case_id(c):
    kind, k, cf, res, noise = c
    return f"{kind}-k{k}-cf{cf}-{'res' if res else 'nores'}-{noise}"


def random_case(kind, k, cf, residual, noise, seed):
    """A random expert-choice layer whose per-expert cut is unambiguous in float32."""
    rng = np.random.default_rng(seed)
    d = int(rng.integers(3, 9))
    E = int(rng.integers(max(k, 2), 7))
    cfg = dict(d_model=d, n_experts=E, k=k, expert=kind, d_ff=int(rng.integers(2, 10)),
               d_out=d if residual else int(rng.integers(2, 8)),
               activation=["relu", "gelu", "silu"][seed % 3], capacity_factor=cf,
               noise="learned" if noise == "linear" else noise,
               noise_scale="linear" if noise == "linear" else "softplus", noise_stddev=0.7,
               aux_alpha=float(rng.choice([0.0, 0.01, 0.3])), z_alpha=float(rng.choice([0.0, 0.05])),
               residual=residual, router_bias=bool(seed % 2), seed=seed, router="expert_choice")
    for _ in range(50):
        T = int(rng.integers(5, 30))
        m = moe.MoE(**cfg)
        params = {}
        for name, p in m.parameters().items():
            scale = 1.0 if name in ("W_g", "W_noise", "b_g") else 1 / math.sqrt(p.shape[-2] if p.ndim == 3 else 4)
            v = rng.normal(size=p.shape) * scale
            if kind == "linear_relu" and name == "b1":
                v += 1.0
            params[name] = v.astype(np.float32)
            setattr(m, name, params[name])
        x = rng.normal(size=(T, d)).astype(np.float32)
        eps = rng.normal(size=(T, E)).astype(np.float32) if noise != "none" else None
        ref = EC.ec_forward({n: R.t64(v) for n, v in params.items()}, R.t64(x), cfg,
                            eps=None if eps is None else R.t64(eps))
        if ref["margin"] > 1e-4:
            return m, cfg, params, x, eps
    raise AssertionError("could not draw a case without near-ties")


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_forward_and_backward_match_torch(case):
    kind, k, cf, residual, noise = case
    seed = 500 + CASES.index(case)
    m, cfg, params, x, eps = random_case(kind, k, cf, residual, noise, seed)
    P = {n: R.t64(v).requires_grad_(True) for n, v in params.items()}
    xt = R.t64(x).requires_grad_(True)
    ref = EC.ec_forward(P, xt, cfg, eps=None if eps is None else R.t64(eps))
    y = m.forward(x, noise=eps)

    np.testing.assert_array_equal(m.routing.ec_tokens, ref["tokens"])
    close(m.routing.ec_gates, ref["gates"].numpy(), rtol=1e-5, atol=1e-7, what="ec_gates")
    close(m.routing.gates, ref["dense"].numpy(), rtol=1e-5, atol=1e-7, what="dense gates")
    s = m.stats
    for key, want in ref["stats"].items():
        if key in ("aux_loss", "z_loss"):
            close(s[key], want, rtol=1e-5, atol=1e-7, what=key)
        else:
            assert s[key] == want, key
    assert m.aux_loss == 0.0

    yr = ref["y"].detach().numpy()
    close(y, yr, rtol=1e-4, atol=1e-5 * (1 + np.abs(yr).max()), what="y")
    chosen = ref["dense"].numpy().any(axis=1)
    live = (y if not residual else y - x)[chosen]
    assert np.count_nonzero(live) >= 0.5 * live.size  # zero-trust

    dx, g = R.check_backward(m, ref["y"], [ref["z_loss"]], xt, P,
                             np.random.default_rng(seed + 1000))
    assert np.count_nonzero(g["W_g"]) > 0.5 * g["W_g"].size  # the gate path carries gradient
    assert np.count_nonzero(dx) > 0.5 * dx.size


def test_evaluation_has_no_noise():
    m, cfg, params, x, eps = random_case("mlp", 2, None, False, "learned", 7)
    y = m.forward(x, training=False)
    ref = EC.ec_forward({n: R.t64(v) for n, v in params.items()}, R.t64(x), cfg, training=False)
    yr = ref["y"].numpy()
    close(y, yr, rtol=1e-4, atol=1e-5 * (1 + np.abs(yr).max()), what="y")
    np.testing.assert_array_equal(m.routing.ec_tokens, ref["tokens"])


def test_capacity_capped_at_T_and_tiny_batches():
    m = moe.MoE(3, 4, 2, capacity_factor=4.0, noise="none", router="expert_choice")
    for T in (1, 3):
        m.forward(np.ones((T, 3), dtype=np.float32))
        assert m.stats["capacity"] == T
        assert m.stats["experts_per_token"] == [0, 0, 0, 0, T]
    y = m.forward(np.zeros((0, 3), dtype=np.float32))
    assert y.shape == (0, 3) and m.stats["capacity"] == 0


@pytest.mark.parametrize("kw, name", [
    (dict(drop_policy="probs"), "drop_policy"),
    (dict(aux_loss="seq", aux_alpha=0.01), "aux_loss"),
    (dict(n_groups=2), "n_groups"),
])
def test_refused_options(kw, name):
    with pytest.raises(ValueError, match=f"{name}.*expert_choice"):
        moe.MoE(4, 4, 2, router="expert_choice", **kw)


@pytest.mark.skipif(not Path(MOE).exists(), reason=f"{MOE} not built")
def test_cli_train_expert_choice(tmp_path):
    out = tmp_path / "run"
    cmd = [MOE, "train", "--router", "expert_choice", "--steps", "60", "--batch", "64",
           "--eval-tokens", "256", "--threads", "1", "--out", str(out), "--json", "--no-plots"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout.strip().split("\n")[-1])
    assert s["config"]["model"]["router"] == "expert_choice"
    assert math.isfinite(s["final_loss"]) and s["final_loss"] < s["initial_loss"], s


def test_bf16_precision():
    rng = np.random.default_rng(5)
    kw = dict(d_ff=75, noise="none", router_init_std=0.5, router="expert_choice",
              capacity_factor=1.5, activation="gelu")  # smooth: no ReLU kink in the gradients
    m32 = moe.MoE(34, 4, 2, **kw)
    m16 = moe.MoE(34, 4, 2, precision="bf16", **kw)
    for name, value in m32.parameters().items():
        setattr(m16, name, value)
    x = rng.standard_normal((40, 34)).astype(np.float32)
    y32 = m32.forward(x, training=False)
    y16 = m16.forward(x, training=False)
    np.testing.assert_array_equal(m16.routing.ec_tokens, m32.routing.ec_tokens)  # fp32 router
    rel = np.linalg.norm(y16 - y32) / np.linalg.norm(y32)
    assert 0 < rel < 1.5e-2, rel  # the bf16 experts really ran
    # Training and backward in bf16 too.
    dy = rng.standard_normal(y32.shape).astype(np.float32)
    m32.forward(x), m16.forward(x)
    dx32, dx16 = m32.backward(dy), m16.backward(dy)
    assert np.linalg.norm(dx16 - dx32) / np.linalg.norm(dx32) < 2e-2
