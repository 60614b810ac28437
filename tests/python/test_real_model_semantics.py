"""The layer semantics that real checkpoints need (issue 13), against PyTorch formulas
written independently in torch_ref*.py: GPT-OSS's clamped SwiGLU experts (expert
"clamped_swiglu", swiglu_alpha, swiglu_limit), shared experts of their own width
(shared_d_ff), and the routed experts with the caller's routing (moe.MoE.experts_forward).
group_score and selection_bias run in test_router_scores.py's matrix; their keywords here."""
import math
import pickle

import numpy as np
import pytest
import torch

import moe
import errors_doc
import moe.torch
import torch_ref as R
import torch_ref_losses as RL

close = R.close


def make_case(cfg, seed, T=17):
    """A layer with random parameters (set through the attributes) and an input whose routing
    has no near-ties; returns (m, params, x)."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        m = moe.MoE(**cfg)
        params = {}
        for name, p in m.parameters().items():
            scale = 1.0 if name == "W_g" else 1.5 / math.sqrt(p.shape[-2] if p.ndim == 3 else 4)
            params[name] = (rng.normal(size=p.shape) * scale).astype(np.float32)
            setattr(m, name, params[name])
        x = rng.normal(size=(T, cfg["d_model"])).astype(np.float32)
        ref = RL.moe_forward({n: R.t64(v) for n, v in params.items()}, R.t64(x), cfg)
        if ref["margin"] > 1e-3:
            return m, params, x
    raise AssertionError("no case without near-ties")


def base(**kw):
    cfg = dict(d_model=6, n_experts=5, k=2, expert="clamped_swiglu", d_ff=7, d_out=4,
               noise="none", aux_alpha=0.3, z_alpha=0.02, router_bias=True, seed=3)
    cfg.update(kw)
    return cfg


CLAMPED = [dict(), dict(swiglu_limit=0.6, swiglu_alpha=1.25), dict(bias=False, swiglu_limit=0.6),
           dict(capacity_factor=0.8, swiglu_limit=0.8),
           dict(n_shared_experts=2, shared_d_ff=3, shared_gate=True, swiglu_limit=0.6),
           dict(residual=True, d_out=None, swiglu_limit=1.0, k=3)]


@pytest.mark.parametrize("kw", CLAMPED, ids=[str(i) for i in range(len(CLAMPED))])
def test_clamped_swiglu_matches_torch(kw):
    cfg = base(**kw)
    seed = 40 + CLAMPED.index(kw)
    m, params, x = make_case(cfg, seed)
    names = set(m.parameters())
    assert {"W1", "W2", "W3"} <= names
    assert ({"b1", "b2", "b3"} <= names) == cfg.get("bias", True)
    P = {n: R.t64(v).requires_grad_(True) for n, v in params.items()}
    xt = R.t64(x).requires_grad_(True)
    ref = RL.moe_forward(P, xt, cfg)
    y = m.forward(x)
    np.testing.assert_array_equal(m.routing.indices, ref["indices"].numpy())
    yr = ref["y"].detach().numpy()
    close(y, yr, 1e-4, 1e-5 * (1 + np.abs(yr).max()), "y")
    assert np.count_nonzero(y) >= 0.5 * y.size
    # The clamps really bite where the limit is small: some gate or up pre-activation lies
    # outside its range (else this case would test plain SwiGLU).
    if cfg.get("swiglu_limit", 7.0) < 2:
        L = cfg["swiglu_limit"]
        a1 = np.einsum("td,edf->tef", x, params["W1"])
        a3 = np.einsum("td,edf->tef", x, params["W3"])
        assert (a1 > L).any() and (np.abs(a3) > L).any()
    R.check_backward(m, ref["y"], [ref["aux_loss"], ref["z_loss"]], xt, P,
                     np.random.default_rng(seed + 7))


def test_clamped_swiglu_bf16_within_bf16_of_fp32():
    # The limit stays out of reach here: a pre-activation within bf16's rounding of a clamp
    # bound flips its gradient mask between the precisions (like ReLU's kink); the C++
    # rounded-operand oracle (RealModelLayer.ClampedSwigluAgainstTheTwin) checks those.
    cfg = base(d_model=32, d_ff=48, d_out=32, n_experts=4)
    m, params, x = make_case(cfg, 5, T=40)
    b = moe.MoE(**dict(cfg, precision="bf16"))
    for n, v in params.items():
        setattr(b, n, v)
    y32, y16 = m.forward(x), b.forward(x)
    np.testing.assert_array_equal(m.routing.indices, b.routing.indices)
    err = np.abs(y16 - y32).max() / np.abs(y32).max()
    assert 1e-6 < err < 2e-2
    dy = np.random.default_rng(1).normal(size=y32.shape).astype(np.float32)
    dx32, dx16 = m.backward(dy), b.backward(dy)
    assert np.abs(dx16 - dx32).max() / np.abs(dx32).max() < 2e-2
    for n in ("W1", "b1", "W3", "b3", "W2", "b2"):
        g32, g16 = m.grads[n], b.grads[n]
        assert np.abs(g16 - g32).max() / np.abs(g32).max() < 3e-2, n


@pytest.mark.parametrize("kind", ["mlp", "swiglu", "clamped_swiglu"])
def test_shared_d_ff_matches_torch(kind):
    cfg = base(expert=kind, n_shared_experts=1 if kind == "swiglu" else 2, shared_d_ff=9,
               shared_gate=kind != "mlp", activation="gelu", swiglu_limit=0.8)
    m, params, x = make_case(cfg, 70)
    assert m.Ws1.shape == (cfg["n_shared_experts"], 6, 9)
    assert m.Ws2.shape == (cfg["n_shared_experts"], 9, 4)
    assert m.W1.shape == (5, 6, 7)
    P = {n: R.t64(v).requires_grad_(True) for n, v in params.items()}
    xt = R.t64(x).requires_grad_(True)
    ref = RL.moe_forward(P, xt, cfg)
    y = m.forward(x)
    yr = ref["y"].detach().numpy()
    close(y, yr, 1e-4, 1e-5 * (1 + np.abs(yr).max()), "y")
    R.check_backward(m, ref["y"], [ref["aux_loss"], ref["z_loss"]], xt, P,
                     np.random.default_rng(71))


def test_keywords_config_and_pickle():
    m = moe.MoE(8, 8, 2, expert="clamped_swiglu", d_ff=12, n_shared_experts=1, shared_d_ff=5,
                router="sigmoid", renormalize=True, n_groups=4, topk_groups=2,
                group_score="max", selection_bias=True, swiglu_alpha=1.5, swiglu_limit=3.0,
                noise="none", seed=2)
    c = m.config
    assert c["group_score"] == "max" and c["selection_bias"] is True
    assert c["shared_d_ff"] == 5 and c["swiglu_alpha"] == 1.5 and c["swiglu_limit"] == 3.0
    assert isinstance(c["swiglu_limit"], float)
    assert moe.MoE(**c).config == c
    assert moe.MoE(4, 4, 1).config["shared_d_ff"] is None
    # The fixed selection bias is assignable, steers the choice and survives pickling of the
    # torch module.
    bias = np.array([0, 0, 0, 0, 0, 0, 4, 4], dtype=np.float32)
    m.expert_bias = bias
    np.testing.assert_array_equal(m.expert_bias, bias)
    x = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    m.forward(x, training=False)
    assert (m.routing.indices[:, 0] >= 6).all()
    t = moe.torch.MoE(8, 8, 2, expert="clamped_swiglu", d_ff=12, router="sigmoid",
                      selection_bias=True, noise="none")
    t.layer.expert_bias = bias
    u = pickle.loads(pickle.dumps(t))
    np.testing.assert_array_equal(u.layer.expert_bias, bias)


@pytest.mark.parametrize("kwargs, message", [
    (dict(group_score="sum"), "group_score: unknown value 'sum'"),
    (dict(expert="clamped_swiglu", swiglu_limit=0.0), "swiglu_limit: must be finite and > 0"),
    (dict(expert="clamped_swiglu", swiglu_alpha=-1.0), "swiglu_alpha: must be finite and > 0"),
    (dict(shared_d_ff=4), "shared_d_ff: needs n_shared_experts > 0"),
    (dict(n_shared_experts=1, shared_d_ff=0), "shared_d_ff: must be at least 1"),
])
def test_RM1_real_model_fields_named(kwargs, message):
    """docs/errors.md row RM1 (Python column)."""
    with errors_doc.raises(ValueError, match=message):
        moe.MoE(6, 4, 2, **kwargs)


# ---- experts_forward ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear_relu", "mlp", "swiglu", "clamped_swiglu"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_experts_forward_is_the_layer_with_its_own_routing(kind, precision):
    m = moe.MoE(10, 6, 3, expert=kind, d_ff=12, d_out=7, router="softmax_topk",
                renormalize=True, noise="none", router_init_std=1.0, swiglu_limit=1.0,
                precision=precision, seed=4)
    x = np.random.default_rng(1).normal(size=(33, 10)).astype(np.float32)
    y = m.forward(x, training=False)
    r = m.routing
    for idx in (r.indices.astype(np.int32), r.indices.astype(np.int64)):
        np.testing.assert_array_equal(m.experts_forward(x, idx, r.weights), y)


@pytest.mark.parametrize("kind", ["mlp", "swiglu", "clamped_swiglu"])
def test_experts_forward_matches_torch(kind):
    rng = np.random.default_rng(9)
    cfg = base(expert=kind, activation="silu", swiglu_limit=0.7, n_shared_experts=1,
               residual=True, d_out=None)
    m, params, _ = make_case(cfg, 90)
    T, k, E = 21, 4, cfg["n_experts"]
    x = rng.normal(size=(T, 6)).astype(np.float32)
    idx = rng.integers(0, E, size=(T, k))  # repeats allowed
    w = rng.normal(size=(T, k)).astype(np.float32)
    y = m.experts_forward(x, idx, w)
    P = {n: R.t64(v) for n, v in params.items()}
    ref = torch.zeros(T, 6, dtype=torch.float64)
    xt = R.t64(x)
    for t in range(T):
        for j in range(k):
            ref[t] += float(w[t, j]) * R.expert_forward(
                kind, P, int(idx[t, j]), xt[t:t + 1], "silu", 1.702, 0.7)[0]
    yr = ref.numpy()
    close(y, yr, 2e-5, 2e-6 * (1 + np.abs(yr).max()), "y")
    assert np.count_nonzero(y) == y.size


def test_RM2_experts_forward_names_the_token():
    """docs/errors.md row RM2 (Python column)."""
    m = moe.MoE(4, 3, 2, seed=1)
    x = np.ones((2, 4), dtype=np.float32)
    w = np.full((2, 2), 0.5, dtype=np.float32)
    with errors_doc.raises(ValueError, match=r"indices: expert index out of range 0..2 at token 1, got 3"):
        m.experts_forward(x, np.array([[0, 1], [2, 3]]), w)
    with errors_doc.raises(ValueError, match="indices: expected an integer array"):
        m.experts_forward(x, np.zeros((2, 2), dtype=np.float32), w)
    with errors_doc.raises(ValueError, match=r"weights: expected shape \[2, 2\]"):
        m.experts_forward(x, np.zeros((2, 2), dtype=np.int32), w[:, :1])
    bad = w.copy()
    bad[1, 0] = np.inf
    with errors_doc.raises(ValueError, match=r"weights: non-finite value inf at token 1 \(slot 0\)"):
        m.experts_forward(x, np.zeros((2, 2), dtype=np.int32), bad)
    with errors_doc.raises(ValueError, match=r"x: expected shape \[2, 4\]|x: expected"):
        m.experts_forward(np.ones((2, 5), dtype=np.float32), np.zeros((2, 2), dtype=np.int32), w)
    # Evaluation only: no backward follows it.
    m.forward(x)
    m.experts_forward(x, np.zeros((2, 2), dtype=np.int32), w)
    with errors_doc.raises(ValueError, match="backward: called before forward", row="L12"):
        m.backward(np.ones((2, 4), dtype=np.float32))


@pytest.mark.parametrize("kind", ["mlp", "swiglu", "clamped_swiglu"])
def test_experts_backward_matches_torch(kind):
    rng = np.random.default_rng(11)
    cfg = base(expert=kind, activation="gelu", swiglu_limit=0.7)
    m, params, _ = make_case(cfg, 95)
    T, k, E = 19, 3, cfg["n_experts"]
    x = rng.normal(size=(T, 6)).astype(np.float32)
    idx = rng.integers(0, E, size=(T, k))
    w = rng.normal(size=(T, k)).astype(np.float32)
    dy = rng.normal(size=(T, 4)).astype(np.float32)
    m.zero_grad()
    m.experts_forward(x, idx, w)
    dx, dw = m.experts_backward(dy)
    experts = [n for n in params if n[0] in "Wb" and n not in ("W_g", "b_g")]
    P = {n: R.t64(params[n]).requires_grad_(True) for n in experts}
    xt = R.t64(x).requires_grad_(True)
    wt = R.t64(w).requires_grad_(True)
    y = torch.zeros(T, 4, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            y[t] += wt[t, j] * R.expert_forward(kind, P, int(idx[t, j]), xt[t:t + 1], "gelu",
                                                1.702, 0.7)[0]
    (y * R.t64(dy)).sum().backward()
    for got, ref, what in [(dx, xt.grad, "dx"), (dw, wt.grad, "dweights")]:
        r = ref.numpy()
        close(got, r, 1e-4, 2e-5 * (1 + np.abs(r).max()), what)
    g = m.grads
    for n in experts:
        r = P[n].grad.numpy()
        close(g[n], r, 1e-4, 2e-5 * (1 + np.abs(r).max()), f"grad {n}")
        assert np.count_nonzero(g[n]) > 0
    assert not np.any(g["W_g"])
    with pytest.raises(ValueError, match="backward_routed: called before forward_routed"):
        m.experts_backward(dy)
