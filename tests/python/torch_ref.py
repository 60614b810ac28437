"""The formulas of SPEC §1–§4 written again in PyTorch (float64), as an independent oracle.

Nothing here calls libmoe. Everything is plain tensor code that autograd differentiates, so
the same functions give the reference outputs, losses, stats and gradients.
"""
import math

import numpy as np
import torch

DT = torch.float64


def t64(a):
    return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=DT)


# ---- router (SPEC §1) ----------------------------------------------------------------------


def topk_order(H, k, tie_break="high"):
    """Indices (T, k) of the k largest entries of each row, best first; equal values go to
    the higher expert index (tie_break="high") or the lower one ("low")."""
    E = H.shape[-1]
    if tie_break == "high":
        # A stable descending sort keeps equal values in their given order: flip the expert
        # axis so the higher index comes first among equals.
        _, order = torch.sort(torch.flip(H.detach(), dims=[-1]), dim=-1, descending=True,
                              stable=True)
        order = E - 1 - order
    else:
        _, order = torch.sort(H.detach(), dim=-1, descending=True, stable=True)
    return order[..., :k]


def topk_margin(H, k):
    """Per row, the gap between the k-th and (k+1)-th largest values (inf when k = E)."""
    s, _ = torch.sort(H.detach(), dim=-1, descending=True)
    if k >= H.shape[-1]:
        return torch.full(H.shape[:-1], math.inf, dtype=H.dtype)
    return s[..., k - 1] - s[..., k]


def softplus(z):
    return torch.clamp(z, min=0) + torch.log1p(torch.exp(-torch.abs(z)))


def noisy_logits(x, W_g, W_noise=None, eps=None, noise_scale="softplus", b_g=None):
    """h = x·W_g (+ b_g); H = h + scale(x·W_noise) ⊙ ε when W_noise and ε are given."""
    h = x @ W_g
    if b_g is not None:
        h = h + b_g
    if W_noise is None or eps is None:
        return h, h
    pre = x @ W_noise
    scale = softplus(pre) if noise_scale == "softplus" else pre
    return h, h + scale * eps


def route(x, W_g, k, W_noise=None, eps=None, noise_scale="softplus", tie_break="high"):
    """Returns dict: logits h, noisy H, indices (T, k), weights (T, k), gates (T, E), probs."""
    h, H = noisy_logits(x, W_g, W_noise, eps, noise_scale)
    idx = topk_order(H, k, tie_break)
    kept = torch.gather(H, 1, idx)
    weights = torch.softmax(kept, dim=1)
    gates = torch.zeros_like(H).scatter(1, idx, weights)
    probs = torch.softmax(H, dim=1)
    return dict(logits=h, noisy=H, indices=idx, weights=weights, gates=gates, probs=probs)


# ---- losses (SPEC §2) ------------------------------------------------------------------------


def load_balancing_loss(indices, probs, n_experts, alpha=0.01, normalize_by_k=False):
    """α·E·Σ f_i·P_i; f from the hard indices (no gradient), P the mean of probs."""
    T, k = indices.shape
    counts = torch.zeros(n_experts, dtype=DT)
    counts.index_add_(0, indices.reshape(-1), torch.ones(T * k, dtype=DT))
    f = counts / T
    if normalize_by_k:
        f = f / k
    P = probs.mean(dim=0)
    return alpha * n_experts * (f * P).sum()


def z_loss(h, c_z):
    return c_z * (torch.logsumexp(h, dim=1) ** 2).mean()


# ---- capacity (SPEC §3) ----------------------------------------------------------------------


def capacity(k, T, E, capacity_factor):
    """C = ceil(k·T/E·cf) with cf taken as the decimal the caller wrote (exact arithmetic),
    or None when dropless."""
    if capacity_factor is None:
        return None
    from fractions import Fraction

    return math.ceil(Fraction(k * T, E) * Fraction(repr(float(capacity_factor))))


