"""The router family's balancing losses, drop policies, random second expert and shared
experts written again in PyTorch (float64) from the published formulas, as an independent
oracle for libmoe (docs/routing.md, "Balancing losses, drop policies, second expert and
shared experts"). Nothing here calls libmoe; the Philox generator is reimplemented below.
"""
import math

import numpy as np
import torch

import torch_ref as R

DT = torch.float64


# ---- balancing losses ------------------------------------------------------------------------


def switch_loss(indices, probs, E, alpha, normalize_by_k=False, f=None):
    """α·E·Σ f_i·P_i (SPEC §2); f given (no gradient) or from the hard indices."""
    if f is None:
        T, k = indices.shape
        f = torch.bincount(indices.reshape(-1), minlength=E).to(DT) / T
        if normalize_by_k:
            f = f / k
    return alpha * E * (f * probs.mean(dim=0)).sum()


def seq_loss(indices, probs, E, alpha, seq_len, normalize_by_k=False):
    """Megatron-style sequence-level loss: switch per sequence of seq_len consecutive tokens,
    averaged over sequences (seq_len 0: the whole batch)."""
    T = indices.shape[0]
    n = seq_len or T
    assert T % n == 0
    parts = [switch_loss(indices[q:q + n], probs[q:q + n], E, alpha, normalize_by_k)
             for q in range(0, T, n)]
    return torch.stack(parts).mean()


def global_loss(load_counts, tokens, k, probs, E, alpha, normalize_by_k=False):
    """f_i = accumulated selections / accumulated tokens (÷k), P from the batch."""
    f = torch.as_tensor(np.asarray(load_counts, dtype=np.float64)) / tokens
    if normalize_by_k:
        f = f / k
    return switch_loss(None, probs, E, alpha, f=f)


def cv_squared(v):
    """Var(v)/(mean(v)² + 1e-10), population variance (tensor2tensor's cv_squared)."""
    if v.numel() <= 1:
        return torch.zeros((), dtype=DT)
    m = v.mean()
    return ((v - m) ** 2).mean() / (m * m + 1e-10)


def shazeer_loss(gates, h, H, std, indices, k, alpha, noisy):
    """Shazeer et al. 2017: α·CV(Importance)² + α·CV(Load)², Importance = Σ_t gates and
    Load_i = Σ_t Φ((h_i − kth_excluding(H, k, i)) / std_i). The load term needs noise."""
    L = alpha * cv_squared(gates.sum(dim=0))
    T, E = H.shape
    if not noisy or k >= E:
        return L
    # Threshold: the (k+1)-th largest noisy logit for experts in the top k, the k-th
    # otherwise. The order of the rest is by value; the top k are the router's choice.
    probs = []
    normal = torch.distributions.Normal(torch.zeros((), dtype=DT), torch.ones((), dtype=DT))
    for t in range(T):
        top = [int(i) for i in indices[t]]
        rest = sorted([e for e in range(E) if e not in top], key=lambda e: (-H[t, e].item(), e))
        kth, k1th = top[k - 1], rest[0]
        row = []
        for e in range(E):
            thr = H[t, k1th] if e in top else H[t, kth]
            row.append(normal.cdf((h[t, e] - thr) / std[t, e]))
        probs.append(torch.stack(row))
    load = torch.stack(probs).sum(dim=0)
    return L + alpha * cv_squared(load)


# ---- Philox-4x32-10, for the random dispatch draws -------------------------------------------

_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def philox(ctr, key):
    c = list(ctr)
    k0, k1 = key
    for _ in range(10):
        p0 = _M0 * c[0]
        p1 = _M1 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c[3] ^ k1) & MASK,
             p0 & MASK]
        k0 = (k0 + _W0) & MASK
        k1 = (k1 + _W1) & MASK
    return c


