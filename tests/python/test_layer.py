"""moe.MoE (SPEC §2–§5): the reference examples, capacity and dropping, statistics,
parameters, validation — and random configurations of every kind against the PyTorch
implementation of the same formulas in torch_ref.py (outputs, losses, stats, gradients)."""
import itertools
import math

import numpy as np
import pytest
import torch

import moe
import torch_ref as R

F32_EPS = float(np.finfo(np.float32).eps)


close = R.close


# ---- worked examples ------------------------------------------------------------------------


def worked_example_layer(**kw):
    m = moe.MoE(2, 3, 2, expert="linear_relu", noise="none", **kw)
    m.W_g = [[1, 0, -1], [0, 1, 1]]
    m.W1 = [np.eye(2), [[0, 1], [1, 0]], [[5, 5], [5, 5]]]
    m.b1 = np.zeros((3, 2))
    return m


def test_worked_example():
    m = worked_example_layer()
    y = m.forward(np.array([[0.8, 0.6]]))
    np.testing.assert_array_equal(np.round(m.routing.gates, 3),
                                  np.array([[0.550, 0.450, 0.0]], dtype=np.float32))
    np.testing.assert_array_equal(np.round(y, 3), np.array([[0.710, 0.690]], dtype=np.float32))
    s = m.stats
    assert s["experts_evaluated"] == 2  # expert 3 never runs
    assert s["load_before"] == [1, 1, 0] and s["load_after"] == [1, 1, 0]
    # One token, 1-D in and out.
    np.testing.assert_array_equal(m.forward(np.array([0.8, 0.6])), y[0])


def test_balancing_loss_example():
    # 4 tokens, 3 experts, hard routing 3 → expert 1, 1 → expert 2; mean probs [0.6, 0.3, 0.1].
    indices = np.array([[0], [0], [0], [1]])
    probs = np.array([[0.6, 0.3, 0.1]] * 4)
    for alpha in (0.01, 1.0):
        assert moe.load_balancing_loss(indices, probs, 3, alpha=alpha) == pytest.approx(1.575 * alpha, rel=1e-6)
    # Balanced: each of E experts gets T·k/E assignments, uniform probs → k·α (α normalised).
    E, k, T = 4, 2, 8
    indices = np.array([[t % E, (t + 1) % E] for t in range(T)])
    probs = np.full((T, E), 1 / E)
    assert moe.load_balancing_loss(indices, probs, E, alpha=0.1) == pytest.approx(k * 0.1, rel=1e-6)
    assert moe.load_balancing_loss(indices, probs, E, alpha=0.1, normalize_by_k=True) == pytest.approx(0.1, rel=1e-6)


