"""The router family's score functions, selection bias, group-limited routing and jitter
(docs/routing.md, "Score functions, selection bias, groups and jitter") written again in
PyTorch (float64), from the published formulas, as an independent oracle of libmoe.

    softmax_topk (Mixtral / Qwen-MoE / OLMoE):  p = softmax(H); top-k of p; w = p[kept]
                                                (÷ Σ p[kept] with renormalize)
    sigmoid (DeepSeek-V3):                      s = sigmoid(H); top-k of s; w = s[kept]
                                                (÷ Σ s[kept] with renormalize)
    w ×= scaling_factor (every router, the default topk_softmax included)
    selection bias b (DeepSeek-V3 balancing without a loss): top-k of s + b, w from s alone
    groups (DeepSeek-V3): group score = sum of its top-2 of s + b; best topk_groups groups
    (DeepSeek-V2, group_score "max": group score = its best s + b)
    jitter (Switch): the router sees x·u, u ~ U(1 - jitter, 1 + jitter) (given here)

Nothing here calls libmoe; the capacity, expert and loss formulas are torch_ref's.
"""
import math

import numpy as np
import torch

import torch_ref as R

DT = torch.float64


def scores_route(H, cfg, sel_bias=None):
    """From the noisy logits H (T, E): dict indices (T, k), weights (T, k), probs (T, E) (the
    balancing loss's input) and margin (the smallest selection gap, for picking tie-free
    cases)."""
    T, E = H.shape
    k = cfg["k"]
    kind = cfg.get("router", "topk_softmax")
    tie = cfg.get("tie_break", "high")
    full = torch.softmax(H, dim=1)
    if kind == "topk_softmax":
        s = H
    elif kind == "softmax_topk":
        s = full
    else:
        s = torch.sigmoid(H)
    sel = s.detach().clone()
    if sel_bias is not None:
        sel = sel + torch.as_tensor(np.asarray(sel_bias, dtype=np.float64), dtype=DT)
    margin = math.inf
    G = cfg.get("n_groups", 1)
    if G > 1:
        gs = E // G
        best = 1 if cfg.get("group_score", "top2_sum") == "max" else min(2, gs)
        top = torch.topk(sel.view(T, G, gs), best, dim=2).values.sum(dim=2)  # (T, G)
        tg = cfg.get("topk_groups", 1)
        gidx = R.topk_order(top, tg, tie)
        if tg < G:
            margin = min(margin, float(R.topk_margin(top, tg).min()))
        mask = torch.zeros(T, G, dtype=torch.bool).scatter(1, gidx, True)
        mask = mask.repeat_interleave(gs, dim=1)
        sel = sel.masked_fill(~mask, -math.inf)
    idx = R.topk_order(sel, k, tie)
    if k < E:
        gap = R.topk_margin(sel, k)
        margin = min(margin, float(gap[torch.isfinite(gap)].min()) if torch.isfinite(gap).any()
                     else math.inf)
    if kind == "topk_softmax":
        w = torch.softmax(torch.gather(H, 1, idx), dim=1)
    else:
        w = torch.gather(s, 1, idx)
        if cfg.get("renormalize", False):
            w = w / (w.sum(dim=1, keepdim=True) + 1e-20)
    w = w * cfg.get("scaling_factor", 1.0)
    probs = s / s.sum(dim=1, keepdim=True) if kind == "sigmoid" else full
    return dict(indices=idx, weights=w, probs=probs, margin=margin)


def moe_forward(p, x, cfg, eps=None, training=True, jitter_u=None, sel_bias=None):
    """The whole layer with the router family. p: dict name → float64 tensor; x (T, d);
    cfg: moe.MoE's keyword arguments; eps (T, E) the noise (training, noise != "none");
    jitter_u (T, d) the jitter factors (training, jitter > 0); sel_bias (E) the selection
    bias. Returns dict y, aux_loss, z_loss, indices, weights, probs, keep, stats, margin."""
    E, k = cfg["n_experts"], cfg["k"]
    T = x.shape[0]
    xr = x * R.t64(jitter_u) if (training and jitter_u is not None) else x
    h, H, _ = R.layer_logits(p, xr, cfg, eps, training)  # the router sees the jittered x
    r = scores_route(H, cfg, sel_bias)
    idx, weights, probs = r["indices"], r["weights"], r["probs"]
    C = R.capacity(k, T, E, cfg.get("capacity_factor"))
    keep = R.keep_mask(idx, weights, E, C, cfg.get("drop_policy", "position"))

    y = R.combine(p, x, cfg, idx, weights, keep)  # the experts see the clean x
    idx_np = idx.numpy()
    if cfg.get("residual", False):
        y = y + x
    aux = R.load_balancing_loss(idx, probs, E, cfg.get("aux_alpha", 0.01),
                                cfg.get("normalize_by_k", False))
    zl = R.z_loss(h, cfg.get("z_alpha", 0.0))
    load_before = np.bincount(idx_np.ravel(), minlength=E)
    return dict(y=y, aux_loss=aux, z_loss=zl, indices=idx, weights=weights, probs=probs,
                keep=keep, load_before=load_before.tolist(), margin=r["margin"],
                cut_margin=R.capacity_margin(idx, weights, E, C))


def update_expert_bias(bias, load, rate):
    """DeepSeek-V3: b_i += rate·sign(mean load − load_i)."""
    load = np.asarray(load, dtype=np.float64)
    return np.asarray(bias, dtype=np.float64) + rate * np.sign(load.mean() - load)
