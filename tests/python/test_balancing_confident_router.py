"""The balancing loss's gradients where `moe train`'s default run ends up (docs/training.md):
T = 512 tokens from 8 clusters, 8 mlp experts, top-2, learned noise, capacity 1.25, and a
router that is sure of itself (the softmax over the experts nearly one-hot), once with one
expert per cluster and once with two clusters on one expert. The gradient of the loss alone
(dy = 0) must equal the float64 PyTorch oracle's at this size too: the investigation of why
α = 0.01 leaves such collisions in place rests on these gradients being right."""
import numpy as np
import pytest
import torch

import moe
import torch_ref as R

T, D, E, K = 512, 32, 8, 2


def clustered_batch(rng):
    centres = rng.standard_normal((E, D))
    regime = rng.integers(0, E, T)
    x = (centres[regime] + rng.standard_normal((T, D))).astype(np.float32)
    return centres, regime, x


def confident_router(centres, owner, scale=0.5):
    """W_g whose column e scores x · (Σ of the centres of the clusters that e owns)."""
    W = np.zeros((D, E))
    for e, clusters in enumerate(owner):
        for c in clusters:
            W[:, e] += centres[c]
    return (scale * W).astype(np.float32)


def aux_gradients(owner, seed):
    rng = np.random.default_rng(seed)
    centres, regime, x = clustered_batch(rng)
    cfg = dict(d_model=D, n_experts=E, k=K, expert="mlp", d_ff=16, capacity_factor=1.25,
               noise="learned", aux_alpha=0.01, residual=True, seed=seed)
    m = moe.MoE(**cfg)
    params = {n: v for n, v in m.parameters().items()}
    params["W_g"] = confident_router(centres, owner)
    params["W_noise"] = (0.1 * rng.standard_normal((D, E))).astype(np.float32)
    m.W_g, m.W_noise = params["W_g"], params["W_noise"]
    for _ in range(20):  # a noise draw without a near-tie in any token's top 2
        eps = rng.standard_normal((T, E)).astype(np.float32)
        P = {n: R.t64(v).requires_grad_(True) for n, v in params.items()}
        xt = R.t64(x).requires_grad_(True)
        ref = R.moe_forward(P, xt, cfg, eps=R.t64(eps))
        if ref["margin"] > 1e-3:
            break
    else:
        raise AssertionError("no noise draw without near-ties")
    m.zero_grad()
    y = m.forward(x, noise=eps)
    np.testing.assert_array_equal(m.routing.indices, ref["indices"].numpy())
    probs = torch.softmax(ref["noisy"], dim=1).detach().numpy()
    assert probs.max(axis=1).mean() > 0.95  # the confident regime of the trained router
    dx = m.backward(np.zeros_like(y))  # the auxiliary loss's gradient only
    ref["aux_loss"].backward()
    R.close(m.aux_loss, float(ref["aux_loss"].detach()), rtol=1e-5, atol=0, what="aux_loss")
    for name in ("W_g", "W_noise"):
        g = P[name].grad.numpy()
        R.close(m.grads[name], g, rtol=1e-4, atol=1e-4 * np.abs(g).max(), what=f"grad {name}")
    R.close(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-4 * np.abs(xt.grad.numpy()).max(),
            what="dx")
    for name in ("W1", "b1", "W2", "b2"):
        assert not m.grads[name].any(), name  # the loss reaches the router only
    return m.grads["W_g"], m.stats["load_before"], float(ref["aux_loss"].detach())


@pytest.mark.parametrize("seed", [0, 1])
def test_balancing_gradient_of_a_confident_router_matches_torch(seed):
    one_each = [[e] for e in range(E)]
    collided = [[0, 1], [], *[[e] for e in range(2, E)]]  # expert 1 is nobody's first choice
    g_even, load_even, aux_even = aux_gradients(one_each, seed)
    g_coll, load_coll, aux_coll = aux_gradients(collided, seed)
    assert min(load_coll) < 0.2 * min(load_even)  # expert 1 only gets second choices
    # k·α = 0.02 is the loss's floor; the collision costs little above it, and the loss
    # pushes harder against it than against the even routing's sampling noise.
    assert 0.02 < aux_even < aux_coll < 0.03
    assert np.linalg.norm(g_coll) > np.linalg.norm(g_even)