def keep_mask(indices, weights, n_experts, C, policy="position"):
    """Bool (T, k): which assignments (t, j) survive capacity C.

    position: an expert takes first choices in token order, then second choices, … (GShard).
    probs: an expert keeps the C assignments of largest gate weight, ties to the lower token.
    """
    idx = indices.numpy()
    w = weights.detach().numpy()
    T, k = idx.shape
    keep = np.ones((T, k), dtype=bool)
    if C is None:
        return keep
    if policy == "position":
        used = np.zeros(n_experts, dtype=np.int64)
        for j in range(k):
            for t in range(T):
                e = idx[t, j]
                keep[t, j] = used[e] < C
                used[e] += 1
    else:
        for e in range(n_experts):
            ts, js = np.nonzero(idx == e)
            order = sorted(range(len(ts)), key=lambda i: (-w[ts[i], js[i]], ts[i]))
            for i in order[C:]:
                keep[ts[i], js[i]] = False
    return keep


def capacity_margin(indices, weights, n_experts, C):
    """Smallest gap, over experts that overflow, between the C-th and (C+1)-th largest gate
    weight (the cut of the probs policy); inf when nothing is cut."""
    if C is None:
        return math.inf
    idx = indices.numpy()
    w = weights.detach().numpy()
    gap = math.inf
    for e in range(n_experts):
        ws = np.sort(w[idx == e])[::-1]
        # Exact ties in float64 are structural (k = 1: every weight is 1) and exact in
        # float32 too; only a small non-zero gap can order differently.
        if len(ws) > C > 0 and ws[C - 1] != ws[C]:
            gap = min(gap, ws[C - 1] - ws[C])
    return gap


# ---- experts and the layer (SPEC §4) -----------------------------------------------------------


def activation(name):
    return {"relu": torch.relu,
            "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),  # exact erf form
            "silu": lambda z: z * torch.sigmoid(z)}[name]


def expert_forward(kind, p, e, x, act="relu", alpha=1.702, limit=7.0):
    """Expert e of the stacked weights p applied to rows x (n, d). clamped_swiglu (GPT-OSS)
    uses alpha and limit."""
    def b(name):
        return p[name][e] if name in p else 0

    if kind == "linear_relu":
        return torch.relu(x @ p["W1"][e] + b("b1"))
    if kind == "mlp":
        return activation(act)(x @ p["W1"][e] + b("b1")) @ p["W2"][e] + b("b2")
    if kind == "swiglu":
        a = x @ p["W1"][e]
        return (a * torch.sigmoid(a) * (x @ p["W3"][e])) @ p["W2"][e]
    if kind == "clamped_swiglu":
        gate = torch.clamp(x @ p["W1"][e] + b("b1"), max=limit)
        up = torch.clamp(x @ p["W3"][e] + b("b3"), min=-limit, max=limit)
        return ((up + 1) * gate * torch.sigmoid(alpha * gate)) @ p["W2"][e] + b("b2")
    raise ValueError(kind)



def layer_logits(p, x, cfg, eps=None, training=True):
    """The layer's router logits: h = x·W_g (+ b_g) and, in training with noise and a given
    ε, H = h + noise ⊙ ε (fixed: σ; learned: softplus(x·W_noise), or x·W_noise itself for the
    linear scale). Returns (h, H, std) with std the noise's standard deviation per logit
    (|x·W_noise| for the linear scale), or None when no noise was applied."""
    noise = cfg.get("noise", "learned")
    h = x @ p["W_g"]
    if "b_g" in p:
        h = h + p["b_g"]
    if not (training and noise != "none" and eps is not None):
        return h, h, None
    if noise == "fixed":
        std = torch.full_like(h, cfg.get("noise_stddev", 1.0))
        return h, h + std * eps, std
    pre = x @ p["W_noise"]
    if cfg.get("noise_scale", "softplus") == "softplus":
        std = softplus(pre)
        return h, h + std * eps, std
    return h, h + pre * eps, torch.abs(pre)


def combine(p, x, cfg, idx, weights, keep):
    """Σ over each token's kept assignments of weight · expert(x_t), (T, d_out); no residual."""
    T, E = x.shape[0], cfg["n_experts"]
    d_out = cfg.get("d_out") or cfg["d_model"]
    kind, act = cfg.get("expert", "mlp"), cfg.get("activation", "relu")
    y = torch.zeros(T, d_out, dtype=DT)
    idx_np = idx.numpy()
    for e in range(E):
        ts, js = np.nonzero((idx_np == e) & keep)
        if len(ts) == 0:
            continue
        ts_t, js_t = torch.as_tensor(ts), torch.as_tensor(js)
        out = expert_forward(kind, p, e, x[ts_t], act, cfg.get("swiglu_alpha", 1.702),
                             cfg.get("swiglu_limit", 7.0))
        y = y.index_add(0, ts_t, weights[ts_t, js_t].unsqueeze(1) * out)
    return y

