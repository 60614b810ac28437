"""Expert-choice routing (Zhou et al. 2022) written again in PyTorch (float64), as an
independent oracle of moe.MoE(router="expert_choice"). Nothing here calls libmoe.

S = softmax(H) over the E experts of each token (H = h plus the training noise, as for the
default router); expert e takes the C tokens of largest S[:, e] (equal scores: lower token
first), C = min(T, ceil(k·T·cf/E)) with cf = capacity_factor or 1; y_t = Σ over the experts
that chose t of S[t, e]·expert_e(x_t) (+ x_t with residual). No balancing loss; z-loss as usual.
"""
import math

import numpy as np
import torch

import torch_ref as R

DT = R.DT


def ec_capacity(k, T, E, capacity_factor):
    if T == 0:
        return 0
    cf = 1.0 if capacity_factor is None else capacity_factor
    return min(T, R.capacity(k, T, E, cf))


def ec_forward(p, x, cfg, eps=None, training=True):
    """p: dict name → float64 tensor; x (T, d); cfg: moe.MoE keyword arguments; eps (T, E).

    Returns dict: y, z_loss, probs, tokens (E, C) numpy, gates (E, C), dense (T, E),
    stats (as moe.MoE.stats), margin (smallest gap between an expert's C-th and (C+1)-th
    score: the selection is only comparable across precisions when it is not tiny)."""
    E, k = cfg["n_experts"], cfg["k"]
    T = x.shape[0]
    h, H, _ = R.layer_logits(p, x, cfg, eps, training)
    S = torch.softmax(H, dim=1)
    C = ec_capacity(k, T, E, cfg.get("capacity_factor"))

    d_out = cfg.get("d_out") or cfg["d_model"]
    kind, act = cfg.get("expert", "mlp"), cfg.get("activation", "relu")
    y = torch.zeros(T, d_out, dtype=DT)
    tokens = np.zeros((E, C), dtype=np.int64)
    gates = torch.zeros(E, C, dtype=DT)
    dense = torch.zeros(T, E, dtype=DT)
    margin = math.inf
    for e in range(E):
        vals, order = torch.sort(S[:, e].detach(), descending=True, stable=True)
        if C < T and C > 0:
            margin = min(margin, float(vals[C - 1] - vals[C]))
        tok = order[:C]
        tokens[e] = tok.numpy()
        if C == 0:
            continue
        g = S[tok, e]
        gates[e] = g.detach()
        dense[tok, e] = g.detach()
        y = y.index_add(0, tok, g.unsqueeze(1) * R.expert_forward(kind, p, e, x[tok], act))
    if cfg.get("residual", False):
        y = y + x
    zl = R.z_loss(h, cfg.get("z_alpha", 0.0)) if T > 0 else torch.zeros((), dtype=DT)

    per_token = np.bincount(tokens.ravel(), minlength=T) if T > 0 else np.zeros(0, np.int64)
    hist = np.bincount(per_token, minlength=E + 1)[: E + 1]
    stats = dict(tokens=T, capacity=C, load_before=[C] * E, load_after=[C] * E,
                 dropped_assignments=0, dropped_tokens=int((per_token == 0).sum()),
                 experts_evaluated=E if C > 0 else 0, experts_per_token=hist.tolist(),
                 aux_loss=0.0, z_loss=float(zl.detach()))
    return dict(y=y, z_loss=zl, probs=S, tokens=tokens, gates=gates, dense=dense, stats=stats,
                margin=margin)
