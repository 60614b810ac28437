"""bf16 expert weights for inference (issue 5, item 4): checked against an oracle that rounds
the weights and each product's input activations to bf16 (round to nearest even) and sums in
float64 — tight — and against the fp32 layer within bf16 tolerance. Dropless, so every kept
assignment is computed in both paths."""
import numpy as np
import pytest

import moe


def bf16(a):
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def act(kind, z):
    if kind == "relu":
        return np.maximum(z, 0)
    if kind == "gelu":
        from math import erf, sqrt
        return 0.5 * z * (1 + np.vectorize(erf)(z / sqrt(2)))
    return z / (1 + np.exp(-z))


def oracle(m, x):
    """y from the routing of the last forward, experts in float64 on bf16-rounded inputs."""
    cfg = m.config
    r = m.routing
    idx, w = np.asarray(r.indices), np.asarray(r.weights, dtype=np.float64)
    y = np.zeros((x.shape[0], m.d_out))
    for t in range(x.shape[0]):
        xt = bf16(x[t])
        for j in range(cfg["k"]):
            e = idx[t, j]
            if cfg["expert"] == "linear_relu":
                z = xt @ bf16(m.W1[e])
                if cfg["expert_bias"]:
                    z = z + m.b1[e]
                out = np.maximum(z, 0)
            elif cfg["expert"] == "mlp":
                a1 = xt @ bf16(m.W1[e]) + (m.b1[e] if cfg["expert_bias"] else 0)
                h = act(cfg["activation"], a1).astype(np.float32)
                out = bf16(h) @ bf16(m.W2[e]) + (m.b2[e] if cfg["expert_bias"] else 0)
            else:
                a1 = xt @ bf16(m.W1[e])
                a3 = xt @ bf16(m.W3[e])
                h = (a1 / (1 + np.exp(-a1)) * a3).astype(np.float32)
                out = bf16(h) @ bf16(m.W2[e])
            y[t] += w[t, j] * out
    return y


CASES = [("linear_relu", "relu", 5, 1, 7), ("mlp", "relu", 6, 2, 33), ("mlp", "gelu", 4, 2, 65),
         ("mlp", "silu", 8, 3, 1), ("swiglu", "relu", 3, 2, 70)]


@pytest.mark.parametrize("expert,activation,E,k,T", CASES)
def test_bf16_matches_the_rounding_oracle_and_fp32(expert, activation, E, k, T):
    rng = np.random.default_rng(E * 100 + T)
    d, f = 34, 75  # odd K (75) exercises the zero pair; N not a multiple of 64
    m = moe.MoE(d, E, k, expert=expert, d_ff=f, activation=activation, noise="none",
                router_init_std=0.5, seed=E + T)
    x = rng.standard_normal((T, d)).astype(np.float32)
    y32 = m.forward(x, training=False)
    m.set_bf16_experts(True)
    assert m.bf16_experts
    y16 = m.forward(x, training=False)
    ref = oracle(m, x)
    scale = np.abs(ref).max() + 1e-6
    # Same rounded inputs, fp32 accumulation vs float64: agreement to fp32 rounding over K.
    assert np.abs(y16 - ref).max() / scale < 2e-5
    # Against fp32: the error of rounding weights and activations to 8 significant bits.
    rel = np.linalg.norm(y16 - y32) / (np.linalg.norm(y32) + 1e-12)
    assert 0 < rel < 1.5e-2, rel
    # Off again: the fp32 path, to the bit.
    m.set_bf16_experts(False)
    assert np.array_equal(m.forward(x, training=False), y32)


def test_snapshot_is_taken_when_switched_on():
    m = moe.MoE(8, 4, 2, noise="none", router_init_std=0.5)
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    m.set_bf16_experts(True)
    y_before = m.forward(x, training=False)
    m.W2 = m.W2 * 2  # not seen until the snapshot is retaken
    assert np.array_equal(m.forward(x, training=False), y_before)
    m.set_bf16_experts(True)
    assert not np.array_equal(m.forward(x, training=False), y_before)


def test_training_and_backward_are_refused_while_on():
    m = moe.MoE(8, 4, 2)
    x = np.zeros((3, 8), dtype=np.float32)
    m.set_bf16_experts(True)
    with pytest.raises(ValueError, match="bf16 expert weights are for evaluation"):
        m.forward(x)
    m.forward(x, training=False)
    with pytest.raises(ValueError, match="backward: bf16 expert weights are for inference"):
        m.backward(np.zeros((3, 8), dtype=np.float32))
