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