def dispatch_bits(seed, step, token, stream, word):
    """Stream 1: drop priorities; 2: second-expert uniforms (docs/routing.md)."""
    ctr = [(stream << 30) | (word // 4), token & MASK, (token >> 32) & MASK, step & MASK]
    return philox(ctr, (seed & MASK, (seed >> 32) & MASK))[word % 4]


# ---- dispatch ------------------------------------------------------------------------------------


def second_expert_mask(weights, seed, step, token_offset=0):
    """GShard: the second choice of token t goes out iff u_t < 2·w2/(w1 + w2)."""
    w = weights.detach().numpy()
    T = w.shape[0]
    keep = np.ones((T, 2), dtype=bool)
    for t in range(T):
        u = dispatch_bits(seed, step, token_offset + t, 2, 0) / 2.0 ** 32
        s = w[t, 0] + w[t, 1]
        keep[t, 1] = u < (2 * w[t, 1] / s if s > 0 else 0.0)
    return keep


def keep_mask(indices, weights, E, C, policy, eligible, seed=0, step=0, token_offset=0):
    """Bool (T, k) of assignments kept under capacity C among the eligible ones."""
    idx = indices.numpy()
    w = weights.detach().numpy()
    T, k = idx.shape
    keep = eligible.copy()
    if C is None:
        return keep
    if policy in ("position", "priority"):
        order = range(T) if policy == "position" else \
            sorted(range(T), key=lambda t: (-float(np.float32(w[t, 0])), t))
        used = np.zeros(E, dtype=np.int64)
        for j in range(k):
            for t in order:
                if not keep[t, j]:
                    continue
                e = idx[t, j]
                keep[t, j] = used[e] < C
                used[e] += 1
        return keep
    for e in range(E):
        ts, js = np.nonzero((idx == e) & keep)
        if policy == "probs":
            key = [(-float(np.float32(w[ts[i], js[i]])), ts[i]) for i in range(len(ts))]
        else:
            key = [(-dispatch_bits(seed, step, token_offset + int(ts[i]), 1, int(js[i])), ts[i])
                   for i in range(len(ts))]
        order = sorted(range(len(ts)), key=lambda i: key[i])
        for i in order[C:]:
            keep[ts[i], js[i]] = False
    return keep


# ---- the layer -----------------------------------------------------------------------------------


def shared_forward(p, x, cfg):
    """Σ_s shared_s(x), times sigmoid(x·w_shared_gate) with shared_gate (DeepSeek / Qwen)."""
    n = cfg.get("n_shared_experts", 0)
    d_out = cfg.get("d_out") or cfg["d_model"]
    y = torch.zeros(x.shape[0], d_out, dtype=DT)
    if n == 0:
        return y
    kind, act = cfg.get("expert", "mlp"), cfg.get("activation", "relu")
    sp = {"W1": p["Ws1"], "W2": p.get("Ws2"), "W3": p.get("Ws3")}
    if "bs1" in p:
        sp["b1"] = p["bs1"]
    if "bs2" in p:
        sp["b2"] = p["bs2"]
    if "bs3" in p:
        sp["b3"] = p["bs3"]
    sp = {a: b for a, b in sp.items() if b is not None}
    for s in range(n):
        y = y + R.expert_forward(kind, sp, s, x, act, cfg.get("swiglu_alpha", 1.702),
                                 cfg.get("swiglu_limit", 7.0))
    if cfg.get("shared_gate", False):
        y = y * torch.sigmoid(x @ p["w_shared_gate"]).unsqueeze(1)
    return y


def moe_forward(p, x, cfg, eps=None, training=True, step=0, token_offset=0, global_load=None):
    """The layer with the router-family options of this part. p, x, cfg, eps as in
    torch_ref.moe_forward; global_load = (counts (E), tokens) accumulated before this batch
    for aux_loss global. Returns dict like torch_ref.moe_forward."""
    E, k = cfg["n_experts"], cfg["k"]
    T = x.shape[0]
    h, H, std = R.layer_logits(p, x, cfg, eps, training)
    noisy = std is not None
    idx = R.topk_order(H, k, cfg.get("tie_break", "high"))
    weights = torch.softmax(torch.gather(H, 1, idx), dim=1)
    gates = torch.zeros_like(H).scatter(1, idx, weights)
    probs = torch.softmax(H, dim=1)
    seed = cfg.get("seed", 0)
    eligible = np.ones((T, k), dtype=bool)
    if cfg.get("second_expert_policy", "all") == "random":
        eligible = second_expert_mask(weights, seed, step, token_offset)
    C = R.capacity(k, T, E, cfg.get("capacity_factor"))
    keep = keep_mask(idx, weights, E, C, cfg.get("drop_policy", "position"), eligible, seed,
                     step, token_offset)

    y = R.combine(p, x, cfg, idx, weights, keep) + shared_forward(p, x, cfg)
    idx_np = idx.numpy()
    if cfg.get("residual", False):
        y = y + x

    alpha = cfg.get("aux_alpha", 0.01)
    nk = cfg.get("normalize_by_k", False)
    kind_loss = cfg.get("aux_loss", "switch")
    if kind_loss == "none" or alpha == 0:
        aux = torch.zeros((), dtype=DT)
    elif kind_loss == "switch":
        aux = switch_loss(idx, probs, E, alpha, nk)
    elif kind_loss == "seq":
        aux = seq_loss(idx, probs, E, alpha, cfg.get("seq_len", 0), nk)
    elif kind_loss == "global":
        counts = np.bincount(idx_np.ravel(), minlength=E)
        tokens = T
        if global_load is not None and training:
            counts = counts + np.asarray(global_load[0])
            tokens += global_load[1]
        aux = global_loss(counts, tokens, k, probs, E, alpha, nk)
    elif kind_loss == "shazeer":
        aux = shazeer_loss(gates, h, H, std, idx, k, alpha, noisy)
    else:
        raise ValueError(kind_loss)
    zl = R.z_loss(h, cfg.get("z_alpha", 0.0))
    load_after = np.bincount(idx_np[keep], minlength=E)
    stats = dict(load_before=np.bincount(idx_np.ravel(), minlength=E).tolist(),
                 load_after=load_after.tolist(), dropped_assignments=int((~keep).sum()),
                 dropped_tokens=int((~keep).all(axis=1).sum()), capacity=C)
    s, _ = torch.sort(H.detach(), dim=-1, descending=True)
    gaps = (s[:, :-1] - s[:, 1:]).min() if E > 1 else math.inf
    return dict(y=y, aux_loss=aux, z_loss=zl, indices=idx, weights=weights, keep=keep,
                probs=probs, noisy=H, logits=h, stats=stats, margin=float(gaps),
                std=std)
