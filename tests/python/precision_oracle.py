"""What the precision tests (test_bf16.py, test_int8.py) share: the NumPy oracle of a layer's
experts on rounded operands, the expert kinds they sweep, and an fp32 layer paired with its
twin in another precision.

The oracle takes the routing of the layer's last forward and evaluates every chosen expert
in float64 on operands rounded as the precision rounds them: `round_w` maps a weight matrix
[in, out] to the values its kernel multiplies by, `round_a` maps one row of a product's input
(the token, then the hidden activation as float32) to the values the kernel reads. Sums,
activations, biases and the combine stay in float64.
"""
import numpy as np

import moe

# (expert, activation, E, k, T): sizes chosen off every vector width.
CASES = [("linear_relu", "relu", 5, 1, 7), ("mlp", "relu", 6, 2, 33), ("mlp", "gelu", 4, 2, 65),
         ("mlp", "silu", 8, 3, 1), ("swiglu", "relu", 3, 2, 70)]


def act(kind, z):
    if kind == "relu":
        return np.maximum(z, 0)
    if kind == "gelu":
        from math import erf, sqrt
        return 0.5 * z * (1 + np.vectorize(erf)(z / sqrt(2)))
    return z / (1 + np.exp(-z))


def rel(a, b):
    """‖a − b‖ / ‖b‖ (Frobenius)."""
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def pair(precision, d, E, k, **kw):
    """The same layer in fp32 and in `precision` (same weights)."""
    m32 = moe.MoE(d, E, k, **kw)
    other = moe.MoE(d, E, k, precision=precision, **kw)
    for name, value in m32.parameters().items():
        setattr(other, name, value)
    return m32, other


def rounded_oracle(m, x, round_w, round_a):
    """y of layer m on x from the routing of its last forward, each expert product on
    operands rounded by round_w (weights) and round_a (a product's input row)."""
    cfg = m.config
    kind, E = cfg["expert"], cfg["n_experts"]
    idx, w = np.asarray(m.routing.indices), np.asarray(m.routing.weights, dtype=np.float64)
    W1 = [round_w(m.W1[e]) for e in range(E)]
    W2 = [round_w(m.W2[e]) for e in range(E)] if kind != "linear_relu" else None
    W3 = [round_w(m.W3[e]) for e in range(E)] if kind == "swiglu" else None
    y = np.zeros((x.shape[0], m.d_out))
    for t in range(x.shape[0]):
        xt = round_a(x[t])
        for j in range(cfg["k"]):
            e = idx[t, j]
            if kind == "linear_relu":
                out = np.maximum(xt @ W1[e] + (m.b1[e] if cfg["bias"] else 0), 0)
            else:
                if kind == "mlp":
                    h = act(cfg["activation"], xt @ W1[e] + (m.b1[e] if cfg["bias"] else 0))
                else:
                    a1, a3 = xt @ W1[e], xt @ W3[e]
                    h = a1 / (1 + np.exp(-a1)) * a3
                out = round_a(h.astype(np.float32)) @ W2[e]
                out = out + (m.b2[e] if cfg["bias"] and kind == "mlp" else 0)
            y[t] += w[t, j] * out
    return y