def test_balancing_loss_matches_torch(rng):
    T, E, k = 37, 7, 3
    probs = rng.dirichlet(np.ones(E), size=T)
    indices = np.argsort(-rng.normal(size=(T, E)), axis=1)[:, :k]
    for nk in (False, True):
        ref = R.load_balancing_loss(torch.as_tensor(indices), R.t64(probs), E, 0.05, nk)
        got = moe.load_balancing_loss(indices, probs, E, alpha=0.05, normalize_by_k=nk)
        assert got == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda: moe.load_balancing_loss(np.array([[0], [3]]), np.ones((2, 3)) / 3, 3), "indices"),
    (lambda: moe.load_balancing_loss(np.array([[0], [1]]), np.ones((2, 4)) / 4, 3), "probs"),
    (lambda: moe.load_balancing_loss(np.array([0, 1]), np.ones((2, 3)) / 3, 3), "indices"),
    (lambda: moe.load_balancing_loss(np.array([[0.5], [1]]), np.ones((2, 3)) / 3, 3), "indices"),
    (lambda: moe.load_balancing_loss(np.array([[2**32]]), np.ones((1, 3)) / 3, 3), "indices"),
])
def test_balancing_loss_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def capacity_layer(k, policy, residual, cf=1.0):
    """T=8, E=2, d=2: every token prefers expert 0, by a margin a_t that varies per token."""
    m = moe.MoE(2, 2, k, expert="linear_relu", capacity_factor=cf, drop_policy=policy,
                noise="none", residual=residual)
    m.W_g = [[1, 0], [0, 0]]  # h_t = [x_t0, 0]
    m.W1 = [np.eye(2), np.eye(2)]
    m.b1 = np.zeros((2, 2))
    a = np.array([0.1, 0.5, 0.2, 0.9, 0.3, 0.8, 0.4, 0.7])
    x = np.stack([a, np.full(8, 0.25)], axis=1)
    return m, x


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("residual", [False, True])
def test_capacity_example_k1(policy, residual):
    m, x = capacity_layer(1, policy, residual)
    y = m.forward(x)
    s = m.stats
    assert s["capacity"] == 4
    assert s["load_before"] == [8, 0] and s["load_after"] == [4, 0]
    assert s["dropped_assignments"] == 4 and s["dropped_tokens"] == 4
    # k = 1: every gate is 1, so "largest gates" ties and the lower tokens win either way.
    kept = np.arange(8) < 4
    np.testing.assert_allclose(y[kept], (2 if residual else 1) * x[kept], rtol=1e-6)
    np.testing.assert_array_equal(y[~kept], x[~kept].astype(np.float32) if residual else 0)


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_capacity_example_k2_policies_differ(policy):
    # k = 2, cf = 0.5: C = ceil(2·8/2·0.5) = 4 for 8 assignments per expert.
    m, x = capacity_layer(2, policy, residual=False, cf=0.5)
    y = m.forward(x)
    s = m.stats
    assert s["capacity"] == 4 and s["load_before"] == [8, 8] and s["load_after"] == [4, 4]
    kept0 = np.zeros(8, bool)
    kept1 = np.zeros(8, bool)
    if policy == "position":
        kept0[:4] = True  # first choices in token order
        kept1[:4] = True  # then second choices in token order
    else:
        order = np.argsort(-x[:, 0], kind="stable")
        kept0[order[:4]] = True   # largest sigmoid(a_t)
        kept1[order[4:]] = True   # largest 1 − sigmoid(a_t)
    g0 = 1 / (1 + np.exp(-x[:, 0]))
    ref = kept0[:, None] * g0[:, None] * x + kept1[:, None] * (1 - g0)[:, None] * x
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-7)
    assert s["dropped_tokens"] == (4 if policy == "position" else 0)


def test_dropless_never_drops(rng):
    m = moe.MoE(4, 3, 2, noise="none", router_init_std=1.0, seed=3)
    m.forward(rng.normal(size=(50, 4)))
    s = m.stats
    assert s["capacity"] is None and s["dropped_assignments"] == 0 and s["dropped_tokens"] == 0
    assert s["load_before"] == s["load_after"] and sum(s["load_after"]) == 100
    assert set(s) >= {"tokens", "capacity", "load_before", "load_after", "dropped_assignments",
                      "dropped_tokens", "experts_evaluated", "aux_loss", "z_loss"}


# ---- random configurations against PyTorch -------------------------------------------------

KINDS = ["linear_relu", "mlp", "swiglu"]
CAPACITY = [(None, "position"), (1.0, "position"), (0.6, "position"), (1.0, "probs"),
            (0.6, "probs")]
NOISE = ["none", "learned", "fixed", "linear"]


def random_case(kind, k, cf, policy, residual, noise, seed):
    """A random layer (parameters assigned through the attributes), input and noise whose
    top-k and capacity cut are unambiguous in float32. Returns (m, cfg, params, x, eps)."""
    rng = np.random.default_rng(seed)
    d = int(rng.integers(3, 9))
    E = int(rng.integers(max(k, 2), 7))
    cfg = dict(d_model=d, n_experts=E, k=k, expert=kind, d_ff=int(rng.integers(2, 10)),
               d_out=d if residual else int(rng.integers(2, 8)),
               activation=["relu", "gelu", "silu"][seed % 3], capacity_factor=cf,
               drop_policy=policy, noise="learned" if noise == "linear" else noise,
               noise_scale="linear" if noise == "linear" else "softplus",
               noise_stddev=0.7, aux_alpha=float(rng.choice([0.0, 0.01, 0.3])),
               z_alpha=float(rng.choice([0.0, 0.05])), normalize_by_k=bool(seed % 2),
               residual=residual, seed=seed)
    for attempt in range(50):
        T = int(rng.integers(12, 30))
        m = moe.MoE(**cfg)
        params = {}
        for name, p in m.parameters().items():
            scale = 1.0 if name in ("W_g", "W_noise") else 1 / math.sqrt(p.shape[-2] if p.ndim == 3 else 4)
            v = rng.normal(size=p.shape) * scale
            if kind == "linear_relu" and name == "b1":
                v += 1.0  # keep most ReLU outputs alive so that the comparison sees values
            params[name] = v.astype(np.float32)
            setattr(m, name, params[name])
        x = rng.normal(size=(T, d)).astype(np.float32)
        eps = rng.normal(size=(T, E)).astype(np.float32) if noise != "none" else None
        ref = R.moe_forward({n: R.t64(v) for n, v in params.items()}, R.t64(x), cfg,
                            eps=None if eps is None else R.t64(eps))
        if ref["margin"] > 1e-3 and ref["cut_margin"] > 1e-4:
            return m, cfg, params, x, eps
    raise AssertionError("could not draw a case without near-ties")