def moe_forward(p, x, cfg, eps=None, training=True):
    """The whole layer. p: dict name → float64 tensor (requires_grad as wanted); x (T, d);
    cfg: dict of moe.MoE's keyword arguments (with n_experts, k); eps (T, E) the noise, used
    only in training with noise != "none".

    Returns dict: y, aux_loss, z_loss (tensors), indices, weights, keep, probs, noisy,
    logits, stats (dict as moe.MoE.stats), margin (top-k), cut_margin (probs policy)."""
    E, k = cfg["n_experts"], cfg["k"]
    T = x.shape[0]
    h, H, _ = layer_logits(p, x, cfg, eps, training)
    idx = topk_order(H, k, cfg.get("tie_break", "high"))
    weights = torch.softmax(torch.gather(H, 1, idx), dim=1)
    probs = torch.softmax(H, dim=1)
    C = capacity(k, T, E, cfg.get("capacity_factor"))
    keep = keep_mask(idx, weights, E, C, cfg.get("drop_policy", "position"))

    y = combine(p, x, cfg, idx, weights, keep)
    idx_np = idx.numpy()
    if cfg.get("residual", False):
        y = y + x

    alpha = cfg.get("aux_alpha", 0.01)
    aux = load_balancing_loss(idx, probs, E, alpha, cfg.get("normalize_by_k", False)) \
        if T > 0 else torch.zeros((), dtype=DT)
    zl = z_loss(h, cfg.get("z_alpha", 0.0)) if T > 0 else torch.zeros((), dtype=DT)

    load_before = np.bincount(idx_np.ravel(), minlength=E)
    load_after = np.bincount(idx_np[keep], minlength=E)
    stats = dict(tokens=T, capacity=C, load_before=load_before.tolist(),
                 load_after=load_after.tolist(), dropped_assignments=int((~keep).sum()),
                 dropped_tokens=int((~keep).all(axis=1).sum()) if k > 0 else 0,
                 experts_evaluated=int((load_after > 0).sum()),
                 aux_loss=float(aux.detach()), z_loss=float(zl.detach()))
    margin = float(topk_margin(H, k).min()) if T > 0 else math.inf
    return dict(y=y, aux_loss=aux, z_loss=zl, indices=idx, weights=weights, keep=keep,
                probs=probs, noisy=H, logits=h, stats=stats, margin=margin,
                cut_margin=capacity_margin(idx, weights, E, C))


# ---- comparison helpers shared by the layer tests -------------------------------------------

def close(got, ref, rtol, atol, what):
    """|got − ref| ≤ atol + rtol·|ref| elementwise, NaN/Inf always failing."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} vs {ref.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    err = np.abs(got - ref)
    bound = atol + rtol * np.abs(ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else None
    assert np.all(err <= bound), (
        f"{what}: |err| {err[worst]:.3g} > {bound[worst]:.3g} at {worst} "
        f"(got {got[worst]:.7g}, ref {ref[worst]:.7g})")


def check_backward(m, ref_y, ref_losses, xt, P, rng):
    """The layer's backward(dy), dy drawn from rng, against autograd of the objective whose
    gradient it gives, (ref_y·dy).sum() + Σ ref_losses: dx against xt.grad and every gradient
    against its parameter's (all of P, and nothing else). Returns (dx, grads)."""
    dy = rng.normal(size=tuple(ref_y.shape)).astype(np.float32)
    m.zero_grad()
    dx = m.backward(dy)
    obj = (ref_y * t64(dy)).sum()
    for loss in ref_losses:
        obj = obj + loss
    obj.backward()
    g = m.grads
    assert set(g) == set(P)
    gx = xt.grad.numpy()
    close(dx, gx, rtol=1e-4, atol=2e-5 * (1 + np.abs(gx).max()), what="dx")
    for name, p in P.items():
        ref_g = p.grad.numpy() if p.grad is not None else np.zeros(p.shape)
        close(g[name], ref_g, rtol=1e-4, atol=2e-5 * (1 + np.abs(ref_g).max()),
              what=f"grad {name}")
    return dx, g