CASES = list(itertools.product(KINDS, [1, 2, 3], CAPACITY, [False, True], NOISE))


def case_id(c):
    kind, k, (cf, pol), res, noise = c
    return f"{kind}-k{k}-cf{cf}-{pol}-{'res' if res else 'nores'}-{noise}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_forward_and_backward_match_torch(case):
    kind, k, (cf, policy), residual, noise = case
    seed = CASES.index(case)
    m, cfg, params, x, eps = random_case(kind, k, cf, policy, residual, noise, seed)

    P = {n: R.t64(v).requires_grad_(True) for n, v in params.items()}
    xt = R.t64(x).requires_grad_(True)
    ref = R.moe_forward(P, xt, cfg, eps=None if eps is None else R.t64(eps))
    y = m.forward(x, noise=eps)

    # Routing, capacity and stats are exact.
    np.testing.assert_array_equal(m.routing.indices, ref["indices"].numpy())
    s = m.stats
    for key in ("tokens", "capacity", "load_before", "load_after", "dropped_assignments",
                "dropped_tokens", "experts_evaluated"):
        assert s[key] == ref["stats"][key], key
    if cf is not None and cf < 1:
        assert s["dropped_assignments"] > 0  # the capacity path really ran

    # float32 against float64: a few hundred ulps of the largest magnitudes involved.
    yr = ref["y"].detach().numpy()
    tol = 1e-5 * (1 + np.abs(yr).max())
    close(y, yr, rtol=1e-4, atol=tol, what="y")
    live = (y if not residual else y - x)[ref["keep"].any(axis=1)]
    assert np.count_nonzero(live) >= 0.5 * live.size  # zero-trust: kept tokens carry values
    close(m.aux_loss, ref["aux_loss"].item(), rtol=1e-5, atol=1e-7, what="aux_loss")
    close(m.z_loss, ref["z_loss"].item(), rtol=1e-5, atol=1e-7, what="z_loss")
    close(s["aux_loss"], m.aux_loss, rtol=0, atol=0, what="stats aux_loss")

    # Gradients: the objective whose gradient backward(dy) gives is (y·dy).sum() + aux + z.
    dx, g = R.check_backward(m, ref["y"], [ref["aux_loss"], ref["z_loss"]], xt, P,
                             np.random.default_rng(seed + 1000))
    assert np.count_nonzero(g["W1"]) > 0 and np.count_nonzero(dx) > 0.5 * dx.size


@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_has_no_noise_and_matches_torch(kind):
    m, cfg, params, x, eps = random_case(kind, 2, None, "position", False, "learned", 7)
    y = m.forward(x, training=False)
    ref = R.moe_forward({n: R.t64(v) for n, v in params.items()}, R.t64(x), cfg, training=False)
    np.testing.assert_array_equal(m.routing.noisy_logits, m.routing.logits)
    yr = ref["y"].numpy()
    close(y, yr, rtol=1e-4, atol=1e-5 * (1 + np.abs(yr).max()), what="y")


def test_gradients_accumulate_until_zero_grad(rng):
    m, cfg, params, x, eps = random_case("mlp", 2, None, "position", False, "learned", 3)
    dy = rng.normal(size=(x.shape[0], cfg["d_out"]))
    m.zero_grad()
    m.forward(x, noise=eps)
    m.backward(dy)
    g1 = m.grads
    m.forward(x, noise=eps)
    m.backward(dy)
    g2 = m.grads
    for n in g1:
        np.testing.assert_allclose(g2[n], 2 * g1[n], rtol=1e-6, atol=1e-7)
    m.zero_grad()
    assert all(not np.any(v) for v in m.grads.values())


def test_layer_routing_equals_moe_route(rng):
    m = moe.MoE(5, 6, 2, noise="learned", router_init_std=0.7, seed=4)
    x = rng.normal(size=(40, 5))
    eps = rng.normal(size=(40, 6))
    m.forward(x, noise=eps)
    r = moe.route(x, m.W_g, 2, W_noise=m.W_noise, noise=eps)
    np.testing.assert_array_equal(m.routing.indices, r.indices)
    np.testing.assert_array_equal(m.routing.gates, r.gates)


# ---- generated noise, threads, determinism -----------------------------------------------------


def test_generated_noise_steps(rng):
    x = rng.normal(size=(30, 4))
    a = moe.MoE(4, 5, 2, router_init_std=0.5, seed=11)
    b = moe.MoE(4, 5, 2, router_init_std=0.5, seed=11)
    ya1, ya2 = a.forward(x), a.forward(x)
    yb1 = b.forward(x)
    np.testing.assert_array_equal(ya1, yb1)            # same seed, same step: same noise
    assert not np.array_equal(a.routing.eps, b.routing.eps)  # a is one step further
    assert a.step == 2
    np.testing.assert_array_equal(a.forward(x, step=0), ya1)  # a pinned step repeats
    np.testing.assert_array_equal(a.forward(x, training=False), b.forward(x, training=False))
    assert a.routing.eps is None
    c = moe.MoE(4, 5, 2, router_init_std=0.5, seed=12)
    c.forward(x, step=0)
    a.forward(x, step=0)
    assert not np.array_equal(c.routing.eps, a.routing.eps)  # another seed, other noise
    # A batch split in two with its global offsets draws the same noise as the whole.
    whole = a.forward(x, step=5)
    eps_whole = a.routing.eps
    first = a.forward(x[:13], step=5)
    eps_first = a.routing.eps
    second = a.forward(x[13:], step=5, token_offset=13)
    np.testing.assert_array_equal(np.concatenate([eps_first, a.routing.eps]), eps_whole)
    # Expert GEMMs over other row counts may round differently: equal to float32 accuracy.
    np.testing.assert_allclose(np.concatenate([first, second]), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_bit_identical_with_one_and_two_threads(rng, threads, kind):
    x = rng.normal(size=(257, 24))
    dy = rng.normal(size=(257, 24))
    results = []
    for n in (1, 2):
        moe.set_num_threads(n)
        m = moe.MoE(24, 8, 2, expert=kind, d_ff=40, capacity_factor=1.1, residual=True,
                    router_init_std=0.3, z_alpha=0.01, seed=5)
        y = m.forward(x)
        dx = m.backward(dy)
        results.append((y, dx, m.grads, m.stats))
    (y1, dx1, g1, s1), (y2, dx2, g2, s2) = results
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, dx2)
    for n in g1:
        np.testing.assert_array_equal(g1[n], g2[n])
    assert s1 == s2


# ---- parameters, attributes, validation --------------------------------------------------------


@pytest.mark.parametrize("kind, names", [
    ("linear_relu", ["W_g", "W_noise", "W1", "b1"]),
    ("mlp", ["W_g", "W_noise", "W1", "b1", "W2", "b2"]),
    ("swiglu", ["W_g", "W_noise", "W1", "W2", "W3"]),
])
def test_parameters_per_kind(kind, names):
    m = moe.MoE(6, 4, 2, expert=kind, d_ff=10, d_out=None if kind == "swiglu" else 5)
    p = m.parameters()
    assert list(p) == names
    d_out = 6 if kind == "swiglu" else 5
    shapes = {"W_g": (6, 4), "W_noise": (6, 4), "W1": (4, 6, d_out if kind == "linear_relu" else 10),
              "b1": (4, d_out if kind == "linear_relu" else 10), "W2": (4, 10, d_out),
              "b2": (4, d_out), "W3": (4, 6, 10)}
    for n in names:
        assert p[n].shape == shapes[n] and p[n].dtype == np.float32
        np.testing.assert_array_equal(getattr(m, n), p[n])
    for n in {"b_g", "W1", "b1", "W2", "b2", "W3"} - set(names):
        assert not hasattr(m, n)
    # Router weights start at zero (Shazeer et al.); experts are scaled by fan-in.
    assert not np.any(p["W_g"]) and not np.any(p["W_noise"])
    assert 0.2 / math.sqrt(6) < p["W1"].std() < 5 / math.sqrt(6)
    assert not hasattr(moe.MoE(6, 4, 2, noise="none"), "W_noise")
    assert moe.MoE(6, 4, 2, router_bias=True).b_g.shape == (4,)
    assert "b1" not in moe.MoE(6, 4, 2, bias=False).parameters()
    assert "b1" in moe.MoE(6, 4, 2, bias=True).parameters()


def test_parameter_assignment(rng):
    m = moe.MoE(3, 4, 2, d_ff=5)
    W1 = rng.normal(size=(4, 3, 5))
    m.W1 = W1  # float64 in
    np.testing.assert_array_equal(m.W1, W1.astype(np.float32))
    m.W1 = W1.transpose(0, 2, 1).copy().transpose(0, 2, 1)  # non-contiguous in
    np.testing.assert_array_equal(m.W1, W1.astype(np.float32))
    m.W1 = W1.astype(np.float32) * 2
    np.testing.assert_array_equal(m.parameters()["W1"], (W1 * 2).astype(np.float32))
    # Reading gives a copy: writing into it leaves the layer alone.
    w = m.W_g
    w[:] = 7
    assert not np.any(m.W_g == 7)
    with pytest.raises(ValueError, match=r"W1: expected shape \[4, 3, 5\], got \[4, 5, 3\]"):
        m.W1 = np.zeros((4, 5, 3))
    with pytest.raises(ValueError, match="b2"):
        m.b2 = np.zeros(4)
    with pytest.raises(AttributeError, match="W3"):
        m.W3 = np.zeros((4, 3, 5))
    with pytest.raises(ValueError, match="W_g"):
        m.W_g = "not numbers"


@pytest.mark.parametrize("kwargs, message", [
    (dict(expert="conv"), "expert"),
    (dict(k=5), "k"),
    (dict(k=0), "k"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(drop_policy="random_walk"), "drop_policy"),
    (dict(noise="loud"), "noise"),
    (dict(noise_scale="cubic"), "noise_scale"),
    (dict(activation="tanh"), "activation"),
    (dict(tie_break="coin"), "tie_break"),
    (dict(residual=True, d_out=3), "residual"),
    (dict(d_ff=0), "d_ff"),
    (dict(d_ff=8.5), "d_ff"),
    (dict(d_out="4"), "d_out"),
    (dict(noise_stddev=-1.0), "noise_stddev"),
    (dict(seed=-1), "seed"),
])
def test_constructor_errors(kwargs, message):
    args = dict(d_model=4, n_experts=4, k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        moe.MoE(**args)


def test_router_family_options_are_validated():
    with pytest.raises(ValueError, match="router: unknown value 'nope'"):
        moe.MoE(4, 4, 2, router="nope")
    with pytest.raises(ValueError, match="n_groups: must divide n_experts"):
        moe.MoE(6, 6, 2, n_groups=4)
    with pytest.raises(ValueError, match="shared_gate: needs n_shared_experts > 0"):
        moe.MoE(4, 4, 2, shared_gate=True)
    with pytest.raises(ValueError, match="second_expert_policy: 'random' needs k == 2"):
        moe.MoE(4, 4, 1, second_expert_policy="random")
    m = moe.MoE(4, 4, 2)
    assert m.config["router"] == "topk_softmax" and m.config["aux_loss"] == "switch"


def test_call_errors(rng):
    m = moe.MoE(4, 3, 2, noise="none")
    with pytest.raises(ValueError, match="backward"):
        m.backward(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"x: expected shape \(T, 4\)"):
        m.forward(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="x"):
        m.forward(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="noise"):
        m.forward(np.zeros((2, 4)), noise=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="token 1"):
        m.forward(np.array([[0, 0, 0, 0], [0, np.nan, 0, 0.0]]))
    m.forward(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"dy: expected shape \[2, 4\]"):
        m.backward(np.zeros((3, 4)))
    n = moe.MoE(4, 3, 2)
    with pytest.raises(ValueError, match=r"noise: expected shape \[2, 3\]"):
        n.forward(np.zeros((2, 4)), noise=np.zeros((2, 4)))


def test_empty_batch():
    m = moe.MoE(4, 3, 2, capacity_factor=1.0)
    y = m.forward(np.zeros((0, 4)))
    assert y.shape == (0, 4)
    assert m.stats["tokens"] == 0 and m.stats["dropped_assignments"] == 0
    assert m.backward(np.zeros((0, 4))).shape == (0, 4)


def test_config_rebuilds_the_layer():
    """moe.MoE(**m.config) makes a layer of the same configuration (moe.torch relies on it)."""
    m = moe.MoE(8, 4, 2, expert="swiglu", d_ff=12, bias=False, precision="bf16",
                router="softmax_topk", renormalize=True, capacity_factor=1.5, seed=3)
    m2 = moe.MoE(**m.config)
    assert m2.config == m.config
